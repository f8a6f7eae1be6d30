"""Checkpoint input/output: lazy safetensors reading and streaming sharded writing."""

from compressor.io.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    MissingTensorError,
    TensorInfo,
)
from compressor.io.safetensors_format import dtype_name, encode_header, read_header, tensor_nbytes, torch_dtype
from compressor.io.writer import (
    PlannedShard,
    ShardedWriter,
    ShardWriter,
    TensorSpec,
    plan_shards,
    shard_filename,
    write_index,
)

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointReader",
    "MissingTensorError",
    "PlannedShard",
    "ShardWriter",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "dtype_name",
    "encode_header",
    "plan_shards",
    "read_header",
    "shard_filename",
    "tensor_nbytes",
    "torch_dtype",
    "write_index",
]
