"""compressor.planning: strategies, criteria, domain weights, the plan file, model checks, the `plan` CLI.

Expectations are computed by hand from small synthetic profiles (2 MoE layers x 8 experts)."""

import itertools
import json

import pytest

import fixtures
from compressor.errors import UserError
from compressor.families import get_family
from compressor.planning import (
    Plan,
    PlanOptions,
    check_plan_matches,
    format_plan_table,
    make_plan,
    non_uniform_note,
    parse_domains,
    parse_protect,
)
from compressor.profiling.schema import (
    DomainProfile,
    LayerStatistics,
    ModelIdentity,
    Profile,
    ProfileSettings,
    SourceDescription,
    config_hash,
)
from helpers import run_cli


# A tiny DeepSeekMoE config: decoder layers 0..2, layer 0 dense, layers 1 and 2 MoE with 8 routed experts.
CONFIG = {
    "model_type": "deepseek",
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "hidden_size": 16,
    "intermediate_size": 32,
    "moe_intermediate_size": 8,
}


def identity(config=CONFIG, family="deepseek_moe", layers=(1, 2), experts=8, top_k=2) -> ModelIdentity:
    return ModelIdentity(
        source="tiny-deepseek", family=family, config_hash=config_hash(config, "num_experts_per_tok"), moe_layers=list(layers),
        experts_per_layer={str(layer): experts for layer in layers}, top_k=top_k,
    )


def make_profile(domains: dict, layers=(1, 2), experts=8) -> Profile:
    """domains: {name: {layer: selected list | dict of statistics}}; layers left out get uniform counts."""
    built = {}
    for name, per_layer in domains.items():
        stats = {}
        for layer in layers:
            given = per_layer.get(layer, [1] * experts)
            stats[str(layer)] = LayerStatistics(**(given if isinstance(given, dict) else {"selected": given}))
        tokens = sum(stats[str(layers[0])].selected) // 2
        built[name] = DomainProfile(tokens=tokens, source=SourceDescription(kind="synthetic", spec=name),
                                    layers=stats)
    return Profile(tool_version="test", model=identity(layers=layers, experts=experts), settings=ProfileSettings(),
                   domains=built)


def kept(profile, **options):
    return make_plan(profile, PlanOptions(**options)).kept()


# Domain normalisation: code has 20x the routing decisions of math in layer 1.
#   code normalised: [.5, .45, 0, 0, 0, 0, .05, 0]; math normalised: [0, 0, .3, .2, 0, 0, .5, 0]
CODE_L1 = [1000, 900, 0, 0, 0, 0, 100, 0]
MATH_L1 = [0, 0, 30, 20, 0, 0, 50, 0]
TWO_DOMAINS = {"code": {1: CODE_L1}, "math": {1: MATH_L1}}


# -- uniform, ties, defaults ---------------------------------------------------------------------------


def test_config_hash_ignores_the_familys_routing_width_only():
    base = config_hash(CONFIG, "num_experts_per_tok")
    assert config_hash({**CONFIG, "num_experts_per_tok": 1}, "num_experts_per_tok") == base  # a top-k override
    assert config_hash({**CONFIG, "moe_k": 1}, "moe_k") == config_hash(CONFIG, "moe_k")  # another family's key
    assert config_hash({**CONFIG, "num_experts_per_tok": 1}, "moe_k") != config_hash(CONFIG, "moe_k")
    assert config_hash({**CONFIG, "n_routed_experts": 4}, "num_experts_per_tok") != base


def test_uniform_keeps_the_most_used_experts_with_ties_to_lower_ids():
    profile = make_profile({"code": {1: [10, 50, 30, 0, 20, 5, 40, 45], 2: [5] * 8}})
    plan = make_plan(profile, PlanOptions(keep=3))
    assert plan.kept() == {1: [1, 6, 7], 2: [0, 1, 2]}
    assert plan.layers["1"].keep == [1, 6, 7]  # written ascending
    assert plan.is_uniform()
    assert plan.strategy.name == "uniform" and plan.strategy.parameters["keep"] == 3
    assert plan.top_k == 1 and plan.compensation == "distill"
    assert plan.profile_hash == profile.content_hash()
    assert plan.model == profile.model


def test_uniform_default_is_half_of_the_experts():
    profile = make_profile({"code": {1: [10, 50, 30, 0, 20, 5, 40, 45]}})
    assert kept(profile) == {1: [1, 2, 6, 7], 2: [0, 1, 2, 3]}
    assert kept(profile, keep_fraction=0.25) == {1: [1, 7], 2: [0, 1]}


# -- domains ---------------------------------------------------------------------------------------------


def test_domains_are_normalised_before_combining():
    profile = make_profile(TWO_DOMAINS)
    # combined [.5, .45, .3, .2, 0, 0, .55, 0]; raw sums would pick experts 0 and 1 instead
    assert kept(profile, keep=2)[1] == [0, 6]
    assert kept(profile, keep=2, domains={"code": 1, "math": 1})[1] == [0, 6]


def test_domain_weights_shift_the_choice():
    profile = make_profile(TWO_DOMAINS)
    # math:2 -> [.5, .45, .6, .4, 0, 0, 1.05, 0]
    assert kept(profile, keep=2, domains={"code": 1, "math": 2})[1] == [2, 6]
    # code:2 -> [1.0, .9, .3, .2, 0, 0, .6, 0]
    assert kept(profile, keep=2, domains={"code": 2, "math": 1})[1] == [0, 1]
    assert kept(profile, keep=2, domains={"math": 1})[1] == [2, 6]
    assert kept(profile, keep=2, domains=parse_domains("code:2,math:1"))[1] == [0, 1]


def test_parse_domains_and_protect():
    assert parse_domains("code,math") == {"code": 1.0, "math": 1.0}
    assert parse_domains("code:2, math:0.5") == {"code": 2.0, "math": 0.5}
    assert parse_domains(None) is None
    assert parse_protect("1:3,1:5,2:0") == {1: {3, 5}, 2: {0}}
    for bad in ("code:x", "code:0", "code:-1", "code,code"):
        with pytest.raises(UserError):
            parse_domains(bad)
    with pytest.raises(UserError, match="LAYER:EXPERT"):
        parse_protect("3")


def test_unknown_domain_lists_the_profile_domains():
    with pytest.raises(UserError, match="unknown domain 'legal'; the profile has domains: code, math"):
        make_plan(make_profile(TWO_DOMAINS), PlanOptions(domains={"legal": 1}))


# -- protect ---------------------------------------------------------------------------------------------


def test_protected_experts_are_kept_and_count_towards_the_budget():
    profile = make_profile(TWO_DOMAINS)
    assert kept(profile, keep=2, protect={1: {3}}) == {1: [3, 6], 2: [0, 1]}
    assert kept(profile, keep=2, protect={1: {3, 4}}) == {1: [3, 4], 2: [0, 1]}
    with pytest.raises(UserError, match="layer 1: 3 experts are protected, more than the 2"):
        make_plan(profile, PlanOptions(keep=2, protect={1: {3, 4, 5}}))
    with pytest.raises(UserError, match="not an MoE layer"):
        make_plan(profile, PlanOptions(keep=2, protect={0: {1}}))
    with pytest.raises(UserError, match="experts 0..7"):
        make_plan(profile, PlanOptions(keep=2, protect={1: {8}}))


# -- criteria --------------------------------------------------------------------------------------------

CRITERIA_L1 = {
    "selected": [100, 80, 60, 40, 20, 10, 5, 0],  # frequency: 0, 1
    "top1": [10, 70, 50, 30, 20, 5, 0, 0],  # top1: 1, 2
    "gate_mass": [5.0, 6.0, 30.0, 1.0, 2.0, 7.0, 0.5, 0.0],  # gate: 2, 5
    "reap": [100.0, 80.0, 60.0, 40.0, 40.0, 30.0, 25.0, 9.0],  # reap / selected = [1,1,1,1,2,3,5,0]: 6, 5
}


@pytest.mark.parametrize("criterion, expected", [
    ("frequency", [0, 1]), ("top1", [1, 2]), ("gate", [2, 5]), ("reap", [5, 6]),
])
def test_each_criterion_uses_its_statistic(criterion, expected):
    layer2 = {key: [1] * 8 if key in ("selected", "top1") else [1.0] * 8 for key in CRITERIA_L1}
    profile = make_profile({"code": {1: CRITERIA_L1, 2: layer2}})
    plan = make_plan(profile, PlanOptions(keep=2, criterion=criterion))
    assert plan.kept()[1] == expected
    assert plan.strategy.parameters["criterion"] == criterion
    # reap of an expert never selected counts 0, whatever its reap sum says (expert 7 has reap 9 but 0 selections)
    assert 7 not in make_plan(profile, PlanOptions(keep=7, criterion="reap")).kept()[1]


@pytest.mark.parametrize("criterion, statistic", [("reap", "reap"), ("gate", "gate_mass"), ("top1", "top1")])
def test_missing_statistic_is_named(criterion, statistic):
    profile = make_profile(TWO_DOMAINS)
    message = (f"criterion '{criterion}' needs the {statistic} statistic, which this profile lacks "
               "(it has: selected); use --criterion frequency")
    with pytest.raises(UserError) as info:
        make_plan(profile, PlanOptions(criterion=criterion))
    assert str(info.value) == message


# -- coverage --------------------------------------------------------------------------------------------

COVERAGE_PROFILE = {"code": {1: [40, 30, 15, 10, 5, 0, 0, 0], 2: [100, 0, 0, 0, 0, 0, 0, 0]}}


@pytest.mark.parametrize("coverage, layer1", [
    (0.5, [0, 1]), (0.8, [0, 1, 2]), (0.85, [0, 1, 2]), (0.86, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3, 4]),
])
def test_coverage_keeps_the_fewest_experts_reaching_the_threshold(coverage, layer1):
    profile = make_profile(COVERAGE_PROFILE)
    plan = make_plan(profile, PlanOptions(strategy="coverage", coverage=coverage))
    assert plan.kept() == {1: layer1, 2: [0]}
    assert not plan.is_uniform()
    counts = COVERAGE_PROFILE["code"][1]
    n = len(layer1)
    assert sum(counts[e] for e in layer1) >= coverage * 100
    # no smaller set reaches it
    assert all(sum(counts[e] for e in subset) < coverage * 100 - 1e-9
               for subset in itertools.combinations(range(8), n - 1))


def test_coverage_min_and_max_keep():
    profile = make_profile(COVERAGE_PROFILE)
    assert kept(profile, strategy="coverage", coverage=0.9, min_keep=2) == {1: [0, 1, 2, 3], 2: [0, 1]}
    assert kept(profile, strategy="coverage", coverage=0.9, max_keep=2) == {1: [0, 1], 2: [0]}
    assert kept(profile, strategy="coverage", coverage=0.5, protect={1: {7}}) == {1: [0, 1, 7], 2: [0]}


# -- global ----------------------------------------------------------------------------------------------

GLOBAL_PROFILE = {"code": {1: [40, 30, 15, 10, 5, 0, 0, 0], 2: [90, 5, 5, 0, 0, 0, 0, 0]}}


@pytest.mark.parametrize("options, expected", [
    # budget 4: floors L1:0, L2:0 (min_keep = top_k = 1), then .3 (L1:1), .15 (L1:2)
    ({"keep_fraction": 0.25}, {1: [0, 1, 2], 2: [0]}),
    ({"keep_fraction": 0.25, "min_keep": 2}, {1: [0, 1], 2: [0, 1]}),
    # L1 full at 2 after .3, so the next is L2:1 (.05, tied with L2:2 -> lower id)
    ({"keep_fraction": 0.25, "max_keep": 2}, {1: [0, 1], 2: [0, 1]}),
    # budget 6: .3, .15, .1, then the .05 tie of L1:4 / L2:1 / L2:2 goes to the lower layer
    ({"keep_fraction": 0.375}, {1: [0, 1, 2, 3, 4], 2: [0]}),
])
def test_global_spreads_the_budget_by_score(options, expected):
    plan = make_plan(make_profile(GLOBAL_PROFILE), PlanOptions(strategy="global", **options))
    assert plan.kept() == expected
    assert sum(len(v) for v in plan.kept().values()) == plan.strategy.parameters["budget"]


def test_global_budget_outside_min_max_is_an_error():
    profile = make_profile(GLOBAL_PROFILE)
    with pytest.raises(UserError, match="allows 1 of 16 experts, fewer than the 2"):
        make_plan(profile, PlanOptions(strategy="global", keep_fraction=0.0625))
    with pytest.raises(UserError, match="asks for 8 of 16 experts, more than --max-keep 2"):
        make_plan(profile, PlanOptions(strategy="global", keep_fraction=0.5, max_keep=2))


@pytest.mark.parametrize("options, message", [
    ({"keep": 2, "keep_fraction": 0.5}, "mutually exclusive"),
    ({"strategy": "coverage", "coverage": 1.5}, r"--coverage must be in \(0, 1\]"),
    ({"strategy": "coverage", "coverage": 0}, r"--coverage must be in \(0, 1\]"),
    ({"keep_fraction": 0}, r"--keep-fraction must be in \(0, 1\]"),
    ({"keep": 9}, "layer 1 has only 8"),
    ({"keep": 2, "top_k": 3}, "--top-k 3 exceeds the 2 experts kept in layer 1"),
    ({"strategy": "magic"}, "unknown strategy"),
    ({"criterion": "random"}, "unknown criterion"),
    ({"compensation": "glue"}, "unknown compensation"),
    ({"strategy": "global", "keep": 3}, "--keep does not apply to --strategy global"),
    ({"coverage": 0.5}, "--coverage does not apply to --strategy uniform"),
])
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        make_plan(make_profile(TWO_DOMAINS), PlanOptions(**options))


# -- predicted coverage ----------------------------------------------------------------------------------


def test_predicted_coverage_equals_hand_computation():
    profile = make_profile({"code": {1: CODE_L1, 2: [8, 7, 6, 5, 4, 3, 2, 1]},
                            "math": {1: MATH_L1, 2: [1, 2, 3, 4, 5, 6, 7, 8]}})
    plan = make_plan(profile, PlanOptions(keep=2))
    # layer 1 keeps {0, 6}; layer 2: normalised scores all equal 9/36 -> ties -> {0, 1}
    assert plan.kept() == {1: [0, 6], 2: [0, 1]}
    assert plan.predicted_coverage == {
        "code": {"1": 1100 / 2000, "2": 15 / 36},
        "math": {"1": 50 / 100, "2": 3 / 36},
    }


# -- the plan file ---------------------------------------------------------------------------------------


def test_plan_round_trip(tmp_path):
    plan = make_plan(make_profile(TWO_DOMAINS), PlanOptions(strategy="coverage", coverage=0.7, top_k=1,
                                                            compensation="renorm", protect={2: {5}}))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.content_hash() == plan.content_hash()
    data = json.loads(path.read_text())
    assert data["format_version"] == 1 and data["compensation"] == "renorm"
    assert data["strategy"]["name"] == "coverage"
    assert data["strategy"]["parameters"]["protect"] == {"2": [5]}
    assert set(data["layers"]) == {"1", "2"}
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_unknown_keys_are_rejected(tmp_path):
    plan = make_plan(make_profile(TWO_DOMAINS), PlanOptions(keep=2))
    data = json.loads(plan.model_dump_json())
    for place in (data, data["layers"]["1"], data["strategy"]):
        place["surprise"] = 1
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match="not a valid plan.*surprise"):
            Plan.load(path)
        del place["surprise"]


def minimal_plan(**changes) -> dict:
    data = {
        "format_version": 1,
        "model": identity().model_dump(),
        "top_k": 2,
        "layers": {"1": {"keep": [5, 1, 3]}, "2": {"keep": [0, 7]}},
    }
    data.update(changes)
    return data


def test_hand_written_minimal_plan_loads(tmp_path, capsys):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(minimal_plan()))
    plan = Plan.load(path)
    assert plan.compensation == "distill"
    assert plan.strategy is None and plan.profile_hash is None and plan.predicted_coverage is None
    assert plan.tool_version is None
    assert plan.kept() == {1: [1, 3, 5], 2: [0, 7]}
    assert not plan.is_uniform()
    table = format_plan_table(plan)
    assert "hand-written" in table and non_uniform_note("deepseek_moe") in table
    assert check_plan_matches(plan, CONFIG, get_family("deepseek_moe")) == {1: [1, 3, 5], 2: [0, 7]}


@pytest.mark.parametrize("layers, top_k, message", [
    ({"1": {"keep": [1, 1]}, "2": {"keep": [0, 7]}}, 2, "layer 1 lists expert 1 twice"),
    ({"1": {"keep": [1, 8]}, "2": {"keep": [0, 7]}}, 2, "layer 1 has experts 0..7; there is no expert 8"),
    ({"1": {"keep": []}, "2": {"keep": [0, 7]}}, 1, "layer 1 keeps no experts"),
    ({"1": {"keep": [1, 2, 3]}, "2": {"keep": [0, 7]}}, 3, "top_k=3 exceeds the 2 experts kept in layer 2"),
    ({"1": {"keep": [1, 2]}}, 1, "no entry for MoE layers 2"),
    ({"0": {"keep": [1]}, "1": {"keep": [1]}, "2": {"keep": [1]}}, 1, "layer 0 is not an MoE layer"),
])
def test_invalid_plans_are_rejected_naming_the_layer(tmp_path, layers, top_k, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(minimal_plan(layers=layers, top_k=top_k)))
    with pytest.raises(UserError, match=f"not a valid plan: {message}"):
        Plan.load(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")


# -- check_plan_matches ----------------------------------------------------------------------------------


def test_check_plan_matches_accepts_its_model_and_rejects_others(tmp_path):
    family = get_family("deepseek_moe")
    plan = make_plan(make_profile(TWO_DOMAINS), PlanOptions(keep=2, top_k=2))
    assert check_plan_matches(plan, CONFIG, family) == {1: [0, 6], 2: [0, 1]}

    v2 = {**CONFIG, "model_type": "deepseek_v2"}
    with pytest.raises(UserError, match="is for another model .family differs"):
        check_plan_matches(plan, v2, get_family("deepseek_v2"))
    path = tmp_path / "p.json"
    plan.save(path)
    with pytest.raises(UserError, match=f"plan {path} is for another model .config hash differs"):
        check_plan_matches(Plan.load(path), {**CONFIG, "hidden_size": 32}, family)
    with pytest.raises(UserError, match="MoE layers differ"):
        check_plan_matches(plan, {**CONFIG, "num_hidden_layers": 4}, family)
    with pytest.raises(UserError, match="expert count differs: layer 1 has 8 experts in the plan's model, 16"):
        check_plan_matches(plan, {**CONFIG, "n_routed_experts": 16}, family)


@pytest.mark.parametrize("keep, top_k, message", [
    ([0, 0], 2, "lists expert 0 twice"),
    ([0, 8], 2, "there is no expert 8"),
    ([], 1, "keeps no experts"),
    ([0, 6], 3, "top_k=3 exceeds"),
])
def test_check_plan_matches_rejects_bad_keep_lists(keep, top_k, message):
    plan = make_plan(make_profile(TWO_DOMAINS), PlanOptions(keep=2, top_k=2))
    plan.layers["1"].keep = keep  # edited in memory after validation
    plan.top_k = top_k
    with pytest.raises(UserError, match=message):
        check_plan_matches(plan, CONFIG, get_family("deepseek_moe"))


# -- CLI -------------------------------------------------------------------------------------------------


@pytest.fixture
def profile_file(tmp_path):
    path = tmp_path / "profile.json"
    make_profile({"code": COVERAGE_PROFILE["code"], "math": {1: MATH_L1}}).save(path)
    return path


def test_cli_default_command_writes_plan_and_table(tmp_path, profile_file, capsys):
    output = tmp_path / "plan.json"
    code, out, err = run_cli(["plan", str(profile_file), "-o", str(output)], capsys)
    assert code == 0, err
    plan = Plan.load(output)
    assert plan.strategy.name == "uniform" and plan.strategy.parameters["keep_fraction"] == 0.5
    assert all(len(v) == 4 for v in plan.kept().values())
    assert "uniform plan: 4 experts kept in every MoE layer" in out
    assert non_uniform_note("deepseek_moe") not in out

    code, out, err = run_cli(["plan", "show", str(output)], capsys)
    assert code == 0, err
    assert "uniform plan" in out


def test_cli_non_uniform_plan_and_show(tmp_path, profile_file, capsys):
    output = tmp_path / "plan.json"
    code, out, err = run_cli(["plan", "make", str(profile_file), "-o", str(output), "--strategy", "coverage",
                              "--coverage", "0.8", "--domains", "code", "--protect", "2:3", "--top-k", "1"], capsys)
    assert code == 0, err
    assert Plan.load(output).kept() == {1: [0, 1, 2], 2: [0, 3]}
    assert non_uniform_note("deepseek_moe") in out
    code, out, err = run_cli(["plan", "show", str(output)], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
    # layer, kept / total, then % of code's and of math's routing decisions retained
    assert rows["1"] == ["1", "3", "/", "8", "85.0%", "30.0%"]  # code 40+30+15 of 100; math 30 of 100
    assert rows["2"] == ["2", "2", "/", "8", "100.0%", "25.0%"]  # code 100 of 100; math 2 of 8
    assert non_uniform_note("deepseek_moe") in out


def test_non_uniform_note_says_how_vllm_serves_per_layer_counts(monkeypatch):
    note = non_uniform_note("deepseek_moe")
    assert "plain transformers needs the same expert count in every layer" in note
    assert "vLLM serves it with moe-compress's vLLM plugin" in note
    assert "scripts/setup_vllm.sh" in note and "pip install plugins/vllm" in note
    monkeypatch.setattr(type(get_family("qwen3_moe")), "vllm_per_layer_architecture", None)
    assert "vLLM cannot serve it" in non_uniform_note("qwen3_moe")


@pytest.mark.parametrize("args, message", [
    (["--keep", "2", "--keep-fraction", "0.5"], "mutually exclusive"),
    (["--strategy", "coverage", "--coverage", "1.5"], "--coverage must be in (0, 1]"),
    (["--domains", "legal"], "unknown domain 'legal'"),
    (["--criterion", "reap"], "criterion 'reap' needs the reap statistic"),
    (["--keep", "2", "--protect", "1:1,1:2,1:3"], "3 experts are protected"),
    (["--keep", "2", "--top-k", "3"], "--top-k 3 exceeds"),
])
def test_cli_bad_input_is_one_error_line_and_no_file(tmp_path, profile_file, capsys, args, message):
    output = tmp_path / "plan.json"
    code, out, err = run_cli(["plan", str(profile_file), "-o", str(output), *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [profile_file]


def test_cli_missing_profile_and_existing_output(tmp_path, profile_file, capsys):
    code, _, err = run_cli(["plan", str(tmp_path / "none.json"), "-o", str(tmp_path / "p.json")], capsys)
    assert code == 2 and err.startswith("error: ") and "does not exist" in err
    (tmp_path / "p.json").write_text("{}")
    code, _, err = run_cli(["plan", str(profile_file), "-o", str(tmp_path / "p.json")], capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "p.json").read_text() == "{}"


# -- real routing counts ---------------------------------------------------------------------------------


def test_deepseek_moe_16b_uniform_32_for_gsm8k():
    counts = fixtures.moe_lens_counts()
    layers = list(range(1, 28))
    model = ModelIdentity(source="deepseek-ai/deepseek-moe-16b-base", family="deepseek_moe", config_hash="0" * 64,
                          moe_layers=layers, experts_per_layer={str(layer): 64 for layer in layers}, top_k=6)
    domains = {
        name: DomainProfile(tokens=sum(per_layer["1"]) // 6, source=SourceDescription(kind="counts", spec=name),
                            layers={layer: LayerStatistics(selected=values) for layer, values in per_layer.items()})
        for name, per_layer in counts.items()
    }
    profile = Profile(tool_version="test", model=model, settings=ProfileSettings(), domains=domains)
    plan = make_plan(profile, PlanOptions(keep=32, domains={"gsm8k": 1}))
    for layer in layers:
        selected = counts["gsm8k"][str(layer)]
        best = sorted(sorted(range(64), key=lambda e: (-selected[e], e))[:32])
        assert plan.kept()[layer] == best
        share = sum(selected[e] for e in best) / sum(selected)
        assert plan.predicted_coverage["gsm8k"][str(layer)] == share
        assert share > 0.6, f"layer {layer}: {share:.3f}"
        for name, per_layer in counts.items():  # every domain's coverage, by hand
            values = per_layer[str(layer)]
            assert plan.predicted_coverage[name][str(layer)] == sum(values[e] for e in best) / sum(values)
    assert plan.is_uniform()


# -- group-limited routers ----------------------------------------------------------------------------------


def test_uniform_on_a_grouped_router_keeps_the_best_of_every_group():
    from compressor.profiling.schema import ExpertGroups

    profile = make_profile({"code": {1: [10, 50, 30, 0, 20, 5, 40, 45], 2: [9, 8, 7, 6, 1, 2, 3, 4]}})
    profile.model.expert_groups = ExpertGroups(count=2, chosen=1, min_kept=1)  # groups 0..3 and 4..7
    # ungrouped, the best 4 of layer 1 are 1, 2, 6, 7; per group: 1, 2 | 6, 7 and 0, 1 | 6, 7 (not 0..3)
    assert kept(profile) == {1: [1, 2, 6, 7], 2: [0, 1, 6, 7]}
    assert kept(profile, keep=2) == {1: [1, 7], 2: [0, 7]}
    assert kept(profile, keep=2, protect={2: {5}}) == {1: [1, 7], 2: [0, 5]}
    assert kept(profile, keep_fraction=0.7) == {1: [0, 1, 2, 4, 6, 7], 2: [0, 1, 2, 5, 6, 7]}  # 2.8 -> 3 per group
    with pytest.raises(UserError, match=r"layer 2: 2 experts of the group 4..7 are protected, more than the 1"):
        kept(profile, keep=2, protect={2: {4, 5}})
    with pytest.raises(UserError, match=r"--keep 3: .*best 1 of 2 expert groups.*keep a multiple of 2.*--ungroup"):
        kept(profile, keep=3)
    with pytest.raises(UserError, match=r"--top-k 2 exceeds the 1 experts kept in the 1 groups open to a token"):
        kept(profile, keep=2, top_k=2)
    with pytest.raises(UserError, match="--strategy global keeps different numbers of experts per expert group"):
        kept(profile, strategy="global")
    assert kept(profile, keep=3, ungroup=True) == {1: [1, 6, 7], 2: [0, 1, 2]}
    profile.model.expert_groups = ExpertGroups(count=2, chosen=1, min_kept=2)
    with pytest.raises(UserError, match="at least 2: keep a multiple of 2 of at least 4"):
        kept(profile, keep=2)


def test_keep_groups_drops_the_groups_of_lowest_total_score():
    from compressor.profiling.schema import ExpertGroups

    profile = make_profile({"code": {1: [10, 50, 30, 0, 20, 5, 40, 45], 2: [9, 8, 7, 6, 1, 2, 3, 4]}})
    profile.model.expert_groups = ExpertGroups(count=2, chosen=1, min_kept=1)
    # group totals: layer 1: 90 | 110, layer 2: 30 | 10
    assert kept(profile, keep=2, keep_groups=1) == {1: [6, 7], 2: [0, 1]}
    assert kept(profile, keep_groups=1) == {1: [4, 5, 6, 7], 2: [0, 1, 2, 3]}  # half of 8 in one group: all of it
    assert kept(profile, keep=2, keep_groups=1, protect={1: {3}}) == {1: [1, 3], 2: [0, 1]}
    plan = make_plan(profile, PlanOptions(keep=2, keep_groups=1))
    assert plan.strategy.parameters["keep_groups"] == 1
    with pytest.raises(UserError, match="protected experts lie in 2 expert groups, more than the 1"):
        kept(profile, keep=2, keep_groups=1, protect={1: {0, 7}})
    with pytest.raises(UserError, match="--keep-groups 3: this model's router has 2 expert groups"):
        kept(profile, keep=3, keep_groups=3)
    with pytest.raises(UserError, match="6 experts in each of 1 groups, but a group has only 4"):
        kept(profile, keep_fraction=0.75, keep_groups=1)
    with pytest.raises(UserError, match="--keep-groups applies to group-limited routers.*once --ungroup"):
        kept(profile, keep=2, keep_groups=1, ungroup=True)
    with pytest.raises(UserError, match="goes with --strategy uniform"):
        kept(profile, strategy="coverage", keep_groups=1)
