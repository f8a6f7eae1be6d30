"""compressor.modeling (our DeepSeekMoE for transformers 5) against an independent plain-torch reference.

The reference forward below is written from the DeepSeekMoE spec (see the module docstring of each helper) and
shares no code with compressor.modeling: it takes a state dict (upstream tensor names) and a plain config dict.
Models are small and random, with weights scaled so that activations are O(1) and routing is decisive
(router weights with std 0.5; the reference asserts that every top-k choice has a clear logit margin).
"""

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import compressor  # noqa: F401  (registers model_type "deepseek" with the Auto classes)
import fixtures
from compressor.modeling import DeepseekConfig, DeepseekForCausalLM, write_modeling_files

# --------------------------------------------------------------------------------------------------------------
# Fixture data: the public deepseek-ai/deepseek-moe-16b-base config.json, verbatim.
# --------------------------------------------------------------------------------------------------------------
REAL_16B_CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "max_position_embeddings": 4096,
    "model_type": "deepseek",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0",
    "use_cache": True,
    "vocab_size": 102400,
}
# The 16B model.safetensors.index.json holds 5,466 tensor names; sha256 of the sorted names joined by "\n":
REAL_16B_NAME_COUNT = 5466
REAL_16B_NAMES_SHA256 = "167994d018e8cfbb24d5a3e585ba6a2596706d252ef6fd0e8a1bd631b1bb0690"

SMALL_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    vocab_size=200,
    num_attention_heads=4,
    num_key_value_heads=4,
    bos_token_id=0,
    eos_token_id=1,
)
# The 16B routing (64 experts, top-6, 2 shared, first layer dense, no renormalisation) at small widths.
BASE = {
    **{k: v for k, v in REAL_16B_CONFIG.items() if k not in ("auto_map", "architectures", "torch_dtype")},
    **SMALL_SIZES,
    "max_position_embeddings": 64,
}
SEQ = 10


def cfg_with(**overrides):
    cfg = copy.deepcopy(BASE)
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------------------------------------------
# Upstream on-disk layout (names and shapes), written from the 16B weight map's pattern.
# --------------------------------------------------------------------------------------------------------------
def is_moe_layer(cfg, layer):
    return (
        cfg.get("n_routed_experts") is not None
        and layer >= cfg.get("first_k_dense_replace", 0)
        and layer % cfg.get("moe_layer_freq", 1) == 0
    )


def experts_in_layer(cfg, layer):
    per_layer = cfg.get("n_routed_experts_per_layer") or {}
    return int(per_layer.get(str(layer), cfg["n_routed_experts"]))


def upstream_weight_names(cfg):
    """Tensor names in upstream's layout, in storage order (embeddings, layer 0, 1, ..., final norm, lm_head)."""
    names = ["model.embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + "post_attention_layernorm.weight"]
        if is_moe_layer(cfg, i):
            names += [p + "mlp.gate.weight"]
            for e in range(experts_in_layer(cfg, i)):
                names += [p + f"mlp.experts.{e}.{x}_proj.weight" for x in ("gate", "up", "down")]
            if cfg.get("n_shared_experts"):
                names += [p + f"mlp.shared_experts.{x}_proj.weight" for x in ("gate", "up", "down")]
        else:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names + ["model.norm.weight", "lm_head.weight"]


def upstream_shape(name, cfg):
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, hidden)
    if name.endswith("norm.weight"):
        return (hidden,)
    if ".self_attn." in name:
        return (hidden, hidden)  # plain multi-head attention, head_dim = hidden / heads
    layer = int(name.split(".")[2])
    if name.endswith("mlp.gate.weight"):
        return (experts_in_layer(cfg, layer), hidden)
    if ".mlp.experts." in name:
        width = cfg["moe_intermediate_size"]
    elif ".mlp.shared_experts." in name:
        width = cfg["moe_intermediate_size"] * cfg["n_shared_experts"]
    else:
        width = cfg["intermediate_size"]
    return (hidden, width) if name.endswith("down_proj.weight") else (width, hidden)


def make_state_dict(cfg, seed=0):
    """Random weights for `cfg` with O(1) activations and decisive routing (router std 0.5)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in upstream_weight_names(cfg):
        shape = upstream_shape(name, cfg)
        w = torch.randn(shape, generator=g)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * w
        elif name.endswith("mlp.gate.weight"):
            w = 0.5 * w
        elif name != "model.embed_tokens.weight":
            w = w / math.sqrt(shape[1])
        sd[name] = w
    return sd


def fused_state_dict(cfg, sd):
    """Upstream's per-expert tensors in transformers 5's fused in-memory layout: per MoE layer gate_up_proj
    [E, 2I, H] (expert e's gate rows, then its up rows) and down_proj [E, H, I]."""
    fused = {name: t for name, t in sd.items() if ".mlp.experts." not in name}
    for layer in range(cfg["num_hidden_layers"]):
        if not is_moe_layer(cfg, layer):
            continue
        p = f"model.layers.{layer}.mlp.experts."
        n = experts_in_layer(cfg, layer)
        fused[p + "gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}{e}.gate_proj.weight"], sd[f"{p}{e}.up_proj.weight"]]) for e in range(n)])
        fused[p + "down_proj"] = torch.stack([sd[f"{p}{e}.down_proj.weight"] for e in range(n)])
    return fused


def build_model(cfg, sd, attn_implementation=None):
    config = DeepseekConfig(**cfg)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = DeepseekForCausalLM(config)
    model.load_state_dict(fused_state_dict(cfg, sd), strict=True)
    return model.eval()


def random_ids(shape, seed=1, vocab=BASE["vocab_size"]):
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# Independent reference forward (plain torch, from the spec).
# --------------------------------------------------------------------------------------------------------------
def ref_rmsnorm(x, weight, eps):
    x32 = x.float()
    return weight.float() * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def ref_rope_cos_sin(cfg, seq_len):
    """Llama RoPE; linear scaling divides positions, dynamic scaling raises the base past max_position_embeddings."""
    dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    base = float(cfg.get("rope_theta", 10000.0))
    positions = torch.arange(seq_len, dtype=torch.float64)
    scaling = cfg.get("rope_scaling")
    if scaling:
        factor = float(scaling["factor"])
        if scaling["type"] == "linear":
            positions = positions / factor
        elif scaling["type"] == "dynamic":
            max_pos = cfg["max_position_embeddings"]
            if seq_len > max_pos:
                base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        else:
            raise AssertionError(scaling)
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def ref_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def ref_attention(h, sd, prefix, cfg, cos, sin):
    batch, seq_len, hidden = h.shape
    heads = cfg["num_attention_heads"]
    assert cfg.get("num_key_value_heads", heads) == heads, "the reference does plain multi-head attention"
    dim = hidden // heads

    def project(x):
        return (h @ sd[prefix + f"{x}_proj.weight"].T).view(batch, seq_len, heads, dim).transpose(1, 2)

    q, k, v = project("q"), project("k"), project("v")
    q = q * cos + ref_rotate_half(q) * sin
    k = k * cos + ref_rotate_half(k) * sin
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(batch, seq_len, hidden) @ sd[prefix + "o_proj.weight"].T


def ref_swiglu(x, sd, prefix):
    gate = x @ sd[prefix + "gate_proj.weight"].T
    up = x @ sd[prefix + "up_proj.weight"].T
    return (F.silu(gate) * up) @ sd[prefix + "down_proj.weight"].T


def ref_moe(h, sd, prefix, cfg, layer, min_margin=1e-4):
    """Softmax over all routed experts (fp32), top-k, optional renormalisation, plus shared experts (weight 1)."""
    batch, seq_len, hidden = h.shape
    n_experts = experts_in_layer(cfg, layer)
    router = sd[prefix + "gate.weight"]
    assert router.shape == (n_experts, hidden)
    k = cfg["num_experts_per_tok"]
    flat = h.reshape(-1, hidden)
    logits = flat.float() @ router.float().T
    scores = logits.softmax(dim=-1)
    out = torch.zeros_like(flat)
    chosen = []
    for t in range(flat.shape[0]):
        ranked = logits[t].sort(descending=True)
        if k < n_experts:  # the top-k set must not hinge on rounding
            assert ranked.values[k - 1] - ranked.values[k] > min_margin, "ambiguous routing: pick another seed"
        experts = ranked.indices[:k]
        weights = scores[t, experts]
        if cfg.get("norm_topk_prob"):
            weights = weights / weights.sum()
        for w, e in zip(weights, experts.tolist()):
            out[t] += w * ref_swiglu(flat[t], sd, prefix + f"experts.{e}.")
        chosen.append(experts)
    if cfg.get("n_shared_experts"):
        out = out + ref_swiglu(flat, sd, prefix + "shared_experts.")
    routing = {"scores": scores.view(batch, seq_len, n_experts), "topk": torch.stack(chosen).view(batch, seq_len, k)}
    return out.view(batch, seq_len, hidden), routing


def ref_forward(sd, cfg, input_ids):
    """Logits [batch, seq, vocab] (fp32) and, per MoE layer, the router scores and chosen experts."""
    sd = {name: t.float() for name, t in sd.items()}
    eps = cfg["rms_norm_eps"]
    x = sd["model.embed_tokens.weight"][input_ids]
    cos, sin = ref_rope_cos_sin(cfg, input_ids.shape[1])
    routing = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = ref_rmsnorm(x, sd[p + "input_layernorm.weight"], eps)
        x = x + ref_attention(h, sd, p + "self_attn.", cfg, cos, sin)
        h = ref_rmsnorm(x, sd[p + "post_attention_layernorm.weight"], eps)
        if is_moe_layer(cfg, i):
            out, r = ref_moe(h, sd, p + "mlp.", cfg, i)
            routing.append(r)
        else:
            out = ref_swiglu(h, sd, p + "mlp.")
        x = x + out
    x = ref_rmsnorm(x, sd["model.norm.weight"], eps)
    return x @ sd["lm_head.weight"].T, routing


def ref_aux_loss(routing, cfg):
    """Upstream's expert-level balance loss with seq_aux=True, summed over MoE layers."""
    alpha = cfg.get("aux_loss_alpha", 0.001)
    k = cfg["num_experts_per_tok"]
    total = torch.zeros(())
    for r in routing:
        scores, topk = r["scores"], r["topk"]
        batch, seq_len, n_experts = scores.shape
        per_seq = []
        for b in range(batch):
            counts = torch.bincount(topk[b].reshape(-1), minlength=n_experts).float()
            ce = counts / (seq_len * k / n_experts)
            per_seq.append((ce * scores[b].mean(dim=0)).sum())
        total = total + torch.stack(per_seq).mean() * alpha
    return total


def logits_of(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()


def cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def assert_close(actual, expected, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------------------
# Shared fixtures
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_sd():
    return make_state_dict(BASE, seed=0)


@pytest.fixture(scope="module")
def base_model(base_sd):
    return build_model(BASE, base_sd)


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory, base_sd):
    """BASE saved by save_pretrained, once with norm_topk_prob false and once true (same weights)."""
    dirs = {}
    for norm in (False, True):
        path = tmp_path_factory.mktemp(f"saved_norm_{norm}")
        build_model(cfg_with(norm_topk_prob=norm), base_sd).save_pretrained(path)
        dirs[norm] = path
    return dirs


# --------------------------------------------------------------------------------------------------------------
# 1. Logits against the reference
# --------------------------------------------------------------------------------------------------------------
DYNAMIC_MAX_POS_8 = cfg_with(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8)
REFERENCE_CASES = {
    "top6_64_experts": (BASE, SEQ),
    "top6_norm_topk_prob": (cfg_with(norm_topk_prob=True), SEQ),
    "per_layer_expert_counts": (cfg_with(n_routed_experts_per_layer={"1": 64, "2": 17, "3": 8}), SEQ),
    "rope_linear": (cfg_with(rope_scaling={"type": "linear", "factor": 4.0}), SEQ),
    "rope_dynamic_beyond_max_pos": (DYNAMIC_MAX_POS_8, 13),
    "rope_dynamic_within_max_pos": (DYNAMIC_MAX_POS_8, 8),
    "moe_layer_freq_2": (cfg_with(moe_layer_freq=2, num_hidden_layers=5), SEQ),
    "rope_theta_and_eps": (cfg_with(rope_theta=1000.0, rms_norm_eps=1e-2), SEQ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_logits_match_reference(case):
    cfg, seq_len = REFERENCE_CASES[case]
    sd = make_state_dict(cfg, seed=0)
    model = build_model(cfg, sd)
    ids = random_ids((2, seq_len))
    expected, _ = ref_forward(sd, cfg, ids)
    assert_close(logits_of(model, ids), expected)


def test_layer_kinds_follow_first_k_dense_replace_and_moe_layer_freq():
    cfg = cfg_with(moe_layer_freq=2, num_hidden_layers=5)
    model = build_model(cfg, make_state_dict(cfg))
    kinds = ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.layers]
    assert kinds == ["dense", "dense", "moe", "dense", "moe"]
    cfg = cfg_with(n_routed_experts_per_layer={"1": 64, "2": 17, "3": 8})
    model = build_model(cfg, make_state_dict(cfg))
    assert [layer.mlp.experts.num_experts for layer in model.model.layers[1:]] == [64, 17, 8]
    assert tuple(model.model.layers[2].mlp.gate.weight.shape) == (17, 64)


def test_rope_scaling_changes_logits(base_sd):
    """Guards the RoPE cases above against a reference that ignores the scaling."""
    ids = random_ids((1, 13))
    plain, _ = ref_forward(base_sd, BASE, ids)
    for scaling, max_pos in (({"type": "linear", "factor": 4.0}, 64), ({"type": "dynamic", "factor": 2.0}, 8)):
        cfg = cfg_with(rope_scaling=scaling, max_position_embeddings=max_pos)
        scaled = logits_of(build_model(cfg, base_sd), ids)
        assert (scaled - plain).abs().max() > 1e-2, scaling


@pytest.mark.parametrize("norm", [False, True], ids=["raw_weight", "norm_topk_prob"])
def test_forced_top1_from_pretrained_matches_reference(saved_dirs, base_sd, norm):
    model = AutoModelForCausalLM.from_pretrained(saved_dirs[norm], num_experts_per_tok=1, dtype=torch.float32).eval()
    assert isinstance(model, DeepseekForCausalLM)
    assert model.config.num_experts_per_tok == 1
    cfg = cfg_with(norm_topk_prob=norm, num_experts_per_tok=1)
    ids = random_ids((2, SEQ))
    expected, _ = ref_forward(base_sd, cfg, ids)
    assert_close(logits_of(model, ids), expected)


def test_top1_norm_topk_prob_gives_routed_weight_exactly_one(saved_dirs, base_sd):
    seen = []

    def on_routing(_module, _inputs, output):  # the router returns (logits, top-k weights, top-k indices)
        seen.append((output[2].clone(), output[1].clone()))

    ids = random_ids((2, SEQ))
    logits = {}
    for norm in (False, True):
        model = AutoModelForCausalLM.from_pretrained(saved_dirs[norm], num_experts_per_tok=1, dtype=torch.float32)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.gate.register_forward_hook(on_routing)
        seen.clear()
        logits[norm] = logits_of(model.eval(), ids)
        assert len(seen) == 3
        for idx, weight in seen:
            assert idx.shape[-1] == 1 and weight.shape[-1] == 1
            if norm:
                assert torch.equal(weight, torch.ones_like(weight))
            else:
                assert (weight < 1).all()
    # the renormalisation matters: top-1 with raw softmax weight is a different model
    assert (logits[True] - logits[False]).abs().max() > 1e-2
    # and "weight exactly 1" is the reference with expert(x) + shared(x)
    expected, _ = ref_forward(base_sd, cfg_with(norm_topk_prob=True, num_experts_per_tok=1), ids)
    assert_close(logits[True], expected)


# --------------------------------------------------------------------------------------------------------------
# 2. An upstream-format checkpoint from the real 16B config.json loads without remote code
# --------------------------------------------------------------------------------------------------------------
def real_small_config():
    cfg = copy.deepcopy(REAL_16B_CONFIG)
    cfg.update(SMALL_SIZES)  # sizes only: routing, auto_map, dtype, rope etc. stay as published
    return cfg


def test_upstream_name_pattern_is_the_16b_weight_map():
    names = upstream_weight_names(REAL_16B_CONFIG)
    assert len(names) == len(set(names)) == REAL_16B_NAME_COUNT
    assert hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest() == REAL_16B_NAMES_SHA256
    assert set(fixtures.deepseek_moe_16b_weight_map()) == set(names)  # the published index itself
    assert fixtures.deepseek_moe_16b_config() == REAL_16B_CONFIG


def write_upstream_checkpoint(directory, cfg, sd):
    """Sharded bf16 safetensors + index + config.json, as the hub stores deepseek-moe-16b (no python files).

    Layer 2 is split between shards 2 and 3 (in the middle of its experts).
    """
    directory.mkdir(parents=True, exist_ok=True)
    names = upstream_weight_names(cfg)
    split_a = names.index("model.layers.2.input_layernorm.weight")
    split_b = names.index("model.layers.2.mlp.experts.32.gate_proj.weight")
    groups = [names[:split_a], names[split_a:split_b], names[split_b:]]
    weight_map, total = {}, 0
    for n, group in enumerate(groups, start=1):
        filename = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: sd[name].to(torch.bfloat16).contiguous() for name in group}
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: filename for name in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return weight_map


@pytest.fixture(scope="module")
def upstream_checkpoint(tmp_path_factory):
    cfg = real_small_config()
    sd = make_state_dict(cfg, seed=3)
    directory = tmp_path_factory.mktemp("upstream") / "deepseek-moe-small"
    weight_map = write_upstream_checkpoint(directory, cfg, sd)
    bf16_sd = {name: t.to(torch.bfloat16) for name, t in sd.items()}
    return directory, cfg, bf16_sd, weight_map


def test_upstream_checkpoint_layout(upstream_checkpoint):
    directory, cfg, _, weight_map = upstream_checkpoint
    assert not list(directory.rglob("*.py"))
    layer_shards = {}
    for name, shard in weight_map.items():
        if name.startswith("model.layers."):
            layer_shards.setdefault(int(name.split(".")[2]), set()).add(shard)
    assert layer_shards[2] == {"model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}
    real_names_for_4_layers = {
        name for name in upstream_weight_names(REAL_16B_CONFIG)
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < 4
    }
    assert set(weight_map) == real_names_for_4_layers
    assert json.loads((directory / "config.json").read_text())["auto_map"] == REAL_16B_CONFIG["auto_map"]


def test_upstream_checkpoint_loads_our_class_without_remote_code(upstream_checkpoint, monkeypatch):
    directory, cfg, bf16_sd, _ = upstream_checkpoint

    def no_remote_code(*args, **kwargs):
        raise AssertionError(f"remote code requested: {args} {kwargs}")

    import transformers.dynamic_module_utils as dynamic_module_utils
    import transformers.models.auto.auto_factory as auto_factory
    import transformers.models.auto.configuration_auto as configuration_auto

    for module in (dynamic_module_utils, auto_factory, configuration_auto):
        if hasattr(module, "get_class_from_dynamic_module"):
            monkeypatch.setattr(module, "get_class_from_dynamic_module", no_remote_code)
    modules_before = set(sys.modules)

    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert type(model) is DeepseekForCausalLM
    assert type(model.config) is DeepseekConfig
    assert not [m for m in set(sys.modules) - modules_before if m.startswith("transformers_modules")]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    fused = fused_state_dict(cfg, bf16_sd)
    assert set(state) == set(fused)
    for name, tensor in fused.items():
        assert torch.equal(state[name], tensor.float()), name
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # untied
    assert model.config.num_experts_per_tok == 6 and model.config.norm_topk_prob is False
    ids = random_ids((2, SEQ))
    expected, _ = ref_forward(bf16_sd, cfg, ids)
    assert_close(logits_of(model.eval(), ids), expected)


def test_saved_names_follow_the_16b_weight_map(upstream_checkpoint, tmp_path):
    directory, _, _, _ = upstream_checkpoint
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    saved = set()
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            saved |= set(f.keys())
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) == saved
    expected = {
        name for name in upstream_weight_names(REAL_16B_CONFIG)
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < 4
    }
    assert saved == expected


# --------------------------------------------------------------------------------------------------------------
# 3. save_pretrained / from_pretrained round trip
# --------------------------------------------------------------------------------------------------------------
UPSTREAM_KEYS = (
    "rope_scaling", "rope_theta", "n_routed_experts", "num_experts_per_tok", "norm_topk_prob", "scoring_func"
)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_routed_experts_per_layer": {"1": 64, "2": 17, "3": 8}, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_scaling": {"type": "dynamic", "factor": 3.0}, "rope_theta": 20000.0, "norm_topk_prob": True},
    ],
    ids=["upstream", "per_layer_linear", "dynamic_norm"],
)
def test_save_load_round_trip(tmp_path, overrides):
    cfg = cfg_with(**overrides)
    sd = make_state_dict(cfg, seed=5)
    model = build_model(cfg, sd)
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.py"))
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in UPSTREAM_KEYS:
        assert key in saved, key
    assert "rope_parameters" not in saved
    assert saved["model_type"] == "deepseek"
    assert saved["rope_scaling"] == cfg["rope_scaling"]
    assert saved["rope_theta"] == cfg["rope_theta"]
    for key in ("n_routed_experts", "num_experts_per_tok", "norm_topk_prob", "scoring_func", "n_shared_experts",
                "first_k_dense_replace", "moe_layer_freq", "moe_intermediate_size"):
        assert saved[key] == cfg[key], key
    if "n_routed_experts_per_layer" in cfg:
        assert saved["n_routed_experts_per_layer"] == cfg["n_routed_experts_per_layer"]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is DeepseekForCausalLM
    assert loaded.config.n_routed_experts_per_layer == cfg.get("n_routed_experts_per_layer")
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b) == set(fused_state_dict(cfg, sd))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = random_ids((2, SEQ))
    # weights are bit-identical (above); loaded tensors are views into the file at other memory alignments, for
    # which the BLAS may pick another kernel, so the logits may differ in the last bit
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=1e-5, atol=1e-5)
    # and a second save writes the same config
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: again.get(k) for k in saved if k != "transformers_version"} == {
        k: v for k, v in saved.items() if k != "transformers_version"
    }


# --------------------------------------------------------------------------------------------------------------
# 4. Generation: KV cache, generate(), left padding
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["eager", "sdpa"])
def gen_model(request, base_sd):
    model = build_model(BASE, base_sd, attn_implementation=request.param)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    assert model.config._attn_implementation == request.param
    return model


def test_kv_cache_decoding_equals_full_forwards(gen_model):
    prompt = random_ids((1, 5), seed=7)
    steps = 6
    # greedy with a full forward (no cache) per step
    ids, full_logits = prompt, []
    for _ in range(steps):
        last = logits_of(gen_model, ids)[:, -1]
        full_logits.append(last)
        ids = torch.cat([ids, last.argmax(-1, keepdim=True)], dim=1)
    # the same with a KV cache, one token per step
    with torch.no_grad():
        out = gen_model(input_ids=prompt, use_cache=True)
        cache, cached_ids, cached_logits = cache_of(out), prompt, [out.logits[:, -1]]
        for _ in range(steps - 1):
            nxt = cached_logits[-1].argmax(-1, keepdim=True)
            cached_ids = torch.cat([cached_ids, nxt], dim=1)
            out = gen_model(input_ids=nxt, cache=cache, use_cache=True)
            cache = cache_of(out)
            cached_logits.append(out.logits[:, -1])
        cached_ids = torch.cat([cached_ids, cached_logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached_ids, ids)
    for a, b in zip(cached_logits, full_logits):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == prompt.shape[1] + steps - 1
    # generate(), with and without cache, makes the same greedy choices
    with torch.no_grad():
        with_cache = gen_model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True)
        without = gen_model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, ids)
    assert torch.equal(without, ids)


def test_multi_token_step_with_cache(gen_model):
    """A chunk of several new tokens after a cached prefix (causal within the chunk)."""
    ids = random_ids((2, 9), seed=8)
    full = logits_of(gen_model, ids)
    with torch.no_grad():
        out = gen_model(input_ids=ids[:, :4], use_cache=True)
        out2 = gen_model(input_ids=ids[:, 4:], cache=cache_of(out), use_cache=True)
    assert_close(torch.cat([out.logits, out2.logits], dim=1), full)


def test_left_padding_matches_unpadded_row(gen_model):
    single = random_ids((1, 5), seed=9)
    other = random_ids((1, 7), seed=10)
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), single], dim=1), other])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    alone = logits_of(gen_model, single)[0, -1]
    other_alone = logits_of(gen_model, other)[0, -1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    for kwargs in ({}, {"position_ids": position_ids}):
        padded = logits_of(gen_model, batch, attention_mask=mask, **kwargs)
        assert torch.isfinite(padded[0, 2:]).all() and torch.isfinite(padded[1]).all()
        assert_close(padded[0, -1], alone, atol=1e-4, rtol=1e-4)
        assert_close(padded[1, -1], other_alone, atol=1e-4, rtol=1e-4)
    # through generate(): per-step logits of the padded row equal those of the row alone
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = gen_model.generate(batch, attention_mask=mask, **kwargs)
        solo = gen_model.generate(single, **kwargs)
    assert torch.equal(batched.sequences[0, 2:], solo.sequences[0])
    for a, b in zip(batched.logits, solo.logits):
        assert_close(a[0], b[0], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# 5. eager vs sdpa; bf16
# --------------------------------------------------------------------------------------------------------------
def test_eager_and_sdpa_agree(base_sd):
    eager = build_model(BASE, base_sd, attn_implementation="eager")
    sdpa = build_model(BASE, base_sd, attn_implementation="sdpa")
    ids = random_ids((2, SEQ))
    assert_close(logits_of(eager, ids), logits_of(sdpa, ids))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    a = logits_of(eager, ids, attention_mask=mask)
    b = logits_of(sdpa, ids, attention_mask=mask)
    assert_close(a[0, 3:], b[0, 3:])
    assert_close(a[1], b[1])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_from_pretrained_attn_implementation(saved_dirs, base_model, implementation):
    model = AutoModelForCausalLM.from_pretrained(saved_dirs[False], attn_implementation=implementation).eval()
    assert model.config._attn_implementation == implementation
    ids = random_ids((1, SEQ))
    assert_close(logits_of(model, ids), logits_of(base_model, ids))


def test_bf16_runs_and_is_close_to_fp32(base_sd, base_model):
    ids = random_ids((2, SEQ))
    fp32 = logits_of(base_model, ids)
    model = build_model(BASE, base_sd).to(torch.bfloat16)
    with torch.no_grad():
        bf16 = model(input_ids=ids, use_cache=False).logits
    assert bf16.dtype == torch.bfloat16
    bf16 = bf16.float()
    assert torch.isfinite(bf16).all()
    scale = fp32.abs().max()
    assert (bf16 - fp32).abs().max() < 0.1 * scale
    assert F.cosine_similarity(bf16.flatten(), fp32.flatten(), dim=0) > 0.995
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.8


# --------------------------------------------------------------------------------------------------------------
# 6. Shipped modeling files load with trust_remote_code where moe-compress is not importable
# --------------------------------------------------------------------------------------------------------------
SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["compressor"] = None  # moe-compress is not importable in this process
    import torch
    from transformers import AutoModelForCausalLM

    directory, result = sys.argv[1], sys.argv[2]
    try:
        import compressor  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("compressor should not be importable here")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    module = type(model).__module__
    assert not [m for m, v in sys.modules.items() if m.startswith("compressor") and v is not None]
    data = torch.load(directory + "/inputs.pt")
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], use_cache=False).logits
        generated = model.generate(data["input_ids"][:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    torch.save({"logits": logits, "generated": generated, "module": module,
                "experts": [getattr(getattr(l.mlp, "experts", None), "num_experts", 0) for l in model.model.layers]},
               result)
    """
)


@pytest.mark.slow
def test_write_modeling_files_loads_with_trust_remote_code_without_compressor(tmp_path):
    cfg = cfg_with(
        n_routed_experts_per_layer={"1": 64, "2": 17, "3": 8}, rope_scaling={"type": "linear", "factor": 2.0}
    )
    model = build_model(cfg, make_state_dict(cfg, seed=6))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    write_modeling_files(checkpoint)
    assert sorted(p.name for p in checkpoint.glob("*.py")) == ["configuration_deepseek.py", "modeling_deepseek.py"]
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekForCausalLM"
    assert saved["auto_map"]["AutoConfig"] == "configuration_deepseek.DeepseekConfig"
    assert saved["n_routed_experts_per_layer"] == cfg["n_routed_experts_per_layer"]
    ids = random_ids((2, SEQ))
    torch.save({"input_ids": ids}, checkpoint / "inputs.pt")
    with torch.no_grad():
        expected_generated = model.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, use_cache=True)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = tmp_path / "result.pt"
    proc = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, str(checkpoint), str(result)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(result)
    assert out["module"].startswith("transformers_modules"), out["module"]
    assert out["experts"] == [0, 64, 17, 8]
    # another process may use other thread counts (another summation order): fp32 agreement, not bit equality
    assert_close(out["logits"], logits_of(model, ids))
    assert torch.equal(out["generated"], expected_generated)


_REGISTRATION_SCRIPT = """
import sys
order, directory = sys.argv[1], sys.argv[2]
if order == "compressor-first":
    import compressor
    assert "transformers.modeling_utils" not in sys.modules, "import compressor loaded the modeling stack"
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(directory)  # the config alone, before any model class is imported
    assert type(config).__module__ == "compressor.modeling.configuration_deepseek", type(config)
    from transformers import AutoModelForCausalLM
else:
    from transformers import AutoModelForCausalLM
    import compressor
model = AutoModelForCausalLM.from_pretrained(directory)
print(type(model).__module__, type(model).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["compressor-first", "transformers-first"])
def test_import_compressor_registers_with_the_auto_classes_in_either_order(upstream_checkpoint, order):
    """`import compressor` is cheap (no modeling stack) yet Auto classes resolve `deepseek` to our classes,
    without remote code, whether transformers' Auto modules were imported before or after it."""
    directory = upstream_checkpoint[0]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", _REGISTRATION_SCRIPT, order, str(directory)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["compressor.modeling.modeling_deepseek", "DeepseekForCausalLM"]


# --------------------------------------------------------------------------------------------------------------
# 7. Invalid routing width
# --------------------------------------------------------------------------------------------------------------
def test_num_experts_per_tok_larger_than_a_layer_raises(saved_dirs, tmp_path):
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        DeepseekConfig(**cfg_with(num_experts_per_tok=65))
    with pytest.raises(ValueError, match=r"num_experts_per_tok=18.*\b17\b"):
        DeepseekConfig(**cfg_with(num_experts_per_tok=18, n_routed_experts_per_layer={"2": 17}))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        AutoModelForCausalLM.from_pretrained(saved_dirs[False], num_experts_per_tok=65)
    cfg = cfg_with(n_routed_experts_per_layer={"1": 64, "2": 17, "3": 8})
    build_model(cfg, make_state_dict(cfg)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_experts_per_tok.*\b8\b"):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_experts_per_tok=9)
    # 8 fits every layer
    assert AutoModelForCausalLM.from_pretrained(tmp_path, num_experts_per_tok=8).config.num_experts_per_tok == 8


# --------------------------------------------------------------------------------------------------------------
# 8. Training loss = cross-entropy + expert-level balance loss (seq_aux)
# --------------------------------------------------------------------------------------------------------------
def test_training_loss_is_cross_entropy_plus_balance_loss():
    cfg = cfg_with(aux_loss_alpha=0.05, seq_aux=True)
    sd = make_state_dict(cfg, seed=0)
    model = build_model(cfg, sd).train()
    ids = random_ids((2, SEQ))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(input_ids=ids, labels=labels, use_cache=False)
    ref_logits, routing = ref_forward(sd, cfg, ids)
    assert_close(out.logits.detach(), ref_logits)
    ce = F.cross_entropy(
        ref_logits[:, :-1].reshape(-1, cfg["vocab_size"]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    aux = ref_aux_loss(routing, cfg)
    assert aux > 1e-2  # large enough to be seen
    assert_close(out.loss.detach(), ce + aux)
    out.loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    # as upstream: the balance loss is a training-time term only
    model.eval()
    with torch.no_grad():
        eval_loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    assert_close(eval_loss, ce)
