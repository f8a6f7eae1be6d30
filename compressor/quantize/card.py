"""The quantized output's model card: the export's card with a quantization section (scheme, sizes, validation)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from compressor.export.card import _size, _validation_section


def write_quantized_card(directory: Path, source: Path, path_hint: str, provenance: dict, validation=None) -> Path:
    """README.md of `directory`: `source`'s card, tagged and with a `## Quantization` section after its title."""
    q = provenance["quantization"]
    card = ModelCard.load(source / "README.md") if (source / "README.md").is_file() else ModelCard("---\n---\n")
    card.data.tags = [*(card.data.tags or []), "compressed-tensors", q["scheme"]]
    groups = f", groups of {q['group_size']} input columns" if q["group_size"] else ""
    section = [
        "## Quantization",
        "",
        f"Quantized after pruning by moe-compress {q['tool_version']}: scheme `{q['scheme']}` (compressed-tensors "
        f"format `{q['format']}`{groups}), {q['method']}, {q['weights_quantized']} linear weights of the decoder "
        "layers; embeddings, norms, routers and lm_head are not quantized.",
        "",
        f"- size: {_size(q['bytes'])} of weights (the unquantized export: {_size(q['source_bytes'])}; the original "
        f"model: {_size(provenance['source_bytes'])})",
        f"- load: `AutoModelForCausalLM.from_pretrained(\"{path_hint}\")` (transformers dequantizes with "
        "compressed-tensors installed); serve with vLLM as below (vLLM's CPU build serves w4a16 only)",
        *([f"- vLLM's CPU build: {q['vllm_cpu']}; serve it with a GPU build"] if q.get("vllm_cpu") else []),
        "",
        "The sections after this one describe the unquantized export; its validation report is "
        "`export_validation.json` (plots in `export_plots/`).",
        "",
    ]
    if validation is None:
        section += ["The quantized model was not validated.", ""]
    else:
        lines = _validation_section(validation)
        lines[0] = "### Validation of the quantized model (original vs pruned + quantized)"
        section += [line for line in lines if "plots/" not in line]
    text = card.content
    head, title, rest = text.partition("\n# ")
    first_line, _, body = rest.partition("\n")
    body = body.replace("](plots/", "](export_plots/").replace("Full report: `validation.json`",
                                                                  "Full report: `export_validation.json`")
    text = f"{head}\n# {first_line} ({q['scheme']})\n\n" + "\n".join(section) + "\n" + body.lstrip("\n")
    card = ModelCard(text)
    path = directory / "README.md"
    card.save(path)
    return path
