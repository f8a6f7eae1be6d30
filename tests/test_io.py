"""compressor.io: lazy safetensors checkpoint reading and streaming sharded writing."""

import copy
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from compressor.errors import UserError
from compressor.io import (
    CheckpointReader,
    MissingTensorError,
    ShardedWriter,
    ShardWriter,
    TensorSpec,
    plan_shards,
    write_index,
)
from compressor.modeling import DeepseekConfig, DeepseekForCausalLM

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=64,
)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DeepseekForCausalLM(DeepseekConfig(**TINY)).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def sharded_dir(tiny_model, tmp_path_factory):
    """The tiny model saved by transformers in many small shards (decoder layers straddle shards)."""
    path = tmp_path_factory.mktemp("sharded")
    tiny_model.save_pretrained(path, max_shard_size="8KB")
    return path


@pytest.fixture
def sharded_copy(sharded_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(sharded_dir, path)
    return path


def saved_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors as save_pretrained writes them (transformers reverts its in-memory fused experts to
    per-expert tensors), by on-disk name."""
    from transformers.core_model_loading import revert_weight_conversion

    return {name: t.contiguous() for name, t in revert_weight_conversion(model, model.state_dict()).items()}


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())


def _parse_header(file):
    """Independent header parse: (absolute data start, header dict)."""
    data = Path(file).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return 8 + length, json.loads(data[8 : 8 + length])


# -- reading ------------------------------------------------------------------------------------


def test_sharded_checkpoint_reads_back_tensor_identical(tiny_model, sharded_dir):
    index = _index(sharded_dir)
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) >= 4
    # Some decoder layer really straddles a shard boundary.
    layer_shards = {}
    for name, file in index["weight_map"].items():
        if name.startswith("model.layers."):
            layer_shards.setdefault(name.split(".")[2], set()).add(file)
    assert any(len(files) > 1 for files in layer_shards.values())

    state = saved_state(tiny_model)
    with CheckpointReader(sharded_dir) as reader:
        assert reader.names() == sorted(index["weight_map"]) == sorted(state)
        assert len(reader) == len(state) and "lm_head.weight" in reader
        assert reader.config["model_type"] == "deepseek" and reader.config["n_routed_experts"] == 8
        assert sorted(p.name for p in reader.shards()) == sorted(shard_files)
        for name, expected in state.items():
            got = reader.get(name)
            assert got.dtype == torch.bfloat16 and torch.equal(got, expected), name


def test_info_is_header_only_and_matches(tiny_model, sharded_dir):
    index = _index(sharded_dir)
    state = saved_state(tiny_model)
    reader = CheckpointReader(sharded_dir)
    headers = {file: _parse_header(sharded_dir / file) for file in set(index["weight_map"].values())}
    for name, tensor in state.items():
        info = reader.info(name)
        assert info.name == name
        assert info.dtype == tensor.dtype and info.shape == tuple(tensor.shape)
        assert info.shard == sharded_dir / index["weight_map"][name]
        assert info.nbytes == tensor.numel() * tensor.element_size()
        start, header = headers[info.shard.name]
        begin, end = header[name]["data_offsets"]
        assert info.data_offsets == (start + begin, start + end)
        meta = reader.meta(name)
        assert meta.device.type == "meta" and meta.dtype == tensor.dtype and meta.shape == tensor.shape
    assert reader.total_bytes == index["metadata"]["total_size"]
    with pytest.raises(MissingTensorError, match="model.layers.9.mlp.gate.weight"):
        reader.info("model.layers.9.mlp.gate.weight")
    with pytest.raises(KeyError):
        reader.get("nope")
    # tensors_in_shard: a partition of all names, each list in on-disk order.
    seen = []
    for shard in reader.shards():
        names = reader.tensors_in_shard(shard)
        assert names == sorted(names, key=lambda n: headers[shard.name][1][n]["data_offsets"][0])
        assert reader.tensors_in_shard(shard.name) == names
        seen += names
    assert sorted(seen) == reader.names()


def test_read_raw_is_the_exact_file_slice(tiny_model, sharded_dir):
    reader = CheckpointReader(sharded_dir)
    for name in ["model.embed_tokens.weight", "model.layers.1.mlp.experts.7.down_proj.weight", "model.norm.weight"]:
        info = reader.info(name)
        start, header = _parse_header(info.shard)
        begin, end = header[name]["data_offsets"]
        raw = reader.read_raw(name)
        assert raw == info.shard.read_bytes()[start + begin : start + end]
        assert raw == saved_state(tiny_model)[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    reader.close()
    assert reader.read_raw("model.norm.weight")  # handles reopen after close


def test_single_file_checkpoints(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").is_file()
    reader = CheckpointReader(tmp_path / "one")
    assert reader.names() == sorted(saved_state(tiny_model))
    assert [p.name for p in reader.shards()] == ["model.safetensors"]
    # A single safetensors file under another name is accepted too.
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(tmp_path / "one" / "config.json", other)
    shutil.copy(tmp_path / "one" / "model.safetensors", other / "weights.safetensors")
    reader = CheckpointReader(other)
    assert torch.equal(reader.get("lm_head.weight"), tiny_model.lm_head.weight)


# -- validation -----------------------------------------------------------------------------------


def test_missing_directory_and_file_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        CheckpointReader(tmp_path / "absent")
    (tmp_path / "f.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a directory"):
        CheckpointReader(tmp_path / "f.safetensors")


def test_missing_config(sharded_copy):
    (sharded_copy / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        CheckpointReader(sharded_copy)


def test_pickle_only_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek"}))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle-only weights are not supported .* convert to safetensors") as err:
        CheckpointReader(tmp_path)
    assert "\n" not in str(err.value)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no safetensors weights"):
        CheckpointReader(tmp_path)


def test_missing_shard(sharded_copy):
    victim = sorted(set(_index(sharded_copy)["weight_map"].values()))[1]
    (sharded_copy / victim).unlink()
    with pytest.raises(UserError, match=f"lists shard {victim}, which is missing"):
        CheckpointReader(sharded_copy)


def test_truncated_shard(sharded_copy):
    victim = sharded_copy / sorted(set(_index(sharded_copy)["weight_map"].values()))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(UserError, match=f"corrupt safetensors shard .*{victim.name}.*truncated"):
        CheckpointReader(sharded_copy)
    start, _ = _parse_header(sharded_copy / _index(sharded_copy)["weight_map"]["lm_head.weight"])
    victim.write_bytes(data[: start - 5])  # cut inside the JSON header
    with pytest.raises(UserError, match="truncated"):
        CheckpointReader(sharded_copy)
    victim.write_bytes(data[:3])  # not even a length prefix
    with pytest.raises(UserError, match="truncated"):
        CheckpointReader(sharded_copy)


def test_corrupt_header(sharded_copy):
    victim = sharded_copy / sorted(set(_index(sharded_copy)["weight_map"].values()))[0]
    data = bytearray(victim.read_bytes())
    data[8:12] = b"\xff\xfe#!"
    victim.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt safetensors shard .*not valid JSON"):
        CheckpointReader(sharded_copy)
    victim.write_bytes(struct.pack("<Q", 2**60) + bytes(data[8:]))
    with pytest.raises(UserError, match="corrupt safetensors shard"):
        CheckpointReader(sharded_copy)


def test_header_size_that_does_not_match_dtype_and_shape(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(UserError, match="corrupt safetensors shard .*needs 16"):
        CheckpointReader(tmp_path)


def test_name_in_index_missing_from_shard(sharded_copy):
    index = _index(sharded_copy)
    index["weight_map"]["model.layers.1.mlp.experts.99.up_proj.weight"] = index["weight_map"]["lm_head.weight"]
    (sharded_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="lists 'model.layers.1.mlp.experts.99.up_proj.weight' .* does not hold it"):
        CheckpointReader(sharded_copy)


def test_corrupt_index(sharded_copy):
    (sharded_copy / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid safetensors index"):
        CheckpointReader(sharded_copy)


def test_unsupported_dtype(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F4X", "shape": [2], "data_offsets": [0, 1]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(UserError, match="unsupported tensor dtype 'F4X'"):
        CheckpointReader(tmp_path)


def test_several_files_without_index(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"a": torch.zeros(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(UserError, match="2 .safetensors files but no model.safetensors.index.json"):
        CheckpointReader(tmp_path)


# -- writing --------------------------------------------------------------------------------------


def test_plan_shards_respects_max_size_and_order():
    entries = [(f"t{i}", size) for i, size in enumerate([40, 30, 30, 100, 150, 10, 10, 90, 5])]
    plan = plan_shards(entries, 100)
    assert [name for shard in plan for name in shard.names] == [name for name, _ in entries]
    sizes = dict(entries)
    for shard in plan:
        assert shard.nbytes == sum(sizes[n] for n in shard.names)
        assert shard.nbytes <= 100 or len(shard.names) == 1  # an oversized tensor sits alone
    assert [list(s.names) for s in plan] == [["t0", "t1", "t2"], ["t3"], ["t4"], ["t5", "t6"], ["t7", "t8"]]
    assert [s.filename for s in plan] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    single = plan_shards([TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.bfloat16, (3, 2))], 1 << 20)
    assert len(single) == 1 and single[0].filename == "model.safetensors" and single[0].nbytes == 16 + 12


def test_sharded_writer_output_loads_everywhere(tiny_model, sharded_dir, tmp_path):
    out = tmp_path / "out"
    source = CheckpointReader(sharded_dir)
    specs = [TensorSpec(n, source.info(n).dtype, source.info(n).shape) for n in source.names()]
    max_bytes = 12_000
    plan = plan_shards(specs, max_bytes)
    assert len(plan) > 3
    by_name = {s.name: s for s in specs}
    with ShardedWriter(out, [(s.filename, [by_name[n] for n in s.names]) for s in plan]) as writer:
        for i, spec in enumerate(specs):  # alternate raw bytes and tensors
            writer.write(spec.name, source.read_raw(spec.name) if i % 2 else source.get(spec.name))
    shutil.copy(sharded_dir / "config.json", out)

    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"]["total_size"] == source.total_bytes
    assert index["weight_map"] == {n: s.filename for s in plan for n in s.names}
    state = saved_state(tiny_model)
    for shard in plan:
        path = out / shard.filename
        assert path.stat().st_size <= max_bytes + 8 + 4096  # data + header
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = raw[8 : 8 + length].decode()
        assert length % 8 == 0 and header.rstrip(" ").endswith("}") and len(header) - len(header.rstrip(" ")) < 8
        assert json.loads(header)["__metadata__"] == {"format": "pt"}
        with safe_open(path, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert list(handle.keys()) == sorted(shard.names)
            for name in shard.names:
                assert torch.equal(handle.get_tensor(name), state[name])
    # Our reader and transformers both read it back; the model computes the same logits.
    assert CheckpointReader(out).names() == source.names()
    loaded = DeepseekForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, copy.deepcopy(tiny_model).float()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_writer_bytes_equal_the_safetensors_library(tmp_path):
    torch.manual_seed(1)
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b.weight": torch.randn(7).to(torch.bfloat16),
        "c": torch.zeros(0, 4, dtype=torch.bfloat16),
        "d": torch.randn(2, 2).to(torch.bfloat16).t(),  # non-contiguous
    }
    plan = [("model.safetensors", [(n, t.dtype, t.shape) for n, t in tensors.items()])]
    with ShardedWriter(tmp_path, plan) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    # safetensors orders same-dtype tensors by name and pads the header with spaces to 8 bytes.
    expected = safetensors_save({n: t.contiguous() for n, t in tensors.items()}, metadata={"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == expected
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_writer_rejects_wrong_order_size_and_unfinished_shards(tmp_path):
    spec = [TensorSpec("x", torch.float32, (2,)), TensorSpec("y", torch.float16, (3,))]
    shard = ShardWriter(tmp_path / "s.safetensors", spec)
    with pytest.raises(ValueError, match="expected 'x' next"):
        shard.write("y", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="planned 8 bytes, got 4"):
        shard.write("x", b"\0" * 4)
    with pytest.raises(ValueError, match="planned torch.float32"):
        shard.write("x", torch.zeros(2, dtype=torch.float64))
    shard.write("x", torch.ones(2))
    with pytest.raises(ValueError, match="never written"):
        shard.close()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind

    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(tmp_path, [("model.safetensors", spec)]) as writer:
            writer.write("x", torch.ones(2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    plan = [("model-00001-of-00002.safetensors", spec[:1]), ("model-00002-of-00002.safetensors", spec[1:])]
    writer = ShardedWriter(tmp_path, plan)
    writer.write("x", torch.ones(2))
    with pytest.raises(ValueError, match="never written, starting at 'y'"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-00001-of-00002.safetensors"]


def test_sharded_writer_syncs_every_shard_once_at_close(tmp_path, monkeypatch):
    """Shards are fsync'ed together at close, none while later shards are written (that would stall the reads)."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    spec = [TensorSpec("x", torch.float32, (2,)), TensorSpec("y", torch.float16, (3,))]
    plan = [("model-00001-of-00002.safetensors", spec[:1]), ("model-00002-of-00002.safetensors", spec[1:])]
    writer = ShardedWriter(tmp_path, plan)
    writer.write("x", torch.ones(2))
    writer.write("y", torch.ones(3, dtype=torch.float16))
    assert synced == []
    writer.close()
    assert sorted(synced) == [str(tmp_path / name) for name, _ in plan]


def test_write_index_format(tmp_path):
    weight_map = {"b": "model-00002-of-00002.safetensors", "a": "model-00001-of-00002.safetensors"}
    path = write_index(tmp_path, weight_map, 123)
    assert path == tmp_path / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    assert data == {"metadata": {"total_size": 123}, "weight_map": weight_map}
    assert list(data["weight_map"]) == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and os.access(path, os.R_OK)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are private (0600/0700); the renamed outputs must get what open()/mkdir() would."""
    import os

    from compressor.io.atomic import atomic_directory, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "x").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("kernel_copy", [True, False], ids=["copy_file_range", "through-memory"])
def test_write_range_copies_the_exact_bytes(sharded_dir, tmp_path, monkeypatch, kernel_copy):
    """Range copies (kernel-side, or the fallback where copy_file_range is missing) mixed with tensor writes
    give the same file as writing every tensor from memory."""
    if not kernel_copy:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    source = CheckpointReader(sharded_dir)
    specs = [TensorSpec(n, source.info(n).dtype, source.info(n).shape) for n in source.names()]
    with ShardedWriter(tmp_path / "mixed", [("model.safetensors", specs)]) as writer:
        for i, spec in enumerate(specs):
            if i % 2:
                writer.write(spec.name, source.get(spec.name))
            else:
                writer.write_range(spec.name, *source.raw_location(spec.name))
    with ShardedWriter(tmp_path / "memory", [("model.safetensors", specs)]) as writer:
        for spec in specs:
            writer.write(spec.name, source.read_raw(spec.name))
    assert (tmp_path / "mixed" / "model.safetensors").read_bytes() == \
        (tmp_path / "memory" / "model.safetensors").read_bytes()
    with ShardedWriter(tmp_path / "short", [("model.safetensors", specs[:1])]) as writer:
        fd, offset, nbytes = source.raw_location(specs[0].name)
        with pytest.raises(ValueError, match="planned"):
            writer.write_range(specs[0].name, fd, offset, nbytes - 1)
        writer.write_range(specs[0].name, fd, offset, nbytes)
