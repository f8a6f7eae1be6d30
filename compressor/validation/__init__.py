"""Validation: compare original and compressed models."""

from compressor.validation.perplexity import perplexity

__all__ = ["perplexity"]
