"""The shipped reference model: structure, held-out quality, domain specialisation, and the training script."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import compressor  # noqa: F401  (registers our DeepSeekMoE)
from compressor.data import DEMO_DOMAINS, demo_documents
from compressor.modeling import DeepseekForCausalLM

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "models" / "reference"
SEQ_LEN = 256
EVAL_TOKENS = 4096


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE)


def test_structure_matches_deepseek_moe_16b_routing():
    config = json.loads((REFERENCE / "config.json").read_text())
    assert config["model_type"] == "deepseek"
    assert config["first_k_dense_replace"] == 1 and config["moe_layer_freq"] == 1
    assert config["n_routed_experts"] == 64 and config["num_experts_per_tok"] == 6
    assert config["n_shared_experts"] == 2 and config["scoring_func"] == "softmax"
    assert config["norm_topk_prob"] is False
    assert 4 <= config["num_hidden_layers"] <= 6 and 128 <= config["hidden_size"] <= 256
    weights = REFERENCE / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20


def test_tokenizer_is_byte_level_bpe_of_about_8k(tokenizer):
    assert 7000 <= len(tokenizer) <= 9000
    text = "def f(x):\n    return x ** 2  # carré, Übung"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def _eval_tokens(tokenizer, name):
    ids = []
    for doc in demo_documents(name, "evaluation"):
        ids.extend(tokenizer(doc)["input_ids"])
        if len(ids) >= EVAL_TOKENS:
            break
    return torch.tensor(ids[:EVAL_TOKENS])


def _train_unigram_log_probs(tokenizer, name, vocab):
    counts = torch.ones(vocab, dtype=torch.float64)
    seen = 0
    for doc in demo_documents(name, "train"):
        ids = torch.tensor(tokenizer(doc)["input_ids"])
        counts += torch.bincount(ids, minlength=vocab)
        seen += len(ids)
        if seen > 200_000:
            break
    return (counts / counts.sum()).log()


@pytest.mark.slow
@pytest.mark.parametrize("name", DEMO_DOMAINS)
def test_held_out_perplexity_beats_unigram_baseline(model, tokenizer, name):
    tokens = _eval_tokens(tokenizer, name)
    rows = tokens[: len(tokens) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    with torch.no_grad():
        logits = model(input_ids=rows, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    perplexity = math.exp(float(nll))
    unigram = math.exp(-float(_train_unigram_log_probs(tokenizer, name, len(tokenizer))[rows[:, 1:]].mean()))
    assert perplexity < 0.5 * unigram, f"{name}: perplexity {perplexity:.1f} vs unigram {unigram:.1f}"


@pytest.mark.slow
def test_routing_is_specialised_per_domain(model, tokenizer):
    """In some MoE layer, some domain's most-used expert takes at least 2x the uniform share (6/64)."""
    best = 0.0
    for name in DEMO_DOMAINS:
        rows = _eval_tokens(tokenizer, name)[: 8 * SEQ_LEN].view(8, SEQ_LEN)
        counts = {}

        def observe(_module, _inputs, output, _counts=counts):  # the router returns (logits, weights, indices)
            _counts.setdefault(len(_counts), torch.bincount(output[2].reshape(-1), minlength=64))

        hooks = [layer.mlp.gate.register_forward_hook(observe) for layer in model.model.layers
                 if hasattr(layer.mlp, "gate")]
        try:
            with torch.no_grad():
                model(input_ids=rows, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        for layer_counts in counts.values():
            assert int(layer_counts.sum()) == rows.numel() * 6
            best = max(best, float(layer_counts.max()) / rows.numel())
    assert best >= 2 * 6 / 64


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek", "qwen3_moe"])
def test_training_script_smoke(tmp_path, family):
    """CI never retrains: a few steps of the real script on a tiny slice, and the output loads."""
    out = tmp_path / "ref"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_reference.py"), "--out", str(out), "--tiny",
         "--steps", "3", "--max-documents", "5", "--domains", "code,math", "--eval-tokens", "256",
         *(["--family", family] if family != "deepseek" else [])],
        check=True, capture_output=True, text=True,
    )
    if family == "deepseek":
        model = DeepseekForCausalLM.from_pretrained(out)
        assert model.config.n_routed_experts == 64 and model.config.num_experts_per_tok == 6
    else:
        from transformers import Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM.from_pretrained(out)
        assert model.config.num_experts == 128 and model.config.num_experts_per_tok == 8
        assert model.config.norm_topk_prob and model.config.mlp_only_layers == []
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        assert (out / "tokenizer.json").read_bytes() == (REFERENCE / "tokenizer.json").read_bytes()
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and set(log["evaluation"]) == {"code", "math"}
    assert "perplexity" in (out / "README.md").read_text()
