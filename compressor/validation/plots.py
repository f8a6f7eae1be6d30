"""Figures of a validation report: perplexity per domain, hidden-state cosine per layer."""

from __future__ import annotations

from pathlib import Path

from compressor.profiling.report import integer_ticks, save_figure
from compressor.validation.schema import ValidationReport


def write_validation_plots(report: ValidationReport, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    names = list(report.domains)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4.5))
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], [report.domains[n].perplexity_original for n in names], 0.4,
           label="original")
    ax.bar([p + 0.2 for p in positions], [report.domains[n].perplexity_compressed for n in names], 0.4,
           label="compressed")
    for p, n in zip(positions, names):
        d = report.domains[n]
        ax.annotate(f"{100 * d.perplexity_increase:+.1f}%", (p + 0.2, d.perplexity_compressed),
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(list(positions), names)
    ax.set_ylabel("perplexity (held-out tokens)")
    ax.set_title("Perplexity per domain: original vs compressed")
    ax.legend()
    paths = [save_figure(fig, directory / "perplexity.png")]

    layers = sorted(report.layers, key=int)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([int(x) for x in layers], [report.layers[x].cosine_mean for x in layers], marker="o", label="mean")
    ax.plot([int(x) for x in layers], [report.layers[x].cosine_p5 for x in layers], marker="v", label="5th percentile")
    if report.thresholds.min_cosine is not None:
        ax.axhline(report.thresholds.min_cosine, color="red", linestyle="--", label="threshold")
    integer_ticks(ax.xaxis)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cosine similarity of hidden states")
    ax.set_title("Residual stream after each layer: original vs compressed")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(save_figure(fig, directory / "cosine.png"))
    return paths
