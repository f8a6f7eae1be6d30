"""Export: rewrite a checkpoint shard by shard according to a plan, with routing compensation."""

from compressor.export.exporter import COMPENSATIONS, ExportOptions, ExportResult, export_checkpoint

__all__ = ["COMPENSATIONS", "ExportOptions", "ExportResult", "export_checkpoint"]
