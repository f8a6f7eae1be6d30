"""What every stage shares to run a model: device and dtype choice, the tokenizer, torch.distributed ranks, and the
one layer-by-layer driver (`run_layer_by_layer`) that profiling, compensation, validation and lens use for models
that are run one decoder layer at a time."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compressor.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class ForwardOptions:
    """How a stage runs a model over text (profile, lens and validate share these)."""

    seq_len: int = 512
    batch_size: int = 8
    dtype: str = "float32"  # compute dtype
    device: str = "auto"
    layerwise: bool = False  # one decoder layer in memory at a time
    text_field: str = "text"  # the text field of .jsonl / .parquet / hf: rows


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; UserError otherwise or when CUDA is missing."""
    if not isinstance(device, str):
        raise UserError(f"--device must be cpu, cuda or auto, not {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise UserError(f"--device must be cpu, cuda, cuda:N or auto, not {device!r}")
    if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """float32 / bfloat16 / float16 (or fp32 / bf16 / fp16); UserError otherwise."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: Path):
    """The model's tokenizer, or None when the checkpoint has no tokenizer files."""
    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def tokenize_domains(model_dir: Path, config: dict, loaded: dict, seq_len: int, max_tokens: int | None,
                     min_length: int = 1) -> tuple[dict[str, list[list[int]]], int]:
    """Every loaded source as token sequences of at most `seq_len` (`max_tokens` each), with the model's tokenizer
    where a source is text, and the pad id; UserError for a source without tokens (or none of `min_length`), token
    ids outside the vocabulary, or a `seq_len` beyond the model's context."""
    from compressor.data.batching import token_sequences

    max_positions = config.get("max_position_embeddings")
    if max_positions and seq_len > max_positions:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context ({max_positions} positions)")
    tokenizer = load_tokenizer(model_dir) if any(not s.pretokenized for s in loaded.values()) else None
    vocab = int(config["vocab_size"])
    domains = {}
    for name, source in loaded.items():
        sequences = [s for s in token_sequences(source, tokenizer, seq_len, max_tokens) if s]
        if not sequences or max(len(s) for s in sequences) < min_length:
            raise UserError(f"domain {name!r} has no tokens after tokenization"
                            + (f" (it needs sequences of at least {min_length})" if min_length > 1 else ""))
        too_big = max(max(row) for row in sequences)
        if too_big >= vocab:
            raise UserError(f"domain {name!r} has token id {too_big}, outside the model's vocabulary of {vocab}")
        domains[name] = sequences
    pad = int(getattr(tokenizer, "pad_token_id", None) or 0) if tokenizer is not None else 0
    return domains, pad


class Distributed:
    """Rank/world of a torch.distributed run (torchrun / accelerate launch), or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self._owns_group = False
        if self.world > 1 and device.type == "cuda" and device.index is None:
            # one GPU per rank (torchrun sets LOCAL_RANK), not every rank on the current device
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            # the backend must match where the accumulators live (--device cpu on a GPU machine: gloo)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
            self._owns_group = True

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        if self.world > 1:
            for tensor in tensors:
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

    def close(self) -> None:
        """Leave the process group this object started, after the last collective (a rank that exits with
        gloo's threads still running can abort: "terminate called without an active exception")."""
        if self._owns_group:
            torch.distributed.destroy_process_group()
            self._owns_group = False


# -- running a model one decoder layer at a time -------------------------------------------------------


ACTIVATIONS_PREFIX = "moe-compress-activations-"


class ActivationStore:
    """Hidden states of every batch between layers: in RAM up to a budget, then spilled to a scratch folder (which a
    later run removes if this process is killed before `close`)."""

    def __init__(self, budget_bytes: int = 2 * 2**30):
        self.budget = budget_bytes
        self.items: list[torch.Tensor | Path | None] = []
        self.in_memory = 0
        self._dir = None  # ScratchDirectory, made at the first spill

    def __len__(self) -> int:
        return len(self.items)

    def put(self, index: int, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        while len(self.items) <= index:
            self.items.append(None)
        old = self.items[index]
        if isinstance(old, torch.Tensor):
            self.in_memory -= old.numel() * old.element_size()
        if self.in_memory + nbytes <= self.budget:
            self.items[index] = tensor
            self.in_memory += nbytes
            return
        if self._dir is None:
            from compressor.io.atomic import ScratchDirectory

            self._dir = ScratchDirectory(ACTIVATIONS_PREFIX)
        path = self._dir.path / f"{index}.pt"
        torch.save(tensor.cpu(), path)
        self.items[index] = path

    def get(self, index: int, device) -> torch.Tensor:
        item = self.items[index]
        return item if isinstance(item, torch.Tensor) else torch.load(item, map_location=device)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


class CheckpointTensors:
    """Where a LayerwiseModel's tensors come from: a checkpoint reader (whose layout is `source_layout`), seen as
    a checkpoint of `layout` — the same one, or e.g. the pruned one through `map_layer(layer, tensors)`."""

    def __init__(self, reader, layout, source_layout=None, map_layer: Callable | None = None):
        self.reader, self.layout, self.map_layer = reader, layout, map_layer
        self.source_layout = source_layout or layout

    def layer(self, layer: int) -> dict[str, torch.Tensor]:
        """All on-disk tensors of decoder layer `layer`, as names of `layout` (FP8 weights dequantized)."""
        tensors = {name: self.get(name) for name in self.reader.names() if self.source_layout.layer_of(name) == layer}
        if self.source_layout.mxfp4:
            from compressor.families.quantization import dequantize_mxfp4

            for blocks in [name for name in tensors if name.endswith("_blocks")]:
                param = blocks.removesuffix("_blocks")
                tensors[param] = dequantize_mxfp4(tensors.pop(blocks), tensors.pop(param + "_scales"))
        return tensors if self.map_layer is None else self.map_layer(layer, tensors)

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`; an FP8 one times its block scales, in fp32."""
        from compressor.families.quantization import FP8_DTYPES, dequantize, scale_name

        tensor = self.reader.get(name)
        if self.source_layout.block and tensor.dtype in FP8_DTYPES:
            return dequantize(tensor, self.reader.get(scale_name(name)), self.source_layout.block)
        return tensor


class LayerwiseModel:
    """A model skeleton on `meta` whose decoder layers are materialised one at a time from `tensors`."""

    def __init__(self, family, config: dict, tensors: CheckpointTensors, device: torch.device, dtype: torch.dtype):
        self.family, self.config, self.tensors, self.device, self.dtype = family, config, tensors, device, dtype
        self.layout = tensors.layout
        self.model = self.layout.model  # built on meta by the layout
        self.model.eval()
        self._rotary = None
        self.check_memory()

    def check_memory(self) -> None:
        """Refuse up front (UserError) when materialising the largest decoder layer needs more than the device's free
        memory, which would only end in an out-of-memory kill later. The lower bound checked: its parameters once as
        read (in fp32 when dequantized from FP8 or MXFP4, else in their on-disk dtype) and once in the compute dtype."""
        import psutil

        sizes = [sum(t.numel() for t in self.layer(i).state_dict().values()) for i in range(self.num_layers)]
        layer = max(range(len(sizes)), key=sizes.__getitem__)
        source = self.tensors.source_layout
        if source.block or source.mxfp4:
            read, how = 4, "read in float32 (dequantized)"
        else:
            infos = [self.tensors.reader.info(n) for n in self.tensors.reader.names() if source.layer_of(n) == layer]
            read = torch.empty((), dtype=max(infos, key=lambda i: i.nbytes).dtype).element_size() if infos else 0
            how = "read as stored"
        held = torch.empty((), dtype=self.dtype).element_size()
        ram = psutil.virtual_memory().available
        # (where, bytes needed, bytes free): read into RAM, held on the device (both in RAM on the CPU)
        if self.device.type == "cuda":
            checks = [("cpu", sizes[layer] * read, ram), (self.device, sizes[layer] * held,
                                                          torch.cuda.mem_get_info(self.device)[0])]
        else:
            checks = [(self.device, sizes[layer] * (read + held), ram)]
        dtype = str(self.dtype).removeprefix("torch.")
        for where, needed, free in checks:
            if needed > free:
                raise UserError(f"one decoder layer at a time still needs decoder layer {layer} whole: its "
                                f"{sizes[layer] / 1e9:.2f} G parameters, {how} and held in {dtype}, need at least "
                                f"{needed / 2**30:.1f} GiB on {where}, but {free / 2**30:.1f} GiB is free there; use "
                                "a machine with more memory"
                                + (" or --dtype bfloat16" if self.dtype == torch.float32 else ""))

    @property
    def num_layers(self) -> int:
        return self.family.num_layers(self.config)

    def layer(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.family.decoder_layer_path(layer))

    def load_layer(self, layer: int) -> torch.nn.Module:
        """Materialise decoder layer `layer` on the device, in the compute dtype."""
        module = self.layer(layer)
        prefix = self.family.decoder_layer_path(layer) + "."
        state = self.layout.to_model(self.tensors.layer(layer))
        module.to_empty(device=self.device)
        module.load_state_dict({name[len(prefix):]: t for name, t in state.items()}, strict=True)
        return module.to(self.dtype)

    def release_layer(self, layer: int) -> None:
        self.layer(layer).to("meta")

    def run_layer(self, module: torch.nn.Module, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
        if self._rotary is None:
            self._rotary = rotary_embedding(self.model, self.family, hidden.device)
        return run_decoder_layer(self.model, module, hidden, attention_mask, self._rotary)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.tensors.get(self.family.embedding_path + ".weight")
        return torch.nn.functional.embedding(input_ids.to(self.device), weight.to(device=self.device, dtype=self.dtype))

    def load_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Materialise the final norm and LM head; returns hidden states after the last layer -> logits."""
        modules = []
        for path in (self.family.final_norm_path, self.family.lm_head_path):
            module = self.model.get_submodule(path)
            module.to_empty(device=self.device)
            state = {}
            for key in module.state_dict():
                name = f"{path}.{key}"
                if name not in self.tensors.reader and path == self.family.lm_head_path and \
                        getattr(self.model.config, "tie_word_embeddings", False):
                    name = self.family.embedding_path + ".weight"
                state[key] = self.tensors.get(name)
            module.load_state_dict(state, strict=True)
            modules.append(module.to(self.dtype))
        norm, head = modules
        return lambda hidden: head(norm(hidden))


def rotary_embedding(model: torch.nn.Module, family, device) -> torch.nn.Module:
    """The model's rotary embedding on `device` (rebuilt from the config when the skeleton left it on meta)."""
    rotary = model.get_submodule(family.rotary_path)
    if any(buffer.is_meta for buffer in rotary.buffers()):
        with torch.device(device):
            rotary = type(rotary)(config=model.config)
    return rotary.to(device)


def _mask_cache_arg() -> str:
    """transformers renamed create_causal_mask's `past_key_values` argument to `cache`."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def run_decoder_layer(model, decoder_layer, hidden_states: torch.Tensor, attention_mask, rotary) -> torch.Tensor:
    """Run one decoder layer on `hidden_states` [batch, seq, hidden] with a [batch, seq] padding mask (or None),
    as the whole model's forward would (causal, sliding-window or a linear-attention layer's padding mask, rotary
    embedding, no cache)."""
    from transformers.masking_utils import (
        create_causal_mask, create_recurrent_attention_mask, create_sliding_window_causal_mask,
    )

    config = model.config
    batch, seq_len, _ = hidden_states.shape
    positions = torch.arange(seq_len, device=hidden_states.device)[None].expand(batch, seq_len)
    layer_types = getattr(config, "layer_types", None)
    index = next((m.layer_idx for m in decoder_layer.modules() if isinstance(getattr(m, "layer_idx", None), int)),
                 None)
    kind = layer_types[index] if layer_types and index is not None else (
        "sliding_attention" if getattr(config, "sliding_window", None) is not None and not layer_types else None)
    create = {"sliding_attention": create_sliding_window_causal_mask,
              "linear_attention": create_recurrent_attention_mask}.get(kind, create_causal_mask)
    mask = create(config=config, inputs_embeds=hidden_states, attention_mask=attention_mask, position_ids=positions,
                  **{_mask_cache_arg(): None})
    output = decoder_layer(hidden_states, attention_mask=mask, position_ids=positions,
                           position_embeddings=rotary(hidden_states, positions))
    return output[0] if isinstance(output, tuple) else output


class LayerStep:
    """One decoder layer, materialised in every model of a layer-by-layer run.

    `input(m, b)` is batch b's hidden state entering the layer in model m; `run(m, b)` the layer's output on it
    (not stored); `set_output(m, b, t)` stores t as what enters the next layer. Outputs not set by the visitor
    are computed after it."""

    def __init__(self, layer: int, models: list[LayerwiseModel], modules: list[torch.nn.Module], stores, batches):
        self.layer, self.models, self.modules, self.stores, self.batches = layer, models, modules, stores, batches
        self._done: set[tuple[int, int]] = set()

    def input(self, model: int, batch: int) -> torch.Tensor:
        if (model, batch) in self._done:
            raise RuntimeError(f"batch {batch}'s input to layer {self.layer} was already replaced by its output")
        return self.stores[model].get(batch, self.models[model].device)

    def mask(self, batch: int):
        mask = self.batches[batch].attention_mask
        return None if mask is None else mask.to(self.models[0].device)

    def run(self, model: int, batch: int) -> torch.Tensor:
        with torch.no_grad():
            return self.models[model].run_layer(self.modules[model], self.input(model, batch), self.mask(batch))

    def set_output(self, model: int, batch: int, output: torch.Tensor) -> None:
        self.stores[model].put(batch, output)
        self._done.add((model, batch))

    def finish(self) -> None:
        for model in range(len(self.models)):
            for batch in range(len(self.batches)):
                if (model, batch) not in self._done:
                    self.set_output(model, batch, self.run(model, batch))


def run_layer_by_layer(models: list[LayerwiseModel], batches: list, *, visit: Callable[[LayerStep], None] | None = None,
                       after: Callable[[LayerStep], None] | None = None, desc: str = "layer by layer",
                       progress: bool = True, budget_bytes: int = 2 * 2**30) -> list[ActivationStore]:
    """Run every batch through each model one decoder layer at a time, the models in lockstep (one layer of each
    in memory). `visit(step)` runs before a layer's outputs are computed (it may observe, fit, or set outputs),
    `after(step)` once they are stored. Returns each model's hidden states after the last layer (close them)."""
    stores = [ActivationStore(budget_bytes) for _ in models]
    try:
        for model, store in zip(models, stores):
            for index, batch in enumerate(batches):
                store.put(index, model.embed(batch.input_ids))
        with tqdm(total=models[0].num_layers, desc=desc, unit="layer", disable=not progress, dynamic_ncols=True) as bar:
            for layer in range(models[0].num_layers):
                step = LayerStep(layer, models, [m.load_layer(layer) for m in models], stores, batches)
                if visit is not None:
                    visit(step)
                step.finish()
                if after is not None:
                    after(step)
                for model in models:
                    model.release_layer(layer)
                bar.update(1)
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores
