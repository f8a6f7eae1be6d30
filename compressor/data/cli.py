"""`moe-compress data fetch|list`."""

from __future__ import annotations

from pathlib import Path

import click

from compressor.data.demo import DEMO_DOMAINS, SPLITS, describe_domain, fetch_sources, sources_dir


@click.group()
def data() -> None:
    """The demo domains: fetch their sources, list them."""


@data.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where to unpack (default: $MOE_COMPRESS_SOURCES or ~/.cache/moe-compress/sources)")
def fetch(directory):
    """Unpack the Debian packages that hold demo texts (apt-get download + dpkg-deb, no system install)."""
    where = fetch_sources(directory)
    click.echo(f"demo sources are in {where}")
    if where.resolve() != sources_dir().resolve():
        click.echo(f"to use them, set MOE_COMPRESS_SOURCES={where}")


@data.command("list")
def list_domains():
    """Each demo domain: availability, documents per split, source and license (extracts on first use)."""
    click.echo(f"{'domain':8} {'available':9} " + " ".join(f"{s:>11}" for s in SPLITS) + "  source (license)")
    for name in DEMO_DOMAINS:
        info = describe_domain(name)
        counts = info.get("documents", {})
        cells = " ".join(f"{counts.get(s, '-'):>11}" for s in SPLITS)
        click.echo(f"{name:8} {'yes' if info['available'] else 'no':9} {cells}  {info['source']} ({info['license']})")
        if not info["available"]:
            click.echo(f"{'':8} {info['problem']}")
    click.echo(f"sources and cached documents: {sources_dir()}")
