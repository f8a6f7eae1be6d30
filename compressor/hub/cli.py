"""`moe-compress push OUT REPO_ID`."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("output", metavar="OUT", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="create the repo private (an existing repo keeps its visibility)")
@click.option("--revision", default=None, help="branch to push to (created from main if missing; default: main)")
@click.option("--commit-message", default=None, help="commit title (default: 'Upload OUT (moe-compress VERSION)')")
@click.option("--token", default=None, help="Hub token with write access (default: HF_TOKEN, else `hf auth login`'s)")
@click.option("--force", is_flag=True, help="push even though OUT's validation.json says validation failed")
def push(output, repo_id, private, revision, commit_message, token, force):
    """Upload the exported OUT (weights, config, plan, provenance, validation, model card, plots) to REPO_ID."""
    from compressor.hub import push_output

    url = push_output(output, repo_id, private=private, revision=revision, commit_message=commit_message,
                      token=token, force=force)
    click.echo(f"pushed {output} to {repo_id}: {url}")
