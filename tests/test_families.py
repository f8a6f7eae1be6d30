"""compressor.families: family detection, tensor naming, pruned configs and in-memory layouts."""

import copy
from collections import Counter

import pytest

import fixtures
from compressor.errors import UserError
from compressor.families import RouterSpec, TensorRole, detect_family, get_family
from compressor.families.layout import CheckpointLayout
from compressor.modeling import DeepseekConfig, DeepseekForCausalLM


# deepseek-ai/deepseek-moe-16b-base config.json (the keys that matter), used when the reference copy is absent.
DEEPSEEK_MOE_16B = {
    "architectures": ["DeepseekForCausalLM"],
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
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
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 102400,
}

# Shaped like deepseek-ai/DeepSeek-V2-Lite's config.json.
V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}

# Shaped like deepseek-ai/DeepSeek-V2's config.json: grouped routing.
V2_GROUPED = {
    **V2_LITE,
    "hidden_size": 5120,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 60,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 160,
    "n_group": 8,
    "topk_group": 3,
    "topk_method": "group_limited_greedy",
    "routed_scaling_factor": 16.0,
    "q_lora_rank": 1536,
}


@pytest.fixture(scope="module")
def moe16b_config():
    config = fixtures.deepseek_moe_16b_config()
    assert {k: config[k] for k in DEEPSEEK_MOE_16B} == DEEPSEEK_MOE_16B
    return config


@pytest.fixture(scope="module")
def moe16b_names():
    return sorted(fixtures.deepseek_moe_16b_weight_map())


# -- detection ------------------------------------------------------------------------------------


def test_detects_deepseek_moe_16b(moe16b_config):
    family = detect_family(moe16b_config)
    assert family.name == "deepseek_moe" and family.model_types == ("deepseek",)
    assert family is get_family("deepseek_moe") is get_family("deepseek")
    assert family.num_layers(moe16b_config) == 28
    assert family.moe_layers(moe16b_config) == list(range(1, 28))
    assert all(family.num_experts(moe16b_config, layer) == 64 for layer in range(1, 28))
    assert family.top_k(moe16b_config) == 6
    assert (family.expert_count_key, family.top_k_key) == ("n_routed_experts", "num_experts_per_tok")
    assert family.router(moe16b_config) == RouterSpec(
        scoring="softmax", top_k=6, renormalize=False, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, correction_bias=False, logits_fp32=True, renorm_eps=1e-20,
    )
    with pytest.raises(UserError, match="layer 0 is not an MoE layer"):
        family.num_experts(moe16b_config, 0)


def test_detects_deepseek_v2_lite():
    family = detect_family(V2_LITE)
    assert family.name == "deepseek_v2" and family.model_types == ("deepseek_v2",)
    assert family.moe_layers(V2_LITE) == list(range(1, 27))
    assert family.num_experts(V2_LITE, 26) == 64 and family.top_k(V2_LITE) == 6
    spec = family.router(V2_LITE)
    assert (spec.scoring, spec.topk_method, spec.n_group, spec.topk_group) == ("softmax", "greedy", 1, 1)
    assert not spec.grouped and not spec.correction_bias and not spec.renormalize


def test_detects_grouped_deepseek_v2():
    family = detect_family(V2_GROUPED)
    assert family.name == "deepseek_v2"
    assert family.moe_layers(V2_GROUPED) == list(range(1, 60))
    spec = family.router(V2_GROUPED)
    assert spec.topk_method == "group_limited_greedy" and spec.grouped
    assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == (8, 3, 16.0)


def test_unknown_model_type_lists_supported_families():
    with pytest.raises(UserError, match=r"unsupported model: model_type 'llama'.*deepseek_moe.*qwen3_moe.*mixtral") as err:
        detect_family({"model_type": "llama"})
    assert "\n" not in str(err.value)
    assert "transformers implements it" in str(err.value)  # a model_type transformers knows, but no adapter
    with pytest.raises(UserError, match="unsupported model: model_type 'frobnicator'; supported") as err:
        detect_family({"model_type": "frobnicator"})
    assert "transformers implements it" not in str(err.value)
    with pytest.raises(UserError, match="without model_type.*deepseek_moe"):
        detect_family({})
    with pytest.raises(UserError, match="unknown model family 'gpt2'.*deepseek_v2"):
        get_family("gpt2")


# -- the on-disk layout, derived from transformers, against the real 16B weight map -------------------------


def test_layout_of_the_real_16b_is_its_weight_map(moe16b_config, moe16b_names):
    """The meta model of the published config, reverted through the registered conversion, names exactly the
    5,466 tensors of deepseek-moe-16b-base's model.safetensors.index.json (no regex per family)."""
    family = detect_family(moe16b_config)
    layout = CheckpointLayout(family, moe16b_config, moe16b_names)
    names = set(moe16b_names)
    assert len(names) == 5466 and layout.expected == names
    roles = {name: layout.classify(name) for name in names}
    kinds = Counter(role.kind for role in roles.values())
    # 27 MoE layers x (64 experts x 3 + 1 router + 3 shared); 9 tensors in dense layer 0, 6 others per MoE
    # layer, and embed/norm/lm_head.
    assert kinds == {"expert": 27 * 64 * 3, "router": 27, "shared_expert": 27 * 3, "other": 9 + 27 * 6 + 3}
    assert sorted(layout.layers) == family.moe_layers(moe16b_config) == list(range(1, 28))
    for layer, layer_layout in layout.layers.items():
        prefix = f"model.layers.{layer}.mlp."
        assert [t.template for t in layer_layout.experts] == [
            f"{prefix}experts.{{}}.{p}_proj.weight" for p in ("gate", "up", "down")]
        assert all(t.per_expert for t in layer_layout.experts)
        assert layer_layout.router == {f"{prefix}gate.weight": 0}
        assert sorted(layer_layout.shared) == sorted(f"{prefix}shared_experts.{p}_proj.weight"
                                                     for p in ("down", "gate", "up"))
        for expert in (0, 17, 63):
            assert all(roles[n] == TensorRole("expert", layer, expert) for n in layer_layout.expert_names(expert))
    assert roles["model.layers.0.mlp.gate_proj.weight"] == TensorRole("other", 0, None)
    assert roles["lm_head.weight"] == TensorRole("other", None, None)
    assert layout.shapes["model.layers.5.mlp.experts.9.down_proj.weight"] == (2048, 1408)
    assert layout.shapes["model.layers.5.mlp.gate.weight"] == (64, 2048)
    assert layout.shapes["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)

    layout.validate(HeadersOf16B(names, layout.shapes))
    with pytest.raises(UserError, match="missing model.layers.5.mlp.experts.63.down_proj.weight"):
        layout.validate(HeadersOf16B(names - {"model.layers.5.mlp.experts.63.down_proj.weight"}, layout.shapes))
    with pytest.raises(UserError, match="no expert for"):
        layout.validate(HeadersOf16B(names | {"model.layers.5.mlp.experts.64.down_proj.weight"}, layout.shapes))
    with pytest.raises(UserError, match=r"gate.weight has shape \[60, 2048\].*64 routed experts"):
        layout.validate(HeadersOf16B(names, {**layout.shapes, "model.layers.3.mlp.gate.weight": (60, 2048)}))


def test_layout_of_v2_lite_at_full_size():
    family = detect_family(V2_LITE)
    layout = CheckpointLayout(family, V2_LITE)
    assert sorted(layout.layers) == list(range(1, 27))
    assert layout.shapes["model.layers.1.mlp.experts.5.gate_proj.weight"] == (1408, 2048)
    assert layout.shapes["model.layers.1.mlp.experts.5.down_proj.weight"] == (2048, 1408)
    assert layout.layers[1].router == {"model.layers.1.mlp.gate.weight": 0}
    assert len([n for n in layout.expected if ".mlp.experts." in n]) == 26 * 64 * 3


class HeadersOf16B:
    """A header-only stand-in for a CheckpointReader: tensor names and their shapes."""

    def __init__(self, names, shapes):
        self._names, self._shapes = sorted(names), shapes

    def names(self):
        return list(self._names)

    def info(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(shape=self._shapes.get(name, (1408, 2048)))


# -- pruned configs -------------------------------------------------------------------------------------


def _keep(config, family, count_for_layer):
    return {layer: list(range(count_for_layer(layer))) for layer in family.moe_layers(config)}


def test_deepseek_moe_pruned_config_uniform(moe16b_config):
    family = detect_family(moe16b_config)
    kept = {layer: list(range(0, 64, 4)) for layer in range(1, 28)}  # 16 per layer
    original = copy.deepcopy(moe16b_config)
    new = family.pruned_config(moe16b_config, kept, top_k=1)
    assert moe16b_config == original  # input untouched
    assert new["n_routed_experts"] == 16 and new["num_experts_per_tok"] == 1
    assert "n_routed_experts_per_layer" not in new
    assert {k: v for k, v in new.items() if k not in ("n_routed_experts", "num_experts_per_tok")} == {
        k: v for k, v in original.items() if k not in ("n_routed_experts", "num_experts_per_tok")
    }
    config = family.build_config(new)
    assert isinstance(config, DeepseekConfig)
    assert [config.routed_experts_in_layer(layer) for layer in range(1, 28)] == [16] * 27
    assert family.num_experts(new, 7) == 16 and family.top_k(new) == 1
    assert family.native_transformers_support(moe16b_config, kept, 1) == (
        "transformers has no native deepseek (v1) model; the output ships moe-compress's modeling file"
    )


def test_deepseek_moe_pruned_config_per_layer(moe16b_config):
    family = detect_family(moe16b_config)
    counts = {layer: 32 if layer < 10 else (24 if layer % 2 else 40) for layer in range(1, 28)}
    kept = {layer: sorted(range(64), key=lambda e: (e * 7919) % 64)[:count] for layer, count in counts.items()}
    new = family.pruned_config(moe16b_config, kept, top_k=2)
    assert new["n_routed_experts"] == 40 and new["num_experts_per_tok"] == 2
    assert new["n_routed_experts_per_layer"] == {str(l): c for l, c in counts.items() if c != 40}
    config = family.build_config(new)
    assert [config.routed_experts_in_layer(layer) for layer in range(1, 28)] == [counts[l] for l in range(1, 28)]
    assert [family.num_experts(new, layer) for layer in range(1, 28)] == [counts[l] for l in range(1, 28)]
    # vLLM's class for it comes from moe-compress's vLLM plugin
    assert new["architectures"] == ["DeepseekForCausalLMPerLayer"] == [family.vllm_per_layer_architecture]
    # Re-pruning a per-layer checkpoint back to uniform drops the per-layer key and names vLLM's own class again.
    again = family.pruned_config(new, {layer: [0, 1, 2] for layer in range(1, 28)}, top_k=1)
    assert again["n_routed_experts"] == 3 and "n_routed_experts_per_layer" not in again
    assert again["architectures"] == ["DeepseekForCausalLM"]


def test_per_layer_pruned_config_builds_a_model():
    family = get_family("deepseek_moe")
    config = dict(model_type="deepseek", vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                  num_hidden_layers=4, num_attention_heads=2, n_routed_experts=6, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1)
    new = family.pruned_config(config, {1: [5, 0], 2: [1, 2, 3], 3: [4]}, top_k=1)
    model = DeepseekForCausalLM(family.build_config(new))
    assert [model.model.layers[i].mlp.experts.num_experts for i in (1, 2, 3)] == [2, 3, 1]
    assert model.model.layers[1].mlp.gate.weight.shape == (2, 16)


def test_keep_plan_validation(moe16b_config):
    family = detect_family(moe16b_config)
    full = {layer: list(range(8)) for layer in range(1, 28)}
    with pytest.raises(UserError, match="no entry for MoE layers 3-4, 27"):
        family.pruned_config(moe16b_config, {k: v for k, v in full.items() if k not in (3, 4, 27)}, 1)
    with pytest.raises(UserError, match="layer 0, which is not an MoE layer"):
        family.pruned_config(moe16b_config, {**full, 0: [1]}, 1)
    with pytest.raises(UserError, match="lists an expert twice"):
        family.pruned_config(moe16b_config, {**full, 5: [1, 1]}, 1)
    with pytest.raises(UserError, match="experts 0..63, not 64"):
        family.pruned_config(moe16b_config, {**full, 5: [64]}, 1)
    with pytest.raises(UserError, match="at least one expert"):
        family.pruned_config(moe16b_config, {**full, 5: []}, 1)
    with pytest.raises(UserError, match="top_k=3 exceeds the 2 experts kept in layer 9"):
        family.pruned_config(moe16b_config, {**full, 9: [0, 1]}, 3)
    assert family.pruned_config(moe16b_config, {str(k): v for k, v in full.items()}, 8)["n_routed_experts"] == 8


def test_deepseek_v2_pruned_config_per_layer_counts():
    family = detect_family(V2_LITE)
    uniform = {layer: list(range(0, 64, 2)) for layer in range(1, 27)}
    new = family.pruned_config(V2_LITE, uniform, top_k=1)
    assert new["n_routed_experts"] == 32 and new["num_experts_per_tok"] == 1
    assert family.build_config(new).num_experts == 32
    assert family.native_transformers_support(V2_LITE, uniform, 1) is None
    ragged = {**uniform, 4: list(range(16))}
    new = family.pruned_config(V2_LITE, ragged, top_k=1)
    assert new["n_routed_experts_per_layer"] == {"4": 16}
    assert "per-layer modeling file" in family.native_transformers_support(V2_LITE, ragged, 1)
    # the same name for transformers' per-layer class and the vLLM plugin's
    assert family.model_class(new).__name__ == "DeepseekV2ForCausalLMPerLayer" == new["architectures"][0]


def test_deepseek_v2_grouped_router_constraints():
    family = detect_family(V2_GROUPED)
    layers = family.moe_layers(V2_GROUPED)
    # 160 experts in 8 groups of 20. Keep 4 per group: 32, grouped by construction.
    balanced = {layer: [g * 20 + j for g in range(8) for j in (0, 3, 7, 19)] for layer in layers}
    new = family.pruned_config(V2_GROUPED, balanced, top_k=6)
    assert new["n_routed_experts"] == 32 and new["n_group"] == 8 and new["topk_group"] == 3
    assert new["topk_method"] == "group_limited_greedy" and new["routed_scaling_factor"] == 16.0
    assert family.native_transformers_support(V2_GROUPED, balanced, 6) is None

    not_divisible = {layer: list(range(30)) for layer in layers}
    with pytest.raises(UserError, match=r"keeps \[20, 10, 0, 0, 0, 0, 0, 0\].*--ungroup \(route without groups: "
                                        r"n_group: 1, topk_group: 1, topk_method: greedy"):
        family.pruned_config(V2_GROUPED, not_divisible, top_k=6)
    unbalanced = {layer: list(range(32)) for layer in layers}  # group 0 full, 12 of group 1, the rest empty
    with pytest.raises(UserError, match=r"every group keeps the same number of experts \(or none.*without groups"):
        family.pruned_config(V2_GROUPED, unbalanced, top_k=6)
    four_groups = {layer: list(range(80)) for layer in layers}  # groups 0..3 whole, 4..7 dropped
    new = family.pruned_config(V2_GROUPED, four_groups, top_k=6)
    assert (new["n_routed_experts"], new["n_group"], new["topk_group"]) == (80, 4, 3)
    two_groups = {layer: [*range(5), *range(40, 45)] for layer in layers}
    new = family.pruned_config(V2_GROUPED, two_groups, top_k=6)
    assert (new["n_routed_experts"], new["n_group"], new["topk_group"]) == (10, 2, 2)
    with pytest.raises(UserError, match="every layer must keep the same number of groups: layer 1 keeps 4, layer 2 "
                                        "keeps 2"):
        family.pruned_config(V2_GROUPED, {**four_groups, 2: two_groups[2]}, top_k=6)
    shuffled = {layer: list(reversed(experts)) for layer, experts in balanced.items()}
    shuffled[1] = [e for pair in zip(balanced[1][:16], balanced[1][16:]) for e in pair]
    with pytest.raises(UserError, match="group by group"):
        family.pruned_config(V2_GROUPED, shuffled, top_k=6)
    one_per_group = {layer: [g * 20 for g in range(8)] for layer in layers}
    with pytest.raises(UserError, match="top_k=6 exceeds the 3 experts left in 3 groups"):
        family.pruned_config(V2_GROUPED, one_per_group, top_k=6)
    assert "every group keeps the same number" in family.native_transformers_support(V2_GROUPED, not_divisible, 6)

    ungrouped = family.pruned_config(V2_GROUPED, unbalanced, top_k=1, ungroup=True)
    assert (ungrouped["topk_method"], ungrouped["n_group"], ungrouped["topk_group"]) == ("greedy", 1, 1)
    assert ungrouped["n_routed_experts"] == 32 and ungrouped["num_experts_per_tok"] == 1
    assert not family.router(ungrouped).grouped
    assert family.native_transformers_support(V2_GROUPED, unbalanced, 1, ungroup=True) is None


# Shaped like deepseek-ai/DeepSeek-V3's config.json (bf16: without its quantization_config).
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "tie_word_embeddings": False,
}


def test_deepseek_v3_router_and_group_constraints():
    family = detect_family(V3)
    assert family.name == "deepseek_v3" and family.moe_layers(V3) == list(range(3, 61))
    spec = family.router(V3)
    assert (spec.scoring, spec.topk_method, spec.n_group, spec.topk_group, spec.top_k) == ("sigmoid", "noaux_tc", 8, 4, 8)
    assert spec.renormalize and spec.routed_scaling_factor == 2.5 and spec.grouped and spec.logits_fp32
    assert family.expert_groups(V3) == {"count": 8, "chosen": 4, "min_kept": 2}
    family.check_config(V3)
    # keys config.json leaves out take transformers' defaults (V3: 8 groups, 4 open, 3 dense layers)
    bare = {k: v for k, v in V3.items() if k not in ("n_group", "topk_group", "first_k_dense_replace")}
    assert family.expert_groups(bare) == {"count": 8, "chosen": 4, "min_kept": 2} and family.moe_layers(bare)[0] == 3

    layers = family.moe_layers(V3)
    balanced = {layer: [g * 32 + j for g in range(8) for j in range(16)] for layer in layers}  # 16 of 32 per group
    new = family.pruned_config(V3, balanced, top_k=8)
    assert (new["n_routed_experts"], new["n_group"], new["topk_group"], new["num_experts_per_tok"]) == (128, 8, 4, 8)
    assert family.native_transformers_support(V3, balanced, 8) is None
    one_per_group = {layer: [g * 32 for g in range(8)] for layer in layers}
    with pytest.raises(UserError, match=r"its 2 best experts; layer 3 keeps 1 per group.*--ungroup \(route without "
                                        r"groups: n_group: 1, topk_group: 1;"):
        family.pruned_config(V3, one_per_group, top_k=1)
    two_per_group = {layer: [g * 32 + j for g in range(8) for j in (0, 1)] for layer in layers}
    with pytest.raises(UserError, match="top_k=9 exceeds the 8 experts left in 4 groups of 2"):
        family.pruned_config(V3, two_per_group, top_k=9)

    front = {layer: list(range(64)) for layer in layers}  # groups 0 and 1 whole, the other six dropped
    regrouped = family.pruned_config(V3, front, top_k=8)
    assert (regrouped["n_group"], regrouped["topk_group"], regrouped["n_routed_experts"]) == (2, 2, 64)
    lopsided = {layer: list(range(48)) for layer in layers}
    with pytest.raises(UserError, match=r"keeps \[32, 16, 0, 0, 0, 0, 0, 0\]"):
        family.pruned_config(V3, lopsided, top_k=8)
    ungrouped = family.pruned_config(V3, lopsided, top_k=8, ungroup=True)
    assert (ungrouped["n_group"], ungrouped["topk_group"], ungrouped["n_routed_experts"]) == (1, 1, 48)
    assert not family.router(ungrouped).grouped and family.expert_groups(ungrouped) is None
    with pytest.raises(UserError, match="every layer must keep at least 2; layer 3 keeps 1"):
        family.pruned_config(V3, {layer: [5] for layer in layers}, top_k=1, ungroup=True)
    assert family.compensation_config(V3, "renorm") == {"norm_topk_prob": True}
    with pytest.raises(UserError, match="topk_group=9 exceeds n_group=8"):
        family.router({**V3, "topk_group": 9})
    assert family.vllm_problem(V3) is None
    bare = {k: v for k, v in V3.items() if k not in ("scoring_func", "topk_method")}  # as transformers writes it
    assert 'set scoring_func: "sigmoid", topk_method: "noaux_tc"' in family.vllm_problem(bare)


# Shaped like zai-org/GLM-4.5-Air's config.json.
GLM45_AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "first_k_dense_replace": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 10944, "max_position_embeddings": 131072,
    "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000, "routed_scaling_factor": 1.0, "tie_word_embeddings": False, "topk_group": 1,
    "use_qk_norm": False, "vocab_size": 151552,
}


def test_glm4_moe_routes_like_deepseek_v3():
    family = detect_family(GLM45_AIR)
    assert family.name == "glm4_moe" and family.moe_layers(GLM45_AIR) == list(range(1, 46))
    family.check_config(GLM45_AIR)
    spec = family.router(GLM45_AIR)
    assert (spec.scoring, spec.topk_method, spec.top_k, spec.renormalize) == ("sigmoid", "noaux_tc", 8, True)
    assert not spec.grouped and family.expert_groups(GLM45_AIR) is None and family.vllm_cpu_workaround is None
    layers = family.moe_layers(GLM45_AIR)
    new = family.pruned_config(GLM45_AIR, {layer: list(range(0, 128, 2)) for layer in layers}, top_k=1)
    assert (new["n_routed_experts"], new["num_experts_per_tok"], new["n_group"]) == (64, 1, 1)
    with pytest.raises(UserError, match="every layer must keep at least 2; layer 1 keeps 1"):
        family.pruned_config(GLM45_AIR, {layer: [0] for layer in layers}, top_k=1)
    bare = {k: v for k, v in GLM45_AIR.items() if k not in ("n_group", "topk_group", "first_k_dense_replace")}
    assert family.moe_layers(bare) == layers and family.expert_groups(bare) is None  # GLM's own defaults: 1, 1, 1


# Shaped like MiniMaxAI/MiniMax-M2's config.json (without its FP8 quantization_config).
MINIMAX_M2 = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 3072, "intermediate_size": 1536, "max_position_embeddings": 196608, "num_attention_heads": 48,
    "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "scoring_func": "sigmoid",
    "tie_word_embeddings": False, "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
}


def test_minimax_m2_router_and_its_block_level_selection_bias():
    family = detect_family(MINIMAX_M2)
    assert family.name == "minimax_m2" and family.moe_layers(MINIMAX_M2) == list(range(62))
    family.check_config(MINIMAX_M2)
    spec = family.router(MINIMAX_M2)
    assert (spec.scoring, spec.topk_method, spec.top_k, spec.renormalize, spec.grouped) == \
        ("sigmoid", "greedy", 8, True, False)
    with pytest.raises(UserError, match="always renormalises"):
        family.compensation_config(MINIMAX_M2, "renorm")
    two_layers = {**MINIMAX_M2, "num_hidden_layers": 2}
    layout = CheckpointLayout(family, two_layers)
    assert layout.layers[1].router == {"model.layers.1.block_sparse_moe.gate.weight": 0,
                                       "model.layers.1.block_sparse_moe.e_score_correction_bias": 0}
    assert layout.shapes["model.layers.1.block_sparse_moe.experts.255.w2.weight"] == (3072, 1536)
    assert layout.classify("model.layers.0.block_sparse_moe.e_score_correction_bias") == TensorRole("router", 0, None)
    new = family.pruned_config(MINIMAX_M2, {layer: list(range(128)) for layer in range(62)}, top_k=4)
    assert (new["num_local_experts"], new["num_experts_per_tok"]) == (128, 4)
    assert family.vllm_problem(new) is None
    assert "set use_routing_bias: true" in family.vllm_problem({**new, "use_routing_bias": False})


# Shaped like baidu/ERNIE-4.5-21B-A3B-PT's config.json.
ERNIE_21B = {
    "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_act": "silu",
    "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072, "moe_intermediate_size": 1536,
    "moe_k": 6, "moe_layer_end_index": 27, "moe_layer_interval": 1, "moe_layer_start_index": 1,
    "moe_num_experts": 64, "moe_num_shared_experts": 2, "num_attention_heads": 20, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-05, "rope_theta": 500000, "tie_word_embeddings": True,
    "use_bias": False, "vocab_size": 103424,
}


def test_ernie_moe_layers_and_its_statistics_bias():
    family = detect_family(ERNIE_21B)
    assert family.name == "ernie4_5_moe" and family.moe_layers(ERNIE_21B) == list(range(1, 28))
    family.check_config(ERNIE_21B)
    assert family.top_k(ERNIE_21B) == 6 and family.num_experts(ERNIE_21B, 5) == 64
    spec = family.router(ERNIE_21B)
    assert (spec.scoring, spec.renormalize, spec.logits_fp32, spec.weights_fp32) == ("softmax", True, True, False)
    sparse = {**ERNIE_21B, "moe_layer_start_index": 2, "moe_layer_end_index": 20, "moe_layer_interval": 2}
    assert family.moe_layers(sparse) == [3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert family.moe_layers({**sparse, "moe_layer_end_index": -1}) == list(range(3, 28, 2))
    layout = CheckpointLayout(family, {**ERNIE_21B, "num_hidden_layers": 2, "moe_layer_end_index": 1})
    assert layout.layers[1].router == {"model.layers.1.mlp.gate.weight": 0,
                                       "model.layers.1.mlp.moe_statics.e_score_correction_bias": 1}
    assert layout.shapes["model.layers.1.mlp.moe_statics.e_score_correction_bias"] == (1, 64)
    new = family.pruned_config(ERNIE_21B, {layer: list(range(32)) for layer in range(1, 28)}, top_k=1)
    assert (new["moe_num_experts"], new["moe_k"]) == (32, 1)
    with pytest.raises(UserError, match="always renormalises"):
        family.compensation_config(ERNIE_21B, "renorm")


# Shaped like openai/gpt-oss-20b's config.json, as its bf16 conversions ship it (no quantization_config).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "intermediate_size": 2880, "max_position_embeddings": 131072, "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "rms_norm_eps": 1e-05, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": 201088, "attention_bias": True,
}


def test_gpt_oss_router_and_its_experts_fused_on_disk():
    family = detect_family(GPT_OSS_20B)
    assert family.name == "gpt_oss" and family.moe_layers(GPT_OSS_20B) == list(range(24))
    family.check_config(GPT_OSS_20B)
    spec = family.router(GPT_OSS_20B)
    assert (spec.softmax_after_topk, spec.top_k, spec.renormalize, spec.logits_fp32) == (True, 4, False, False)
    layout = CheckpointLayout(family, {**GPT_OSS_20B, "num_hidden_layers": 2})
    assert layout.layers[1].router == {"model.layers.1.mlp.router.weight": 0, "model.layers.1.mlp.router.bias": 0}
    fused = {t.template: t.per_expert for t in layout.layers[1].experts}
    assert fused == {f"model.layers.1.mlp.experts.{n}": False for n in
                     ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
    assert layout.shapes["model.layers.1.mlp.experts.gate_up_proj"] == (32, 2880, 5760)
    assert layout.classify("model.layers.1.mlp.experts.down_proj") == TensorRole("expert", 1, None)
    with pytest.raises(UserError, match="always sum to 1"):
        family.compensation_config(GPT_OSS_20B, "renorm")


def test_quantizations_other_than_fine_grained_fp8_and_mxfp4_are_refused_in_one_line():
    for config, method in ((GPT_OSS_20B, "bitsandbytes"), (V3, "gptq"), (MINIMAX_M2, "awq")):
        quantized = {**config, "quantization_config": {"quant_method": method}}
        with pytest.raises(UserError, match=rf"quantization_config method '{method}' is not supported"):
            detect_family(quantized).check_config(quantized)
    per_tensor = {**V3, "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
    with pytest.raises(UserError, match="needs weight_block_size"):
        detect_family(per_tensor).check_config(per_tensor)
    fine_grained = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    detect_family(V3).check_config({**V3, "quantization_config": fine_grained})
    detect_family(GPT_OSS_20B).check_config({**GPT_OSS_20B, "quantization_config": {"quant_method": "mxfp4"}})


# Shaped like Qwen/Qwen3-Next-80B-A3B-Instruct's config.json.
QWEN3_NEXT = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "decoder_sparse_step": 1,
    "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
    "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
    "mlp_only_layers": [], "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16,
    "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48, "num_key_value_heads": 2,
    "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_theta": 10000000,
    "shared_expert_intermediate_size": 512, "tie_word_embeddings": False, "vocab_size": 151936,
}


def test_qwen3_next_moe_layers_and_gated_shared_expert():
    family = detect_family(QWEN3_NEXT)
    assert family.name == "qwen3_next" and family.moe_layers(QWEN3_NEXT) == list(range(48))
    family.check_config(QWEN3_NEXT)
    spec = family.router(QWEN3_NEXT)
    assert (spec.scoring, spec.top_k, spec.renormalize, spec.logits_fp32) == ("softmax", 10, True, False)
    layout = CheckpointLayout(family, {**QWEN3_NEXT, "num_hidden_layers": 4})
    assert sorted(layout.layers[3].shared) == sorted(
        f"model.layers.3.mlp.shared_expert{part}.weight"
        for part in (".gate_proj", ".up_proj", ".down_proj", "_gate"))
    assert layout.shapes["model.layers.3.mlp.experts.511.down_proj.weight"] == (2048, 512)
    assert layout.classify("model.layers.0.linear_attn.in_proj_qkvz.weight").kind == "other"
