"""`moe-compress lens` against an independent computation: the model runs with hooks only to capture the MoE block
inputs and decoder layer outputs; routing, experts, the final norm and the LM head are then recomputed here in
float64 from the checkpoint's tensors (read with safetensors), with the family's rule written out in this file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from compressor.lens import LensOptions, LensReport, lens_model
from helpers import TINY, cli_one_and_two_ranks, run_cli, save_tiny_checkpoint, stage_options, write_jsonl

torch.set_num_threads(1)
SEQ = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny DeepSeekMoE (layers 1, 2 MoE; 2 the last) and a tiny Qwen3-MoE (all layers MoE), saved to disk."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("lens")
    deepseek = save_tiny_checkpoint(root / "deepseek")
    torch.manual_seed(0)
    qwen = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=TINY["vocab_size"], hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=True, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for name, parameter in qwen.named_parameters():
            if ".mlp." in name:
                parameter.copy_(torch.randn_like(parameter) * (0.5 if name.endswith("gate.weight") else 0.2))
    qwen.save_pretrained(root / "qwen3")
    return {"deepseek": deepseek, "qwen3": root / "qwen3"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("lens-data")
    rows = lambda n: [[rng.randrange(2, TINY["vocab_size"]) for _ in range(rng.randint(3, SEQ))] for _ in range(n)]  # noqa: E731
    return {"a": write_jsonl(root / "a.jsonl", rows(9)), "b": write_jsonl(root / "b.jsonl", rows(6))}


def options(**changes) -> LensOptions:
    return stage_options(LensOptions, **{"seq_len": SEQ, "batch_size": 4, "device": "cpu", "progress": False,
                                         "max_tokens": None, **changes})


@torch.no_grad()
def expected_lens(directory: Path, rows: list[list[int]]) -> dict[str, dict[str, float | list[float]]]:
    from transformers import AutoModelForCausalLM

    import compressor  # noqa: F401

    config = json.loads((directory / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    sd = {n: t.double() for n, t in load_file(directory / "model.safetensors").items()}
    k = config["num_experts_per_tok"]
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    captured = {}
    for layer in layers:
        model.model.layers[layer].mlp.register_forward_pre_hook(
            lambda m, args, layer=layer: captured.__setitem__(("x", layer), args[0][0].double()))
        model.model.layers[layer].register_forward_hook(
            lambda m, args, out, layer=layer: captured.__setitem__(("h", layer), out[0].double()))
    eps = config["rms_norm_eps"]

    def log_p(h):
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * sd["model.norm.weight"]
        return (normed @ sd["lm_head.weight"].T).log_softmax(-1)

    def swiglu(x, p):
        return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T

    sums = {layer: {"kl": 0.0, "agree": 0, "cos": 0.0, "acc_k": 0, "acc_1": 0, "final": 0, "curve": [0.0] * k,
                    "n": 0} for layer in layers}
    for row in rows:
        captured.clear()
        final = model(input_ids=torch.tensor([row]), use_cache=False).logits[0].argmax(-1)
        n = len(row) - 1  # positions with a next token
        target = torch.tensor(row[1:])
        for layer in layers:
            p = f"model.layers.{layer}.mlp."
            x, h = captured[("x", layer)][:n], captured[("h", layer)][:n]
            probs = (x @ sd[p + "gate.weight"].T).softmax(-1)  # both families: softmax over all experts
            weight, index = probs.topk(k, dim=-1)  # sorted: slot 0 = the highest weight
            if config.get("norm_topk_prob"):
                weight = weight / weight.sum(-1, keepdim=True)
            outs = torch.stack([torch.stack([swiglu(x[t], f"{p}experts.{int(e)}.") for e in index[t]])
                                for t in range(n)])  # [n, k, H]
            weighted = outs * weight[..., None]
            h_j = [h - weighted.sum(1) + weighted[:, :j].sum(1) for j in range(1, k + 1)]
            lk = log_p(h)
            s = sums[layer]
            for j in range(k):
                lj = log_p(h_j[j])
                s["curve"][j] += float((lk.exp() * (lk - lj)).sum(-1).sum())
            l1 = log_p(h_j[0])
            s["kl"] += float((lk.exp() * (lk - l1)).sum(-1).sum())
            s["agree"] += int((lk.argmax(-1) == l1.argmax(-1)).sum())
            s["cos"] += float(F.cosine_similarity(h, h_j[0], dim=-1).sum())
            s["acc_k"] += int((lk.argmax(-1) == target).sum())
            s["acc_1"] += int((l1.argmax(-1) == target).sum())
            s["final"] += int((lk.argmax(-1) == final[:n]).sum())
            s["n"] += n
    return {str(layer): {"kl_topk_top1": s["kl"] / s["n"], "top1_agreement": s["agree"] / s["n"],
                         "cosine": s["cos"] / s["n"], "early_accuracy_topk": s["acc_k"] / s["n"],
                         "early_accuracy_top1": s["acc_1"] / s["n"], "final_agreement_topk": s["final"] / s["n"],
                         "kl_by_experts": [v / s["n"] for v in s["curve"]], "tokens": s["n"]}
            for layer, s in sums.items()}


def rows_of(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"][:SEQ] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["deepseek", "qwen3"])
def test_every_key_matches_the_independent_computation(models, data, name):
    report = lens_model(str(models[name]), {"a": str(data["a"])}, options())
    expected = expected_lens(models[name], rows_of(data["a"]))
    domain = report.domains["a"]
    assert domain.tokens == sum(len(r) - 1 for r in rows_of(data["a"]))
    assert set(domain.layers) == set(expected)
    for layer, want in expected.items():
        got = domain.layers[layer].model_dump()
        assert set(got) == set(want) - {"tokens"}
        for key in ("top1_agreement", "early_accuracy_topk", "early_accuracy_top1", "final_agreement_topk"):
            assert got[key] == pytest.approx(want[key], abs=1e-12), (layer, key)
        for key in ("kl_topk_top1", "cosine"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), (layer, key)
        assert got["kl_by_experts"] == pytest.approx(want["kl_by_experts"], rel=1e-4, abs=1e-7)
        assert got["kl_by_experts"][-1] == 0  # j = k: the ensemble itself
        assert got["kl_by_experts"][0] == got["kl_topk_top1"]
    last = str(report.model.moe_layers[-1])
    assert domain.layers[last].final_agreement_topk == 1.0  # the last decoder layer's lens is the model's prediction
    assert domain.layers[last].kl_topk_top1 > 1e-4  # and top-1 routing changes something there


def test_layerwise_equals_whole_and_two_domains_in_one_run(models, data):
    sources = {name: str(path) for name, path in data.items()}
    whole = lens_model(str(models["deepseek"]), sources, options())
    layerwise = lens_model(str(models["deepseek"]), sources, options(layerwise=True))
    assert set(whole.domains) == {"a", "b"} and layerwise.settings.layerwise
    for name in ("a", "b"):
        alone = lens_model(str(models["deepseek"]), {name: sources[name]}, options()).domains[name]
        for report in (whole, layerwise):
            domain = report.domains[name]
            assert domain.tokens == alone.tokens
            for layer, stats in domain.layers.items():
                other = alone.layers[layer]
                for key, value in stats.model_dump().items():
                    assert value == pytest.approx(getattr(other, key), rel=1e-5, abs=1e-8), (name, layer, key)


def test_cli_writes_the_report_and_figures(models, data, tmp_path, capsys):
    out = tmp_path / "lens.json"
    code, stdout, err = run_cli(["lens", models["qwen3"], "-d", f"a={data['a']}", "-d", f"b={data['b']}", "-o", out,
                                 "--seq-len", SEQ, "--device", "cpu"], capsys)
    assert code == 0, err
    report = LensReport.load(out)
    assert report.format_version == 1 and set(report.domains) == {"a", "b"}
    assert sorted(p.name for p in (tmp_path / "lens-plots").iterdir()) == ["lens-a.png", "lens-b.png"]
    assert "a: " in stdout and "the top-1 expert alone agrees with the top-3 ensemble" in stdout
    raw = json.loads(out.read_text())
    assert set(raw["domains"]["a"]["layers"]["0"]) == {
        "kl_topk_top1", "top1_agreement", "cosine", "early_accuracy_topk", "early_accuracy_top1",
        "final_agreement_topk", "kl_by_experts"}
    with pytest.raises(Exception):
        LensReport.model_validate({**raw, "extra": 1})


@pytest.mark.parametrize("case", ["dense model", "empty source", "seq-len 1"])
def test_bad_input_is_one_line(models, data, tmp_path, capsys, case):
    model, source, extra = models["deepseek"], data["a"], []
    if case == "dense model":
        model = save_tiny_checkpoint(tmp_path / "dense", n_routed_experts=None)
    elif case == "empty source":
        source = tmp_path / "empty.jsonl"
        source.write_text("")
    else:
        extra = ["--seq-len", "1"]
    out = tmp_path / "lens.json"
    code, _, err = run_cli(["lens", model, "-d", f"a={source}", "-o", out, "--device", "cpu", *extra], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(models, data, tmp_path):
    common = ["lens", models["qwen3"], "-d", f"a={data['a']}", "-d", f"b={data['b']}", "--seq-len", str(SEQ),
              "--batch-size", "2", "--device", "cpu"]
    a, b = (LensReport.load(path) for path in cli_one_and_two_ranks(common, tmp_path))
    assert (a.settings.world_size, b.settings.world_size) == (1, 2)
    for name, domain in a.domains.items():
        assert b.domains[name].tokens == domain.tokens
        for layer, stats in domain.layers.items():
            other = b.domains[name].layers[layer].model_dump()
            for key, value in stats.model_dump().items():
                assert other[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, layer, key)


def test_report_has_a_lens_section(models, data, tmp_path, capsys):
    lens = lens_model(str(models["deepseek"]), {"a": str(data["a"]), "b": str(data["b"])}, options())
    lens.save(tmp_path / "lens.json")
    code, _, err = run_cli(["report", tmp_path / "lens.json", "-o", tmp_path / "report"], capsys)
    assert code == 0, err
    page = (tmp_path / "report" / "report.html").read_text()
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "Lens of" in page and "# Lens of" in summary
    for name, domain in lens.domains.items():
        for layer, s in domain.layers.items():
            cells = f"{name} | {layer} | {s.kl_topk_top1:.3f} | {100 * s.top1_agreement:.1f}% | {s.cosine:.3f} |"
            assert cells in summary
            assert "<td>" + cells.replace(" | ", "</td><td>").rstrip(" |") + "</td>" in page
        assert f"![lens-{name}](lens-{name}.png)" in summary
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == ["lens-a.png", "lens-b.png"]
    assert page.count("data:image/png;base64,") == 2
