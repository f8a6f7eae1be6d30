"""One self-contained HTML page from a profile, a plan, a validation report and a lens report (any subset), plus
the PNGs and `summary.md`."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from compressor.errors import UserError


def load_artifact(path: Path):
    """A Profile, Plan, ValidationReport or LensReport, recognised by its content."""
    from compressor.lens.schema import LensReport
    from compressor.planning import Plan
    from compressor.profiling.schema import Profile
    from compressor.validation.schema import ValidationReport

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a profile, plan, validation or lens JSON file")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not JSON (expected a profile, plan, validation or lens report)") from None
    if isinstance(data, dict) and "compressed" in data:
        return ValidationReport.load(path)
    if isinstance(data, dict) and _is_lens(data):
        return LensReport.load(path)
    if isinstance(data, dict) and "domains" in data and "settings" in data:
        return Profile.load(path)
    if isinstance(data, dict) and "layers" in data and "top_k" in data:
        return Plan.load(path)
    raise UserError(f"{path} is neither a profile, a plan, a validation report nor a lens report")


def _is_lens(data: dict) -> bool:
    """Lens and profile files both hold domains of layers; only a lens layer has `kl_topk_top1`."""
    domains = data.get("domains")
    if not isinstance(domains, dict):
        return False
    layers = [layer for d in domains.values() if isinstance(d, dict) and isinstance(d.get("layers"), dict)
              for layer in d["layers"].values()]
    return any(isinstance(layer, dict) and "kl_topk_top1" in layer for layer in layers)


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(paths: list[Path], directory: Path, overwrite: bool = False) -> list[Path]:
    """Write `report.html` (figures embedded), the PNGs and, for profiles and lens reports, `summary.md` into the folder
    `directory`, atomically (an existing one is replaced only with `overwrite`); returns the pages written."""
    from compressor.io.atomic import atomic_directory, check_writable_target

    artifacts = [load_artifact(path) for path in paths]
    _check_related(list(zip(paths, artifacts)))
    check_writable_target(directory, overwrite, directory=True)
    with atomic_directory(directory, overwrite) as staging:
        pages = [directory / page.name for page in _write_pages(artifacts, staging)]
    return pages


def _check_related(named: list) -> None:
    """A plan given with a profile must come from that profile (its profile_hash), so coverage means what it says."""
    from compressor.planning import Plan
    from compressor.profiling.schema import Profile

    profiles = [(path, a) for path, a in named if isinstance(a, Profile)]
    for path, plan in ((p, a) for p, a in named if isinstance(a, Plan)):
        if plan.profile_hash and profiles and all(plan.profile_hash != p.content_hash() for _, p in profiles):
            raise UserError(f"plan {path} was made from another profile than {profiles[0][0]} "
                            "(its profile_hash differs); give the profile it was made from")


def _write_pages(artifacts: list, directory: Path) -> list[Path]:
    from compressor.lens.plots import lens_headline, lens_rows, lens_summary, write_lens_figures
    from compressor.lens.schema import LensReport
    from compressor.planning import Plan
    from compressor.profiling.report import concentration, profile_summary, write_profile_figures
    from compressor.profiling.schema import Profile
    from compressor.validation.plots import write_validation_plots
    from compressor.validation.schema import ValidationReport

    sections, summaries = [], []
    for artifact in artifacts:
        if isinstance(artifact, Profile):
            figures = write_profile_figures(artifact, directory)
            summaries.append(profile_summary(artifact, figures))
            rows = []
            for domain in artifact.domains:
                c = concentration(artifact, domain)
                rows.append([domain, c.tokens, f"{100 * c.top_share_median:.1f}%",
                             f"{100 * c.top_share_max:.1f}% (layer {c.top_share_max_layer})",
                             f"{c.cover50_min} / {c.cover50_median:g} / {c.cover50_max}"])
            sections.append(
                f"<h2>Routing profile of {html.escape(artifact.model.source)}</h2>"
                + _table(["domain", "tokens", "top expert share (median over layers)", "max (layer)",
                          "experts covering 50% of decisions (min / median / max)"], rows)
                + "".join(_image(f, f.stem.replace("-", " ")) for f in figures)
            )
        elif isinstance(artifact, Plan):
            kept = artifact.kept()
            coverage = artifact.predicted_coverage or {}
            domains = list(coverage)
            rows = [[layer, f"{len(experts)} / {artifact.model.experts_per_layer[str(layer)]}",
                     ", ".join(map(str, experts))]
                    + [f"{100 * coverage[d].get(str(layer), 0):.1f}%" for d in domains]
                    for layer, experts in sorted(kept.items())]
            sections.append(
                f"<h2>Plan: top-{artifact.top_k}, compensation {html.escape(artifact.compensation)}</h2>"
                + _table(["layer", "kept / total", "kept experts (original ids)"]
                         + [f"routing retained: {d}" for d in domains], rows)
            )
        elif isinstance(artifact, ValidationReport):
            figures = write_validation_plots(artifact, directory) if artifact.domains else []
            verdict = "passed" if artifact.passed else "FAILED: " + "; ".join(artifact.failures)
            rows = [[n, d.tokens, f"{d.perplexity_original:.3f}", f"{d.perplexity_compressed:.3f}",
                     f"{100 * d.perplexity_increase:+.1f}%", f"{d.kl_mean:.4f}", f"{100 * d.top1_agreement:.1f}%"]
                    for n, d in artifact.domains.items()]
            sections.append(
                f"<h2>Validation: {html.escape(verdict)}</h2>"
                f"<p>{artifact.compressed.parameters / 1e6:.1f}M parameters "
                f"(original {artifact.original.parameters / 1e6:.1f}M).</p>"
                + (_table(["domain", "tokens", "perplexity original", "perplexity compressed", "change",
                           "KL (nats)", "top-1 agreement"], rows) if rows else "")
                + (_table(["decoder layer", "hidden-state cosine (mean)", "5th percentile"],
                          [[layer, f"{r.cosine_mean:.4f}", f"{r.cosine_p5:.4f}"]
                           for layer, r in sorted(artifact.layers.items(), key=lambda item: int(item[0]))])
                   if artifact.layers else "")
                + (_table(*artifact.task_table()) if artifact.tasks else "")
                + "".join(_image(f, f.stem) for f in figures)
            )
        elif isinstance(artifact, LensReport):
            figures = write_lens_figures(artifact, directory)
            summaries.append(lens_summary(artifact, figures))
            sections.append(
                f"<h2>Lens of {html.escape(artifact.model.source)}: top-1 expert vs top-{artifact.model.top_k} "
                "ensemble</h2>"
                + "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lens_headline(artifact)) + "</ul>"
                + _table(*lens_rows(artifact))
                + "".join(_image(f, f.stem.replace("-", " ")) for f in figures)
            )
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}figcaption{color:#666;font-size:90%}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>moe-compress report</title>"
            f"<style>{style}</style></head><body><h1>moe-compress report</h1>{''.join(sections)}</body></html>")
    out = directory / "report.html"
    out.write_text(page)
    if not summaries:
        return [out]
    summary = directory / "summary.md"
    summary.write_text("\n".join(summaries))
    return [out, summary]
