"""Downstream task evaluation through lm-evaluation-harness (compressor.evaluation.harness) and the shipped tasks."""
