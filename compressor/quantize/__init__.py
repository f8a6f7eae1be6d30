"""Quantization of exported checkpoints into compressed-tensors format (the format vLLM loads)."""

from compressor.quantize.quantizer import SCHEMES, QuantizeOptions, QuantizeResult, quantize_checkpoint

__all__ = ["SCHEMES", "QuantizeOptions", "QuantizeResult", "quantize_checkpoint"]
