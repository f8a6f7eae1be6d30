"""MXFP4 writing: `quantize_mxfp4`, the inverse of gpt-oss's layout, tied to transformers' own MXFP4 dequantizer,
and `moe-compress quantize --scheme mxfp4` on a tiny bf16 gpt-oss export.

Independent expectations: transformers' `convert_moe_packed_tensors` dequantizes what is written; the OCP MX rule
is restated here element by element (the group's largest |value| over the shared scale lies in [4, 8); each value
within half an e2m1 step of the original, or saturated at 6); the config is the one OpenAI publishes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from compressor.families.quantization import dequantize_mxfp4, quantize_mxfp4
from helpers import run_cli, write_jsonl
from test_families_end_to_end import COMMON, FAMILIES, VOCAB, _decisive, disk, keep_for, mxfp4_reading, write_plan

GPT_OSS_MXFP4 = {"quant_method": "mxfp4", "modules_to_not_convert": [  # openai/gpt-oss-20b's config.json
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def _packed(generator, experts=3, outputs=24, groups=5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks and scales as the OCP rule writes them: each group holds a 4 or a 6 (of either sign);
    one all-zero group (+0 and -0) with the scale an all-zero group gets (E8M0 0)."""
    nibbles = torch.randint(0, 16, (experts, outputs, groups, 32), generator=generator, dtype=torch.uint8)
    nibbles[..., 7] = torch.tensor([6, 7, 14, 15], dtype=torch.uint8)[
        torch.randint(0, 4, nibbles.shape[:-1], generator=generator)]
    scales = torch.randint(100, 150, (experts, outputs, groups), generator=generator, dtype=torch.uint8)
    nibbles[1, 2, 3] = torch.tensor([0, 8] * 16, dtype=torch.uint8)
    scales[1, 2, 3] = 0
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scales


def test_a_dequantized_mxfp4_tensor_comes_back_byte_for_byte():
    blocks, scales = _packed(torch.Generator().manual_seed(0))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' dequantizer
    assert theirs.shape == (3, 5 * 32, 24)
    assert torch.equal(dequantize_mxfp4(blocks, scales), theirs)
    requantized = quantize_mxfp4(theirs)
    assert requantized[0].dtype == requantized[1].dtype == torch.uint8
    assert torch.equal(requantized[0], blocks) and torch.equal(requantized[1], scales)
    assert (blocks & 0x0F).eq(8).any()  # -0 is written as such


def test_any_mxfp4_tensor_comes_back_value_for_value():
    """Groups without a 4 or a 6 (as rules that round the scale up write them) get a smaller scale, same values."""
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 16, 3, 16), generator=generator, dtype=torch.uint8) & 0x55  # codes <= 1.0
    scales = torch.randint(110, 140, (2, 16, 3), generator=generator, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    again, new_scales = quantize_mxfp4(theirs)
    assert torch.equal(convert_moe_packed_tensors(again, new_scales, dtype=torch.float32), theirs)
    assert not torch.equal(new_scales, scales)


def _half_steps(magnitude: torch.Tensor) -> torch.Tensor:
    """Half the e2m1 spacing around |value| / scale (0.5 up to 2, 1 up to 4, 2 up to 6)."""
    return torch.where(magnitude <= 2, 0.25, torch.where(magnitude <= 4, 0.5, 1.0))


def assert_ocp_mxfp4(weight: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> float:
    """`blocks` / `scales` are the OCP MX quantization of `weight` [E, in, out]; its relative error (Frobenius)."""
    weight = weight.float()
    experts, inputs, outputs = weight.shape
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (experts, outputs, inputs // 32, 16) and scales.shape == (experts, outputs, inputs // 32)
    written = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    groups = weight.transpose(1, 2).unflatten(-1, (-1, 32))
    scale = torch.exp2(scales.double() - 127).float()[..., None]
    ratio = groups.abs().amax(-1, keepdim=True) / scale
    assert ratio.ge(4).all() and ratio.lt(8).all()  # 2^(floor(log2 amax) - 2)
    magnitude = groups.abs() / scale
    error = (written.transpose(1, 2).unflatten(-1, (-1, 32)) - groups).abs() / scale
    bound = torch.where(magnitude > 6, magnitude - 6, _half_steps(magnitude))  # saturated at 6 above it
    assert error.le(bound + 1e-6).all()
    return float((written - weight).norm() / weight.norm())


def test_gaussian_weights_are_within_mxfp4s_error():
    weight = torch.randn(4, 256, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    relative = assert_ocp_mxfp4(weight, *quantize_mxfp4(weight))
    assert 0.105 < relative < 0.125, relative  # measured 0.115 (E8M0 scales, 32-value groups, e2m1 elements)


def test_ties_go_to_the_even_value_and_zero_groups_get_a_valid_scale():
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -0.1, 6.0] + [0.0] * 21)
    weight = torch.stack([values, torch.zeros(32)], dim=-1)[None]  # [1, 32 in, 2 out]
    blocks, scales = quantize_mxfp4(weight)
    assert scales.tolist() == [[[127], [0]]]
    assert dequantize_mxfp4(blocks, scales)[0, :11, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0,
                                                                    -0.0, 6.0]
    assert blocks[0, 0, 0, 4] == 8 | (8 << 4)  # -0.25 and -0.1: -0
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.zeros(1, 48, 2))


def _export(root: Path, name: str, **overrides) -> Path:
    """A tiny bf16 checkpoint of family `name` exported (4 experts kept a layer, compensation none)."""
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions, export_checkpoint
    from compressor.planning import Plan

    config_class, model_class, extra, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **extra, **overrides})).eval()
    _decisive(model, torch.Generator().manual_seed(1))
    model.to(torch.bfloat16).save_pretrained(root / name)
    plan = Plan.load(write_plan(root / name, root / f"{name}.json", keep_for(model), 1))
    export_checkpoint(str(root / name), plan, root / f"{name}-out", ExportOptions(
        run=RunOptions(progress=False), validation=ExportValidation(enabled=False)))
    return root / f"{name}-out"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mxfp4-quantize")
    rng = random.Random(0)
    rows = write_jsonl(root / "rows.jsonl", [[rng.randrange(2, VOCAB) for _ in range(12)] for _ in range(6)])
    return {"rows": rows, "gpt_oss": _export(root, "gpt_oss", intermediate_size=32), "mixtral": _export(root, "mixtral")}


def test_quantize_mxfp4_writes_gpt_oss_format_that_loads_and_validates(exports, tmp_path, capsys):
    source, out = exports["gpt_oss"], tmp_path / "mxfp4"
    code, stdout, err = run_cli(["quantize", source, "-o", out, "--scheme", "mxfp4", "--validate-on",
                                 f"r={exports['rows']}", "--seq-len", "16", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "mxfp4, 6 weights quantized" in stdout
    config, exported = (json.loads((d / "config.json").read_text()) for d in (out, source))
    assert config.pop("quantization_config") == GPT_OSS_MXFP4 and config == exported
    original, written = disk(source), disk(out)
    fused = {f"model.layers.{layer}.mlp.experts.{part}" for layer in range(3) for part in ("gate_up_proj", "down_proj")}
    assert set(written) == (set(original) - fused) | {n + p for n in fused for p in ("_blocks", "_scales")}
    for name in set(original) - fused:  # biases, router, attention, norms, embeddings: as exported, byte for byte
        assert torch.equal(written[name].view(torch.uint8), original[name].view(torch.uint8)), name
    errors = [assert_ocp_mxfp4(original[name], written[name + "_blocks"], written[name + "_scales"])
              for name in sorted(fused)]
    assert 0.05 < max(errors) < 0.2, errors
    quantization = json.loads((out / "moe_compress_provenance.json").read_text())["quantization"]
    assert (quantization["scheme"], quantization["format"], quantization["group_size"],
            quantization["weights_quantized"]) == ("mxfp4", "mxfp4", 32, 6)
    card = (out / "README.md").read_text()
    assert "(mxfp4)" in card and "scheme `mxfp4` (`quant_method: mxfp4`" in card
    assert "compressed-tensors" not in card.partition("---\n")[2].partition("---\n")[0]  # not a tag
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["domains"]["r"]["perplexity_compressed"] > 0
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():  # transformers dequantizes on CPU: what our reading of the written tensors computes
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits,
            mxfp4_reading(out)(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_quantize_refuses_what_its_format_cannot_hold_in_one_line(exports, tmp_path, capsys):
    narrow = _export(tmp_path, "gpt_oss")  # expert width 16: not groups of 32
    for source, scheme, message in (
            (exports["gpt_oss"], "w4a16", "(fused on disk); the compressed-tensors schemes need checkpoints that "
                                          "store each expert's projections separately; --scheme mxfp4 writes this "
                                          "family's MXFP4 format"),
            (exports["mixtral"], "mxfp4", "--scheme mxfp4 writes the MXFP4 format of families that store their "
                                          "experts fused on disk; mixtral has none"),
            (narrow, "mxfp4", "model.layers.0.mlp.experts.down_proj has 16 inputs, not a multiple of 32")):
        out = tmp_path / f"refused-{scheme}"
        code, _, err = run_cli(["quantize", source, "-o", out, "--scheme", scheme, "--no-validate"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and not out.exists(), err
