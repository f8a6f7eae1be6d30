"""Every supported family through the MoE seam, end to end, on tiny random checkpoints built with transformers' own
config and model classes (ours for DeepSeekMoE) and written by `save_pretrained`, so the on-disk layout is the
standard one.

Independent expectations: routing is recomputed here from the router weights read from disk with each family's rule
written out in this file; the pruned output loaded in plain transformers is compared with the original model whose
router is masked here (dropped experts' logits at -inf, their selection-only biases excluded); kept tensors are
compared byte for byte with the original's. DeepSeek-V3 runs twice: with group-limited routing (2 groups of 4, one
open per token) and without groups.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
    Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM, GptOssConfig, GptOssForCausalLM,
    MiniMaxM2Config, MiniMaxM2ForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM,
    Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM,
)

from compressor.families import detect_family, open_checkpoint
from compressor.families.moe_block import MoEBlock
from compressor.modeling import DeepseekConfig, DeepseekForCausalLM
from helpers import cli_one_and_two_ranks, run_cli, write_jsonl

HIDDEN, EXPERTS, TOP_K, VOCAB = 32, 8, 2, 96
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=1, pad_token_id=None, tie_word_embeddings=False)
_V3 = dict(n_routed_experts=EXPERTS, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
           kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
           routed_scaling_factor=2.5, num_key_value_heads=4, scoring_func="sigmoid", topk_method="noaux_tc")
# name (the family, or family:variant): (config class, model class, extra config, router rule: fp32 logits,
# renormalise, scaling[, (scoring, n_group, topk_group): a selection bias, groups scored by their best two; scoring
# "topk_softmax": gpt-oss's logit bias, top-k on the logits, softmax over the chosen])
FAMILIES = {
    "deepseek_moe": (DeepseekConfig, DeepseekForCausalLM,
                     dict(n_routed_experts=EXPERTS, moe_intermediate_size=16, n_shared_experts=1,
                          first_k_dense_replace=1, num_key_value_heads=4), (True, False, 1.0)),
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM,
                    dict(n_routed_experts=EXPERTS, moe_intermediate_size=16, n_shared_experts=1,
                         first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=8, routed_scaling_factor=1.5, num_key_value_heads=4),
                    (True, False, 1.5)),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM, dict(_V3, n_group=2, topk_group=1, norm_topk_prob=False),
                    (True, False, 2.5, ("sigmoid", 2, 1))),
    "deepseek_v3:ungrouped": (DeepseekV3Config, DeepseekV3ForCausalLM,
                              dict(_V3, n_group=1, topk_group=1, norm_topk_prob=True), (True, True, 2.5, ("sigmoid", 1, 1))),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM,
                 dict(n_routed_experts=EXPERTS, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                      n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5, head_dim=8,
                      partial_rotary_factor=0.5, use_qk_norm=True), (True, True, 1.5, ("sigmoid", 1, 1))),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                  dict(num_experts=EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=False), (False, False, 1.0)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  dict(num_experts=EXPERTS, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[]), (False, True, 1.0)),
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=EXPERTS), (False, True, 1.0)),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(num_experts=EXPERTS, norm_topk_prob=False), (False, False, 1.0)),
    "minimax_m2": (MiniMaxM2Config, MiniMaxM2ForCausalLM, dict(num_local_experts=EXPERTS, head_dim=8,
                                                               scoring_func="sigmoid", use_routing_bias=True),
                   (False, True, 1.0, ("sigmoid", 1, 1))),
    "ernie4_5_moe": (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM,
                     dict(moe_num_experts=EXPERTS, moe_intermediate_size=16, moe_num_shared_experts=1,
                          moe_layer_start_index=1, moe_layer_interval=1), (True, True, 1.0, ("softmax", 1, 1))),
    "qwen3_next": (Qwen3NextConfig, Qwen3NextForCausalLM,
                   dict(num_experts=EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=24, head_dim=8,
                        decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True,
                        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                        linear_conv_kernel_dim=2), (False, True, 1.0)),
    "gpt_oss": (GptOssConfig, GptOssForCausalLM, dict(num_local_experts=EXPERTS, head_dim=8, intermediate_size=16),
                (False, False, 1.0, ("topk_softmax", 1, 1))),
}
NAMES = list(FAMILIES)


def family_name(name: str) -> str:
    return name.split(":")[0]


def _decisive(model, generator):
    """Large router rows (decisive routing) and experts whose output matters next to the residual stream; selection
    biases that change some choices."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." in name or ".block_sparse_moe." in name:
                std = 0.5 if name.endswith(("gate.weight", "router.weight")) and "proj" not in name else 0.2
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """{family: (model, directory)}: each family's tiny model, saved in several shards that cut through layers."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (config_class, model_class, extra, _) in FAMILIES.items():
        torch.manual_seed(0)
        config = config_class(**{**COMMON, **extra})
        config._attn_implementation = "eager"
        model = model_class(config).eval()
        _decisive(model, torch.Generator().manual_seed(1))
        model.save_pretrained(root / name, max_shard_size="40KB")
        out[name] = (model, root / name)
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    rng = random.Random(0)
    data = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(6, 16))] for _ in range(12)]
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", data)


def disk(directory: Path) -> dict[str, torch.Tensor]:
    return {n: t for shard in sorted(directory.glob("*.safetensors")) for n, t in load_file(shard).items()}


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(_block(layer), "experts")]


def _block(layer):
    return getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")


def reference_routing(name: str, weight: torch.Tensor, x: torch.Tensor, top_k: int, dropped=None, bias=None,
                      groups=None):
    """(weights, indices) by the family's rule, written here: softmax of the logits (fp32 logits for the DeepSeek
    families), top-k, renormalised (Mixtral, Qwen3 with norm_topk_prob), times the V2 scaling factor. With a
    selection bias (DeepSeek-V3, GLM, MiniMax-M2: sigmoid scores; ERNIE: softmax): experts chosen by score + `bias`
    within the `topk_group` of `n_group` groups (`groups` overrides the rule's) whose two best biased scores sum
    highest; dropped experts can never be chosen."""
    fp32, renorm, scale, *grouping = FAMILIES[name][3]
    logits = x.float() @ weight.float().T if fp32 else (x @ weight.T).float()
    if dropped is not None:
        logits = logits.masked_fill(dropped, float("-inf"))
    if not grouping:
        top, index = logits.softmax(-1).topk(top_k, dim=-1)
    else:
        scoring, n_group, topk_group = grouping[0]
        n_group, topk_group = groups or (n_group, topk_group)
        if scoring == "topk_softmax":
            logits = x @ weight.T + bias
            if dropped is not None:
                logits = logits.masked_fill(dropped, float("-inf"))
            top, index = logits.float().topk(top_k, dim=-1)
            return top.softmax(-1), index
        scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + bias.float()
        if dropped is not None:
            choice = choice.masked_fill(dropped, float("-inf"))
        per = choice.shape[-1] // n_group
        best_groups = choice.view(-1, n_group, per).topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        open_ = torch.zeros(choice.shape[0], n_group, dtype=torch.bool).scatter(1, best_groups, True)
        index = choice.masked_fill(~open_.repeat_interleave(per, dim=1), float("-inf")).topk(top_k, dim=-1).indices
        top, order = scores.gather(-1, index).sort(dim=-1, descending=True)
        index = index.gather(-1, order)
    if renorm:
        top = top / top.sum(-1, keepdim=True)
    return top * scale, index


def _bias(tensors: dict, router_name: str):
    """The router's bias: the selection-only one of the router (DeepSeek-V3, GLM), of the MoE block (MiniMax-M2) or
    of its statistics module (ERNIE); gpt-oss's logit bias."""
    block = router_name.removesuffix("gate.weight").removesuffix("router.weight")
    found = [t for n, t in tensors.items() if n.startswith(block) and n.endswith("e_score_correction_bias")]
    assert len(found) <= 1
    return found[0] if found else tensors.get(router_name.removesuffix("weight") + "bias")


def _router(block):
    return getattr(block, "gate", None) or block.router


def _block_forward(block, x):
    """The MoE block's own output for tokens `x` [T, H] (gpt-oss's block also returns its router scores)."""
    out = block(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def expert_reference(name, config, w, h):
    """One routed expert's output for token `h` from its weight views, written here: SwiGLU, or gpt-oss's clamped
    variant with biases."""
    if name != "gpt_oss":
        return (F.silu(w.gate @ h) * (w.up @ h)) @ w.down.T
    limit, alpha = config["swiglu_limit"], config["swiglu_alpha"]
    gate = (w.gate @ h + w.gate_bias).clamp(max=limit)
    up = (w.up @ h + w.up_bias).clamp(-limit, limit)
    return w.down @ ((up + 1) * gate * torch.sigmoid(gate * alpha)) + w.down_bias


def _native_router(block, x):
    """The family's own router on `x` (MiniMax-M2's takes its block's selection bias as an argument)."""
    own = dict(block.module.named_buffers(recurse=False)).get("e_score_correction_bias")
    return block.router(x) if own is None else block.router(x, own)


# -- the MoE-block interface against the families' own modules -------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_route_matches_the_family_router_and_the_rule_written_here(checkpoints, name):
    model, directory = checkpoints[name]
    config = json.loads((directory / "config.json").read_text())
    family = detect_family(config)
    assert family.name == family_name(name) and family.moe_layers(config) == moe_layers(model)
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(3))
    for layer in moe_layers(model):
        block = MoEBlock(family, config, layer, model.model.layers[layer])
        routing = block.route(x)
        _, native_weights, native_index = _native_router(block, x)
        order = native_weights.float().sort(dim=-1, descending=True).indices
        assert torch.equal(routing.indices, native_index.gather(-1, order))
        torch.testing.assert_close(routing.weights, native_weights.float().gather(-1, order))
        tensors, router = disk(directory), _router_name(directory, layer)
        weights, index = reference_routing(name, tensors[router], x, TOP_K, bias=_bias(tensors, router))
        assert torch.equal(routing.indices, index)
        torch.testing.assert_close(routing.weights, weights)
        removed = torch.zeros(EXPERTS, dtype=torch.bool)
        removed[[1, 4, 6]] = True
        masked = block.route(x, removed=removed, top_k=1)
        assert not torch.isin(masked.indices, torch.tensor([1, 4, 6])).any() and masked.indices.shape == (40, 1)
        assert torch.equal(masked.indices, reference_routing(name, tensors[router], x, 1, removed,
                                                             _bias(tensors, router))[1])


def _router_name(directory: Path, layer: int) -> str:
    names = [n for n in disk(directory) if n.endswith((f"layers.{layer}.mlp.gate.weight",
                                                     f"layers.{layer}.block_sparse_moe.gate.weight",
                                                     f"layers.{layer}.mlp.router.weight"))]
    assert len(names) == 1, names
    return names[0]


@pytest.mark.parametrize("name", NAMES)
def test_block_outputs_and_weight_views(checkpoints, name):
    model, directory = checkpoints[name]
    config = json.loads((directory / "config.json").read_text())
    family = detect_family(config)
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(4))
    for layer in moe_layers(model):
        decoder_layer = model.model.layers[layer]
        block = MoEBlock(family, config, layer, decoder_layer)
        with torch.no_grad():
            native = _block_forward(_block(decoder_layer), x)
            torch.testing.assert_close(block.forward(x), native, rtol=1e-5, atol=1e-6)
            seen = []
            detach = block.observe(lambda **kw: seen.append(kw))
            observed = _block_forward(_block(decoder_layer), x)
            detach()
            torch.testing.assert_close(observed, native, rtol=1e-5, atol=1e-6)
            assert len(seen) == 1 and seen[0]["expert_outputs"].shape == (24, TOP_K, HIDDEN)
            routing = seen[0]["routing"]
            for slot in range(TOP_K):
                for token in (0, 7, 23):
                    expert = int(routing.indices[token, slot])
                    expected = expert_reference(name, config, block.expert_weights(expert), x[token])
                    torch.testing.assert_close(seen[0]["expert_outputs"][token, slot], expected, rtol=1e-5, atol=1e-6)
            # the views write through into the fused tensors
            w = block.expert_weights(3)
            before = block.experts.down_proj.detach().clone()
            w.down.mul_(2)
            changed = (block.experts.down_proj != before).nonzero()[:, 0].unique().tolist()
            w.down.div_(2)
            assert changed == [3] and torch.equal(block.experts.down_proj, before)


@pytest.mark.parametrize("name", NAMES)
def test_block_forward_equals_the_family_block_bit_for_bit_in_bf16(checkpoints, name):
    """Routing in the family's dtypes: logits, scores and the weights handed to the experts (fp32 or bf16)."""
    model, directory = checkpoints[name]
    config = json.loads((directory / "config.json").read_text())
    family = detect_family(config)
    x = torch.randn(64, HIDDEN, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    for layer in moe_layers(model):
        decoder_layer = copy.deepcopy(model.model.layers[layer]).to(torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(MoEBlock(family, config, layer, decoder_layer).forward(x),
                               _block_forward(_block(decoder_layer), x))


@pytest.mark.parametrize("name", NAMES)
def test_layout_converts_each_layer_like_transformers(checkpoints, name):
    model, directory = checkpoints[name]
    checkpoint = open_checkpoint(directory)
    tensors = disk(directory)
    state = model.state_dict()
    for layer in range(3):
        on_disk = {n: t for n, t in tensors.items() if checkpoint.layout.layer_of(n) == layer}
        assert on_disk and all(f"layers.{layer}." in n for n in on_disk)
        converted = checkpoint.layout.to_model(on_disk)
        expected = {n: t for n, t in state.items() if n.startswith(f"model.layers.{layer}.")}
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[n], expected[n]) for n in expected)
        back = checkpoint.layout.to_disk(converted)
        assert back.keys() == on_disk.keys() and all(torch.equal(back[n], on_disk[n]) for n in on_disk)
    roles = {checkpoint.layout.classify(n).kind for n in tensors}
    assert {"expert", "router", "other"} <= roles
    checkpoint.close()


# -- profile ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_profiled_counts_equal_routing_computed_here(checkpoints, rows, name, tmp_path, capsys):
    model, directory = checkpoints[name]
    sequences = [json.loads(line)["input_ids"] for line in rows.read_text().splitlines()]
    inputs = {}
    hooks = [_block(model.model.layers[layer]).register_forward_pre_hook(
        lambda m, args, layer=layer: inputs.setdefault(layer, []).append(args[0].reshape(-1, HIDDEN)))
        for layer in moe_layers(model)]
    with torch.no_grad():
        for row in sequences:
            model(input_ids=torch.tensor([row]), use_cache=False)
    for hook in hooks:
        hook.remove()
    tensors = disk(directory)
    expected = {}
    for layer, parts in inputs.items():
        router = _router_name(directory, layer)
        _, index = reference_routing(name, tensors[router], torch.cat(parts), TOP_K, bias=_bias(tensors, router))
        expected[str(layer)] = torch.bincount(index.reshape(-1), minlength=EXPERTS).tolist()
    for layerwise in ([], ["--layerwise"]):
        out = tmp_path / f"profile{len(layerwise)}.json"
        code, _, err = run_cli(["profile", directory, "-d", f"r={rows}", "-o", out, "--seq-len", "16",
                                "--device", "cpu", *layerwise], capsys)
        assert code == 0, err
        profile = json.loads(out.read_text())
        assert profile["model"]["family"] == family_name(name)
        assert {layer: stats["selected"] for layer, stats in profile["domains"]["r"]["layers"].items()} == expected


# -- export, and the pruned output in plain transformers ----------------------------------------------------------


def write_plan(directory: Path, path: Path, keep: dict[int, list[int]], top_k: int, compensation="none",
               **extra) -> Path:
    from compressor.profiling.schema import config_hash

    config = json.loads((directory / "config.json").read_text())
    family = detect_family(config)
    layers = family.moe_layers(config)
    model = {"source": str(directory), "family": family.name, "config_hash": config_hash(config, family.top_k_key), "moe_layers": layers,
             "experts_per_layer": {str(layer): family.num_experts(config, layer) for layer in layers},
             "top_k": family.top_k(config)}
    path.write_text(json.dumps({"format_version": 1, "model": model, "top_k": top_k, "compensation": compensation,
                                "layers": {str(layer): {"keep": keep[layer]} for layer in layers}, **extra}))
    return path


def masked_logits(name: str, model, keep: dict[int, list[int]], top_k: int, ids, groups=None, renorm=None):
    """The original's logits with each MoE router masked here: dropped experts' logits at -inf (and their selection
    biases excluded), top-`top_k`; `groups` (n_group, topk_group) and `renorm` override the rule's."""
    saved = {}
    for layer, kept in keep.items():
        block = _block(model.model.layers[layer])
        router = _router(block)
        dropped = torch.ones(EXPERTS, dtype=torch.bool)
        dropped[kept] = False
        weight = router.weight.detach()
        bias = _bias({n: t.detach() for n, t in [*block.named_parameters(), *block.named_buffers()]},
                     "gate.weight" if router is getattr(block, "gate", None) else "router.weight")

        def forward(hidden, *_, weight=weight, dropped=dropped, bias=bias):
            x = hidden.reshape(-1, HIDDEN)
            weights, index = reference_routing(name, weight, x, top_k, dropped, bias, groups)
            if renorm:
                weights = weights / weights.sum(-1, keepdim=True) * FAMILIES[name][3][2]
            return None, weights.to(x.dtype if not FAMILIES[name][3][0] else torch.float32), index

        saved[layer] = router
        router.forward = forward
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for router in saved.values():
            del router.forward


KEEP = {1: [6, 1, 3, 4], 2: [0, 2, 5, 7]}  # (layer 0 too for the families whose every layer is MoE)


def keep_for(model) -> dict[int, list[int]]:
    return {layer: KEEP.get(layer, [7, 0, 3, 2]) for layer in moe_layers(model)}


@pytest.mark.parametrize("name", NAMES)
def test_pruned_output_in_transformers_equals_the_masked_original(checkpoints, name, tmp_path, capsys):
    model, directory = checkpoints[name]
    keep = keep_for(model)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / "plan.json", keep, 1), "-o", out,
                            "--no-validate"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    family = detect_family(config)
    assert [family.num_experts(config, layer) for layer in moe_layers(model)] == [4] * len(keep)
    assert family.top_k(config) == 1 and ("auto_map" in config) == (name == "deepseek_moe")
    assert family.expert_groups(config) == family.expert_groups(json.loads((directory / "config.json").read_text()))
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(pruned) is type(model)  # the family's own class (ours for DeepSeekMoE, registered, no remote code)
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).logits
        original = model(input_ids=ids, use_cache=False).logits
    expected = masked_logits(name, model, keep, 1, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (original - expected).abs().max() > 1e-2  # the masking matters

    # kept experts' tensors are the original's, renumbered in the plan's order; routers are sliced rows
    source, output = disk(directory), disk(out)
    layout = open_checkpoint(directory).layout
    for layer, kept in keep.items():
        kept = sorted(kept)  # a plan's experts are renumbered in ascending order of their original ids
        for tensor in layout.layers[layer].experts:
            if not tensor.per_expert:  # fused on disk (gpt-oss): sliced along the expert axis
                assert torch.equal(output[tensor.name()], source[tensor.name()][kept])
                continue
            for new, old in enumerate(kept):
                assert torch.equal(output[tensor.name(new)], source[tensor.name(old)])
            assert tensor.name(4) not in output
        for router, axis in layout.layers[layer].router.items():  # ERNIE's selection bias is [1, E]
            assert torch.equal(output[router], source[router].index_select(axis, torch.tensor(kept)))
    untouched = [n for n in source if layout.classify(n).kind in ("other", "shared_expert")]
    assert all(torch.equal(output[n], source[n]) for n in untouched)


@pytest.mark.parametrize("name", NAMES)
def test_keep_all_is_byte_identical(checkpoints, name, tmp_path, capsys):
    model, directory = checkpoints[name]
    keep = {layer: list(range(EXPERTS)) for layer in moe_layers(model)}
    out = tmp_path / "out"
    plan = write_plan(directory, tmp_path / "plan.json", keep, TOP_K)
    code, _, err = run_cli(["export", directory, plan, "-o", out, "--no-validate"], capsys)
    assert code == 0, err
    source, output = disk(directory), disk(out)
    assert source.keys() == output.keys()
    for n in source:
        assert source[n].dtype == output[n].dtype and bytes(source[n].view(-1).view(torch.uint8).numpy()) == \
            bytes(output[n].view(-1).view(torch.uint8).numpy()), n


@pytest.mark.parametrize("name", NAMES)
def test_fitted_modes_lower_the_moe_layer_error(checkpoints, rows, name, tmp_path, capsys):
    model, directory = checkpoints[name]
    keep = keep_for(model)
    plan = write_plan(directory, tmp_path / "plan.json", keep, 1)
    sequences = [json.loads(line)["input_ids"] for line in rows.read_text().splitlines()]
    errors = {}
    for mode, extra in (("none", []), ("scale", []), ("refit", []), ("distill", ["--distill-steps", "40"])):
        out = tmp_path / mode
        fit = ["--calibration", f"r={rows}", "--seq-len", "16", "--device", "cpu"] if mode != "none" else []
        code, _, err = run_cli(["export", directory, plan, "-o", out, "--no-validate", "--compensation", mode,
                                *fit, *extra], capsys)
        assert code == 0, (mode, err)
        errors[mode] = _last_moe_layer_error(model, out, sequences)
    for mode in ("scale", "refit", "distill"):
        assert errors[mode] < 0.95 * errors["none"], errors


def _last_moe_layer_error(model, out: Path, sequences) -> float:
    """Relative error of the last MoE layer's output (whole model run), pruned vs the original, over the rows."""
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    layer = moe_layers(model)[-1]
    captured = {}
    for key, m in (("original", model), ("pruned", pruned)):
        m.model.layers[layer].register_forward_hook(
            lambda mod, args, output, key=key: captured.setdefault(key, []).append(
                output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        for row in sequences:
            for m in (model, pruned):
                m(input_ids=torch.tensor([row]), use_cache=False)
    for m in (model,):
        m.model.layers[layer]._forward_hooks.clear()
    a, b = torch.cat([t.reshape(-1, HIDDEN) for t in captured["pruned"]]), \
        torch.cat([t.reshape(-1, HIDDEN) for t in captured["original"]])
    return float((a - b).pow(2).sum() / b.pow(2).sum())


# -- group-limited routing (DeepSeek-V3: 2 groups of 4 experts, one open per token) --------------------------------


def test_grouped_router_plans_keep_groups_equal_and_export_refuses_breaking_plans(checkpoints, rows, tmp_path,
                                                                                   capsys):
    model, directory = checkpoints["deepseek_v3"]
    code, out, err = run_cli(["inspect", directory], capsys)
    assert code == 0 and "sigmoid, top-2 in the best 1 of 2 expert groups, noaux_tc, renormalise no, x2.5, selection " \
        "bias" in out, err
    profile_path = tmp_path / "profile.json"
    code, _, err = run_cli(["profile", directory, "-d", f"r={rows}", "-o", profile_path, "--seq-len", "16",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    profile = json.loads(profile_path.read_text())
    assert profile["model"]["expert_groups"] == {"count": 2, "chosen": 1, "min_kept": 2}
    code, _, err = run_cli(["plan", profile_path, "-o", tmp_path / "plan.json"], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    for layer, stats in profile["domains"]["r"]["layers"].items():  # the 2 most selected of each group of 4
        counts = stats["selected"]
        expected = sorted(e for group in (range(4), range(4, 8)) for e in sorted(group, key=lambda e: -counts[e])[:2])
        assert plan["layers"][layer]["keep"] == expected and not plan.get("ungroup")
    for argv in (["--strategy", "coverage"], ["--keep", "3"], ["--keep", "2"]):
        code, _, err = run_cli(["plan", profile_path, "-o", tmp_path / "bad.json", *argv], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "--ungroup" in err, (argv, err)
        assert not (tmp_path / "bad.json").exists()
    code, _, err = run_cli(["plan", profile_path, "-o", tmp_path / "free.json", "--strategy", "coverage",
                            "--ungroup"], capsys)
    assert code == 0 and json.loads((tmp_path / "free.json").read_text())["ungroup"] is True, err
    code, _, err = run_cli(["plan", profile_path, "-o", tmp_path / "one.json", "--keep", "2", "--keep-groups", "1"],
                           capsys)
    assert code == 0, err
    by_group = {}  # the group of highest selection count, then its 2 most selected experts
    for layer, stats in profile["domains"]["r"]["layers"].items():
        counts = stats["selected"]
        group = max((0, 1), key=lambda g: (sum(counts[4 * g:4 * g + 4]), -g))
        by_group[int(layer)] = sorted(sorted(range(4 * group, 4 * group + 4), key=lambda e: -counts[e])[:2])
    plan = json.loads((tmp_path / "one.json").read_text())
    assert {int(layer): spec["keep"] for layer, spec in plan["layers"].items()} == by_group

    lopsided = {1: [0, 1, 2, 4], 2: [0, 4, 5, 6]}
    for keep, message in ((lopsided, r"every group keeps the same number of experts \(or none"),
                          ({1: [0, 4], 2: [3, 7]}, "at least 2 per group"),
                          ({1: [0, 1, 4, 5], 2: [0, 1]}, "layer 1 keeps 2, layer 2 keeps 1")):
        out = tmp_path / "refused"
        code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / "p.json", keep, 1), "-o", out,
                                "--no-validate"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
        assert re.search(message, err), err

    # a whole group dropped: one group left, routing exactly the masked original's; --ungroup: plain top-k
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    one_group = {1: [4, 5, 6, 7], 2: [0, 1, 2, 3]}
    for keep, extra, groups in ((one_group, {}, None), (lopsided, {"ungroup": True}, (1, 1)), (by_group, {}, None)):
        out = tmp_path / f"out{len(extra)}{len(keep[1])}"
        code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / "u.json", keep, 1, **extra),
                                "-o", out, "--no-validate"], capsys)
        assert code == 0, err
        config = json.loads((out / "config.json").read_text())
        assert (config["n_group"], config["topk_group"], config["n_routed_experts"]) == (1, 1, len(keep[1]))
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            got = pruned(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, masked_logits("deepseek_v3", model, keep, 1, ids, groups=groups),
                                   rtol=1e-5, atol=1e-5)
    source, output = disk(directory), disk(tmp_path / "out14")
    bias = "model.layers.2.mlp.gate.e_score_correction_bias"
    assert torch.equal(output[bias], source[bias][[0, 4, 5, 6]])


def test_renorm_on_a_sigmoid_router_renormalises_the_chosen_weights(checkpoints, tmp_path, capsys):
    model, directory = checkpoints["deepseek_v3"]
    keep = keep_for(model)
    out = tmp_path / "out"
    code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / "plan.json", keep, 2), "-o", out,
                            "--no-validate", "--compensation", "renorm"], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["norm_topk_prob"] is True
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).logits
    expected = masked_logits("deepseek_v3", model, keep, 2, ids, renorm=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (masked_logits("deepseek_v3", model, keep, 2, ids) - expected).abs().max() > 1e-3


def test_mtp_layers_are_copied_untouched(checkpoints, tmp_path, capsys):
    """DeepSeek-V3's next-token-prediction layer (decoder layer num_hidden_layers, which transformers does not build):
    its tensors travel byte for byte, the output still loads in plain transformers and equals the masked original."""
    import shutil

    from safetensors.torch import save_file

    model, directory = checkpoints["deepseek_v3"]
    source = tmp_path / "with-mtp"
    shutil.copytree(directory, source)
    mtp = {n.replace("layers.2.", "layers.3."): t.clone() for n, t in disk(directory).items() if ".layers.2." in n}
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=torch.Generator().manual_seed(2))
    save_file(mtp, source / "mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    keep, out = keep_for(model), tmp_path / "out"
    code, _, err = run_cli(["export", source, write_plan(source, tmp_path / "plan.json", keep, 1), "-o", out,
                            "--no-validate"], capsys)
    assert code == 0, err
    output = disk(out)
    assert all(torch.equal(output[n], t) for n, t in mtp.items())
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, masked_logits("deepseek_v3", model, keep, 1, ids), rtol=1e-5, atol=1e-5)


FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def fp8_copy(directory: Path, target: Path) -> Path:
    """`directory`'s checkpoint with every decoder-layer projection block-quantized here to FP8 (e4m3, one scale per
    128x128 block: ``weight_scale_inv``), as DeepSeek publishes V3; the router, norms and embeddings stay as they
    are."""
    from safetensors.torch import save_file

    tensors = {}
    for name, weight in disk(directory).items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            tensors[name] = weight
            continue
        rows, cols = weight.shape
        scale = torch.empty(-(-rows // 128), -(-cols // 128))
        quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                block = weight[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
                scale[i, j] = block.abs().max() / 448.0
                quantized[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / scale[i, j]).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale_inv"] = quantized, scale
    target.mkdir()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": FP8}))
    return target


def assert_layerwise_profile_counts_as_whole(source, rows, tmp_path, capsys):
    """Profiling `source` layer by layer (dequantizing on the fly) selects each expert as often as the whole model."""
    profiles = []
    for layerwise in ([], ["--layerwise"]):
        out = tmp_path / f"profile{len(layerwise)}.json"
        code, _, err = run_cli(["profile", source, "-d", f"r={rows}", "-o", out, "--seq-len", "16", "--device", "cpu",
                                *layerwise], capsys)
        assert code == 0, err
        profiles.append({k: v["selected"] for k, v in json.loads(out.read_text())["domains"]["r"]["layers"].items()})
    assert profiles[0] == profiles[1]


def profile_and_export_quantized(model, source: Path, rows, tmp_path, capsys):
    """For a quantized copy `source` of `model`: checks that profiling it layer by layer (dequantized on the fly)
    counts what the whole model (transformers, dequantizing on load) routes, then exports it with keep_for(model)
    at top-1. Returns (transformers' own dequantized model, the kept experts, the plan, the output)."""
    dequantized = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert_layerwise_profile_counts_as_whole(source, rows, tmp_path, capsys)
    keep, out = keep_for(model), tmp_path / "out"
    plan = write_plan(source, tmp_path / "plan.json", keep, 1)
    code, _, err = run_cli(["export", source, plan, "-o", out, "--no-validate"], capsys)
    assert code == 0, err
    return dequantized, keep, plan, out


def test_fp8_checkpoint_scales_travel_with_their_experts(checkpoints, rows, tmp_path, capsys):
    model, directory = checkpoints["deepseek_v3"]
    source = fp8_copy(directory, tmp_path / "fp8")
    dequantized, keep, plan, out = profile_and_export_quantized(model, source, rows, tmp_path, capsys)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == FP8
    original, output = disk(source), disk(out)
    for layer, kept in keep.items():
        for part in ("gate_proj", "up_proj", "down_proj"):
            for suffix in ("weight", "weight_scale_inv"):
                template = f"model.layers.{layer}.mlp.experts.{{}}.{part}.{suffix}"
                for new, old in enumerate(sorted(kept)):
                    a, b = output[template.format(new)], original[template.format(old)]
                    assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                assert template.format(len(kept)) not in output
    shared = "model.layers.1.mlp.shared_experts.down_proj.weight"
    assert torch.equal(output[shared].view(torch.uint8), original[shared].view(torch.uint8))
    assert torch.equal(output[shared + "_scale_inv"], original[shared + "_scale_inv"])
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, masked_logits("deepseek_v3", dequantized, keep, 1, ids), rtol=1e-5, atol=1e-5)
    reports = []  # validation layer by layer (dequantized here) = whole (transformers)
    for layerwise in ([], ["--layerwise"]):
        path = tmp_path / f"v{len(layerwise)}.json"
        code, _, err = run_cli(["validate", source, out, "-d", f"r={rows}", "-o", path, "--seq-len", "16",
                                "--device", "cpu", *layerwise], capsys)
        assert code == 0, err
        reports.append(json.loads(path.read_text())["domains"]["r"])
    for key in ("perplexity_original", "perplexity_compressed", "kl_mean"):
        assert reports[1][key] == pytest.approx(reports[0][key], rel=1e-5)

    # fitted modes write their experts re-quantized (new block scales) and say the error that adds
    sequences = [json.loads(line)["input_ids"] for line in rows.read_text().splitlines()]
    errors = {"none": _last_moe_layer_error(dequantized, out, sequences)}
    for mode in ("scale", "refit"):
        fitted = tmp_path / mode
        code, _, err = run_cli(["export", source, plan, "-o", fitted, "--no-validate", "--compensation", mode,
                                "--calibration", f"r={rows}", "--seq-len", "16", "--device", "cpu"], capsys)
        assert code == 0, err
        report = json.loads((fitted / "moe_compress_provenance.json").read_text())["fit"]["fp8_requantization"]
        assert report["tensors"] == 2 * 4 * 3 and 0 < report["max_relative_error"] < 0.1  # kept experts' weights
        down = "model.layers.2.mlp.experts.0.down_proj.weight"
        assert disk(fitted)[down].dtype == torch.float8_e4m3fn
        assert not torch.equal(disk(fitted)[down + "_scale_inv"], output[down + "_scale_inv"])
        errors[mode] = _last_moe_layer_error(dequantized, fitted, sequences)
    assert errors["scale"] < 0.95 * errors["none"] and errors["refit"] < 0.95 * errors["none"], errors

    # refused in one line, nothing written: an FP8 weight without its scale
    refused = tmp_path / "refused"
    from safetensors.torch import save_file

    missing = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"
    save_file({n: t for n, t in original.items() if n != missing}, source / "model.safetensors",
              metadata={"format": "pt"})
    code, _, err = run_cli(["export", source, plan, "-o", refused, "--no-validate"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not refused.exists(), err
    assert f"{missing.removesuffix('_scale_inv')} has no scale tensor {missing}" in err


def mxfp4_checkpoint(target: Path):
    """A tiny gpt-oss (expert widths a multiple of 32) whose fused experts are quantized here to MXFP4 as OpenAI
    publishes them: ``P_blocks`` [E, out, in / 32, 16] (FP4 e2m1 pairs, low nibble first), ``P_scales`` [E, out,
    in / 32] (E8M0 exponents, bias 127, each group's largest value within 6 x 2^e); returns (model, directory)."""
    from safetensors.torch import save_file

    config_class, model_class, extra, _ = FAMILIES["gpt_oss"]
    torch.manual_seed(0)
    model = model_class(config_class(**{**COMMON, **extra, "intermediate_size": 32})).eval()
    _decisive(model, torch.Generator().manual_seed(1))
    model.save_pretrained(target)
    fp4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    tensors = {}
    for name, value in disk(target).items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = value
            continue
        groups = value.transpose(1, 2).float().reshape(*value.shape[0:1], value.shape[2], -1, 32)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
        index = (groups / torch.exp2(exponent)[..., None])[..., None].sub(fp4).abs().argmin(-1)
        tensors[name + "_blocks"] = (index[..., 0::2] | (index[..., 1::2] << 4)).to(torch.uint8)
        tensors[name + "_scales"] = (exponent + 127).to(torch.uint8)
    for shard in target.glob("*.safetensors"):
        shard.unlink()
    (target / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config))
    return model, target


def test_mxfp4_blocks_and_scales_are_sliced_along_the_expert_axis(rows, tmp_path, capsys):
    model, source = mxfp4_checkpoint(tmp_path / "mxfp4")
    dequantized, keep, plan, out = profile_and_export_quantized(model, source, rows, tmp_path, capsys)
    original, output = disk(source), disk(out)
    for layer, kept in keep.items():
        for part in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                     "gate_up_proj_bias", "down_proj_bias"):
            name = f"model.layers.{layer}.mlp.experts.{part}"
            assert torch.equal(output[name], original[name][sorted(kept)])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        got = pruned(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, masked_logits("gpt_oss", dequantized, keep, 1, ids), rtol=1e-5, atol=1e-5)
    ragged, out = {0: [0, 1, 2], 1: [0, 1, 2, 3], 2: [1, 2, 3, 4, 5]}, tmp_path / "ragged"  # per-layer counts
    code, _, err = run_cli(["export", source, write_plan(source, tmp_path / "ragged.json", ragged, 1), "-o", out,
                            "--no-validate"], capsys)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    per_layer = detect_family(config).model_class(config).from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = per_layer(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, masked_logits("gpt_oss", dequantized, ragged, 1, ids), rtol=1e-5, atol=1e-5)

    refused = tmp_path / "refused"
    from safetensors.torch import save_file

    scales = "model.layers.1.mlp.experts.down_proj_scales"
    save_file({n: t for n, t in original.items() if n != scales}, source / "model.safetensors",
              metadata={"format": "pt"})
    code, _, err = run_cli(["export", source, plan, "-o", refused, "--no-validate"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and scales in err and not refused.exists(), err


def mxfp4_reading(directory: Path) -> torch.nn.Module:
    """The gpt-oss checkpoint at `directory` built from our reading of its tensors: MXFP4 experts dequantized by
    `dequantize_mxfp4`, every other tensor as written."""
    from compressor.families.quantization import dequantize_mxfp4

    config = json.loads((directory / "config.json").read_text())
    config.pop("quantization_config")
    model = GptOssForCausalLM(GptOssConfig(**config)).eval()
    tensors = disk(directory)
    for blocks in [name for name in tensors if name.endswith("_blocks")]:
        param = blocks.removesuffix("_blocks")
        tensors[param] = dequantize_mxfp4(tensors.pop(blocks), tensors.pop(param + "_scales"))
    model.load_state_dict(tensors, strict=True)
    return model


def test_mxfp4_fitted_modes_write_their_experts_requantized(rows, tmp_path, capsys, monkeypatch):
    """scale, refit and distill on an MXFP4 source write the fitted experts as new MXFP4 blocks and scales: the
    output loads in transformers (which dequantizes them) and computes what our reading of its tensors does; the
    reported error is the fitted weights' against transformers' dequantization of what was written."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from compressor.export.compensation import FittedTensors

    model, source = mxfp4_checkpoint(tmp_path / "mxfp4")
    keep = keep_for(model)
    plan = write_plan(source, tmp_path / "plan.json", keep, 1)
    original = disk(source)
    popped = {}  # every fitted tensor as the export takes it (the fused experts before re-quantization)
    pop = FittedTensors.pop
    monkeypatch.setattr(FittedTensors, "pop", lambda self, name: popped.setdefault(name, pop(self, name)))
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(13))
    for mode in ("scale", "refit", "distill"):
        popped.clear()
        out = tmp_path / mode
        code, _, err = run_cli(["export", source, plan, "-o", out, "--no-validate", "--compensation", mode,
                                "--calibration", f"r={rows}", "--seq-len", "16", "--device", "cpu",
                                "--distill-steps", "20"], capsys)
        assert code == 0, err
        output = disk(out)
        assert set(output) == set(original)  # same names (and layout: shapes below)
        errors = []
        for layer, kept in keep.items():
            for part in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{part}"
                blocks, scales = output[name + "_blocks"], output[name + "_scales"]
                assert blocks.dtype == scales.dtype == torch.uint8
                assert blocks.shape == (len(kept), *original[name + "_blocks"].shape[1:])
                assert scales.shape == (len(kept), *original[name + "_scales"].shape[1:])
                fitted = popped[name].float()
                written = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                errors.append(float((written - fitted).norm() / fitted.norm()))
            router = f"model.layers.{layer}.mlp.router.weight"
            assert torch.equal(output[router], original[router][sorted(kept)])
        report = json.loads((out / "moe_compress_provenance.json").read_text())["fit"]["mxfp4_requantization"]
        assert report["tensors"] == 6 and 0 < report["max_relative_error"] < 0.2, report
        assert report["max_relative_error"] == pytest.approx(max(errors), rel=1e-5)
        assert report["rms_relative_error"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 6), rel=1e-5)
        for name, tensor in output.items():  # everything but the MoE blocks as in the source, byte for byte
            if ".mlp." not in name:
                assert torch.equal(tensor.view(torch.uint8), original[name].view(torch.uint8)), name
        if mode == "refit":
            down = "model.layers.2.mlp.experts.down_proj_blocks"
            assert not torch.equal(output[down], original[down][sorted(keep[2])])
        pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # transformers dequantizes
        with torch.no_grad():
            torch.testing.assert_close(pruned(input_ids=ids, use_cache=False).logits,
                                       mxfp4_reading(out)(input_ids=ids, use_cache=False).logits,
                                       rtol=1e-5, atol=1e-5)


def test_an_unsupported_quantization_is_refused_in_one_line(checkpoints, tmp_path, capsys):
    import shutil

    model, directory = checkpoints["deepseek_v3"]
    quantized = tmp_path / "gptq"
    shutil.copytree(directory, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(["export", quantized, write_plan(directory, tmp_path / "plan.json", keep_for(model), 1),
                            "-o", out, "--no-validate"], capsys)
    assert code == 2 and not out.exists(), err
    assert len(err.strip().splitlines()) == 1 and "quantization_config method 'gptq' is not supported" in err


# -- per-layer expert counts, validation, serving ---------------------------------------------------------------------


_LOAD_WITHOUT_COMPRESSOR = """
import json, sys, torch
sys.modules["compressor"] = None  # moe-compress is not importable here
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for directory in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        out[directory] = {"logits": model(input_ids=ids, use_cache=False).logits.tolist(),
                          "class": type(model).__name__}
print(json.dumps(out))
"""


def test_per_layer_counts_load_in_process_and_without_moe_compress(checkpoints, tmp_path, capsys):
    ids = torch.randint(2, VOCAB, (1, 10), generator=torch.Generator().manual_seed(6))
    outputs, expected = [], {}
    for name, (model, directory) in checkpoints.items():
        layers = moe_layers(model)
        keep = {layer: list(range(3 + i)) for i, layer in enumerate(layers)}  # 3, 4 (, 5) experts
        if len(FAMILIES[name][3]) > 3 and FAMILIES[name][3][3][1] == 2:  # 2 groups of 4: 2 + 2, 3 + 3 experts
            keep = {layer: [*range(2 + i), *range(4, 6 + i)] for i, layer in enumerate(layers)}
        out = tmp_path / name
        code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / f"{name}.json", keep, 1),
                                "-o", out, "--no-validate"], capsys)
        assert code == 0, (name, err)
        config = json.loads((out / "config.json").read_text())
        family = detect_family(config)
        assert [family.num_experts(config, layer) for layer in layers] == [len(keep[layer]) for layer in layers]
        in_process = family.model_class(config).from_pretrained(out, dtype=torch.float32).eval()
        assert [MoEBlock(family, config, layer, in_process.model.layers[layer]).num_experts for layer in layers] == \
            [len(keep[layer]) for layer in layers]
        with torch.no_grad():
            expected[str(out)] = in_process(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(expected[str(out)], masked_logits(name, model, keep, 1, ids),
                                       rtol=1e-5, atol=1e-5)
        outputs.append(str(out))
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_COMPRESSOR, json.dumps(ids.tolist()), *outputs],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for directory, logits in expected.items():
        torch.testing.assert_close(torch.tensor(loaded[directory]["logits"]), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_validate_whole_equals_layerwise_and_serve_check_accepts_uniform(checkpoints, rows, name, tmp_path, capsys):
    from compressor.serving import check_servable

    model, directory = checkpoints[name]
    out = tmp_path / "out"
    code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / "plan.json", keep_for(model), 1),
                            "-o", out, "--no-validate"], capsys)
    assert code == 0, err
    reports = []
    for layerwise in ([], ["--layerwise"]):
        path = tmp_path / f"v{len(layerwise)}.json"
        code, _, err = run_cli(["validate", directory, out, "-d", f"r={rows}", "-o", path, "--seq-len", "16",
                                "--device", "cpu", *layerwise], capsys)
        assert code == 0, err
        reports.append(json.loads(path.read_text()))
    whole, layerwise = reports
    for domain in whole["domains"]:
        for key in ("perplexity_original", "perplexity_compressed", "kl_mean"):
            assert layerwise["domains"][domain][key] == pytest.approx(whole["domains"][domain][key], rel=1e-4)
    assert whole["domains"]["r"]["perplexity_increase"] != 0 and set(whole["layers"]) == {"0", "1", "2"}
    info = check_servable(out)
    assert info.family == family_name(name) and info.experts == 4 and info.top_k == 1
    assert info.trust_remote_code is (name == "deepseek_moe")


@pytest.mark.slow
def test_torchrun_profile_of_a_native_family_equals_one_process(checkpoints, rows, tmp_path):
    _, directory = checkpoints["qwen3_moe"]
    common = ["profile", directory, "-d", f"r={rows}", "--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
    a, b = (json.loads(path.read_text()) for path in cli_one_and_two_ranks(common, tmp_path))
    assert (a["settings"]["world_size"], b["settings"]["world_size"]) == (1, 2)
    for layer, stats in a["domains"]["r"]["layers"].items():
        other = b["domains"]["r"]["layers"][layer]
        assert stats["selected"] == other["selected"] and stats["top1"] == other["top1"]
        assert other["gate_mass"] == pytest.approx(stats["gate_mass"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if family_name(n) not in ("deepseek_moe", "gpt_oss")])
def test_w4a16_output_computes_what_the_round_to_nearest_weights_compute(checkpoints, name, tmp_path, capsys):
    """Quantized (w4a16, groups of 8) after pruning, the output loads in transformers, which computes what the
    export computes with every decoder-layer Linear's weight replaced by its round-to-nearest, written here; only
    the routers are left unquantized (DeepSeekMoE: tests/test_quantize.py; gpt-oss: --scheme mxfp4, test_mxfp4.py)."""
    from safetensors.torch import save_file
    from transformers import CompressedTensorsConfig

    from helpers import rtn

    model, directory = checkpoints[name]
    out, quantized = tmp_path / "out", tmp_path / "quantized"
    code, _, err = run_cli(["export", directory, write_plan(directory, tmp_path / "plan.json", keep_for(model), 1),
                            "-o", out, "--no-validate"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["quantize", out, "-o", quantized, "--scheme", "w4a16", "--group-size", "8",
                            "--no-validate"], capsys)
    assert code == 0, err
    exported = disk(out)
    names = {n.removesuffix("_packed") for n in disk(quantized) if n.endswith(".weight_packed")}
    linear = {n for n, t in exported.items() if ".layers." in n and n.endswith(".weight") and t.ndim == 2
              and "norm" not in n}
    assert names <= linear and any(".experts." in n for n in names)
    assert all(n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")) for n in linear - names), \
        sorted(linear - names)  # only the routers stay as they are
    expected_dir = tmp_path / "expected"
    expected_dir.mkdir()
    save_file({n: (rtn(t, "w4a16", 8)[0].to(t.dtype) if n in names else t).contiguous()
               for n, t in exported.items()}, expected_dir / "model.safetensors", metadata={"format": "pt"})
    (expected_dir / "config.json").write_text((out / "config.json").read_text())
    ids = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(expected_dir, dtype=torch.float32).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32, quantization_config=(
            CompressedTensorsConfig(dequantize=True))).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (plain - expected).abs().max() > 1e-3  # the 4 bits matter


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if ":" not in n])
def test_every_family_is_scored_on_tasks_as_computed_here(name, tmp_path, capsys):
    """`validate --tasks` on each family's tiny model (the reference model's vocabulary and tokenizer) and its pruned
    output: both multiple-choice accuracies equal the per-choice log-likelihood argmax computed without the harness
    (tests/test_tasks.py's), document by document."""
    import shutil

    from compressor.runtime import load_tokenizer
    from compressor.validation.schema import ValidationReport
    from test_tasks import CODE, REFERENCE, choice_accuracy, load, rows

    DOCUMENTS = 12
    config_class, model_class, extra, _ = FAMILIES[name]
    torch.manual_seed(0)
    config = config_class(**{**COMMON, **extra, "vocab_size": 8192})
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    _decisive(model, torch.Generator().manual_seed(1))
    original, pruned, report = tmp_path / "original", tmp_path / "pruned", tmp_path / "validation.json"
    model.save_pretrained(original)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(REFERENCE / file, original / file)
    code, _, err = run_cli(["export", original, write_plan(original, tmp_path / "plan.json", keep_for(model), 1),
                            "-o", pruned, "--no-validate"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["validate", original, pruned, "--tasks", CODE, "--task-limit", DOCUMENTS, "--device", "cpu",
                            "-o", report], capsys)
    assert code == 0, err
    scored = ValidationReport.load(report).tasks[CODE]
    tokenizer = load_tokenizer(original)
    for side, path in (("original", original), ("compressed", pruned)):
        expected = choice_accuracy(load(path), tokenizer, rows(CODE, DOCUMENTS))
        assert getattr(scored, side) == pytest.approx(sum(expected) / len(expected)), side
