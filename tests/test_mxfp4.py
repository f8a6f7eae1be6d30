"""MXFP4 writing (`quantize_mxfp4`): the inverse of gpt-oss's layout, tied to transformers' own MXFP4 dequantizer.

Independent expectations: transformers' `convert_moe_packed_tensors` dequantizes what is written; the OCP MX rule
is restated here element by element (the group's largest |value| over the shared scale lies in [4, 8); each value
within half an e2m1 step of the original, or saturated at 6).
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from compressor.families.quantization import dequantize_mxfp4, quantize_mxfp4


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


def test_gaussian_weights_are_within_mxfp4s_error():
    weight = torch.randn(4, 256, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (4, 1024, 8, 16) and scales.shape == (4, 1024, 8)
    written = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    groups = weight.transpose(1, 2).unflatten(-1, (-1, 32))
    scale = torch.exp2(scales.double() - 127).float()[..., None]
    ratio = groups.abs().amax(-1, keepdim=True) / scale
    assert ratio.ge(4).all() and ratio.lt(8).all()  # 2^(floor(log2 amax) - 2)
    magnitude = groups.abs() / scale
    error = (written.transpose(1, 2).unflatten(-1, (-1, 32)) - groups).abs() / scale
    bound = torch.where(magnitude > 6, magnitude - 6, _half_steps(magnitude))  # saturated at 6 above it
    assert error.le(bound + 1e-6).all()
    relative = float((written - weight).norm() / weight.norm())
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
