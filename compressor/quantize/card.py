"""The quantized output's model card: the export's card with a quantization section (scheme, sizes, validation)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard

from compressor.export.card import _size, _validation_section
from compressor.quantize.quantizer import MXFP4


def write_quantized_card(directory: Path, source: Path, path_hint: str, provenance: dict, validation=None) -> Path:
    """README.md of `directory`: `source`'s card, tagged and with a `## Quantization` section after its title."""
    q = provenance["quantization"]
    card = ModelCard.load(source / "README.md") if (source / "README.md").is_file() else ModelCard("---\n---\n")
    mxfp4 = q["format"] == MXFP4
    card.data.tags = [*(card.data.tags or []), *([] if mxfp4 else ["compressed-tensors"]), q["scheme"]]
    groups = f", groups of {q['group_size']} input columns" if q["group_size"] else ""
    if mxfp4:
        what = (f"(`quant_method: mxfp4`: the fused routed experts' weights as E2M1 `*_blocks` with E8M0 "
                f"`*_scales`{groups}), {q['method']}, {q['weights_quantized']} fused experts weights; everything "
                f"else is as in the export (not converted: {', '.join(f'`{m}`' for m in q['ignored'])}).")
        load = "(transformers dequantizes MXFP4 to bf16 unless its MXFP4 GPU kernels are installed)"
    else:
        what = (f"(compressed-tensors format `{q['format']}`{groups}), {q['method']}, {q['weights_quantized']} linear "
                "weights of the decoder layers; embeddings, norms, routers and lm_head are not quantized.")
        load = ("(transformers dequantizes with compressed-tensors installed); serve with vLLM as below (vLLM's CPU "
                "build serves w4a16 only)")
    section = [
        "## Quantization",
        "",
        f"Quantized after pruning by moe-compress {q['tool_version']}: scheme `{q['scheme']}` {what}",
        "",
        f"- size: {_size(q['bytes'])} of weights (the unquantized export: {_size(q['source_bytes'])}; the original "
        f"model: {_size(provenance['source_bytes'])})",
        f"- load: `AutoModelForCausalLM.from_pretrained(\"{path_hint}\")` {load}",
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
