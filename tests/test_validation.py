"""Validate (compressor.validation), export's automatic validation and the HTML report.

Expectations are computed independently: each sequence is run alone (no padding) through plain
`model(...)` of both checkpoints, and perplexity, KL(original || compressed), top-1 agreement and the
per-layer hidden-state cosine (hidden_states[i + 1] is the residual stream after decoder layer i) are
recomputed in float64 from the logits and hidden states.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.errors import UserError
from compressor.modeling import DeepseekForCausalLM
from compressor.validation.runner import ValidateOptions, validate_models
from compressor.validation.schema import ValidationReport
from helpers import MOE_LAYERS, TINY, run_cli, save_tiny_checkpoint, stage_options, write_jsonl

torch.set_num_threads(1)
KEEP = [0, 2, 5, 7]
SEQ_LEN, BATCH = 16, 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- fixtures -------------------------------------------------------------------------------------------




def random_rows(seed: int, count: int, vocab: int = TINY["vocab_size"]) -> list[list[int]]:
    """Rows of 3..24 tokens: some are padded in a batch, some are cut at SEQ_LEN."""
    rng = random.Random(seed)
    lengths = [rng.randint(3, 24) for _ in range(count)]
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


def make_plan(source: Path, keep=KEEP, top_k: int = 1, compensation: str = "none"):
    from compressor.families import detect_family
    from compressor.planning import Plan
    from compressor.profiling.schema import config_hash

    config = json.loads((source / "config.json").read_text())
    family = detect_family(config)
    identity = {"source": str(source), "family": family.name, "config_hash": config_hash(config, family.top_k_key),
                "moe_layers": family.moe_layers(config),
                "experts_per_layer": {str(layer): family.num_experts(config, layer)
                                      for layer in family.moe_layers(config)},
                "top_k": family.top_k(config)}
    return Plan.model_validate({"model": identity, "top_k": top_k, "compensation": compensation,
                                "layers": {str(layer): {"keep": list(keep)} for layer in family.moe_layers(config)}})


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validation")


@pytest.fixture(scope="module")
def source(root) -> Path:
    return save_tiny_checkpoint(root / "source")


@pytest.fixture(scope="module")
def plan_path(root, source) -> Path:
    path = root / "plan.json"
    make_plan(source).save(path)
    return path


@pytest.fixture(scope="module")
def pruned(root, source, plan_path) -> Path:
    """The source pruned to experts KEEP in every MoE layer, top-1, compensation none, not validated."""
    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions
    from compressor.planning import Plan

    export_checkpoint(str(source), Plan.load(plan_path), root / "pruned",
                      ExportOptions(compensation="none", run=RunOptions(device="cpu", progress=False),
                                    validation=ExportValidation(enabled=False)))
    return root / "pruned"


@pytest.fixture(scope="module")
def data(root) -> dict[str, Path]:
    return {"alpha": write_jsonl(root / "alpha.jsonl", random_rows(1, 14)),
            "beta": write_jsonl(root / "beta.jsonl", random_rows(2, 9))}


def options(**overrides) -> ValidateOptions:
    base = dict(max_tokens=10_000, seq_len=SEQ_LEN, batch_size=BATCH, device="cpu", progress=False)
    return stage_options(ValidateOptions, **{**base, **overrides})


@pytest.fixture(scope="module")
def report(source, pruned, data) -> ValidationReport:
    return validate_models(str(source), str(pruned), {k: str(v) for k, v in data.items()}, options())


def assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 150


# -- the independent computation ------------------------------------------------------------------------


def rows_of(path: Path) -> list[list[int]]:
    return [json.loads(line)["input_ids"] for line in path.read_text().splitlines() if line.strip()]


def capped(rows, seq_len=SEQ_LEN, max_tokens=10_000):
    out, used = [], 0
    for row in rows:
        if used >= max_tokens:
            break
        row = row[: min(seq_len, max_tokens - used)]
        out.append(row)
        used += len(row)
    return out


@torch.no_grad()
def expected_metrics(original: Path, compressed: Path, domains: dict[str, list[list[int]]]):
    """Per domain {ppl_o, ppl_c, kl, agree, tokens}; per decoder layer the cosines of all tokens."""
    models = [DeepseekForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (original, compressed)]
    per_domain, cosines = {}, {}
    for name, sequences in domains.items():
        nll_o = nll_c = kl = 0.0
        agree = tokens = 0
        for seq in sequences:
            ids = torch.tensor([seq])
            out_o, out_c = (m(input_ids=ids, use_cache=False, output_hidden_states=True) for m in models)
            lo = torch.log_softmax(out_o.logits[0, :-1].double(), -1)
            lc = torch.log_softmax(out_c.logits[0, :-1].double(), -1)
            target = ids[0, 1:]
            nll_o -= float(lo[torch.arange(len(target)), target].sum())
            nll_c -= float(lc[torch.arange(len(target)), target].sum())
            kl += float((lo.exp() * (lo - lc)).sum())
            agree += int((lo.argmax(-1) == lc.argmax(-1)).sum())
            tokens += len(target)
            for layer in range(TINY["num_hidden_layers"]):
                a = out_o.hidden_states[layer + 1][0].double()
                b = out_c.hidden_states[layer + 1][0].double()
                cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
                cosines.setdefault(layer, []).extend(cos.tolist())
        per_domain[name] = dict(ppl_o=math.exp(nll_o / tokens), ppl_c=math.exp(nll_c / tokens), kl=kl / tokens,
                                agree=agree / tokens, tokens=tokens)
    return per_domain, {layer: np.array(values) for layer, values in cosines.items()}


@pytest.fixture(scope="module")
def expected(source, pruned, data):
    return expected_metrics(source, pruned, {name: capped(rows_of(path)) for name, path in data.items()})


# -- validate: numbers ------------------------------------------------------------------------------------


def test_pruned_model_matches_independent_computation(report, expected):
    per_domain, cosines = expected
    assert set(report.domains) == {"alpha", "beta"}
    for name, want in per_domain.items():
        got = report.domains[name]
        assert got.tokens == want["tokens"]
        assert got.perplexity_original == pytest.approx(want["ppl_o"], rel=1e-5)
        assert got.perplexity_compressed == pytest.approx(want["ppl_c"], rel=1e-5)
        assert got.perplexity_increase == pytest.approx(want["ppl_c"] / want["ppl_o"] - 1, rel=1e-4, abs=1e-6)
        assert got.kl_mean == pytest.approx(want["kl"], rel=1e-5, abs=1e-7)
        assert got.top1_agreement == pytest.approx(want["agree"], abs=1e-12)
        # top-1 of 4 kept experts out of top-3 of 8: the models really differ
        assert want["kl"] > 1e-3 and want["ppl_c"] != pytest.approx(want["ppl_o"], rel=1e-4)
    assert sorted(report.layers, key=int) == ["0", "1", "2"]
    for layer, values in cosines.items():
        got = report.layers[str(layer)]
        assert got.cosine_mean == pytest.approx(values.mean(), rel=1e-5)
        assert got.cosine_p5 == pytest.approx(np.percentile(values, 5), rel=1e-5)
    # layer 0 is dense (unchanged): identical after it; the MoE layers change the residual stream
    assert report.layers["0"].cosine_mean == pytest.approx(1.0, abs=1e-6)
    assert report.layers["1"].cosine_mean < 0.9999 and report.layers["2"].cosine_mean < 0.9999


def test_report_identity_and_settings(report, source, pruned, data):
    assert report.format_version == 1 and report.passed and report.failures == []
    assert report.original.source == str(source) and report.compressed.source == str(pruned)
    assert report.original.family == report.compressed.family == "deepseek_moe"
    assert report.compressed.parameters < report.original.parameters
    assert report.compressed.bytes < report.original.bytes
    original = sum(p.numel() for p in DeepseekForCausalLM.from_pretrained(source).parameters())
    assert report.original.parameters == original
    assert report.domains["alpha"].source["spec"] == str(data["alpha"])
    assert report.settings["seq_len"] == SEQ_LEN and report.settings["layerwise"] is False


def test_max_tokens_caps_the_tokens_per_domain(source, pruned, data):
    capped_report = validate_models(str(source), str(pruned), {"alpha": str(data["alpha"])}, options(max_tokens=40))
    per_domain, _ = expected_metrics(source, pruned, {"alpha": capped(rows_of(data["alpha"]), max_tokens=40)})
    got, want = capped_report.domains["alpha"], per_domain["alpha"]
    assert got.tokens == want["tokens"]
    assert got.perplexity_compressed == pytest.approx(want["ppl_c"], rel=1e-5)
    assert got.kl_mean == pytest.approx(want["kl"], rel=1e-5)


def test_layerwise_equals_whole_model(report, source, pruned, data):
    layerwise = validate_models(str(source), str(pruned), {k: str(v) for k, v in data.items()},
                                options(layerwise=True))
    assert layerwise.settings["layerwise"] is True
    for name, whole in report.domains.items():
        got = layerwise.domains[name]
        assert got.tokens == whole.tokens
        for key in ("perplexity_original", "perplexity_compressed", "kl_mean", "top1_agreement"):
            assert getattr(got, key) == pytest.approx(getattr(whole, key), rel=1e-5, abs=1e-8), (name, key)
    assert layerwise.layers.keys() == report.layers.keys()
    for layer, whole in report.layers.items():
        assert layerwise.layers[layer].cosine_mean == pytest.approx(whole.cosine_mean, rel=1e-5)
        assert layerwise.layers[layer].cosine_p5 == pytest.approx(whole.cosine_p5, rel=1e-5)
    # forward speed is timed only when each model runs whole (layer-by-layer timings include loading)
    assert layerwise.throughput is None
    assert report.throughput.original_tokens_per_second > 0 and report.throughput.compressed_tokens_per_second > 0


# -- validate: the command line ---------------------------------------------------------------------------


def validate_argv(original, compressed, data, output, *extra):
    argv = ["validate", original, compressed, "-o", output, "--seq-len", SEQ_LEN, "--batch-size", BATCH,
            "--device", "cpu"]
    for name, path in data.items():
        argv += ["-d", f"{name}={path}"]
    return argv + list(extra)


def test_model_against_itself(source, data, tmp_path, capsys):
    output = tmp_path / "self.json"
    code, out, err = run_cli(validate_argv(source, source, data, output, "--max-ppl-increase", "0",
                                           "--min-cosine", "0.999999"), capsys)
    assert code == 0, err
    assert "validation passed" in out
    same = ValidationReport.load(output)
    assert same.passed and same.failures == []
    for d in same.domains.values():
        assert d.perplexity_increase == 0.0 and d.perplexity_original == d.perplexity_compressed
        assert abs(d.kl_mean) < 1e-9
        assert d.top1_agreement == 1.0
    for layer in same.layers.values():
        assert layer.cosine_mean == pytest.approx(1.0, abs=1e-6)
        assert layer.cosine_p5 == pytest.approx(1.0, abs=1e-6)


def test_cli_thresholds_fail_and_pass(report, source, pruned, data, tmp_path, capsys):
    alpha, beta = report.domains["alpha"].perplexity_increase, report.domains["beta"].perplexity_increase
    assert abs(alpha - beta) > 2e-3, "the two domains need distinct increases for this test"
    low, high = sorted([("alpha", alpha), ("beta", beta)], key=lambda item: item[1])
    worst_layer = min(report.layers, key=lambda k: report.layers[k].cosine_mean)

    # the domain with the larger increase fails, the other holds; every layer is above 0.5
    output = tmp_path / "fail.json"
    code, out, err = run_cli(validate_argv(source, pruned, data, output, f"--max-ppl-increase={low[1] + 1e-3}",
                                           "--min-cosine", "0.5"), capsys)
    assert code == 1, (out, err)
    assert "validation FAILED" in err
    failed_lines = [line.strip() for line in err.splitlines() if line.startswith("  ")]
    assert len(failed_lines) == 1 and failed_lines[0].startswith(f"{high[0]}:"), err
    saved = ValidationReport.load(output)
    assert not saved.passed and len(saved.failures) == 1 and saved.failures[0].startswith(f"{high[0]}:")
    assert saved.thresholds.max_ppl_increase == pytest.approx(low[1] + 1e-3)

    # the worst layer's cosine fails a threshold just above it
    output = tmp_path / "cos.json"
    threshold = report.layers[worst_layer].cosine_mean + 1e-6
    failing_layers = sorted(k for k, v in report.layers.items() if v.cosine_mean < threshold)
    code, out, err = run_cli(validate_argv(source, pruned, data, output, "--min-cosine", threshold), capsys)
    assert code == 1
    saved = ValidationReport.load(output)
    assert [f.split(":")[0] for f in saved.failures] == [f"layer {k}" for k in failing_layers]
    assert f"layer {worst_layer}:" in err

    # thresholds that hold
    output = tmp_path / "pass.json"
    code, out, err = run_cli(validate_argv(source, pruned, data, output, f"--max-ppl-increase={high[1] + 1e-3}",
                                           "--min-cosine", report.layers[worst_layer].cosine_mean - 1e-4), capsys)
    assert code == 0, err
    assert "validation passed" in out and "FAILED" not in err
    assert ValidationReport.load(output).passed


def test_per_domain_perplexity_gates(report, source, pruned, data, tmp_path, capsys):
    """NAME=X gates only the named domains; each domain is held to its own limit; unknown names are refused."""
    alpha, beta = report.domains["alpha"].perplexity_increase, report.domains["beta"].perplexity_increase
    gate = f"alpha={alpha - 1e-3},beta={beta + 1e-3}"
    output = tmp_path / "gates.json"
    code, out, err = run_cli(validate_argv(source, pruned, data, output, "--max-ppl-increase", gate), capsys)
    assert code == 1
    saved = ValidationReport.load(output)
    assert [f.split(":")[0] for f in saved.failures] == ["alpha"]
    assert saved.thresholds.max_ppl_increase == pytest.approx({"alpha": alpha - 1e-3, "beta": beta + 1e-3})

    code, out, err = run_cli(validate_argv(source, pruned, data, tmp_path / "beta-only.json",
                                           "--max-ppl-increase", f"beta={beta + 1e-3}"), capsys)
    assert code == 0, err  # alpha is not gated

    for bad, message in (("gamma=0.1", "gamma"), ("alpha=x", "--max-ppl-increase")):
        code, out, err = run_cli(validate_argv(source, pruned, data, tmp_path / "bad.json",
                                               "--max-ppl-increase", bad), capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_cli_writes_report_and_plots(report, source, pruned, data, tmp_path, capsys):
    output = tmp_path / "validation.json"
    code, out, err = run_cli(validate_argv(source, pruned, data, output), capsys)
    assert code == 0, err
    assert "no thresholds given" in out
    for name in data:
        assert re.search(rf"^{name}\s+\d+", out, re.MULTILINE), out
    saved = ValidationReport.load(output)
    assert saved.domains["alpha"].kl_mean == pytest.approx(report.domains["alpha"].kl_mean, rel=1e-9)
    pngs = sorted(tmp_path.rglob("*.png"))
    assert [p.name for p in pngs] == ["cosine.png", "perplexity.png"]
    for png in pngs:
        assert_png(png)
        assert png.name in out

    # an existing output is refused without --overwrite
    before = output.read_bytes()
    code, out, err = run_cli(validate_argv(source, pruned, data, output), capsys)
    assert code == 2 and err.startswith("error: ") and output.read_bytes() == before


def test_report_file_rejects_unknown_keys(report, tmp_path):
    path = tmp_path / "v.json"
    report.save(path)
    assert ValidationReport.load(path) == report
    raw = json.loads(path.read_text())

    raw["surprise"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="surprise"):
        ValidationReport.load(path)

    del raw["surprise"]
    raw["layers"]["1"]["cosine_median"] = 0.5
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="cosine_median"):
        ValidationReport.load(path)

    del raw["layers"]["1"]["cosine_median"]
    raw["format_version"] = 2
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="format_version"):
        ValidationReport.load(path)


@pytest.fixture(scope="module")
def unrelated(root) -> Path:
    return save_tiny_checkpoint(root / "unrelated", seed=3, vocab_size=120)


@pytest.mark.parametrize("case", ["different vocab", "missing original", "missing compressed", "token out of vocab"])
def test_cli_bad_input(case, source, pruned, unrelated, data, root, tmp_path, capsys):
    models = {"different vocab": (source, unrelated), "missing original": (tmp_path / "nope", pruned),
              "missing compressed": (source, tmp_path / "nope")}.get(case, (source, pruned))
    domains = dict(data)
    if case == "token out of vocab":
        domains = {"oov": write_jsonl(tmp_path / "oov.jsonl", [[3, 4, 5], [6, TINY["vocab_size"]]])}
    output = tmp_path / "v.json"
    code, out, err = run_cli(validate_argv(*models, domains, output), capsys)
    assert code == 2, (case, out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    expected_word = {"different vocab": "vocabulary", "missing original": "nope", "missing compressed": "nope",
                     "token out of vocab": "vocabulary"}[case]
    assert expected_word in lines[0]
    assert not output.exists() and not list(tmp_path.rglob("*.png"))


# -- export's automatic validation ------------------------------------------------------------------------


def test_export_validates_its_output(source, plan_path, data, report, tmp_path):
    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions
    from compressor.planning import Plan

    out = tmp_path / "out"
    result = export_checkpoint(str(source), Plan.load(plan_path), out, ExportOptions(
        compensation="none", run=RunOptions(seq_len=SEQ_LEN, batch_size=BATCH, device="cpu", progress=False),
        validation=ExportValidation(data={k: str(v) for k, v in data.items()}, max_tokens=10_000,
                                    max_ppl_increase=10.0)))
    saved = ValidationReport.load(out / "validation.json")
    assert result.validation == saved and saved.passed
    assert saved.compressed.source == str(out) and saved.original.source == str(source)
    # the same numbers as validating the same export separately
    for name, d in report.domains.items():
        assert saved.domains[name].perplexity_compressed == pytest.approx(d.perplexity_compressed, rel=1e-9)
        assert saved.domains[name].kl_mean == pytest.approx(d.kl_mean, rel=1e-9)
    for png in ("perplexity.png", "cosine.png"):
        assert_png(out / "plots" / png)
    card = (out / "README.md").read_text()
    section = card.split("## Validation", 1)[1].split("\n## ", 1)[0]
    assert "**passed**" in section and "FAILED" not in section
    for name, d in saved.domains.items():
        assert f"| {name} | {d.tokens} | {d.perplexity_original:.3f} | {d.perplexity_compressed:.3f} |" in section
    assert "plots/perplexity.png" in section and "plots/cosine.png" in section
    assert not list(tmp_path.glob(".*"))  # no staging leftovers


def test_export_validation_sources_never_reuse_calibration_data():
    from compressor.export.exporter import ExportOptions, ExportValidation, FitOptions, validation_sources

    calibration = {"code": "demo:code", "math": "demo:math@calibration", "mine": "/data/mine.jsonl"}
    assert validation_sources(ExportOptions(fit=FitOptions(calibration=calibration))) == {
        "code": "demo:code@evaluation", "math": "demo:math@evaluation"}
    assert validation_sources(ExportOptions(fit=FitOptions(calibration=calibration),
                                            validation=ExportValidation(data={"x": "x.jsonl"}))) == {
        "x": "x.jsonl"}
    assert validation_sources(ExportOptions()) == {}


def test_export_without_held_out_data_is_not_validated(source, plan_path, tmp_path):
    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, RunOptions
    from compressor.planning import Plan

    out = tmp_path / "out"
    result = export_checkpoint(str(source), Plan.load(plan_path), out,
                               ExportOptions(compensation="none", run=RunOptions(device="cpu", progress=False)))
    assert result.validation is None
    assert not (out / "validation.json").exists() and not (out / "plots").exists()
    assert "Not validated" in (out / "README.md").read_text()


def test_export_cli_failed_gate_exits_1_and_card_says_so(report, source, plan_path, data, tmp_path, capsys):
    increase = report.domains["alpha"].perplexity_increase
    out = tmp_path / "out"
    code, stdout, err = run_cli(["export", source, plan_path, "-o", out, "--compensation", "none",
                                 "--validate-on", f"alpha={data['alpha']}", "--seq-len", SEQ_LEN,
                                 "--batch-size", BATCH, "--device", "cpu",
                                 f"--max-ppl-increase={increase - 1e-3}"], capsys)
    assert code == 1, (stdout, err)
    assert "validation FAILED" in err and "alpha:" in err
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    saved = ValidationReport.load(out / "validation.json")
    assert not saved.passed and saved.failures and saved.failures[0].startswith("alpha:")
    assert saved.domains["alpha"].perplexity_increase == pytest.approx(increase, rel=1e-9, abs=1e-12)
    card = (out / "README.md").read_text()
    section = card.split("## Validation", 1)[1].split("\n## ", 1)[0]
    assert "**FAILED**" in section and saved.failures[0] in section
    assert_png(out / "plots" / "cosine.png")


# -- the HTML report --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile_path(root, source, data) -> Path:
    from compressor.profiling import ProfileOptions, profile_model

    path = root / "profile.json"
    profile_model(str(source), {k: str(v) for k, v in data.items()},
                  stage_options(ProfileOptions, max_tokens=None, seq_len=SEQ_LEN, batch_size=BATCH, device="cpu",
                                 progress=False)).save(path)
    return path


def test_report_html_is_self_contained(profile_path, plan_path, report, tmp_path, capsys):
    validation = tmp_path / "validation.json"
    report.save(validation)
    out = tmp_path / "report"
    code, stdout, err = run_cli(["report", profile_path, plan_path, validation, "-o", out], capsys)
    assert code == 0, err
    page = (out / "report.html").read_text()
    files = sorted(p.name for p in out.glob("*.png"))
    assert "perplexity.png" in files and "cosine.png" in files and len(files) >= 3
    for png in out.glob("*.png"):
        assert_png(png)

    # every figure is embedded as a data: URI; nothing refers outside the page
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(files)
    assert re.findall(r"(?:src|href)\s*=\s*['\"]?([^'\" >]*)", page) == sources
    embedded = {base64.b64decode(s.removeprefix("data:image/png;base64,")) for s in sources}
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert embedded == {p.read_bytes() for p in out.glob("*.png")}
    assert "<link" not in page and "<script" not in page and "url(" not in page and "@import" not in page

    text = re.sub(r"<[^>]+>", " ", page)
    for domain in ("alpha", "beta"):
        assert re.search(rf"\b{domain}\b", text), domain
    for layer, r in report.layers.items():  # every decoder layer's cosine, as a number, not only in a figure
        assert f"<td>{layer}</td><td>{r.cosine_mean:.4f}</td><td>{r.cosine_p5:.4f}</td>" in page, layer
    for layer in MOE_LAYERS:
        assert f"<td>{layer}</td><td>{len(KEEP)} / 8</td><td>{', '.join(map(str, KEEP))}</td>" in page
    assert "Validation: passed" in page and "top-1" in page
    assert (out / "summary.md").exists()

    # an existing report is replaced only with --overwrite
    code, _, err = run_cli(["report", profile_path, "-o", out], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(["report", profile_path, "-o", out, "--overwrite"], capsys)
    assert code == 0, err


def test_report_rejects_unknown_files(tmp_path, capsys):
    bogus = tmp_path / "x.json"
    bogus.write_text('{"hello": 1}')
    code, _, err = run_cli(["report", bogus, "-o", tmp_path / "r"], capsys)
    assert code == 2 and err.startswith("error: ") and "x.json" in err


# -- non-finite numbers never pass ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(root, pruned) -> Path:
    """The pruned output with one NaN in a kept expert of layer 1 (every token routed there turns NaN)."""
    import shutil

    from safetensors.torch import load_file, save_file

    target = root / "nan-model"
    shutil.copytree(pruned, target)
    tensors = load_file(target / "model.safetensors")
    for e in range(len(KEEP)):
        tensors[f"model.layers.1.mlp.experts.{e}.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("gate", [[], ["--max-ppl-increase", "10"], ["--min-cosine", "-1"],
                                  ["--max-ppl-increase", "alpha=10"]])
def test_nan_model_fails_validation_with_or_without_gates(nan_model, source, data, tmp_path, capsys, gate):
    output = tmp_path / "v.json"
    code, out, err = run_cli(validate_argv(source, nan_model, {"alpha": data["alpha"]}, output) + gate, capsys)
    assert code == 1, (out, err)
    assert "validation FAILED" in err and "not a finite number" in err and "validation passed" not in out
    saved = ValidationReport.load(output)  # NaN is stored as "NaN", never as null, and loads back
    assert not saved.passed and math.isnan(saved.domains["alpha"].perplexity_compressed)
    stored = json.loads(output.read_text())["domains"]["alpha"]
    assert stored["perplexity_compressed"] == "NaN" and stored["kl_mean"] == "NaN"


def test_nan_fails_both_gates_through_the_api(nan_model, source, data):
    report = validate_models(str(source), str(nan_model), {"alpha": str(data["alpha"])},
                             options(max_ppl_increase=0.5, min_cosine=0.5))
    assert not report.passed
    assert any(f.startswith("alpha:") and "not a finite number" in f for f in report.failures)
    assert any(f.startswith("layer ") and "not a finite number" in f for f in report.failures)


def test_profile_of_nan_weights_is_refused_and_writes_nothing(nan_model, data, tmp_path, capsys):
    output = tmp_path / "p.json"
    code, out, err = run_cli(["profile", nan_model, "-d", f"alpha={data['alpha']}", "-o", output,
                              "--seq-len", SEQ_LEN, "--device", "cpu"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and "not finite" in err
    assert not output.exists()


# -- the model card -----------------------------------------------------------------------------------------


def test_card_names_targets_warns_off_target_and_shows_the_tokenizer(source, data, tmp_path):
    from huggingface_hub import ModelCard

    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions
    from compressor.planning import PlanOptions
    from compressor.planning import make_plan as plan_from_profile
    from compressor.profiling import ProfileOptions, profile_model

    import shutil

    licensed = tmp_path / "licensed"
    shutil.copytree(source, licensed)
    (licensed / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    profile = profile_model(str(licensed), {k: str(v) for k, v in data.items()},
                            stage_options(ProfileOptions, seq_len=SEQ_LEN, device="cpu", progress=False))
    plan = plan_from_profile(profile, PlanOptions(keep=4, domains={"alpha": 1}, compensation="none"))
    out = tmp_path / "model"
    export_checkpoint(str(licensed), plan, out, ExportOptions(
        run=RunOptions(seq_len=SEQ_LEN, device="cpu", progress=False),
        validation=ExportValidation(data={k: str(v) for k, v in data.items()})))
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    text = (out / "README.md").read_text()
    assert "# licensed, pruned to 4 of 8 experts per layer, top-1" in text and "\n# model\n" not in text
    assert "AutoTokenizer.from_pretrained(path)" in text and f'path = "{out}"' in text
    assert "chosen for: **alpha**" in text
    beta = ValidationReport.load(out / "validation.json").domains["beta"].perplexity_increase
    assert f"beta {100 * beta:+.1f}%" in text.split("**Warning:**", 1)[1].splitlines()[0]
    assert "pypi.org" not in text
