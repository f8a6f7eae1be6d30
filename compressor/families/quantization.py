"""Quantized checkpoints on disk.

- Fine-grained FP8 (``quantization_config.quant_method: fp8`` with ``weight_block_size``: DeepSeek-V3/R1, MiniMax-M2
  and many Qwen3/GLM FP8 releases): each FP8 weight ``X.weight`` comes with ``X.weight_scale_inv`` [ceil(rows /
  block), ceil(cols / block)]; the weight is ``fp8 * scale`` block by block. Fitted weights are written re-quantized
  (`quantize`).
- MXFP4 (``quant_method: mxfp4``: gpt-oss): each fused expert parameter ``P`` is stored as ``P_blocks`` and
  ``P_scales``, expert axis first (`dequantize_mxfp4`). Fitted weights are written re-quantized (`quantize_mxfp4`),
  and `moe-compress quantize --scheme mxfp4` writes bf16 fused experts this way.

Export keeps or drops each expert's tensors together with their scales (raw bytes) and leaves
``quantization_config`` as it is; layer-by-layer stages dequantize on the fly. Any other method is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from compressor.errors import UserError

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MXFP4_PARTS = ("_blocks", "_scales")


COMPRESSED_TENSORS = "compressed-tensors"  # `moe-compress quantize` outputs: validated and served, not compressed


def method(config: Mapping) -> str | None:
    """``fp8``, ``mxfp4``, ``compressed-tensors`` or None (unquantized) for a checkpoint's config.json; UserError
    for other methods."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    name = quantization.get("quant_method") if isinstance(quantization, Mapping) else quantization
    if name not in ("fp8", "mxfp4", COMPRESSED_TENSORS):
        raise UserError(f"config.json: quantization_config method {name!r} is not supported; moe-compress reads "
                        "unquantized checkpoints, fine-grained FP8 (quant_method fp8 with weight_block_size) and "
                        "gpt-oss's MXFP4")
    return name


def block_size(config: Mapping) -> tuple[int, int] | None:
    """The FP8 block size of a checkpoint's config.json, None when not FP8; UserError for what moe-compress cannot
    read."""
    if method(config) != "fp8":
        return None
    quantization = config["quantization_config"]
    block = quantization.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise UserError(f"config.json: quantization_config (fp8) needs weight_block_size [rows, cols] of block "
                        f"scales, not {block!r} (per-tensor FP8 is not supported)")
    return int(block[0]), int(block[1])


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def quantize(weight: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, fp32 block scales) of a weight [rows, cols]: each block scaled so its largest value is the FP8
    type's largest."""
    rows, cols = weight.shape[-2:]
    padded = torch.zeros(-(-rows // block[0]) * block[0], -(-cols // block[1]) * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    scale = blocks.abs().amax(dim=(1, 3)) / torch.finfo(dtype).max
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(dtype)
    return quantized, scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """An FP8 weight [rows, cols] times its block scales, in fp32."""
    rows, cols = weight.shape[-2:]
    expanded = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    expanded = expanded.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.float() * expanded


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss's MXFP4 experts: `blocks` [E, out, G, 16] (two FP4 e2m1 values a byte, low nibble first) and `scales`
    [E, out, G] (E8M0 exponents of 32-value groups) -> the fp32 parameter [E, in, out] (in = 32 G)."""
    lut = torch.tensor(FP4_VALUES)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1).flatten(-2)  # [E,out,G,32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).transpose(-1, -2).contiguous()


def quantize_mxfp4(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `dequantize_mxfp4`, as the OCP MX spec quantizes: a parameter [E, in, out] (in a multiple of
    32) -> (blocks [E, out, in / 32, 16], scales [E, out, in / 32]), uint8.

    Each group of 32 input values shares the scale 2^(floor(log2 amax) - 2) (2 is e2m1's largest exponent; an
    all-zero group gets 2^-127, E8M0 0); its values are rounded to the nearest e2m1 value, ties to even, saturating
    at 6 (compressed-tensors' `cast_to_fp4`; a value that rounds to zero keeps its sign) and packed two a byte, low
    nibble first (its `pack_fp4_to_uint8`). A dequantized MXFP4 tensor whose every group holds a 4 or a 6 (as the
    OCP rule writes them) comes back byte for byte; any MXFP4 tensor comes back value for value. One expert at a
    time (bounded memory)."""
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    *lead, inputs, outputs = param.shape
    if inputs % 32:
        raise ValueError(f"MXFP4 needs an input width that is a multiple of 32, not {inputs}")
    experts = param.reshape(-1, inputs, outputs)
    blocks = torch.empty(experts.shape[0], outputs, inputs // 32, 16, dtype=torch.uint8)
    scales = torch.empty(experts.shape[0], outputs, inputs // 32, dtype=torch.uint8)
    for expert, weight in enumerate(experts):
        groups = weight.float().t().unflatten(-1, (-1, 32))  # [out, G, 32]
        amax = groups.abs().amax(-1)
        exponent = torch.where(amax > 0, torch.frexp(amax).exponent - 3, -127).clamp(-127, 127)  # frexp: m 2^k, m<1
        scaled = groups / torch.exp2(exponent.double()).float()[..., None]  # exact: a power of two
        values = torch.copysign(cast_to_fp4(scaled), scaled)
        blocks[expert] = pack_fp4_to_uint8(values.reshape(-1, 32)).view(outputs, inputs // 32, 16)
        scales[expert] = (exponent + 127).to(torch.uint8)
    return blocks.view(*lead, outputs, inputs // 32, 16), scales.view(*lead, outputs, inputs // 32)
