"""Lens: the MoE Lens paper's early-decoding analysis of the top-1 expert alone vs the top-k ensemble."""

from compressor.lens.runner import LensOptions, lens_model
from compressor.lens.schema import LENS_FORMAT_VERSION, LensReport

__all__ = ["LENS_FORMAT_VERSION", "LensOptions", "LensReport", "lens_model"]
