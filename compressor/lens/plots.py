"""Figures of a lens report: per domain, KL and agreement per layer, and the experts-kept curve as a heatmap."""

from __future__ import annotations

from pathlib import Path

from compressor.lens.schema import LensReport
from compressor.profiling.report import _slug, integer_ticks, save_figure


def write_lens_figures(report: LensReport, directory: Path) -> list[Path]:
    """One PNG per domain: left, KL(p(h_k) || p(h_1)) and the top-1 agreement per MoE layer; right, the mean
    KL(p(h_k) || p(h_j)) per layer and number of experts kept j. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, domain in report.domains.items():
        layers = sorted(domain.layers, key=int)
        stats = [domain.layers[layer] for layer in layers]
        x = [int(layer) for layer in layers]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
        k = report.model.top_k
        left.plot(x, [s.kl_topk_top1 for s in stats], marker="o", color="tab:red", label=f"KL(top-{k} || top-1)")
        left.set_xlabel("decoder layer")
        left.set_ylabel("KL, nats", color="tab:red")
        left.set_ylim(bottom=0)
        integer_ticks(left.xaxis)
        twin = left.twinx()
        twin.plot(x, [s.top1_agreement for s in stats], marker="s", color="tab:blue", label="top-1 agreement")
        twin.plot(x, [s.cosine for s in stats], marker="^", color="tab:green", label="cosine(h_k, h_1)")
        twin.set_ylim(0, 1.02)
        twin.set_ylabel("share / cosine")
        handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        left.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="upper center",
                    bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
        left.set_title(f"{name}: top-1 expert alone vs the top-{k} ensemble (early decoding)")
        curves = np.array([s.kl_by_experts for s in stats])
        image = right.imshow(curves, aspect="auto", cmap="magma_r", interpolation="nearest")
        right.set_yticks(range(len(layers)), layers)
        right.set_xticks(range(curves.shape[1]), [str(j) for j in range(1, curves.shape[1] + 1)])
        right.set_xlabel("experts kept (j highest-weight)")
        right.set_ylabel("decoder layer")
        right.set_title(f"KL(top-{k} || top-j), nats")
        fig.colorbar(image, ax=right)
        paths.append(save_figure(fig, directory / f"lens-{_slug(name)}.png"))
    return paths


def lens_rows(report: LensReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per domain and MoE layer, every metric of the lens, formatted."""
    k = report.model.top_k
    header = ["domain", "layer", f"KL(top-{k} ‖ top-1), nats", "top-1 agreement", "cosine(h_k, h_1)",
              f"next-token accuracy top-{k} / top-1", f"top-{k} agrees with the final prediction",
              f"KL(top-{k} ‖ top-j), j = 1..{k}"]
    rows = []
    for name, domain in report.domains.items():
        for layer in sorted(domain.layers, key=int):
            s = domain.layers[layer]
            rows.append([name, layer, f"{s.kl_topk_top1:.3f}", f"{100 * s.top1_agreement:.1f}%", f"{s.cosine:.3f}",
                         f"{100 * s.early_accuracy_topk:.1f}% / {100 * s.early_accuracy_top1:.1f}%",
                         f"{100 * s.final_agreement_topk:.1f}%", " ".join(f"{v:.3f}" for v in s.kl_by_experts)])
    return header, rows


def lens_headline(report: LensReport) -> list[str]:
    """One sentence per domain: mean agreement and cosine over layers, and the layer where top-1 differs most."""
    lines = []
    for name, domain in report.domains.items():
        stats = domain.layers.values()
        worst_layer, worst = max(domain.layers.items(), key=lambda item: item[1].kl_topk_top1)
        lines.append(f"{name}: {domain.tokens} tokens; the top-1 expert alone agrees with the top-{report.model.top_k} "
                     f"ensemble on {100 * sum(s.top1_agreement for s in stats) / len(stats):.1f}% of tokens, "
                     f"cosine {sum(s.cosine for s in stats) / len(stats):.3f} (means over layers); largest KL "
                     f"{worst.kl_topk_top1:.3f} nats at layer {worst_layer}")
    return lines


def lens_summary(report: LensReport, figures: list[Path]) -> str:
    """Markdown: the lens headline per domain, the full table and the figures (by file name)."""
    header, rows = lens_rows(report)
    lines = [f"# Lens of {report.model.source}", "",
             "Early decoding after each MoE layer: the top-1 expert alone (h_1) against the top-"
             f"{report.model.top_k} ensemble (h_k), both through the final norm and the unembedding.", ""]
    lines += [f"- {line}" for line in lens_headline(report)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *(f"![{path.stem}]({path.name})" for path in figures)]
    return "\n".join(lines) + "\n"
