"""Profile: per-domain routing statistics, checked against an independent plain-torch computation.

The expectations here never use compressor.profiling's math: routing (fp32 softmax, top-k), the four per-expert
statistics and the two cosine sums are recomputed from the checkpoint's weights, on every sequence run alone
(no padding at all), from the MoE block inputs captured with forward hooks.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fixtures
from compressor.errors import UserError
from compressor.modeling import DeepseekForCausalLM
from compressor.profiling import Profile, ProfileOptions, merge_profiles, profile_model
from compressor.profiling.report import concentration, write_profile_report
from compressor.profiling.schema import (
    DomainProfile, LayerStatistics, ModelIdentity, ProfileSettings, SourceDescription,
)
from helpers import MOE_LAYERS, TINY, cli_one_and_two_ranks, run_cli, save_tiny_checkpoint, stage_options, write_jsonl

REPO = Path(__file__).resolve().parents[1]
N_EXPERTS, TOP_K = 8, 3
SEQ_LEN, BATCH = 16, 4
COUNT_KEYS = ("selected", "top1")
FLOAT_KEYS = ("gate_mass", "reap")
SUM_KEYS = ("top1_routed_cosine_sum", "top1_layer_cosine_sum")


# --------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny upstream-format checkpoint, pre-tokenized rows
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    """A different model: same layer/expert structure, other config (expert width)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("other"), seed=1, moe_intermediate_size=12)


@pytest.fixture(scope="module")
def rows() -> list[list[int]]:
    """28 rows of lengths 3..24 (some longer than SEQ_LEN, so both padding and truncation happen)."""
    rng = random.Random(7)
    lengths = [rng.randint(3, 24) for _ in range(28)]
    lengths[0], lengths[5] = 24, 3
    return [[rng.randrange(2, TINY["vocab_size"]) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def rows_jsonl(data_dir, rows) -> Path:
    return write_jsonl(data_dir / "rows.jsonl", rows)


def options(**overrides) -> ProfileOptions:
    base = dict(max_tokens=None, seq_len=SEQ_LEN, batch_size=BATCH, dtype="float32", device="cpu", progress=False)
    return stage_options(ProfileOptions, **{**base, **overrides})


@pytest.fixture(scope="module")
def whole(ckpt, rows_jsonl) -> Profile:
    return profile_model(str(ckpt), {"a": str(rows_jsonl)}, options())


# --------------------------------------------------------------------------------------------------------------
# Independent reference: each sequence alone (no padding), hooks capture the MoE inputs, math in plain torch
# --------------------------------------------------------------------------------------------------------------
def capped_sequences(rows, seq_len, max_tokens=None):
    """The spec's sequences: each row as given, cut at seq_len, max_tokens in all."""
    budget = math.inf if max_tokens is None else max_tokens
    out, used = [], 0
    for row in rows:
        if used >= budget:
            break
        row = row[: int(min(seq_len, budget - used))]
        out.append(row)
        used += len(row)
    return out


def swiglu(x, prefix, sd):
    gate = x @ sd[prefix + "gate_proj.weight"].T
    up = x @ sd[prefix + "up_proj.weight"].T
    return (F.silu(gate) * up) @ sd[prefix + "down_proj.weight"].T


def reference_statistics(model_dir: Path, sequences: list[list[int]], min_margin: float = 1e-6,
                         renormalize: bool = False) -> dict:
    """{layer: {selected, top1, gate_mass, reap, top1_routed_cosine_sum, top1_layer_cosine_sum, cosine_tokens}}."""
    from safetensors.torch import load_file

    model = DeepseekForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sd = {k: v.float() for k, v in load_file(model_dir / "model.safetensors").items()}  # upstream names, on disk
    stats = {
        layer: {**{key: torch.zeros(N_EXPERTS, dtype=torch.float64) for key in COUNT_KEYS + FLOAT_KEYS},
                "routed_cos": 0.0, "layer_cos": 0.0, "tokens": 0}
        for layer in MOE_LAYERS
    }
    captured = {}
    handles = []
    for layer in MOE_LAYERS:
        decoder = model.model.layers[layer]
        handles.append(decoder.register_forward_pre_hook(
            lambda m, args, layer=layer: captured.__setitem__((layer, "in"), args[0].detach().clone())))
        handles.append(decoder.self_attn.register_forward_hook(
            lambda m, args, out, layer=layer: captured.__setitem__(
                (layer, "attn"), (out[0] if isinstance(out, tuple) else out).detach().clone())))
        handles.append(decoder.mlp.register_forward_pre_hook(
            lambda m, args, layer=layer: captured.__setitem__((layer, "moe_in"), args[0].detach().clone())))
        handles.append(decoder.register_forward_hook(
            lambda m, args, out, layer=layer: captured.__setitem__((layer, "out"), out.detach().clone())))
    smallest_margin = math.inf
    with torch.no_grad():
        for row in sequences:
            captured.clear()
            model(input_ids=torch.tensor([row]), use_cache=False)
            for layer in MOE_LAYERS:
                p = f"model.layers.{layer}.mlp."
                x = captured[(layer, "moe_in")][0].float()  # [T, hidden]
                scores = torch.softmax(x @ sd[p + "gate.weight"].T, dim=-1)  # fp32 softmax over all experts
                ranked, order = torch.sort(scores, dim=-1, descending=True)
                top1_margin = ranked[:, 0] - ranked[:, 1]
                topk_margin = ranked[:, TOP_K - 1] - ranked[:, TOP_K]
                smallest_margin = min(smallest_margin, float(top1_margin.min()), float(topk_margin.min()))
                weight, idx = ranked[:, :TOP_K], order[:, :TOP_K]  # raw softmax weights (norm_topk_prob false)
                if renormalize:  # norm_topk_prob true: the chosen weights sum to 1
                    weight = weight / weight.sum(-1, keepdim=True)
                every = torch.stack([swiglu(x, f"{p}experts.{e}.", sd) for e in range(N_EXPERTS)], 1)  # [T, E, h]
                chosen = every[torch.arange(len(row))[:, None], idx]  # [T, k, h], unweighted
                routed = (chosen * weight[..., None]).sum(1)
                shared = swiglu(x, p + "shared_experts.", sd)
                residual = captured[(layer, "in")][0] + captured[(layer, "attn")][0]
                full = residual + shared + routed
                torch.testing.assert_close(full, captured[(layer, "out")][0], atol=1e-5, rtol=1e-5)  # reference sane
                top1_part = weight[:, :1] * chosen[:, 0]
                single = residual + shared + top1_part
                s = stats[layer]
                for t in range(len(row)):
                    for j in range(TOP_K):
                        e = int(idx[t, j])
                        s["selected"][e] += 1
                        s["gate_mass"][e] += float(weight[t, j])
                        s["reap"][e] += float(weight[t, j]) * float(chosen[t, j].double().norm())
                    s["top1"][int(idx[t, 0])] += 1
                s["routed_cos"] += F.cosine_similarity(top1_part.double(), routed.double(), dim=-1).sum().item()
                s["layer_cos"] += F.cosine_similarity(single.double(), full.double(), dim=-1).sum().item()
                s["tokens"] += len(row)
    for handle in handles:
        handle.remove()
    assert smallest_margin > min_margin, "routing has a near tie; pick another seed for the test data"
    return {
        str(layer): dict(
            selected=[int(v) for v in s["selected"]], top1=[int(v) for v in s["top1"]],
            gate_mass=s["gate_mass"].tolist(), reap=s["reap"].tolist(),
            top1_routed_cosine_sum=s["routed_cos"], top1_layer_cosine_sum=s["layer_cos"], cosine_tokens=s["tokens"],
        )
        for layer, s in stats.items()
    }


def assert_layers_match(actual: dict[str, LayerStatistics], expected, rel: float) -> None:
    """Counts exactly, floats to `rel` relative; `expected` is a reference dict or another profile's layers."""
    assert set(actual) == set(expected)
    for layer, stats in actual.items():
        want = expected[layer]
        want = want.model_dump() if isinstance(want, LayerStatistics) else want
        for key in COUNT_KEYS + ("cosine_tokens",):
            assert getattr(stats, key) == want[key], (layer, key)
        for key in FLOAT_KEYS:
            assert getattr(stats, key) == pytest.approx(want[key], rel=rel, abs=0), (layer, key)
        for key in SUM_KEYS:
            assert getattr(stats, key) == pytest.approx(want[key], rel=rel, abs=0), (layer, key)


# --------------------------------------------------------------------------------------------------------------
# 1. Statistics against the independent computation
# --------------------------------------------------------------------------------------------------------------
def test_statistics_match_independent_computation(whole, ckpt, rows):
    sequences = capped_sequences(rows, SEQ_LEN)
    expected = reference_statistics(ckpt, sequences)
    domain = whole.domains["a"]
    assert domain.tokens == sum(len(s) for s in sequences)
    assert domain.sequences == len(sequences)
    assert_layers_match(domain.layers, expected, rel=1e-6)
    # routing is genuinely spread (not degenerate): several experts are someone's top-1 in every layer
    for stats in domain.layers.values():
        assert sum(1 for v in stats.top1 if v) >= 3
        assert 0 < stats.top1_routed_cosine_sum < stats.cosine_tokens
        assert 0 < stats.top1_layer_cosine_sum <= stats.cosine_tokens * (1 + 1e-9)


def test_renormalised_weights_are_recorded_as_applied(tmp_path, rows, rows_jsonl):
    """norm_topk_prob true: gate_mass holds the renormalised weights (each token's k weights sum to 1)."""
    model_dir = save_tiny_checkpoint(tmp_path / "norm", norm_topk_prob=True)
    profile = profile_model(str(model_dir), {"a": str(rows_jsonl)}, options())
    sequences = capped_sequences(rows, SEQ_LEN)
    assert_layers_match(profile.domains["a"].layers, reference_statistics(model_dir, sequences, renormalize=True), 1e-6)
    for stats in profile.domains["a"].layers.values():
        assert sum(stats.gate_mass) == pytest.approx(profile.domains["a"].tokens, rel=1e-6)


def test_profile_identity_settings_and_source(whole, ckpt, rows_jsonl):
    assert whole.model.family == "deepseek_moe"
    assert whole.model.moe_layers == MOE_LAYERS
    assert whole.model.experts_per_layer == {"1": N_EXPERTS, "2": N_EXPERTS}
    assert whole.model.top_k == TOP_K
    assert whole.settings.seq_len == SEQ_LEN and whole.settings.batch_size == BATCH
    assert whole.settings.world_size == 1 and whole.settings.layerwise is False
    assert whole.settings.dtype == "float32" and whole.settings.device == "cpu"
    source = whole.domains["a"].source
    assert source.spec == str(rows_jsonl) and source.content_hash
    assert whole.statistics_available() == {"selected", "top1", "gate_mass", "reap"}


# --------------------------------------------------------------------------------------------------------------
# 2. Layer by layer equals the whole model (also with activations spilled to disk)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2 * 2**30, 1], ids=["in-memory", "spilled"])
def test_layerwise_equals_whole_model(whole, ckpt, rows_jsonl, budget):
    layerwise = profile_model(str(ckpt), {"a": str(rows_jsonl)},
                              options(layerwise=True, activation_budget_bytes=budget))
    assert layerwise.settings.layerwise is True
    assert layerwise.domains["a"].tokens == whole.domains["a"].tokens
    assert layerwise.domains["a"].sequences == whole.domains["a"].sequences
    assert_layers_match(layerwise.domains["a"].layers, whole.domains["a"].layers, rel=1e-6)


def test_layerwise_two_domains_equal_whole_model(ckpt, data_dir, rows):
    """Several domains share the layer-by-layer pass; each keeps its own statistics."""
    b = write_jsonl(data_dir / "b.jsonl", rows[10:20])
    c = write_jsonl(data_dir / "c.jsonl", rows[:7])
    sources = {"b": str(b), "c": str(c)}
    one = profile_model(str(ckpt), sources, options(batch_size=3))
    two = profile_model(str(ckpt), sources, options(batch_size=3, layerwise=True, activation_budget_bytes=4096))
    assert list(one.domains) == list(two.domains) == ["b", "c"]
    for name in sources:
        assert one.domains[name].tokens == two.domains[name].tokens
        assert_layers_match(two.domains[name].layers, one.domains[name].layers, rel=1e-6)
    assert one.domains["b"].layers["1"].selected != one.domains["c"].layers["1"].selected


# --------------------------------------------------------------------------------------------------------------
# 3. Padding never counts; truncation at seq_len; max_tokens caps
# --------------------------------------------------------------------------------------------------------------
def test_padding_never_counts(whole, rows):
    domain = whole.domains["a"]
    assert any(len(r) > SEQ_LEN for r in rows) and len({min(len(r), SEQ_LEN) for r in rows}) > 1
    assert domain.tokens == sum(min(len(r), SEQ_LEN) for r in rows)
    for stats in domain.layers.values():
        assert sum(stats.selected) == domain.tokens * TOP_K
        assert sum(stats.top1) == domain.tokens
        assert stats.cosine_tokens == domain.tokens
        # raw softmax weights: each token's top-k mass is below 1, above k/E
        assert TOP_K / N_EXPERTS * domain.tokens < sum(stats.gate_mass) < domain.tokens


def test_max_tokens_caps_and_cuts_the_last_row(ckpt, rows_jsonl, rows):
    max_tokens = 100
    profile = profile_model(str(ckpt), {"a": str(rows_jsonl)}, options(max_tokens=max_tokens))
    sequences = capped_sequences(rows, SEQ_LEN, max_tokens)
    assert sum(len(s) for s in sequences) == max_tokens
    domain = profile.domains["a"]
    assert domain.tokens == max_tokens
    assert domain.sequences == len(sequences)
    assert profile.settings.max_tokens == max_tokens
    for stats in domain.layers.values():
        assert sum(stats.selected) == max_tokens * TOP_K
    assert_layers_match(domain.layers, reference_statistics(ckpt, sequences), rel=1e-6)


def test_rows_are_used_as_given_without_bos_or_packing(ckpt, data_dir):
    """Short rows stay separate sequences (no packing), nothing is prepended (no BOS)."""
    path = write_jsonl(data_dir / "short.jsonl", [[5, 6], [7], [8, 9, 10]])
    profile = profile_model(str(ckpt), {"s": str(path)}, options(batch_size=2))
    domain = profile.domains["s"]
    assert domain.tokens == 6 and domain.sequences == 3
    # padded batches vs one row at a time: fp32 matmuls of different shapes differ by ~1e-6
    assert_layers_match(domain.layers, reference_statistics(ckpt, [[5, 6], [7], [8, 9, 10]]), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 4. Text sources need the model's tokenizer; they are packed into seq_len chunks
# --------------------------------------------------------------------------------------------------------------
TEXT = (
    "the cat sat on the mat . the dog sat on the log . a cat and a dog met on the mat . "
    "the log was wet and the mat was dry . a bird sat on the dog and the cat ran . "
) * 3


@pytest.fixture(scope="module")
def ckpt_with_tokenizer(tmp_path_factory, ckpt) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("with_tokenizer")
    for file in ckpt.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=["<s>", "</s>", "<unk>", "<pad>"]))
    assert tokenizer.get_vocab_size() < TINY["vocab_size"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)
    return directory


def test_text_source_is_tokenized_and_packed(ckpt_with_tokenizer, data_dir):
    from transformers import PreTrainedTokenizerFast

    text_file = data_dir / "doc.txt"
    text_file.write_text(TEXT)
    profile = profile_model(str(ckpt_with_tokenizer), {"t": str(text_file)}, options())
    ids = PreTrainedTokenizerFast(tokenizer_file=str(ckpt_with_tokenizer / "tokenizer.json"))(TEXT)["input_ids"]
    assert len(ids) > 3 * SEQ_LEN and len(ids) % SEQ_LEN  # several chunks, the last one short (padded)
    chunks = [ids[i : i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN)]
    domain = profile.domains["t"]
    assert domain.tokens == len(ids)
    assert domain.sequences == len(chunks)
    assert_layers_match(domain.layers, reference_statistics(ckpt_with_tokenizer, chunks), rel=1e-6)


def test_text_source_without_tokenizer_is_a_user_error(ckpt, data_dir):
    text_file = data_dir / "doc2.txt"
    text_file.write_text(TEXT)
    with pytest.raises(UserError, match="tokenizer"):
        profile_model(str(ckpt), {"t": str(text_file)}, options())


def test_pretokenized_source_needs_no_tokenizer(whole, ckpt):
    assert not any(ckpt.glob("tokenizer*"))
    assert whole.domains["a"].tokens > 0


# --------------------------------------------------------------------------------------------------------------
# 5. Merge
# --------------------------------------------------------------------------------------------------------------
def test_merge_of_parts_equals_whole(whole, ckpt, data_dir, rows, tmp_path):
    n = 3 * BATCH  # a multiple of the batch size: the parts see the same batches as the whole run
    first = profile_model(str(ckpt), {"a": str(write_jsonl(data_dir / "part1.jsonl", rows[:n]))}, options())
    second = profile_model(str(ckpt), {"a": str(write_jsonl(data_dir / "part2.jsonl", rows[n:]))}, options())
    merged = merge_profiles([first, second])
    domain = merged.domains["a"]
    assert domain.tokens == whole.domains["a"].tokens
    assert domain.sequences == whole.domains["a"].sequences
    assert_layers_match(domain.layers, whole.domains["a"].layers, rel=1e-9)
    assert "part1.jsonl" in domain.source.spec and "part2.jsonl" in domain.source.spec

    path = tmp_path / "merged.json"
    merged.save(path)
    again = Profile.load(path)
    assert again == merged
    assert again.content_hash() == merged.content_hash()


def test_merge_of_different_domains_keeps_both(whole, ckpt, data_dir, rows):
    other = profile_model(str(ckpt), {"b": str(write_jsonl(data_dir / "b-only.jsonl", rows[:5]))}, options())
    merged = merge_profiles([whole, other])
    assert list(merged.domains) == ["a", "b"]
    assert merged.domains["a"] == whole.domains["a"]
    assert merged.domains["b"] == other.domains["b"]


def test_merge_of_different_models_is_a_user_error(whole, other_ckpt, rows_jsonl):
    other = profile_model(str(other_ckpt), {"a": str(rows_jsonl)}, options())
    assert other.model.config_hash != whole.model.config_hash
    with pytest.raises(UserError, match="different models"):
        merge_profiles([whole, other])


def test_merge_of_different_top_k_is_a_user_error(whole, tmp_path, rows_jsonl):
    """num_experts_per_tok is not part of the config hash, but top-2 and top-3 statistics cannot be summed."""
    model_dir = save_tiny_checkpoint(tmp_path / "top2", num_experts_per_tok=2)
    other = profile_model(str(model_dir), {"a": str(rows_jsonl)}, options())
    assert other.model.config_hash == whole.model.config_hash and other.model.top_k == 2
    with pytest.raises(UserError, match="top_k"):
        merge_profiles([whole, other])


def test_load_rejects_unknown_keys(whole, tmp_path):
    path = tmp_path / "p.json"
    whole.save(path)
    assert Profile.load(path) == whole
    data = json.loads(path.read_text())
    data["domains"]["a"]["layers"]["1"]["surprise"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="surprise"):
        Profile.load(path)
    data = json.loads(path.read_text())
    del data["domains"]["a"]["layers"]["1"]["surprise"]
    data["extra_top_level"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(UserError):
        Profile.load(path)


# --------------------------------------------------------------------------------------------------------------
# 6. Distributed (torchrun, gloo on CPU) equals one process
# --------------------------------------------------------------------------------------------------------------
def _cli_env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(ckpt, rows_jsonl, tmp_path):
    common = ["profile", str(ckpt), "-d", f"a={rows_jsonl}", "--seq-len", "16", "--batch-size", "2",
              "--max-tokens", "400"]
    a, b = (Profile.load(path) for path in cli_one_and_two_ranks(common, tmp_path))
    assert a.settings.world_size == 1 and b.settings.world_size == 2
    expected_tokens = min(400, sum(min(len(r), 16) for r in json_rows(rows_jsonl)))
    assert a.domains["a"].tokens == b.domains["a"].tokens == expected_tokens
    assert a.domains["a"].sequences == b.domains["a"].sequences
    assert_layers_match(b.domains["a"].layers, a.domains["a"].layers, rel=1e-9)


def json_rows(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# 7. Report: concentration figures of the real DeepSeekMoE-16B counts (MoE Lens release)
# --------------------------------------------------------------------------------------------------------------
README_FIGURES = {  # domain: (top share median %, max %, experts for 50%: min, median, max)
    "gsm8k": (48.4, 72.8, 8, 15, 21),
    "aime-math": (37.2, 68.1, 12, 18, 22),
    "arxiv": (32.3, 66.7, 16, 19, 25),
    "english": (25.6, 42.9, 14, 21, 23),
    "french-qa": (23.7, 65.8, 17, 24, 26),
    "github": (20.5, 31.3, 25, 27, 29),
    "chinese": (16.7, 21.5, 23, 28, 30),
}


@pytest.fixture(scope="module")
def lens_profile() -> Profile:
    counts = fixtures.moe_lens_counts()
    layers = list(range(1, 28))
    domains = {}
    for name, per_layer in counts.items():
        assert sorted(per_layer, key=int) == [str(layer) for layer in layers]
        totals = {sum(v) for v in per_layer.values()}
        assert len(totals) == 1 and next(iter(totals)) % 6 == 0
        domains[name] = DomainProfile(
            tokens=next(iter(totals)) // 6,
            source=SourceDescription(kind="imported", spec=f"moe-lens:{name}"),
            layers={layer: LayerStatistics(selected=values) for layer, values in per_layer.items()},
        )
    identity = ModelIdentity(
        source="deepseek-ai/deepseek-moe-16b-base", family="deepseek_moe", config_hash="0" * 64,
        moe_layers=layers, experts_per_layer={str(layer): 64 for layer in layers}, top_k=6,
    )
    return Profile(tool_version="test", model=identity, settings=ProfileSettings(), domains=domains)


@pytest.mark.parametrize("domain", list(README_FIGURES))
def test_concentration_reproduces_published_figures(lens_profile, domain):
    median, top, cmin, cmed, cmax = README_FIGURES[domain]
    c = concentration(lens_profile, domain)
    assert f"{100 * c.top_share_median:.1f}" == f"{median:.1f}"
    assert f"{100 * c.top_share_max:.1f}" == f"{top:.1f}"
    assert (c.cover50_min, c.cover50_median, c.cover50_max) == (cmin, cmed, cmax)
    assert c.tokens == lens_profile.domains[domain].tokens
    if domain == "gsm8k":
        assert c.top_share_max_layer == 13


def test_lens_profile_round_trips_as_counts_only(lens_profile, tmp_path):
    path = tmp_path / "lens.json"
    lens_profile.save(path)
    again = Profile.load(path)
    assert again == lens_profile
    assert again.statistics_available() == {"selected"}


@pytest.mark.slow
def test_write_profile_report(lens_profile, tmp_path):
    (tmp_path / "report").mkdir()
    summary, figures = write_profile_report(lens_profile, tmp_path / "report")
    assert summary == tmp_path / "report" / "summary.md"
    assert sorted(figures) == sorted((tmp_path / "report").glob("*.png"))
    pngs = sorted((tmp_path / "report").glob("*.png"))
    assert len(pngs) >= len(README_FIGURES) + 2  # a heatmap per domain, top-expert share, coverage
    for png in pngs:
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = summary.read_text()
    assert "| gsm8k |" in text and "48.4%" in text and "72.8% (13)" in text and "8 / 15 / 21" in text
    for domain, (median, top, cmin, cmed, cmax) in README_FIGURES.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {domain} |"))
        assert f"{median:.1f}%" in line and f"{top:.1f}%" in line and f"{cmin} / {cmed} / {cmax}" in line
    for png in pngs:
        assert f"({png.name})" in text


# --------------------------------------------------------------------------------------------------------------
# 8. The command line: success, and bad input -> one line "error: ...", exit code 2, no output file
# --------------------------------------------------------------------------------------------------------------

def test_cli_profile_writes_the_same_profile(ckpt, rows_jsonl, whole, tmp_path, capsys):
    output = tmp_path / "p.json"
    code, out, err = run_cli(["profile", ckpt, "-d", f"a={rows_jsonl}", "-o", output, "--seq-len", SEQ_LEN,
                              "--batch-size", BATCH, "--device", "cpu"], capsys)
    assert code == 0, err
    profile = Profile.load(output)
    assert profile.domains["a"].tokens == whole.domains["a"].tokens
    assert_layers_match(profile.domains["a"].layers, whole.domains["a"].layers, rel=1e-9)
    assert profile.settings.max_tokens == 65536

    merged = tmp_path / "m.json"
    code, _, err = run_cli(["profile", "merge", output, output, "-o", merged], capsys)
    assert code == 0, err
    doubled = Profile.load(merged).domains["a"]
    assert doubled.tokens == 2 * whole.domains["a"].tokens
    assert doubled.layers["1"].selected == [2 * v for v in whole.domains["a"].layers["1"].selected]


def test_cli_report_of_a_profile(whole, tmp_path, capsys):
    path = tmp_path / "p.json"
    whole.save(path)
    code, _, err = run_cli(["report", path, "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| a |" in summary
    assert list((tmp_path / "out").glob("*.png"))


@pytest.fixture
def bad_inputs(tmp_path, ckpt, other_ckpt, rows_jsonl, whole):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    (tmp_path / "exists.json").write_text("keep me\n")
    whole.save(tmp_path / "mine.json")
    theirs = whole.model_copy(update={"model": whole.model.model_copy(update={"config_hash": "f" * 64,
                                                                               "source": str(other_ckpt)})})
    theirs.save(tmp_path / "theirs.json")
    return tmp_path


def _profile_argv(ckpt, output, *data, extra=()):
    argv = ["profile", ckpt, "-o", output, "--seq-len", SEQ_LEN, "--device", "cpu", *extra]
    for item in data:
        argv += ["-d", item]
    return argv


BAD_CASES = {
    "nonexistent source": lambda d, c, j: _profile_argv(c, d / "out.json", f"a={d / 'nope.jsonl'}"),
    "empty text": lambda d, c, j: _profile_argv(c, d / "out.json", f"a={d / 'empty.txt'}"),
    "csv source": lambda d, c, j: _profile_argv(c, d / "out.json", f"a={d / 'rows.csv'}"),
    "seq-len beyond context": lambda d, c, j: _profile_argv(c, d / "out.json", f"a={j}", extra=["--seq-len", "1000"]),
    "duplicate domain": lambda d, c, j: _profile_argv(c, d / "out.json", f"a={j}", f"a={j}"),
    "existing output": lambda d, c, j: _profile_argv(c, d / "exists.json", f"a={j}"),
    "merge different models": lambda d, c, j: ["profile", "merge", d / "mine.json", d / "theirs.json", "-o",
                                               d / "out.json"],
    "empty pre-tokenized rows": lambda d, c, j: _profile_argv(
        c, d / "out.json", f"a={write_jsonl(d / 'e.jsonl', [[], []])}"),
    "malformed -d": lambda d, c, j: _profile_argv(c, d / "out.json", str(j)),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_cli_bad_input(case, bad_inputs, ckpt, rows_jsonl, capsys):
    argv = BAD_CASES[case](bad_inputs, ckpt, rows_jsonl)
    before = sorted(p.name for p in bad_inputs.iterdir())
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (case, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (bad_inputs / "out.json").exists()
    assert sorted(p.name for p in bad_inputs.iterdir()) == before
    assert (bad_inputs / "exists.json").read_text() == "keep me\n"


def test_seq_len_beyond_context_is_a_user_error(ckpt, rows_jsonl):
    with pytest.raises(UserError, match="64"):
        profile_model(str(ckpt), {"a": str(rows_jsonl)}, options(seq_len=65))


def test_token_ids_outside_the_vocabulary_are_a_user_error(ckpt, data_dir):
    path = write_jsonl(data_dir / "oov.jsonl", [[1, 2, 3], [4, TINY["vocab_size"]]])
    with pytest.raises(UserError, match="vocabulary"):
        profile_model(str(ckpt), {"a": str(path)}, options())


@pytest.mark.slow
def test_cli_error_in_a_subprocess_is_one_line(ckpt, rows_jsonl, tmp_path):
    """The real process: nothing but the one error line on stderr (no warnings, no traceback)."""
    output = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "compressor", "profile", str(ckpt), "-d", f"a={rows_jsonl}", "-o", str(output),
         "--seq-len", "1000"],
        capture_output=True, text=True, env=_cli_env(), cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "1000" in result.stderr
    assert not output.exists()
