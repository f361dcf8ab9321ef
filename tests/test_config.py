"""Configuration: loading precedence, override parsing, validation messages, presets, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from opd.config import (
    PRESETS,
    SECTIONS,
    Config,
    ConfigError,
    check_combinations,
    config_from_dict,
    config_to_dict,
    config_warnings,
    dump_config,
    format_config_help,
    format_methods,
    load_config,
    parse_override,
    required_teacher_access,
    resolve_teacher_access,
    validate_config,
    with_overrides,
)
from opd.config.fields import field_specs


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(overrides: list[str], path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# presets
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_loads_validates_and_has_no_warnings(name: str) -> None:
    cfg = load_config(None, [f"method={name}"])
    assert cfg.method == name
    assert check_combinations(cfg) == []
    assert config_warnings(cfg) == []
    for path, value in PRESETS[name].settings():
        section, key = path.split(".")
        assert getattr(getattr(cfg, section), key) == value, path


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_set_their_defining_variables_explicitly(name: str) -> None:
    preset = PRESETS[name]
    assert preset.summary and preset.citation
    assert "divergence" in preset.values["route1"], "route 1 on or off must be explicit"
    assert "coef" in preset.values["route2"], "route 2 on or off must be explicit"
    assert preset.values["teacher"]["access"] in ("sampled", "topk", "full")
    # the explicit access is exactly what the objective needs: no more, no less
    assert required_teacher_access(load_config(None, [f"method={name}"])) == preset.values["teacher"]["access"]


def test_required_presets_exist_with_their_defining_values() -> None:
    for name in ("thinking-machines", "gkd", "minillm", "vopd", "gae-opd", "cr-opd", "opsd", "sft-teacher"):
        assert name in PRESETS
    tm = load_config(None, ["method=thinking-machines"])
    assert (tm.route2.coef, tm.route2.credit, tm.route2.baseline, tm.route2.is_correction) == (
        1.0, "immediate", "none", "ratio")
    assert (tm.route1.divergence, tm.teacher.access, tm.routing.kind) == ("none", "sampled", "softmax")
    gkd = load_config(None, ["method=gkd"])
    assert (gkd.route1.divergence, gkd.route1.beta, gkd.support.kind) == ("jsd", 0.5, "full")
    assert (gkd.rollout.on_policy_fraction, gkd.rollout.off_policy_source, gkd.rollout.temperature) == (
        0.5, "answer", 0.9)
    mini = load_config(None, ["method=minillm"])
    assert (mini.route1.divergence, mini.support.kind, mini.route2.credit) == ("rkl", "full", "return_to_go")
    assert mini.route2.future_only and mini.route2.length_normalize
    assert (mini.rollout.teacher_mix, mini.route2.is_correction) == (0.2, "ppo_clip")
    vopd = load_config(None, ["method=vopd"])
    assert (vopd.route2.baseline, vopd.route2.value, vopd.route1.divergence) == ("value", "closed_form", "none")
    gae = load_config(None, ["method=gae-opd"])
    assert (gae.route2.credit, gae.route2.gamma, gae.route2.lam, gae.route2.value) == (
        "gae", 1.0, 0.95, "decomposed")
    cr = load_config(None, ["method=cr-opd"])
    assert (cr.routing.kind, cr.teacher.topk, cr.route2.credit, cr.route2.baseline) == (
        "cr_opd", 16, "immediate", "value")
    opsd = load_config(None, ["method=opsd"])
    assert (opsd.teacher.model, opsd.teacher.self_mode, opsd.teacher.use_context) == ("self", "frozen", True)
    assert (opsd.route1.divergence, opsd.support.kind) == ("rkl", "full")
    sft = load_config(None, ["method=sft-teacher"])
    assert (sft.rollout.on_policy_fraction, sft.rollout.off_policy_source, sft.route1.divergence) == (
        0.0, "teacher", "none")
    assert (sft.route2.coef, sft.regularization.sft_coef, sft.rollout.off_policy_source) == (0.0, 1.0, "teacher")


def test_new_presets_set_their_defining_values() -> None:
    tm = load_config(None, ["method=thinking-machines"])  # tinker: the sampler's log-probs, a summed loss
    assert (tm.route2.reward_logprobs, tm.gates.reduction) == ("behaviour", "sum")
    opdvr = load_config(None, ["method=opdvr"])
    assert opdvr.outcome.sign_gate and opdvr.outcome.adv_tau == 0 and opdvr.route2.reward == "log_ratio"
    opsa = load_config(None, ["method=opsa"])
    assert (opsa.route2.reward, opsa.route2.constant_reward, opsa.gates.logprob_gate, opsa.gates.logprob_fraction) == (
        "entropy_rank", -1.0, True, 0.2)
    iw = load_config(None, ["method=iw-opd"])
    assert (iw.gates.position, iw.gates.drift_gamma, iw.route2.is_correction) == ("drift_share", 0.5, "none")
    eopd = load_config(None, ["method=eopd"])
    assert (eopd.route1.divergence, eopd.route1.fkl_coef, eopd.support.kind) == ("rkl", 1.0, "full")
    d2 = load_config(None, ["method=distillm-2"])
    assert (d2.route1.divergence, d2.route1.off_policy_divergence, d2.rollout.off_policy_source) == (
        "srkl_sg", "skl", "teacher")
    verl = load_config(None, ["method=verl-fkl-topk"])
    assert (verl.support.norm, verl.support.k, verl.route1.clamp_low, verl.route1.logprob_floor) == (
        "none", 128, 0.0, -10.0)
    assert load_config(None, ["method=verl-k3"]).route1.divergence == "k3"
    nemo = load_config(None, ["method=nemo-rl-opd"])
    assert (nemo.route2.is_correction, nemo.route2.icepop_low, nemo.route2.icepop_high) == ("icepop", 0.2, 5.0)
    prime = load_config(None, ["method=prime-rl-hybrid"])
    assert (prime.outcome.adv_tau, prime.outcome.teacher_tau, prime.outcome.normalize_std) == (1.0, 0.5, False)
    assert (prime.route2.is_correction, prime.route2.dppo_sign, prime.regularization.mismatch_coef) == (
        "dppo", "outcome", 1e-3)
    slime = load_config(None, ["method=slime-opd"])
    assert (slime.outcome.adv_tau, slime.outcome.teacher_tau, slime.route2.is_correction) == (1.0, 1.0, "ppo_clip")
    light = load_config(None, ["method=lightning-opd"])
    assert (light.rollout.on_policy_fraction, light.route2.off_policy_rows, light.teacher.cache) == (
        0.0, True, "memory")
    for name, (model, mode) in {"sdft": ("self", "frozen"), "sdpo": ("self", "live")}.items():
        cfg = load_config(None, [f"method={name}"])
        assert (cfg.teacher.model, cfg.teacher.self_mode, cfg.teacher.use_context) == (model, mode, True)


def test_new_options_are_checked() -> None:
    assert any("route2.off_policy_rows" in p for p in problems_of(["route2.coef=1", "rollout.on_policy_fraction=0"]))
    assert any("outcome.sign_gate" in p and "data.verifier" in p
               for p in problems_of(["method=opdvr", "data.verifier=none"]))
    assert any("icepop" in p for p in problems_of(["method=nemo-rl-opd", "route2.icepop_low=6"]))
    assert any("credit=immediate" in p for p in problems_of(["method=opsa", "route2.credit=return_to_go"]))
    assert any("reward_logprobs" in p for p in problems_of(["method=lightning-opd", "route2.reward_logprobs=behaviour"]))
    warnings = config_warnings(load_config(None, ["method=vopd", "gates.drift_gamma=0.9"]))
    assert any("gates.drift_gamma" in w and "drift_share" in w for w in warnings)
    # the sampled-token k3 estimator needs only sampled teacher log-probs, whatever the support
    assert required_teacher_access(load_config(None, ["method=verl-k3", "support.kind=full"])) == "sampled"


def test_format_methods_lists_every_preset_with_its_variables() -> None:
    text = format_methods()
    for preset in PRESETS.values():
        assert f"\n{preset.name}\n" in f"\n{text}"
        assert preset.citation.split(",")[0] in text
    block = text.split("\nthinking-machines\n")[1].split("\n\n")[0]
    assert "route2:" in block and "credit=immediate" in block and "baseline=none" in block
    assert "teacher:" in block and "access=sampled" in block and "divergence=none" in block
    assert "reward_logprobs=behaviour" in block and "reduction=sum" in block and "formula: " in block


def test_format_config_help_documents_every_option() -> None:
    text = format_config_help()
    for spec in field_specs().values():
        assert f"{spec.name}: " in text and spec.doc.split()[0] in text
    route2 = format_config_help("route2")
    assert "gamma: float = 1.0   range: in [0, 1]" in route2
    assert "credit: str = immediate   one of: immediate, return_to_go, discounted, gae" in route2
    assert "rollout:" not in route2
    with pytest.raises(ConfigError, match="did you mean route2"):
        format_config_help("rout2")


# ---------------------------------------------------------------------------------------------
# precedence and parsing
def test_precedence_defaults_preset_file_override(tmp_path: Path) -> None:
    path = write(tmp_path, "method: gkd\nroute1:\n  beta: 0.3\nrollout:\n  temperature: 0.7\n")
    cfg = load_config(path, ["route1.beta=0.2"])
    assert cfg.route1.divergence == "jsd"            # preset over default
    assert cfg.rollout.on_policy_fraction == 0.5     # preset
    assert cfg.rollout.temperature == 0.7            # file over preset (0.9)
    assert cfg.route1.beta == 0.2                    # override over file over preset
    assert cfg.train.steps == Config().train.steps   # default
    assert load_config(path).route1.beta == 0.3


def test_method_override_beats_the_file_and_file_values_still_apply(tmp_path: Path) -> None:
    path = write(tmp_path, "method: gkd\nrollout:\n  temperature: 0.7\n")
    cfg = load_config(path, ["method=vopd"])
    assert cfg.method == "vopd"
    assert (cfg.route1.divergence, cfg.route2.baseline) == ("none", "value")
    assert cfg.rollout.temperature == 0.7 and cfg.rollout.on_policy_fraction == 1.0


def test_override_values_are_yaml_scalars_lists_and_mappings() -> None:
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("train.betas=[0.9,0.95]") == ("train.betas", [0.9, 0.95])
    assert parse_override("teacher.routes={math: /p}") == ("teacher.routes", {"math": "/p"})
    assert parse_override("logging.run_dir=null") == ("logging.run_dir", None)
    assert parse_override("train.precision=no") == ("train.precision", "no")   # YAML 1.1 would say False
    cfg = load_config(None, ["train.lr=1e-3", "train.betas=[0.9,0.95]", "teacher.routes={math: /p}",
                             "teacher.routes.code=/q", "data.route_field=domain", "logging.run_dir=null",
                             "train.precision=no", "route2.gamma=1", "teacher.context_template=Hint: {context}",
                             "train.weight_decay='1e-2'"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == [0.9, 0.95]
    assert cfg.teacher.routes == {"math": "/p", "code": "/q"}
    assert cfg.logging.run_dir is None and cfg.train.precision == "no"
    assert cfg.route2.gamma == 1.0 and isinstance(cfg.route2.gamma, float)   # int accepted for float
    assert cfg.teacher.context_template == "Hint: {context}"                 # a string option keeps its text
    assert cfg.train.weight_decay == 0.01                                    # a float written as a string


def test_yaml_file_reads_1e_3_as_float_and_no_as_string(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 1e-3\n  precision: no\n  steps: 1e3\n")
    cfg = load_config(path)
    assert cfg.train.lr == 1e-3 and cfg.train.precision == "no" and cfg.train.steps == 1000


@pytest.mark.parametrize("text, expected", [
    ("route2.gamma", "not of the form section.key=value"),
    ("route2.gamma=", "has no value"),
    ("route2.gamma=[0.9", "not valid YAML"),
])
def test_malformed_overrides(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [text])


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML.*line 2"):
        load_config(write(tmp_path, "route2:\n  gamma: [0.9\n"))
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    problems = problems_of([], write(tmp_path, "route2: 5\nroute1:\n  divergnce: fkl\n", "bad.yaml"))
    assert any("route2: a section must be a mapping" in p and "file '" in p for p in problems)
    assert any("route1.divergnce: unknown key; did you mean route1.divergence?" in p and "bad.yaml" in p
               for p in problems)
    assert load_config(write(tmp_path, "", "empty.yaml")) == Config()


# ---------------------------------------------------------------------------------------------
# field validation
def test_unknown_keys_sections_and_methods_get_suggestions() -> None:
    problems = problems_of(["route2.gama=0.9", "rout2.gamma=1", "route1.gamma=0.5", "gamma=0.3",
                            "method=gkdd", "route2.gamma.x=1"])
    text = "\n".join(problems)
    assert "route2.gama: unknown key; did you mean route2.gamma? (from override 'route2.gama=0.9')" in text
    assert "rout2.gamma: unknown section; did you mean route2?" in text
    assert "route1.gamma: unknown key; did you mean route2.gamma?" in text
    assert "gamma: unknown option; did you mean route2.gamma?" in text
    assert "method='gkdd' is not a preset; did you mean gkd?" in text and "thinking-machines" in text
    assert "route2.gamma is not a mapping option" in text
    assert "the keys of route2 are:" in problems_of(["route2.zzzzzz=1"])[0]


@pytest.mark.parametrize("override, expected", [
    ("route2.gamma=abc", "route2.gamma: expected a number, got 'abc' (a string)"),
    ("train.steps=1.5", "train.steps: expected an integer, got 1.5"),
    ("train.steps=true", "train.steps: expected an integer, got True (a boolean)"),
    ("gates.mask_special_tokens=1", "gates.mask_special_tokens: expected true or false, got 1 (an integer)"),
    ("student.model=null", "student.model: null is not allowed here"),
    ("route2.gamma=.nan", "nan is not allowed"),
    ("train.betas=[0.9, x]", "train.betas: item 1: expected a number"),
    ("teacher.routes={a: [1]}", "teacher.routes: entry 'a': expected a string"),
    ("route2.gamma=1.5", "route2.gamma=1.5 is out of range: it must be in [0, 1]"),
    ("rollout.temperature=0", "rollout.temperature=0.0 is out of range: it must be > 0"),
    ("train.steps=0", "train.steps=0 is out of range: it must be ≥ 1"),
    ("route2.credit=gea", "route2.credit='gea' is not one of: immediate, return_to_go, discounted, gae, window; "
                          "did you mean gae?"),
    ("data.verifier=foo", "data.verifier='foo' is not a verifier"),
    ("train.betas=[0.9]", "AdamW needs two numbers in [0, 1)"),
])
def test_field_errors(override: str, expected: str) -> None:
    problems = problems_of([override])
    assert len(problems) == 1 and expected in problems[0], problems
    assert f"(from override '{override}')" in problems[0]


def test_all_problems_are_reported_together_with_their_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "method: cr-opd\nroute2:\n  gama: 0.9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["teacher.access=sampled", "train.steps=0", "rollout.top_p=2"])
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert str(info.value).startswith("invalid configuration (4 problems):")
    assert all(line in str(info.value) for line in problems)
    assert any("route2.gama" in p and "cfg.yaml" in p for p in problems)
    access = next(p for p in problems if p.startswith("teacher.access=sampled is too little: routing.kind"))
    assert "teacher.access from override 'teacher.access=sampled'" in access
    assert "routing.kind from preset 'cr-opd'" in access
    assert isinstance(info.value, ValueError)


def test_validate_config_converts_and_checks_configs_built_in_code() -> None:
    cfg = Config()
    cfg.route2.gamma = "0.9"  # type: ignore[assignment]
    cfg.train.steps = 10.0    # type: ignore[assignment]
    clean = validate_config(cfg)
    assert clean.route2.gamma == 0.9 and clean.train.steps == 10 and isinstance(clean.train.steps, int)
    cfg.route1.divergence = "none"
    cfg.rollout.top_p = "x"   # type: ignore[assignment]
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    assert len(info.value.problems) == 2  # the bad field and the missing loss, each once
    assert check_combinations(dataclasses.replace(Config(), route1=dataclasses.replace(
        Config().route1, divergence="none")))[0].startswith("no loss term is on")


# ---------------------------------------------------------------------------------------------
# combinations
COMBINATIONS = [
    (["route1.divergence=none"], "no loss term is on (route1.divergence=none, route2.coef=0"),
    (["routing.kind=cr_opd"], "routing.kind=cr_opd reroutes the route-2 update, but route2.coef=0"),
    (["method=cr-opd", "teacher.access=sampled"], "teacher.access=sampled is too little: routing.kind=cr_opd"),
    (["teacher.access=topk"], "is too little: route1.divergence=rkl on support.kind=full needs full"),
    (["support.kind=student_topk", "teacher.access=topk"], "on support.kind=student_topk needs full"),
    (["support.kind=union", "teacher.access=sampled"], "on support.kind=union needs full"),
    (["support.kind=teacher_topk", "teacher.access=sampled"], "on support.kind=teacher_topk needs topk"),
    (["support.kind=sampled"], "support.kind=sampled with support.norm=renorm is degenerate"),
    (["method=vopd", "teacher.access=sampled"], "too little: route2.value=closed_form"),
    (["method=vopd", "teacher.access=topk"], "computed on support.kind=full) needs full"),
    (["method=gae-opd", "teacher.access=sampled"], "too little: route2.value=decomposed"),
    (["method=thinking-machines", "gates.coverage_gate=true"], "too little: gates.coverage_gate"),
    (["method=cr-opd", "support.k=32"], "support.k=32 exceeds teacher.topk=16"),
    (["method=thinking-machines", "route2.baseline=group_mean"], "route2.baseline=group_mean averages over the "
                                                                 "samples of a prompt"),
    (["method=thinking-machines", "route2.baseline=leave_one_out"], "rollout.samples_per_prompt ≥ 2"),
    (["method=thinking-machines", "outcome.adv_tau=1", "data.verifier=none", "rollout.samples_per_prompt=4"],
     "but data.verifier=none"),
    (["outcome.adv_tau=1", "rollout.samples_per_prompt=4"], "enters through the route-2 advantage"),
    (["method=thinking-machines", "outcome.adv_tau=1"], "the outcome advantage is group-normalised"),
    (["method=exopd", "regularization.reference=null"], "regularization.reference is unset"),
    (["regularization.ref_kl_coef=0.1", "regularization.reference=null"], "ref_kl_coef > 0 needs a reference"),
    (["method=thinking-machines", "route2.reward=clipped"], "route2.reward=clipped needs a bound"),
    (["method=thinking-machines", "route2.reward=clipped", "route2.reward_low=3", "route2.reward_high=1"],
     "swap them"),
    (["rollout.prefix_tokens=16", "rollout.max_new_tokens=8"], "rollout.prefix_tokens=16 exceeds"),
    (["data.task=jsonl", "data.path=p.jsonl", "data.answer_field=null", "rollout.on_policy_fraction=0.5",
      "rollout.off_policy_source=answer"], "off_policy_source=answer trains on dataset answers, but "
                                           "data.answer_field is unset"),
    (["method=sft-teacher", "data.task=jsonl", "data.path=p.jsonl", "data.answer_field=null",
      "rollout.off_policy_source=answer"], "data.answer_field is unset"),
    (["regularization.sft_coef=1"], "rollout.on_policy_fraction=1 leaves none"),
    (["method=opsd", "data.task=jsonl", "data.path=p.jsonl"], "teacher.use_context=true but there is no "
                                                              "teacher-only context"),
    (["method=opsd", "teacher.context_template=ctx"], "has no {context} placeholder"),
    (["teacher.model=self", "teacher.use_context=true", "teacher.routes={a: m}", "data.route_field=d"],
     "teacher.model=self cannot be combined with teacher.routes"),
    (["teacher.model=self", "teacher.self_mode=live"], "every teacher signal is exactly 0"),
    (["data.route_field=domain"], "but teacher.routes is empty"),
    (["teacher.routes={a: m}"], "data.route_field is unset, so no prompt can be routed"),
    (["method=minillm", "teacher.routes={a: m}", "data.route_field=d"], "needs one in-process teacher"),
    (["method=thinking-machines", "route2.length_normalize=true"], "needs route2.credit=return_to_go, "
                                                                  "not immediate"),
    (["method=gae-opd", "route2.baseline=value"], "route2.credit=gae already subtracts the value"),
    (["method=vopd", "route2.value=decomposed"], "trained only with route2.credit=gae"),
    (["method=thinking-machines", "rollout.on_policy_fraction=0"], "route 2 is the policy gradient on the "
                                                                  "student's own samples and there are none"),
    (["data.task=jsonl"], "data.task=jsonl needs data.path"),
    (["student.model=self"], "only the teacher can be 'self'"),
]


@pytest.mark.parametrize("overrides, expected", COMBINATIONS, ids=[" ".join(o) for o, _ in COMBINATIONS])
def test_incompatible_combinations(overrides: list[str], expected: str) -> None:
    problems = problems_of(overrides)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------
# warnings
WARNINGS = [
    (["method=minillm", "route1.divergence=none"], "the immediate reverse-KL step is never trained"),
    (["method=minillm", "route2.credit=immediate", "route2.length_normalize=false"], "A_t = r_{t+1}"),
    (["route2.coef=1"], "gradient is counted twice"),
    (["method=thinking-machines", "route2.is_correction=none", "rollout.temperature=0.7"],
     "the rollouts come from μ ≠ π_S (rollout.temperature=0.7)"),
    (["method=thinking-machines", "route2.is_correction=none", "rollout.updates_per_rollout=2"],
     "ignores that staleness"),
    (["method=thinking-machines", "rollout.top_p=0.9"], "cannot correct for them"),
    (["teacher.temperature=2"], "differs from support.student_temperature=1.0"),
    (["method=thinking-machines", "teacher.temperature=2"], "route 2's reward compares the tempered teacher"),
    (["method=thinking-machines", "teacher.server=http://host:8000", "teacher.protocol=vllm",
      "teacher.temperature=0.5"],
     "servers usually return untempered log-probs"),
    (["method=exopd", "route2.extrapolation_lambda=1"], "equals reward=log_ratio"),
    (["method=gae-opd", "route2.value_coef=0"], "never trains its value head"),
    (["method=vopd", "route2.value=zero"], "subtracts 0"),
    (["method=vopd", "support.kind=sampled", "support.norm=tail"], "two-point"),
    (["route1.coef=0", "route2.coef=1"], "route1.divergence=rkl with route1.coef=0: route 1 is off"),
    (["teacher.model=self"], "only regularises towards the starting point"),
    (["data.task=jsonl", "data.path=p.jsonl", "data.context_field=hint"], "the context is never shown"),
    (["train.warmup_steps=400"], "never reaches its peak"),
    (["method=thinking-machines", "route2.gamma=0.9"],
     "route2.gamma=0.9 has no effect: it is used only with route2.credit=discounted, gae or window"),
    (["method=thinking-machines", "routing.kappa=0.5"], "routing.kappa=0.5 has no effect"),
    (["route2.credit=gae", "route2.lam=0.9"], "route2.credit, route2.lam have no effect: route 2 is off"),
    (["method=thinking-machines", "support.k=8"], "support.k has no effect: nothing uses the support"),
    (["route1.beta=0.3"], "route1.beta=0.3 has no effect: it is used only with route1.divergence=jsd"),
]


@pytest.mark.parametrize("overrides, expected", WARNINGS, ids=[" ".join(o) for o, _ in WARNINGS])
def test_warnings(overrides: list[str], expected: str) -> None:
    warnings = config_warnings(load_config(None, overrides))
    assert any(expected in w for w in warnings), warnings


def test_defaults_have_no_warnings() -> None:
    assert config_warnings(load_config()) == []


# ---------------------------------------------------------------------------------------------
# teacher access
@pytest.mark.parametrize("overrides, access", [
    ([], "full"),
    (["method=thinking-machines"], "sampled"),
    (["method=power-opd"], "sampled"),
    (["method=fu-topk"], "topk"),
    (["method=cr-opd"], "topk"),
    (["method=vopd"], "full"),
    (["method=vopd", "support.kind=teacher_topk", "support.norm=tail", "teacher.access=auto"], "topk"),
    (["method=gae-opd", "route2.value=zero"], "sampled"),
    (["support.kind=sampled", "support.norm=tail"], "sampled"),
    (["support.kind=teacher_topk_sampled"], "topk"),
    (["method=thinking-machines", "gates.coverage_gate=true", "teacher.access=auto"], "topk"),
    (["method=sft-teacher"], "sampled"),
])
def test_required_teacher_access(overrides: list[str], access: str) -> None:
    cfg = load_config(None, overrides)
    assert required_teacher_access(cfg) == access
    auto = load_config(None, [*overrides, "teacher.access=auto"])
    assert auto.teacher.access == "auto" and resolve_teacher_access(auto) == access


def test_explicit_access_above_the_need_is_kept() -> None:
    cfg = load_config(None, ["method=thinking-machines", "teacher.access=full"])
    assert resolve_teacher_access(cfg) == "full" and required_teacher_access(cfg) == "sampled"


# ---------------------------------------------------------------------------------------------
# round trips
def _custom() -> Config:
    return load_config(None, ["method=gkd", "train.lr=1e-5", "train.betas=[0.9,0.95]", "logging.run_dir=1e-3",
                              "teacher.context_template=no", "data.prompt_field=yes", "teacher.routes={on: m, 7: n}",
                              "data.route_field=domain", "route2.reward_high=1.0e+300", "seed=7", "rollout.top_p=0.3333333333333333"])


@pytest.mark.parametrize("name", [*PRESETS, None])
def test_dump_then_load_is_exact(tmp_path: Path, name: str | None) -> None:
    cfg = load_config(None, [f"method={name}"]) if name else _custom()
    path = tmp_path / "run" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg   # any YAML reader gets the same data
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_dump_layout_keeps_method_and_schema_order(tmp_path: Path) -> None:
    cfg = _custom()
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    text = path.read_text()
    assert text.splitlines()[1] == "method: gkd"
    positions = [text.index(f"\n{section}:\n") for section in SECTIONS]
    assert positions == sorted(positions)
    assert "run_dir: '1e-3'" in text and "context_template: 'no'" in text   # quoted: not a float / bool
    assert list(config_to_dict(cfg)) == ["method", "seed", *SECTIONS]


def test_config_from_dict_does_not_apply_the_preset() -> None:
    cfg = config_from_dict({"method": "gkd", "rollout": {"temperature": 0.5}})
    assert cfg.method == "gkd" and cfg.route1.divergence == "rkl" and cfg.rollout.temperature == 0.5
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({"rollout": {"temprature": 0.5}})


def test_with_overrides() -> None:
    base = load_config(None, ["method=vopd"])
    cfg = with_overrides(base, ["route2.credit=return_to_go"])
    assert cfg.route2.credit == "return_to_go" and base.route2.credit == "immediate"
    assert cfg.route2.baseline == "value"
    with pytest.raises(ConfigError, match="cannot change `method`"):
        with_overrides(base, ["method=gkd"])
    with pytest.raises(ConfigError, match="support.kind=sampled with support.norm=renorm"):
        with_overrides(base, ["support.kind=sampled"])


def test_choices_come_from_the_math_registries_and_docs_list_them():
    """The schema's choices are the math layer's name lists (live registries, never copies), and the
    table of docs/methods.md §3.1 lists the same names."""
    import re

    from opd.math import credit, divergences, support

    specs = field_specs()
    assert specs["route1.divergence"].choices == ("none", *divergences.DIVERGENCES, "k3")
    assert specs["route1.off_policy_divergence"].choices == (*divergences.DIVERGENCES, "k3")
    assert specs["route2.credit"].choices == tuple(credit.CREDIT_ESTIMATORS)
    assert specs["route2.baseline"].choices == tuple(credit.BASELINES)
    assert specs["route2.value"].choices == credit.VALUE_ESTIMATES
    assert specs["support.kind"].choices == support.SUPPORT_KINDS
    assert specs["support.norm"].choices == support.SUPPORT_NORMS
    text = (Path(__file__).resolve().parents[1] / "docs/methods.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+\.\w+)` \| (`[^|]*`) \|", text, flags=re.M))
    assert set(rows) == {"route1.divergence", "support.kind", "support.norm", "route2.credit", "route2.baseline",
                         "route2.value"}
    for path, names in rows.items():
        assert tuple(re.findall(r"`(\w+)`", names)) == tuple(specs[path].choices), path
