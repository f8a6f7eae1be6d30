"""The shipped Qwen3-MoE reference model: structure, plain-transformers loading, held-out quality, specialisation.

Everything here uses transformers' own Qwen3MoeForCausalLM; nothing loads moe-compress's modeling code.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from compressor.data import DEMO_DOMAINS, demo_documents
from helpers import one_thread  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "models" / "reference-qwen3"
DEEPSEEK_REFERENCE = REPO / "models" / "reference"
SEQ_LEN = 256
EVAL_TOKENS = 8192  # a short slice; the log's value is over the first 16384 (LOG_EVAL_TOKENS)
LOG_EVAL_TOKENS = 16384
NUM_EXPERTS, TOP_K = 128, 8


@pytest.fixture(scope="module")
def config():
    return json.loads((REFERENCE / "config.json").read_text())


@pytest.fixture(scope="module")
def log():
    return json.loads((REFERENCE / "training_log.json").read_text())


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE)


def _eval_rows(tokenizer, name, count):
    """The first `count` tokens of the domain's evaluation split, as rows of SEQ_LEN (as the script cuts them)."""
    ids = []
    for doc in demo_documents(name, "evaluation"):
        ids.extend(tokenizer(doc)["input_ids"])
        if len(ids) >= count:
            break
    return torch.tensor(ids[:count]).view(-1, SEQ_LEN)


@pytest.fixture(scope="module")
def eval_rows(tokenizer):
    return {name: _eval_rows(tokenizer, name, EVAL_TOKENS) for name in DEMO_DOMAINS}


@torch.no_grad()
def _perplexity(model, rows, batch_size=8):
    nll, tokens = 0.0, 0
    for batch in rows.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits
        nll += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        tokens += batch[:, 1:].numel()
    return math.exp(nll / tokens)


def test_structure_matches_qwen3_30b_a3b_routing(config):
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert "auto_map" not in config  # native transformers class, no custom code
    assert config["decoder_sparse_step"] == 1 and config["mlp_only_layers"] == []  # every layer MoE
    assert config.get("num_experts", config.get("num_local_experts")) == NUM_EXPERTS
    assert config["num_experts_per_tok"] == TOP_K and config["norm_topk_prob"] is True
    assert not config.get("shared_expert_intermediate_size")  # no shared expert (unlike Qwen2-MoE)
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["tie_word_embeddings"] is False
    assert 4 <= config["num_hidden_layers"] <= 6 and 128 <= config["hidden_size"] <= 256
    assert (REFERENCE / "model.safetensors").stat().st_size < 25 * 10**6


def test_checkpoint_stores_experts_per_expert(config):
    """On disk as Qwen3-30B-A3B ships: one gate/up/down matrix per expert, q/k norms, an untied lm_head."""
    with safe_open(REFERENCE / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
        assert all(weights.get_slice(key).get_dtype() == "BF16" for key in keys)
        hidden, width = config["hidden_size"], config["moe_intermediate_size"]
        assert weights.get_slice("model.layers.0.mlp.experts.0.gate_proj.weight").get_shape() == [width, hidden]
        assert weights.get_slice("model.layers.0.mlp.experts.0.down_proj.weight").get_shape() == [hidden, width]
        assert weights.get_slice("model.layers.0.mlp.gate.weight").get_shape() == [NUM_EXPERTS, hidden]
    for layer in range(config["num_hidden_layers"]):
        for expert in range(NUM_EXPERTS):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight" in keys
        assert f"model.layers.{layer}.self_attn.q_norm.weight" in keys
        assert f"model.layers.{layer}.self_attn.k_norm.weight" in keys
    assert not any("shared_expert" in key or "gate_up_proj" in key for key in keys)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys


def test_tokenizer_is_the_deepseek_references(tokenizer, config):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (REFERENCE / name).read_bytes() == (DEEPSEEK_REFERENCE / name).read_bytes()
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert config["vocab_size"] == len(tokenizer)
    text = "def f(x):\n    return x ** 2  # carré, Übung"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


PLAIN_TRANSFORMERS = r"""
import sys, torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
assert type(model) is Qwen3MoeForCausalLM, type(model)
# the per-expert tensors on disk are what transformers fused into its 3-D expert tensors
experts = model.model.layers[1].mlp.experts
with safe_open(f"{path}/model.safetensors", "pt") as weights:
    for e in (0, 77, 127):
        gate, up, down = (weights.get_tensor(f"model.layers.1.mlp.experts.{e}.{p}_proj.weight").float()
                          for p in ("gate", "up", "down"))
        assert torch.equal(experts.gate_up_proj[e], torch.cat([gate, up])), e
        assert torch.equal(experts.down_proj[e], down), e
ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
out = model.generate(ids, max_new_tokens=4, do_sample=False)
assert out.shape == (1, ids.shape[1] + 4)
assert not any(name == "compressor" or name.startswith("compressor.") for name in sys.modules)
print("ok")
"""


def test_loads_in_plain_transformers_without_compressor():
    """A fresh interpreter that never imports moe-compress, with no stdin (a custom-code prompt would fail)."""
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(REFERENCE)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    assert "trust_remote_code" not in result.stderr


def _train_unigram_log_probs(tokenizer, name, vocab, budget=100_000):
    counts = torch.ones(vocab, dtype=torch.float64)
    seen = 0
    for doc in demo_documents(name, "train"):
        ids = torch.tensor(tokenizer(doc)["input_ids"])
        counts += torch.bincount(ids, minlength=vocab)
        seen += len(ids)
        if seen > budget:
            break
    return (counts / counts.sum()).log()


def test_held_out_perplexity_near_log_and_far_below_unigram(model, tokenizer, eval_rows, log):
    """On the first 8192 held-out tokens of each domain: near the log's value over the first 16384 (the
    documents differ, so a slice's perplexity does too, by up to ~1.5x here), and far below the unigram baseline."""
    assert set(log["evaluation"]) == set(DEMO_DOMAINS)
    for name, rows in eval_rows.items():
        perplexity = _perplexity(model, rows)
        logged = log["evaluation"][name]["perplexity"]
        assert logged / 1.6 < perplexity < 1.6 * logged, f"{name}: {perplexity:.2f} vs logged {logged:.2f}"
        unigram = math.exp(-float(_train_unigram_log_probs(tokenizer, name, len(tokenizer))[rows[:, 1:]].mean()))
        assert perplexity < 0.25 * unigram, f"{name}: perplexity {perplexity:.1f} vs unigram {unigram:.1f}"
        assert perplexity < 0.25 * log["evaluation"][name]["unigram_perplexity"]


@pytest.mark.slow
def test_held_out_perplexity_reproduces_log(model, tokenizer, log):
    """The log's numbers exactly: the same 16384 tokens per domain, the same bf16 weights (run in fp32)."""
    for name in DEMO_DOMAINS:
        rows = _eval_rows(tokenizer, name, LOG_EVAL_TOKENS)
        assert log["evaluation"][name]["tokens"] == rows[:, 1:].numel()
        perplexity = _perplexity(model, rows)
        assert perplexity == pytest.approx(log["evaluation"][name]["perplexity"], rel=1e-3), name


def test_routing_is_specialised(model, eval_rows, log):
    """Every layer routes each token to 8 experts; some layer's most-used expert takes >= 2x the uniform 8/128."""
    counts = {}

    def hook_for(layer):
        def observe(module, inputs, output):
            router_logits, routing_weights, selected = output
            assert selected.shape[-1] == TOP_K
            assert torch.allclose(routing_weights.sum(-1), torch.ones(()), atol=1e-5)  # norm_topk_prob
            counts[layer] = counts.get(layer, 0) + torch.bincount(selected.reshape(-1), minlength=NUM_EXPERTS)

        return observe

    handles = [layer.mlp.gate.register_forward_hook(hook_for(i)) for i, layer in enumerate(model.model.layers)]
    best = 0.0
    try:
        for rows in eval_rows.values():
            rows = rows[:8]  # 2048 tokens per domain
            counts.clear()
            with torch.no_grad():
                model(input_ids=rows, use_cache=False)
            assert len(counts) == len(model.model.layers)  # every layer is MoE
            for layer_counts in counts.values():
                assert int(layer_counts.sum()) == rows.numel() * TOP_K
                best = max(best, float(layer_counts.max()) / rows.numel())
    finally:
        for handle in handles:
            handle.remove()
    assert best >= 2 * TOP_K / NUM_EXPERTS
    assert max(r["max_top_expert_share"] for r in log["evaluation"].values()) >= 2 * TOP_K / NUM_EXPERTS
