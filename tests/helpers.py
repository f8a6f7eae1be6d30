"""Shared test helpers: run the CLI in-process or as one process vs two torchrun ranks, a tiny random
upstream-format DeepSeekMoE, token-id files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            num_experts_per_tok=3, first_k_dense_replace=1, moe_layer_freq=1, norm_topk_prob=False,
            max_position_embeddings=64, initializer_range=0.2, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False)
MOE_LAYERS = [1, 2]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `moe-compress ARGV`; output printed before the call is dropped."""
    from compressor.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def save_tiny_checkpoint(directory: Path, seed: int = 0, gate_seed: int | None = None, **overrides) -> Path:
    """TINY (with `overrides`) with random weights and decisive, non-degenerate routing, saved upstream-style."""
    from compressor.modeling import DeepseekConfig, DeepseekForCausalLM

    torch.manual_seed(seed)
    model = DeepseekForCausalLM(DeepseekConfig(**{**TINY, **overrides})).eval()
    generator = torch.Generator().manual_seed(seed + 1000 if gate_seed is None else gate_seed)
    with torch.no_grad():
        for layer in MOE_LAYERS if model.config.n_routed_experts else []:
            gate = model.model.layers[layer].mlp.gate.weight
            gate.copy_(0.5 * torch.randn(gate.shape, generator=generator))
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").exists()
    assert not any(directory.glob("tokenizer*"))
    return directory


def write_jsonl(path: Path, rows: list[list[int]]) -> Path:
    """Pre-tokenized rows (`input_ids`), one sequence per line."""
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in rows))
    return path


def cli_one_and_two_ranks(argv: list, cwd: Path) -> tuple[Path, Path]:
    """Run `moe-compress ARGV -o one.json` in one process and under torchrun with two CPU ranks (`-o two.json`),
    both in `cwd`; each must succeed. The two output paths."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(a) for a in argv]
    one, two = cwd / "one.json", cwd / "two.json"
    single = subprocess.run([sys.executable, "-m", "compressor", *argv, "-o", str(one)],
                            capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(port), "-m", "compressor", *argv, "-o", str(two)],
                            capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    return one, two


def stage_options(cls, **fields):
    """`cls` (ProfileOptions, LensOptions or ValidateOptions) from flat `fields`, the ForwardOptions ones grouped."""
    import dataclasses

    from compressor.runtime import ForwardOptions

    names = {f.name for f in dataclasses.fields(ForwardOptions)}
    forward = ForwardOptions(**{k: v for k, v in fields.items() if k in names})
    return cls(forward=forward, **{k: v for k, v in fields.items() if k not in names})


def rtn(weight: torch.Tensor, scheme: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized weight, scale per element) of a [out, in] bf16 weight, written independently of the tool."""
    w = weight.float()
    if scheme == "fp8-dynamic":
        scale = (w.abs().amax(1, keepdim=True) / 448.0).to(weight.dtype)
        ratio = (weight / scale).float().clamp(-448, 448)  # w / scale in the weight's dtype, then to fp8
        return ratio.to(torch.float8_e4m3fn).float() * scale.float(), scale.float().expand_as(w)
    bits = 8 if scheme == "w8a16" else 4
    grouped = weight.unflatten(1, (-1, group)) if group else weight.unsqueeze(1)
    scale = (grouped.float().abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)).to(weight.dtype)
    q = torch.clamp(torch.round((grouped / scale).float()), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale.float()).reshape(w.shape), scale.float().expand_as(grouped).reshape(w.shape)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while the module that imports this fixture runs: on a busy machine (or under
    `pytest -n 2` on 2 cores) two threads made forwards many times slower (the Qwen3 reference's perplexity test:
    96 s against 7 s); one is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
