"""Quantization of exported checkpoints into compressed-tensors format (the format vLLM loads), or into the MXFP4 format
of families whose experts are fused on disk."""

from compressor.quantize.quantizer import ALL_SCHEMES, SCHEMES, QuantizeOptions, QuantizeResult, quantize_checkpoint

__all__ = ["ALL_SCHEMES", "SCHEMES", "QuantizeOptions", "QuantizeResult", "quantize_checkpoint"]
