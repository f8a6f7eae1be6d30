"""What each compensation mode achieves on the shipped reference model (a small version of the README table).

Half the experts kept per MoE layer for code and math, routed top-1; perplexity on held-out evaluation text
(never seen in calibration). The full table comes from `benchmarks/compensation.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compressor  # noqa: F401
from compressor.data.batching import token_sequences
from compressor.data.sources import load_source
from compressor.export.exporter import DistillOptions, ExportOptions, ExportValidation, FitOptions, RunOptions, export_checkpoint
from compressor.planning import PlanOptions, make_plan
from compressor.profiling.runner import ProfileOptions, profile_model
from compressor.runtime import ForwardOptions
from compressor.validation.perplexity import perplexity

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"
TARGETS = ("code", "math")
MODES = ("none", "renorm", "scale", "refit", "distill")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Perplexity per domain of the original and of the top-1, 32/64 export under each mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    evaluation = {d: token_sequences(load_source(f"demo:{d}@evaluation"), tokenizer, 256, 4096)
                  for d in TARGETS + ("english",)}

    def evaluate(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return {d: perplexity(model, sequences) for d, sequences in evaluation.items()}

    profile = profile_model(str(REFERENCE), {d: f"demo:{d}" for d in TARGETS},
                            ProfileOptions(max_tokens=8192, forward=ForwardOptions(seq_len=256), progress=False))
    plan = make_plan(profile, PlanOptions(strategy="uniform", keep=32, domains={d: 1.0 for d in TARGETS},
                                          top_k=1, compensation="none"))
    table = {"original": evaluate(REFERENCE)}
    root = tmp_path_factory.mktemp("compensation")
    for mode in MODES:
        out = root / mode
        export_checkpoint(str(REFERENCE), plan, out, ExportOptions(
            compensation=mode, run=RunOptions(seq_len=256, progress=False), validation=ExportValidation(enabled=False),
            fit=FitOptions(calibration={d: f"demo:{d}" for d in TARGETS}, max_tokens=16384,
                           distill=DistillOptions(steps=150))))
        table[mode] = evaluate(out)
    # the demo's kind of settings, scaled down: router rows, more calibration text (train split), end to end
    out = root / "distill-e2e"
    export_checkpoint(str(REFERENCE), plan, out, ExportOptions(
        compensation="distill", run=RunOptions(seq_len=256, progress=False), validation=ExportValidation(enabled=False),
        fit=FitOptions(calibration={d: f"demo:{d}@train" for d in TARGETS}, max_tokens=65536,
                       distill=DistillOptions(steps=150, router=True, e2e_steps=80))))
    table["distill-e2e"] = evaluate(out)
    return table


def increase(results, mode, domain):
    return results[mode][domain] / results["original"][domain] - 1


@pytest.mark.parametrize("domain", TARGETS)
def test_pruned_top1_costs_perplexity_and_fitted_modes_win_some_back(results, domain):
    assert increase(results, "none", domain) > 0.05  # the problem is real on the reference model
    for mode in ("scale", "refit", "distill"):
        assert results[mode][domain] < results["none"][domain], (mode, results)
    assert results["distill"][domain] < results["scale"][domain], results
    # distillation removes at least a third of the damage on the targeted domains
    assert increase(results, "distill", domain) < 2 / 3 * increase(results, "none", domain), results


@pytest.mark.parametrize("domain", TARGETS)
def test_weight_one_renormalisation_is_far_worse(results, domain):
    """The trained top-1 weight is small, so setting it to 1 (renorm) blows the routed output up."""
    assert increase(results, "renorm", domain) > 2 * increase(results, "none", domain), results


def test_off_target_domain_suffers_more_than_targets(results):
    """The kept experts were chosen for code and math: English loses more than either."""
    assert increase(results, "none", "english") > max(increase(results, "none", d) for d in TARGETS), results


@pytest.mark.parametrize("domain", TARGETS)
def test_end_to_end_distillation_takes_most_of_the_remaining_damage_away(results, domain):
    assert increase(results, "distill-e2e", domain) < 0.7 * increase(results, "distill", domain), results
    assert increase(results, "distill-e2e", domain) < 0.4 * increase(results, "none", domain), results
