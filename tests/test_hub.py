"""`moe-compress push` / `export --push-to-hub` / compressor.hub against a fake Hub on 127.0.0.1 (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT when it is imported, so every command that talks to the (fake) Hub runs in a
subprocess with HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0 and a temporary HF_HOME.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import USER, FakeHub  # noqa: E402

from compressor.errors import UserError  # noqa: E402

TOKEN = "hf_secretTOKENdoNotLeak0123456789"
WRONG_TOKEN = "hf_wrongTOKENalsoSecret987654321"
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
HIDDEN = (".moe-compress-partial.tmp", "plots/.scratch.png", ".cache/huggingface/upload/x.lock")


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(source dir, plan path, OUT) for a tiny random DeepSeekMoE pruned 8 -> 4 experts, exported unvalidated."""
    from compressor.export import export_checkpoint
    from compressor.export.exporter import ExportOptions, ExportValidation, RunOptions
    from compressor.families import detect_family
    from compressor.modeling import DeepseekConfig, DeepseekForCausalLM
    from compressor.planning import Plan
    from compressor.profiling.schema import config_hash

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    DeepseekForCausalLM(DeepseekConfig(**TINY)).eval().save_pretrained(root / "source")
    config = json.loads((root / "source" / "config.json").read_text())
    family = detect_family(config)
    identity = {"source": str(root / "source"), "family": family.name, "config_hash": config_hash(config, family.top_k_key),
                "moe_layers": family.moe_layers(config),
                "experts_per_layer": {str(layer): family.num_experts(config, layer)
                                      for layer in family.moe_layers(config)},
                "top_k": family.top_k(config)}
    plan = Plan.model_validate({"model": identity, "top_k": 2, "compensation": "renorm",
                                "layers": {str(layer): {"keep": [0, 3, 5, 6]} for layer in family.moe_layers(config)}})
    (root / "plan.json").write_text(plan.model_dump_json(indent=1, exclude_none=True))
    export_checkpoint(str(root / "source"), plan, root / "out", ExportOptions(run=RunOptions(progress=False), validation=ExportValidation(enabled=False)))
    return root / "source", root / "plan.json", root / "out"


def make_out(exported, tmp_path, validation: bool | None) -> Path:
    """A copy of the export with plots, hidden temp files and (unless None) a passed/failed validation.json."""
    out = tmp_path / "out"
    shutil.copytree(exported[2], out)
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / "perplexity.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    for name in HIDDEN:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("temporary\n")
    if validation is not None:
        write_validation(out, passed=validation)
    return out


def write_validation(out: Path, passed: bool) -> None:
    from compressor import __version__
    from compressor.validation.schema import DomainResult, LayerResult, ModelRef, Thresholds, ValidationReport

    increase = 0.02 if passed else 0.30
    ref = dict(family="deepseek_moe", config_hash="0" * 16, parameters=100_000, bytes=400_000)
    ValidationReport(
        tool_version=__version__, original=ModelRef(source="source", **ref), compressed=ModelRef(source=".", **ref),
        settings={"max_tokens": 256, "seq_len": 32}, thresholds=Thresholds(max_ppl_increase=0.05),
        domains={"demo": DomainResult(tokens=256, source={"kind": "demo"}, perplexity_original=40.0,
                                      perplexity_compressed=40.0 * (1 + increase), perplexity_increase=increase,
                                      kl_mean=0.01, top1_agreement=0.9)},
        layers={"1": LayerResult(cosine_mean=0.99, cosine_p5=0.95)},
        passed=passed, failures=[] if passed else ["demo: perplexity +30.0% > +5.0%"],
    ).save(out / "validation.json")


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN) as server:
        yield server
    assert server.unknown == [], f"requests the fake Hub does not implement: {server.unknown}"


@pytest.fixture
def hf_home(tmp_path):
    home = tmp_path / "hf_home"
    home.mkdir()
    return home


def hub_env(endpoint: str, hf_home: Path, token: str | None = None) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(hf_home),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """`python -m compressor ARGS`; no token may appear in its output, whatever happened."""
    result = subprocess.run([sys.executable, "-m", "compressor", *args], env=env, capture_output=True, text=True,
                            timeout=180)
    for secret in (TOKEN, WRONG_TOKEN):
        assert secret not in result.stdout + result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def expected_files(out: Path) -> dict[str, bytes]:
    return {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*")
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(out).parts)}


def assert_no_token_in(*directories: Path) -> None:
    for directory in directories:
        for path in directory.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert TOKEN.encode() not in data and WRONG_TOKEN.encode() not in data, path


# -- pushing --------------------------------------------------------------------------------------------

_DOWNLOAD_AND_COMPARE = textwrap.dedent("""
    import json, sys, torch
    import compressor
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM
    local, repo, cache = sys.argv[1:4]
    snapshot = snapshot_download(repo, cache_dir=cache)
    ids = torch.arange(2, 34).reshape(2, 16) % 64
    logits = {}
    for name, path in (("local", local), ("hub", snapshot)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
    print(json.dumps({"snapshot": snapshot, "identical": bool(torch.equal(logits["local"], logits["hub"])),
                      "max_abs_diff": float((logits["local"] - logits["hub"]).abs().max())}))
""")


def test_push_round_trips_through_the_hub(exported, tmp_path, hub, hf_home):
    out = make_out(exported, tmp_path, validation=True)
    result = run(["push", str(out), "someone/tiny-pruned", "--token", TOKEN], hub_env(hub.endpoint, hf_home))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower()
    [commit] = hub.commits
    assert f"{hub.endpoint}/someone/tiny-pruned/commit/{commit.oid}" in result.stdout
    assert hub.create_payloads == [{"name": "tiny-pruned", "organization": "someone", "type": "model"}]
    assert not hub.repos["someone/tiny-pruned"].private

    # every file of OUT, byte for byte (plots and validation included), and no hidden temp file
    expected = expected_files(out)
    assert {"config.json", "compression_plan.json", "moe_compress_provenance.json", "validation.json", "README.md",
            "model.safetensors", "plots/perplexity.png"} <= set(expected)
    remote = hub.repos["someone/tiny-pruned"].files()
    remote.pop(".gitattributes")
    assert remote == expected

    # snapshot_download from the Hub + from_pretrained gives the local output's logits exactly
    download = tmp_path / "download"
    check = subprocess.run([sys.executable, "-c", _DOWNLOAD_AND_COMPARE, str(out), "someone/tiny-pruned",
                            str(download)], env=hub_env(hub.endpoint, hf_home), capture_output=True, text=True,
                           timeout=180)
    assert check.returncode == 0, check.stderr[-3000:]
    outcome = json.loads(check.stdout.strip().splitlines()[-1])
    assert outcome["identical"], outcome
    snapshot = Path(outcome["snapshot"])
    assert {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()} \
        == {**expected, ".gitattributes": hub.repos["someone/tiny-pruned"].files()[".gitattributes"]}
    assert TOKEN not in check.stdout + check.stderr
    assert_no_token_in(out, download, hf_home)


def test_private_branch_message_and_unvalidated_output_warns(exported, tmp_path, hub, hf_home):
    out = make_out(exported, tmp_path, validation=None)
    result = run(["push", str(out), "tiny-pruned", "--private", "--revision", "pruned-4",
                  "--commit-message", "four experts per layer"], hub_env(hub.endpoint, hf_home, token=TOKEN))
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and "validation.json" in result.stderr
    assert hub.create_payloads == [{"name": "tiny-pruned", "organization": None, "visibility": "private",
                                    "type": "model"}]
    repo = hub.repos[f"{USER}/tiny-pruned"]  # a bare name lands in the token's namespace
    assert repo.private
    [commit] = hub.commits
    assert (commit.revision, commit.summary) == ("pruned-4", "four experts per layer")
    assert sorted(repo.files("main")) == [".gitattributes"]
    assert {path: data for path, data in repo.files("pruned-4").items() if path != ".gitattributes"} \
        == expected_files(out)
    assert_no_token_in(out, hf_home)


def test_failed_validation_is_refused_unless_forced(exported, tmp_path, hub, hf_home):
    out = make_out(exported, tmp_path, validation=False)
    env = hub_env(hub.endpoint, hf_home)
    refused = run(["push", str(out), "someone/tiny-pruned", "--token", TOKEN], env)
    assert "--force" in one_line_error(refused) and "validation" in refused.stderr
    assert hub.requests == [] and hub.commits == []  # nothing created, nothing uploaded

    forced = run(["push", str(out), "someone/tiny-pruned", "--token", TOKEN, "--force"], env)
    assert forced.returncode == 0, forced.stderr
    assert "warning" in forced.stderr  # says it is pushing a failed validation
    files = hub.repos["someone/tiny-pruned"].files()
    assert json.loads(files["validation.json"])["passed"] is False
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()


# -- bad input: one line, exit 2, nothing uploaded ------------------------------------------------------


def test_malformed_repo_id_fails_before_any_request(exported, tmp_path, hub, hf_home):
    out = make_out(exported, tmp_path, validation=True)
    line = one_line_error(run(["push", str(out), "someone/bad name", "--token", TOKEN],
                              hub_env(hub.endpoint, hf_home)))
    assert "repo id" in line and "someone/bad name" in line
    assert hub.requests == []


def test_unreachable_hub_is_one_line(exported, tmp_path, hf_home):
    out = make_out(exported, tmp_path, validation=None)  # its warning comes only once the Hub has answered
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    line = one_line_error(run(["push", str(out), "someone/tiny-pruned", "--token", TOKEN], hub_env(endpoint, hf_home)))
    assert line.startswith(f"error: cannot reach the Hugging Face Hub at {endpoint}: ")


def test_missing_token_says_how_to_log_in(exported, tmp_path, hub, hf_home):
    out = make_out(exported, tmp_path, validation=True)
    line = one_line_error(run(["push", str(out), "someone/tiny-pruned"], hub_env(hub.endpoint, hf_home)))
    assert "token" in line and "hf auth login" in line and "HF_TOKEN" in line
    assert hub.requests == []


def test_rejected_token_is_scrubbed_from_the_error(exported, tmp_path, hub, hf_home):
    out = make_out(exported, tmp_path, validation=True)
    # the fake Hub echoes the Authorization header it got into its 401 message
    line = one_line_error(run(["push", str(out), "someone/tiny-pruned", "--token", WRONG_TOKEN],
                              hub_env(hub.endpoint, hf_home)))
    assert "rejected the token" in line and "***" in line
    assert hub.commits == []
    assert_no_token_in(out, hf_home)


def test_not_an_output_is_refused_before_the_network(exported, tmp_path, capsys):
    from compressor.cli import main
    from compressor.hub import push_output

    for missing in ("compression_plan.json", "config.json"):
        out = tmp_path / missing
        shutil.copytree(exported[2], out)
        (out / missing).unlink()
        with pytest.raises(UserError, match=f"not a moe-compress output .no {missing}"):
            push_output(out, "someone/tiny-pruned", token=TOKEN)
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path / "nowhere"), "someone/tiny-pruned", "--token", TOKEN])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and TOKEN not in err


# -- export --push-to-hub -------------------------------------------------------------------------------


def test_export_push_to_hub(exported, tmp_path, hub, hf_home, capsys):
    from compressor.cli import main

    source, plan, _ = exported
    # a bad repo id fails before anything is exported
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(source), str(plan), "-o", str(tmp_path / "never"), "--no-validate",
              "--push-to-hub", "not/a/repo"])
    assert exit_info.value.code == 2 and not (tmp_path / "never").exists()
    assert capsys.readouterr().err.startswith("error: invalid Hub repo id")

    out = tmp_path / "exported"
    result = run(["export", str(source), str(plan), "-o", str(out), "--no-validate", "--push-to-hub",
                  "someone/exported"], hub_env(hub.endpoint, hf_home, token=TOKEN))
    assert result.returncode == 0, result.stderr
    assert f"{hub.endpoint}/someone/exported/commit/" in result.stdout
    remote = hub.repos["someone/exported"].files()
    remote.pop(".gitattributes")
    assert remote == expected_files(out)
