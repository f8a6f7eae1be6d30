"""Routing concentration figures and summary of a profile: heatmaps, top-expert share, coverage curves."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.profiling.schema import Profile


@dataclass
class Concentration:
    """How concentrated one domain's routing is, over the MoE layers."""

    domain: str
    tokens: int
    top_share_median: float  # most-used expert's share of tokens, median over layers
    top_share_max: float
    top_share_max_layer: int
    cover50_min: int  # experts needed to cover 50% of routing decisions
    cover50_median: float
    cover50_max: int


def selection_matrix(profile: Profile, domain: str) -> tuple[list[int], np.ndarray]:
    """(layers, [layers x experts] selection counts) of one domain."""
    layers = sorted(profile.domains[domain].layers, key=int)
    counts = np.array([profile.domains[domain].layers[layer].selected for layer in layers], dtype=np.float64)
    return [int(layer) for layer in layers], counts


def coverage_curve(counts: np.ndarray) -> np.ndarray:
    """Share of routing decisions covered by the N most-used experts, N = 1..E (per row)."""
    ranked = -np.sort(-counts, axis=-1)
    return np.cumsum(ranked, axis=-1) / ranked.sum(axis=-1, keepdims=True)


def experts_to_cover(counts: np.ndarray, share: float) -> np.ndarray:
    """Fewest experts whose selections cover `share` of the routing decisions (per row)."""
    return (coverage_curve(counts) < share - 1e-12).sum(axis=-1) + 1


def concentration(profile: Profile, domain: str) -> Concentration:
    layers, counts = selection_matrix(profile, domain)
    tokens = counts.sum(axis=-1) / profile.model.top_k
    top_share = counts.max(axis=-1) / tokens
    best = int(np.argmax(top_share))
    cover = experts_to_cover(counts, 0.5)
    return Concentration(
        domain=domain,
        tokens=profile.domains[domain].tokens,
        top_share_median=float(statistics.median(top_share.tolist())),
        top_share_max=float(top_share[best]),
        top_share_max_layer=layers[best],
        cover50_min=int(cover.min()),
        cover50_median=float(statistics.median(cover.tolist())),
        cover50_max=int(cover.max()),
    )


def concentration_table(profile: Profile) -> str:
    rows = [
        "| domain | tokens | top expert share, median over layers | max (layer) | experts for 50% of decisions (min / median / max) |",
        "|---|---|---|---|---|",
    ]
    for domain in profile.domains:
        c = concentration(profile, domain)
        rows.append(
            f"| {domain} | {c.tokens} | {100 * c.top_share_median:.1f}% | {100 * c.top_share_max:.1f}% "
            f"({c.top_share_max_layer}) | {c.cover50_min} / {c.cover50_median:g} / {c.cover50_max} |"
        )
    return "\n".join(rows)


def write_profile_figures(profile: Profile, directory: Path) -> list[Path]:
    """Per-domain heatmap, top-expert share per layer, coverage curves; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    k = profile.model.top_k
    for domain in profile.domains:
        layers, counts = selection_matrix(profile, domain)
        tokens = counts.sum(axis=-1, keepdims=True) / k
        share = counts / tokens
        fig, ax = plt.subplots(figsize=(10, 0.25 * len(layers) + 2))
        image = ax.imshow(100 * share, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("routed expert")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"{domain}: share of tokens routed to each expert (top-{k})")
        fig.colorbar(image, ax=ax, label="% of tokens")
        written.append(save_figure(fig, directory / f"heatmap-{_slug(domain)}.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for domain in profile.domains:
        layers, counts = selection_matrix(profile, domain)
        tokens = counts.sum(axis=-1) / k
        ax.plot(layers, 100 * counts.max(axis=-1) / tokens, marker="o", label=domain)
    ax.axhline(100 * k / counts.shape[-1], color="grey", linestyle="--", label="uniform routing")
    integer_ticks(ax.xaxis)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("most-used expert's share of tokens (%)")
    ax.set_title("Top-expert share per layer")
    ax.legend(fontsize="small")
    written.append(save_figure(fig, directory / "top-expert-share.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for domain in profile.domains:
        _, counts = selection_matrix(profile, domain)
        curve = coverage_curve(counts).mean(axis=0)
        ax.plot(range(1, len(curve) + 1), 100 * curve, label=domain)
    integer_ticks(ax.xaxis)
    ax.set_xlabel("number of most-used experts kept (per layer)")
    ax.set_ylabel("routing decisions covered (%, mean over layers)")
    ax.set_title("Coverage curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    written.append(save_figure(fig, directory / "coverage.png"))
    return written


def write_profile_report(profile: Profile, directory: Path) -> tuple[Path, list[Path]]:
    """Figures plus `summary.md` with the concentration table; returns the summary's path and the figures."""
    figures = write_profile_figures(profile, directory)
    summary = directory / "summary.md"
    summary.write_text(profile_summary(profile, figures))
    return summary, figures


def profile_summary(profile: Profile, figures: list[Path]) -> str:
    """Markdown: the profile's concentration table and its figures (by file name)."""
    lines = [
        f"# Routing profile of {profile.model.source}",
        "",
        f"Family `{profile.model.family}`, top-{profile.model.top_k} routing, "
        f"{len(profile.model.moe_layers)} MoE layers, statistics: {', '.join(sorted(profile.statistics_available()))}.",
        "",
        "## Concentration",
        "",
        concentration_table(profile),
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{path.stem}]({path.name})" for path in figures]
    return "\n".join(lines) + "\n"


def integer_ticks(axis) -> None:
    """Whole-number ticks only (layer indices, expert counts)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name)
