"""LoRA students (opd/lora.py): only the adapter trains, save / load is exact, merged exports load
with ``AutoModelForCausalLM`` and give the LoRA model's logits, resume is exact, and a frozen
self-teacher is the base model seen through the student's own module (no second copy).

Models: the shipped 2-digit smoke pair; everything on CPU, one thread."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from accelerate import Accelerator  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from opd import lora  # noqa: E402
from opd.cli import main as opd_main  # noqa: E402
from opd.config.load import ConfigError, load_config  # noqa: E402
from opd.factories import build_student, build_teacher  # noqa: E402
from opd.model_paths import resolve_model_path  # noqa: E402
from opd.models import load_model, load_tokenizer  # noqa: E402
from opd.rollout import Sampling, generate_rollouts  # noqa: E402
from opd.tasks.arith import ArithTask  # noqa: E402
from opd.teachers import ModelTeacher, SelfTeacher  # noqa: E402

SMOKE = [
    "student.model=builtin:arith/smoke_student", "teacher.model=builtin:arith/smoke_teacher", "data.digits=2",
    "rollout.prompts_per_step=16", "eval.size=20", "eval.every=0", "logging.progress=false", "logging.report=false",
    "train.threads=1",
]
STUDENT = resolve_model_path("builtin:arith/smoke_student")
SETTINGS = lora.LoraSettings(rank=4, alpha=8.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_student(seed: int = 0, settings: lora.LoraSettings = SETTINGS):
    torch.manual_seed(seed)
    return lora.apply_lora(load_model(STUDENT), settings)


def _perturb_adapter(model: torch.nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero B (and new A) so that the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _ids(vocab: int = 17, rows: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(5))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- wrapping
def test_wrapping_keeps_the_model_class_and_starts_at_the_base_model():
    base = load_model(STUDENT)
    model = _lora_student()
    assert type(model) is type(base) and lora.is_lora(model) and not lora.is_lora(base)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(base, ids))  # B = 0: W x + 0 exactly
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sorted(trainable) == sorted(lora.lora_parameter_names(model))
    # all-linear: every projection of the decoder, never the (tied) output head
    adapted = {n.rsplit(".", 1)[-1] for n, _ in lora._tuner_layers(model)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_bad_targets_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="match no module.*q_proj"):
        lora.apply_lora(load_model(STUDENT), lora.LoraSettings(rank=2, alpha=2.0, target_modules=("nope",)))
    with pytest.raises(ValueError, match="output head"):
        lora.apply_lora(load_model(STUDENT), lora.LoraSettings(rank=2, alpha=2.0, target_modules=("lm_head",)))
    with pytest.raises(ValueError, match="already carries"):
        lora.apply_lora(_lora_student(), SETTINGS)
    with pytest.raises(ValueError, match="rank"):
        lora.LoraSettings(rank=0, alpha=1.0)


def test_config_options_and_their_checks():
    cfg = load_config(None, [*SMOKE, "student.lora_rank=8", "student.lora_alpha=16",
                             "student.lora_target_modules=[q_proj,v_proj]", "student.lora_dropout=0.1"])
    assert lora.LoraSettings.from_student_config(cfg.student) == lora.LoraSettings(8, 16.0, 0.1, ("q_proj", "v_proj"))
    assert lora.LoraSettings.from_student_config(load_config(None, SMOKE).student) is None  # off by default
    with pytest.raises(ConfigError, match="lora_target_modules"):
        load_config(None, [*SMOKE, "student.lora_rank=8", "student.lora_target_modules=[]"])
    with pytest.raises(ConfigError, match="lora_dropout"):
        load_config(None, [*SMOKE, "student.lora_dropout=1.0"])
    with pytest.raises(ConfigError, match="cannot also sample rollouts"):
        load_config(None, [*SMOKE, "student.lora_rank=4", "teacher.model=self", "rollout.teacher_mix=0.2"])
    with pytest.raises(ConfigError, match="background thread"):
        load_config(None, [*SMOKE, "student.lora_rank=4", "teacher.model=self", "rollout.overlap=true"])
    load_config(None, [*SMOKE, "student.lora_rank=4", "rollout.overlap=true"])  # a model teacher: fine


def test_a_training_step_changes_only_the_adapter(tmp_path):
    from opd.assemble import build_components
    from opd.step import train_step

    cfg = load_config(None, [*SMOKE, "student.lora_rank=4", "student.lora_alpha=8", "train.lr=1e-2",
                             f"logging.run_dir={tmp_path}"])
    parts = build_components(cfg, tmp_path, Accelerator(cpu=True))
    try:
        before = {n: p.detach().clone() for n, p in parts.student.named_parameters()}
        adapter = set(lora.lora_parameter_names(parts.student))
        assert {id(p) for p in parts.params} == {id(p) for n, p in parts.student.named_parameters() if n in adapter}
        metrics = train_step(parts, 0)
        assert math.isfinite(metrics["loss"]) and "skipped" not in metrics
        after = dict(parts.student.named_parameters())
        for name, value in before.items():
            if name in adapter:
                continue
            assert torch.equal(after[name], value), f"{name} is a base weight and must not change"
        assert any(not torch.equal(after[n], before[n]) for n in adapter if ".lora_B." in n)
    finally:
        parts.close()


# ---------------------------------------------------------------------------------------------- save / load
def test_adapter_checkpoint_round_trip_is_exact_and_loads_in_peft(tmp_path):
    model = _lora_student()
    _perturb_adapter(model)
    tok = load_tokenizer(STUDENT)
    folder = lora.save_student(model, tok, tmp_path / "ckpt", merged=False)
    assert lora.is_adapter_folder(folder) and (folder / lora.ADAPTER_WEIGHTS).is_file()
    assert not (folder / "model.safetensors").exists()  # only the adapter: the base is student.model
    assert Path(lora.adapter_base_path(folder)).resolve() == Path(STUDENT).resolve()

    fresh = _lora_student(seed=123)  # another A initialisation: loading must overwrite it
    lora.load_student_weights(fresh, folder)
    state, loaded = dict(model.named_parameters()), dict(fresh.named_parameters())
    assert all(torch.equal(state[n], loaded[n]) for n in state)
    ids = _ids()
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))

    # what the checkpoint code does: read every *.safetensors of the folder, then apply the dict
    from safetensors.torch import load_file

    again = _lora_student(seed=321)
    lora.apply_student_weights(again, {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()},
                               folder)
    assert torch.equal(_logits(again, ids), _logits(model, ids))

    from peft import PeftModel  # the folder is a standard peft adapter

    peft_model = PeftModel.from_pretrained(load_model(STUDENT), str(folder))
    assert torch.equal(_logits(peft_model, ids), _logits(model, ids))


def test_loading_the_wrong_kind_of_weights_says_what_to_set(tmp_path):
    model = _lora_student()
    lora.save_student(model, None, tmp_path / "adapter", merged=False)
    plain = load_model(STUDENT)
    lora.save_student(plain, None, tmp_path / "full", merged=False)
    with pytest.raises(ValueError, match="student has no LoRA"):
        lora.load_student_weights(load_model(STUDENT), tmp_path / "adapter")
    with pytest.raises(ValueError, match="lora_rank=0"):
        lora.load_student_weights(_lora_student(), tmp_path / "full")
    with pytest.raises(ValueError, match="lora_alpha"):
        lora.load_student_weights(_lora_student(settings=lora.LoraSettings(rank=4, alpha=4.0)), tmp_path / "adapter")
    with pytest.raises(ValueError, match="does not fit|other LoRA settings"):
        lora.load_student_weights(_lora_student(settings=lora.LoraSettings(rank=2, alpha=8.0)), tmp_path / "adapter")
    bf16 = lora.apply_lora(load_model(STUDENT, dtype="bfloat16"), SETTINGS)
    with pytest.raises(ValueError, match="stored in float32 but the student's adapter is bfloat16"):
        lora.load_student_weights(bf16, tmp_path / "adapter")
    other = load_model(STUDENT)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    lora.load_student_weights(other, tmp_path / "full")  # full weights: a plain student, exactly
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), plain.state_dict().values()))


def _naive_merged(model: torch.nn.Module, settings: lora.LoraSettings) -> dict[str, torch.Tensor]:
    """W + (α/r)·B A for every adapted layer, written out here from the parameters."""
    params = dict(model.named_parameters())
    out = {}
    for name, p in params.items():
        if name.endswith(".base_layer.weight"):
            prefix = name[: -len(".base_layer.weight")]
            a, b = params[f"{prefix}.lora_A.default.weight"], params[f"{prefix}.lora_B.default.weight"]
            out[f"{prefix}.weight"] = p + (settings.alpha / settings.rank) * (b @ a)
    return out


def test_merged_weights_match_a_naive_merge_and_load_with_automodel(tmp_path):
    model = _lora_student()
    _perturb_adapter(model)
    naive = _naive_merged(model, SETTINGS)
    merged_sd = lora.merged_state_dict(model)
    base_keys = set(load_model(STUDENT).state_dict())
    assert set(merged_sd) == base_keys
    for key, value in naive.items():
        torch.testing.assert_close(merged_sd[key], value, rtol=1e-6, atol=1e-6)
    # a state dict gathered from a wrapped model (DDP / FSDP names) merges the same way
    gathered = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    from_gathered = lora.merge_lora_state_dict(model, gathered)
    assert set(from_gathered) == base_keys and all(torch.equal(from_gathered[k], merged_sd[k]) for k in base_keys)
    copy_ = lora.merged_copy(model)
    assert not lora.is_lora(copy_) and lora.is_lora(model)  # the model itself is untouched
    assert all(torch.equal(copy_.state_dict()[k], merged_sd[k]) for k in base_keys)

    out = lora.save_student(model, load_tokenizer(STUDENT), tmp_path / "final", merged=True)
    assert (out / "model.safetensors").is_file() and not lora.is_adapter_folder(out)
    from safetensors.torch import load_file

    assert not any("lora" in k or "base_layer" in k for k in load_file(str(out / "model.safetensors")))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert not lora.is_lora(reloaded)
    out2 = lora.save_student(model, None, tmp_path / "final2", merged=True, state_dict=gathered)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert set(a) <= set(b) <= set(a) | {"lm_head.weight"}  # cloned tied weights may be stored twice
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = _ids()
    reference = _logits(model, ids)
    assert not torch.allclose(reference, _logits(load_model(STUDENT), ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(_logits(reloaded, ids), reference, rtol=1e-5, atol=1e-5)


def test_opd_export_merges_an_adapter_from_a_run_or_a_folder(tmp_path, capsys):
    model = _lora_student()
    _perturb_adapter(model)
    tok = load_tokenizer(STUDENT)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-000002"
    lora.save_student(model, tok, ckpt / "model", merged=False)
    (ckpt / "trainer_state.pt").write_bytes(b"")
    (run / "config.yaml").write_text("student:\n  model: builtin:arith/smoke_student\n  lora_rank: 4\n")
    ids = _ids()
    for source, out in ((run, tmp_path / "a"), (ckpt, tmp_path / "b"), (ckpt / "model", tmp_path / "c")):
        assert opd_main(["export", str(source), str(out), "--check"]) == 0
        printed = capsys.readouterr().out
        assert "LoRA adapter merged" in printed and "max |Δ logit|" in printed
        reloaded = AutoModelForCausalLM.from_pretrained(str(out))
        torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
        assert load_tokenizer(out).get_vocab() == tok.get_vocab()
    assert opd_main(["export", str(run), str(tmp_path / "d"), "--step", "7"]) == 2
    assert "no checkpoint for step 7" in capsys.readouterr().err
    plain = load_model(STUDENT)  # a full-weight folder is re-saved as it is
    lora.save_student(plain, tok, tmp_path / "plain", merged=True)
    assert opd_main(["export", str(tmp_path / "plain"), str(tmp_path / "e")]) == 0
    assert "full weights" in capsys.readouterr().out
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "e")), ids),
                               _logits(plain, ids), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- resume
def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    model.train()
    for step in steps:
        torch.manual_seed(1000 + step)  # the loop seeds every step (dropout draws from it)
        ids = torch.randint(4, 17, (4, 9))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_resume_from_an_adapter_checkpoint_is_exact(tmp_path):
    settings = lora.LoraSettings(rank=4, alpha=8.0, dropout=0.1)

    def fresh(seed: int):
        model = _lora_student(seed, settings)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.98))

    full, full_opt = fresh(0)
    full_losses = _train(full, full_opt, range(6))
    part, part_opt = fresh(0)
    losses = _train(part, part_opt, range(3))
    lora.save_student(part, None, tmp_path / "model", merged=False)
    torch.save(part_opt.state_dict(), tmp_path / "optimizer.pt")
    resumed, resumed_opt = fresh(77)  # a new process: another random A, empty optimizer
    lora.load_student_weights(resumed, tmp_path / "model")
    resumed_opt.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    losses += _train(resumed, resumed_opt, range(3, 6))
    assert losses == full_losses
    a, b = dict(full.named_parameters()), dict(resumed.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_lora_resume_after_a_stop_reproduces_the_uninterrupted_run(tmp_path):
    from opd.metrics_log import read_metrics

    common = [*SMOKE, "student.lora_rank=4", "student.lora_alpha=8", "student.lora_dropout=0.1", "train.lr=1e-2",
              "train.steps=5", "train.schedule=cosine", "rollout.samples_per_prompt=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert opd_main(["distill", *common, f"logging.run_dir={full}"]) == 0
    assert opd_main(["distill", *common, f"logging.run_dir={part}", "train.stop_after=2"]) == 0
    assert opd_main(["distill", "--resume", str(part)]) == 0
    drop = {"time", "seconds", "tokens_per_s"}
    records = [[{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run, "train")]
               for run in (full, part)]
    assert records[0] == records[1]
    for run in (full, part):  # final/ holds merged weights any HF tool loads
        assert (run / "final" / "model.safetensors").is_file() and not lora.is_adapter_folder(run / "final")
    a = AutoModelForCausalLM.from_pretrained(str(full / "final")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(part / "final")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- self-teacher
def _storages(*models: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}


def test_frozen_self_teacher_of_a_lora_student_is_the_base_without_a_copy():
    cfg = load_config(None, [*SMOKE, "student.lora_rank=4", "student.lora_alpha=8", "teacher.model=self",
                             "teacher.use_context=true"])
    student, tok = build_student(cfg, "cpu")
    teacher = build_teacher(cfg, student, tok, "cpu")
    assert isinstance(teacher, SelfTeacher) and teacher.base_as_teacher
    assert teacher.model is student and _storages(student, teacher.model) == _storages(student)
    plain_student, _ = build_student(load_config(None, SMOKE), "cpu")  # without LoRA: a deep copy (two copies)
    plain_teacher = SelfTeacher(plain_student, tok, mode="frozen")
    assert not plain_teacher.base_as_teacher
    assert _storages(plain_student).isdisjoint(_storages(plain_teacher.model))

    _perturb_adapter(student)  # the student has trained: it now differs from its base
    task = ArithTask(digits=2, eval_size=8, seed=0)
    torch.manual_seed(0)
    rollouts = generate_rollouts(student, tok, task.train_examples(0, 6, 0), Sampling(max_new_tokens=4))
    base_teacher = ModelTeacher(load_model(STUDENT), tok, use_context=True, context_template="{context}")
    grads = [(p, p.requires_grad) for p in student.parameters()]
    student.train()
    for access in ("sampled", "full"):
        got, want = teacher.score(rollouts, access=access), base_teacher.score(rollouts, access=access)
        # fp32 rounding only: peft's disabled-adapter forward may take another kernel path than the plain
        # model (bitwise equal on the Intel CPUs this was written on; 9.5e-7 apart on an AMD EPYC)
        torch.testing.assert_close(got.sampled_logprobs_BT, want.sampled_logprobs_BT, rtol=0, atol=1e-5)
        if access == "full":
            torch.testing.assert_close(got.logits_BTV, want.logits_BTV, rtol=0, atol=1e-5)
    live = SelfTeacher(student, tok, mode="live", use_context=True, context_template="{context}")
    assert not torch.allclose(live.score(rollouts).sampled_logprobs_BT, want.sampled_logprobs_BT, atol=1e-3)
    # the shared module is handed back as it was: adapter on, trainable, in training mode
    assert student.training and all(p.requires_grad == flag for p, flag in grads)
    assert all(not layer.disable_adapters for _, layer in lora._tuner_layers(student))


def test_adapters_are_switched_back_on_after_an_error():
    model = _lora_student()
    _perturb_adapter(model)
    ids = _ids()
    before = _logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with lora.adapters_disabled(model):
            torch.testing.assert_close(_logits(model, ids), _logits(load_model(STUDENT), ids), rtol=0, atol=0)
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, ids), before)


def test_opsd_with_a_lora_student_runs_through_the_cli(tmp_path):
    run = tmp_path / "opsd"
    assert opd_main(["distill", "method=opsd", *SMOKE, "rollout.prompts_per_step=8", "train.steps=2",
                     "student.lora_rank=4", f"logging.run_dir={run}"]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info  # the run wrote its record; the loop ran with the base-as-teacher path
    from opd.metrics_log import read_metrics

    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]
