"""Exports killed or raced: OUT is always absent or complete, a user's directory is never replaced without
--overwrite, SIGTERM and SIGINT clean up at once, and a later export removes what a SIGKILLed one left behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compressor.io import CheckpointReader
from compressor.runtime import ActivationStore
from compressor.io.atomic import exchange, remove_stale_staging, rename_noreplace, write_text_atomic
from compressor.errors import UserError
from helpers import TINY, save_tiny_checkpoint, stage_options, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from compressor.planning import PlanOptions, make_plan
    from compressor.profiling import ProfileOptions, profile_model

    root = tmp_path_factory.mktemp("kills")
    model = save_tiny_checkpoint(root / "model")
    rng = random.Random(0)
    data = write_jsonl(root / "data.jsonl", [[rng.randrange(2, TINY["vocab_size"]) for _ in range(16)]
                                             for _ in range(16)])
    profile = profile_model(str(model), {"code": str(data)},
                            stage_options(ProfileOptions, seq_len=16, device="cpu", progress=False))
    plan = make_plan(profile, PlanOptions(keep=4, top_k=1, compensation="none"))
    plan.save(root / "plan.json")
    return model, root / "plan.json", data


def export_command(setup, out: Path, slow: bool = True) -> list[str]:
    model, plan, data = setup
    command = [sys.executable, "-m", "compressor", "export", str(model), str(plan), "-o", str(out), "--device", "cpu",
               "--no-validate"]
    if slow:  # a few seconds of fitting: time to be killed or raced
        command += ["--compensation", "distill", "--calibration", f"code={data}", "--distill-steps", "100",
                    "--seq-len", "16"]
    return command


def staging_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and ".moe-compress-" in p.name)


def wait_for_staging(folder: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not any(p.name.endswith(".partial") for p in staging_of(folder)):
        assert process.poll() is None, "the export ended before it staged anything"
        assert time.monotonic() < deadline, "the export never staged its output"
        time.sleep(0.05)


def assert_complete(out: Path) -> None:
    with CheckpointReader(out) as reader:
        assert reader.names()
    for name in ("config.json", "compression_plan.json", "moe_compress_provenance.json", "README.md"):
        assert (out / name).is_file(), name
    assert not any(".moe-compress-" in p.name for p in out.rglob("*")), "scratch left inside the output"


def test_sigkill_at_random_points_leaves_out_absent_or_complete(setup, tmp_path):
    rng = random.Random(20261201)
    outcomes = set()
    for trial in range(5):
        out = tmp_path / f"out{trial}"
        process = subprocess.Popen(export_command(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 12.0))
        process.kill()
        process.wait()
        if out.exists():
            assert_complete(out)
            outcomes.add("complete")
        else:
            outcomes.add("absent")
    # whatever the kills left beside the outputs goes with the next export into the same folder
    quick = tmp_path / "after"
    subprocess.run(export_command(setup, quick, slow=False), check=True, capture_output=True)
    assert_complete(quick)
    assert staging_of(tmp_path) == []
    assert outcomes  # at least one kill happened; which states it caught varies with the machine's speed


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_clean_up_at_once(setup, tmp_path, sig, code):
    out = tmp_path / "out"
    process = subprocess.Popen(export_command(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_staging(tmp_path, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert not out.exists() and staging_of(tmp_path) == []


def test_out_created_meanwhile_is_never_replaced(setup, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(export_command(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_staging(tmp_path, process)
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "appeared while" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"] and (out / "mine.txt").read_text() == "the user's file"
    assert staging_of(tmp_path) == []


def test_two_exports_to_one_out_one_wins(setup, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(export_command(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(export_command(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.strip().splitlines()[-1].startswith("error: ")
    assert_complete(out)
    assert staging_of(tmp_path) == []


def test_no_scratch_directory_without_fitting(setup, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(export_command(setup, out, slow=False), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    seen = set()
    while process.poll() is None:
        seen.update(p.name for p in tmp_path.iterdir())
        time.sleep(0.01)
    assert process.returncode == 0
    assert not any("fit" in name for name in seen)
    assert_complete(out)


# -- the primitives -----------------------------------------------------------------------------------------


def test_rename_noreplace_refuses_an_existing_target(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")  # even an empty folder is not replaced
    (tmp_path / "f").write_text("x")
    (tmp_path / "g").write_text("y")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_text() == "y"
    rename_noreplace(tmp_path / "f", tmp_path / "h")
    assert (tmp_path / "h").read_text() == "x" and not (tmp_path / "f").exists()


def test_exchange_swaps_two_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one").write_text("1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two").write_text("2")
    exchange(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["two"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["one"]


def test_atomic_file_write_does_not_replace_a_file_that_appeared(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("someone else's")
    with pytest.raises(UserError, match="appeared while"):
        write_text_atomic(target, "ours", overwrite=False)
    assert target.read_text() == "someone else's" and staging_of(tmp_path) == []
    write_text_atomic(target, "ours", overwrite=True)
    assert target.read_text() == "ours"


_HOLD_STAGING = """
import sys, time
from pathlib import Path
from compressor.io.atomic import atomic_directory
with atomic_directory(Path(sys.argv[1])) as staging:
    (staging / "big.bin").write_bytes(b"x" * 1000)
    print("staged", flush=True)
    time.sleep(600)
"""


def test_stale_staging_is_removed_only_when_its_owner_is_gone(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", _HOLD_STAGING, str(tmp_path / "busy")], stdout=subprocess.PIPE,
                             text=True)
    dead = subprocess.Popen([sys.executable, "-c", _HOLD_STAGING, str(tmp_path / "gone")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert alive.stdout.readline().strip() == "staged" and dead.stdout.readline().strip() == "staged"
        dead.kill()
        dead.wait()
        assert len(staging_of(tmp_path)) == 4  # a .partial and a .lock each
        removed = remove_stale_staging(tmp_path)
        assert [p.name.startswith(".gone.") for p in removed] == [True] and len(removed) == 1
        left = staging_of(tmp_path)
        assert len(left) == 2 and all(p.name.startswith(".busy.") for p in left)
    finally:
        alive.kill()
        alive.wait()
    assert len(remove_stale_staging(tmp_path)) == 1  # the busy one's owner is gone now too
    assert staging_of(tmp_path) == []
    assert not (tmp_path / "busy").exists() and not (tmp_path / "gone").exists()
    assert os.listdir(tmp_path) == []


_SPILL_AND_WAIT = """
import sys, time, torch
from compressor.runtime import ActivationStore
store = ActivationStore(budget_bytes=0)
store.put(0, torch.ones(4))
print(store.items[0].parent, flush=True)
time.sleep(600)
"""


def test_spilled_activations_of_a_killed_run_are_removed_by_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", _SPILL_AND_WAIT], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(tmp_path)}) for _ in range(2)]
    killed, alive = runs
    try:
        folders = [Path(run.stdout.readline().strip()) for run in runs]
        assert all(f.parent == tmp_path and (f / "0.pt").is_file() for f in folders)
        killed.kill()
        killed.wait()
        import tempfile

        monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
        store = ActivationStore(budget_bytes=0)
        store.put(0, torch.zeros(2))
        assert not folders[0].exists() and not folders[0].with_name(folders[0].name + ".lock").exists()
        assert (folders[1] / "0.pt").is_file()  # its owner is alive
        mine = store.items[0].parent
        store.close()
        assert not mine.exists() and not mine.with_name(mine.name + ".lock").exists()
    finally:
        alive.kill()
        alive.wait()
