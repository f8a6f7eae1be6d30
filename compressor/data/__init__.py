"""Calibration and evaluation data: demo domains, data sources (`NAME=SOURCE`), batching."""

from compressor.data.demo import (
    DEMO_DOMAINS,
    SPLITS,
    demo_documents,
    describe_domain,
    fetch_sources,
    sources_dir,
)

__all__ = ["DEMO_DOMAINS", "SPLITS", "demo_documents", "describe_domain", "fetch_sources", "sources_dir"]
