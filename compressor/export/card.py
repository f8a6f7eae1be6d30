"""The exported checkpoint's model card (README.md)."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from compressor.serving.check import PLUGIN_INSTALL


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.2f}M"


def _source_license(source_dir: Path | None) -> str | None:
    """The license in the source checkpoint's model card metadata, if it has one."""
    card = source_dir / "README.md" if source_dir is not None else None
    if card is None or not card.is_file():
        return None
    try:
        return ModelCard.load(card).data.license
    except Exception:  # noqa: BLE001 - a card we cannot parse just has no license to carry over
        return None


def _targets(plan) -> list[str]:
    """The domains the plan chose experts for (all profiled domains when it did not weight any)."""
    parameters = plan.strategy.parameters if plan.strategy else {}
    return list(parameters.get("domains") or {})


def write_basic_card(directory: Path, path_hint: str, family, config: dict, plan, provenance: dict,
                     validation=None, source_dir: Path | None = None) -> Path:
    """Model card: what was done, experts kept per layer, top-k, compensation, size before/after, how to load,
    the domains the experts were chosen for and what the other domains lose."""
    kept = plan.kept()
    counts = {layer: len(experts) for layer, experts in kept.items()}
    uniform = len(set(counts.values())) == 1
    out_bytes = provenance["bytes"]
    base = provenance["source_model"]
    hub_source = "/" in base and not Path(base).exists()
    license_id = _source_license(source_dir)
    data = ModelCardData(
        base_model=base if hub_source else None,
        license=license_id or "other",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "expert-pruning", family.name, "moe-compress"],
    )
    total = sum(family.num_experts(config, layer) for layer in kept)
    source_name = Path(base).name if not hub_source else base
    kept_text = (f"{next(iter(counts.values()))} of {family.num_experts(config, next(iter(kept)))} experts per layer"
                 if uniform else f"{sum(counts.values())} of {total} experts")
    title = f"{source_name}, pruned to {kept_text}, top-{plan.top_k}"
    targets = _targets(plan)
    rows = "\n".join(
        f"| {layer} | {counts[layer]} / {family.num_experts(config, layer)} | {', '.join(map(str, experts))} |"
        for layer, experts in sorted(kept.items())
    )
    not_native = family.native_transformers_support(config, kept, plan.top_k, ungroup=plan.ungroup)
    ships_code = "auto_map" in json.loads((directory / "config.json").read_text())  # written with the runtime files
    loading = [
        "```python",
        *(["import compressor  # moe-compress registers its modeling code"] if ships_code else []),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{path_hint}"  # this directory, or its Hub repo id',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        'inputs = tokenizer("def fibonacci(n):", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```",
    ]
    if ships_code:
        loading += [
            "",
            f"Without moe-compress installed: `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` "
            f"(the directory ships the modeling code). Why: {not_native}.",
        ]
    elif not_native:
        loading += ["", f"Note: {not_native}."]
    flag = " --trust-remote-code" if family.vllm_reads_shipped_config else ""
    serve = (f"`vllm serve {path_hint}{flag}` (check it first: `moe-compress serve-check {path_hint}`)")
    if uniform:
        loading += ["", f"Serve with vLLM: {serve}."]
        if family.vllm_cpu_plugin_routing:
            loading[-1] += (" On vLLM's CPU build, install moe-compress's vLLM plugin there first "
                            f"({PLUGIN_INSTALL}): that build routes {family.name} as transformers does only with it.")
    elif family.vllm_per_layer_architecture:
        loading += [
            "",
            "This plan keeps different numbers of experts per layer, which vLLM's own model classes cannot hold: "
            f"vLLM serves it with moe-compress's vLLM plugin, which registers `{family.vllm_per_layer_architecture}` "
            f"(the architecture config.json names) as vLLM's class with each MoE layer at its own count. Install "
            f"it where vLLM is ({PLUGIN_INSTALL}), then serve with {serve}.",
        ]
    else:
        loading += [
            "",
            "This plan keeps different numbers of experts per layer: vLLM and plain transformers need the same "
            "count in every layer, so load it with moe-compress's modeling code (above).",
        ]
    text = "\n".join(
        [
            "---",
            data.to_yaml(),
            "---",
            "",
            f"# {title}",
            "",
            f"`{base}` with its least-used routed experts removed by moe-compress {provenance['tool_version']}.",
            "",
            *_scope_section(targets, validation),
            f"- routed experts kept: {sum(counts.values())} of "
            f"{sum(family.num_experts(config, layer) for layer in kept)} over {len(kept)} MoE layers"
            f" ({'uniform' if uniform else 'per-layer counts'})",
            f"- routing: top-{plan.top_k} (was top-{family.top_k(config)})"
            f"{', expert groups removed (plain top-k)' if plan.ungroup and plan.model.expert_groups else ''}; "
            f"compensation: `{provenance['compensation']}`"
            f"{_fit_summary(provenance.get('fit') or {})}",
            f"- size: {_size(out_bytes)} of weights, {_count(provenance['parameters'])} parameters "
            f"(was {_size(provenance['source_bytes'])}, {_count(provenance['source_parameters'])})",
            f"- plan strategy: {plan.strategy.name if plan.strategy else 'hand-written'}",
            "",
            "## How to load",
            "",
            *[line for line in loading if line is not None],
            "",
            *_validation_section(validation),
            "## Experts kept per layer (original ids)",
            "",
            "| layer | kept / total | experts |",
            "|---|---|---|",
            rows,
            "",
            "The plan is in `compression_plan.json`, provenance (tool version, source, plan hash, settings) in "
            "`moe_compress_provenance.json`.",
            "",
        ]
    )
    card = ModelCard(text)
    path = directory / "README.md"
    card.save(path)
    return path


def _scope_section(targets: list[str], report) -> list[str]:
    """Which domains the experts were chosen for, and a warning with the measured loss elsewhere."""
    if not targets:
        return ["The experts were chosen on all profiled domains together.", ""]
    lines = [f"The experts were chosen for: **{', '.join(targets)}**. Text of other kinds loses more.", ""]
    if report is None:
        return lines + ["> **Warning:** other domains were not measured; validate on the text you will run it on.", ""]
    off = {name: d.perplexity_increase for name, d in report.domains.items() if name not in targets}
    if off:
        measured = ", ".join(f"{name} {100 * change:+.1f}%" for name, change in off.items())
        lines += [f"> **Warning:** measured perplexity change outside the target domains: {measured}.", ""]
    else:
        lines += ["> **Warning:** only the target domains were validated; other text was not measured.", ""]
    return lines


def _validation_section(report) -> list[str]:
    if report is None:
        return ["## Validation", "", "Not validated (exported with `--no-validate` or without held-out data).", ""]
    verdict = "**passed**" if report.passed else "**FAILED**: " + "; ".join(report.failures)
    lines = ["## Validation", "", f"Held-out tokens, original vs compressed: {verdict}.", "",
             "| domain | tokens | perplexity original | perplexity compressed | change | KL | top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for name, d in report.domains.items():
        lines.append(f"| {name} | {d.tokens} | {d.perplexity_original:.3f} | {d.perplexity_compressed:.3f} | "
                     f"{100 * d.perplexity_increase:+.1f}% | {d.kl_mean:.4f} | {100 * d.top1_agreement:.1f}% |")
    worst = min(report.layers.items(), key=lambda item: item[1].cosine_mean)
    lines += ["", f"Lowest hidden-state cosine: layer {worst[0]}, mean {worst[1].cosine_mean:.4f} "
              f"(5th percentile {worst[1].cosine_p5:.4f}). Full report: `validation.json`.", ""]
    if report.throughput is not None:
        t = report.throughput
        lines += [f"Forward throughput on the validation batches ({t.device}, {t.threads} threads): "
                  f"{t.original_tokens_per_second:,.0f} tokens/s original, {t.compressed_tokens_per_second:,.0f} "
                  f"compressed.", ""]
    if report.tasks:
        headers, rows = report.task_table()
        lines += [f"Tasks (lm-evaluation-harness, both models on the same documents{_limit(report)}):", "",
                  "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                  *("| " + " | ".join(row) + " |" for row in rows), ""]
    lines += ["![perplexity](plots/perplexity.png)", "", "![cosine](plots/cosine.png)", ""]
    return lines


def _limit(report) -> str:
    limit = report.settings.get("tasks", {}).get("limit")
    return f", the first {limit} per task" if limit else ""


def _fit_summary(fit: dict) -> str:
    """' (fitted on N calibration tokens[, then S end-to-end steps])' for fitted modes, else ''."""
    if not fit:
        return ""
    end_to_end = fit.get("end_to_end")
    steps = f", then {end_to_end['steps']} end-to-end steps" if end_to_end else ""
    return f" (fitted layer by layer on {fit['calibration_tokens']:,} calibration tokens{steps})"
