"""Checks made before a run writes or loads anything heavy, so that a run that cannot work fails at
once with one line saying what is wrong and how to fix it.

* :func:`check_environment` (nothing loaded yet): the device and mixed precision the config asks
  for exist here, and the optional packages it needs are installed (each named with the ``pip``
  line that installs it);
* :func:`check_context_lengths` (models and data loaded, nothing written): every prompt plus the
  completion budget fits the student's and every teacher's context window.

Configuration problems themselves are found earlier, by :func:`opd.config.load_config`; soft
warnings (options that have no effect, ...) by :func:`opd.config.config_warnings`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from opd.config.schema import Config
from opd.tasks.base import Example

__all__ = ["EXTRAS", "Extra", "PreflightError", "check_context_lengths", "check_environment", "context_window"]


class PreflightError(ValueError):
    """The run cannot start here (the message says why and how to fix it)."""


@dataclass(frozen=True)
class Extra:
    """An optional package a configuration needs: ``needed(cfg)`` → ``module`` must import."""

    module: str
    install: str
    why: str
    needed: Callable[[Config], bool]


#: Optional packages and the settings that need them.
EXTRAS: tuple[Extra, ...] = (
    Extra("tensorboard", 'pip install "opd[logging]"', "logging.tensorboard=true", lambda c: c.logging.tensorboard),
    Extra("wandb", "pip install wandb", "logging.wandb=true", lambda c: c.logging.wandb),
    Extra("datasets", 'pip install "opd[hub]"', "data.task=hf", lambda c: c.data.task == "hf"),
)


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_environment(cfg: Config) -> None:
    """Device, precision and optional packages (see the module docstring).

    Raises:
        PreflightError: listing every problem, one per line.
    """
    problems = [f"{e.why} needs the package {e.module!r}, which is not installed: {e.install}"
                for e in EXTRAS if e.needed(cfg) and not _has_module(e.module)]
    import torch

    t = cfg.train
    cuda = torch.cuda.is_available()
    if t.device == "cuda" and not cuda:
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else f"torch is built with CUDA {torch.version.cuda}, but no GPU is visible")
        problems.append(f"train.device=cuda, but no CUDA GPU is usable here (torch {torch.__version__}: {why}); use "
                        "train.device=auto or train.device=cpu")
    on_gpu = cuda and t.device != "cpu"
    if t.precision == "fp16" and not on_gpu:
        problems.append("train.precision=fp16 needs a CUDA GPU (autocast on the CPU supports bf16 only); use "
                        "train.precision=bf16 or train.precision=no")
    if t.precision == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        problems.append("train.precision=bf16, but this GPU has no bf16 support; use train.precision=fp16 or no")
    for name, dtype in (("student.dtype", cfg.student.dtype), ("teacher.dtype", cfg.teacher.dtype)):
        if dtype == "float16" and not on_gpu:
            problems.append(f"{name}=float16 on the CPU: many CPU kernels have no float16 version; use bfloat16 or "
                            "float32")
    if problems:
        raise PreflightError("\n".join(problems) if len(problems) == 1 else
                             "the run cannot start here:\n" + "\n".join(f"  - {p}" for p in problems))


def context_window(model) -> int | None:
    """The longest sequence ``model`` accepts (its config's position limit), or None when unknown."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _longest(tokenizer, texts: Sequence[str], examples: Sequence[Example]) -> tuple[int, Example | None]:
    from opd.tasks.base import RenderedPrompt

    longest, where = 0, None
    for start in range(0, len(texts), 1024):
        chunk = list(texts[start:start + 1024])
        plain = [i for i, t in enumerate(chunk) if not isinstance(t, RenderedPrompt)]
        rendered = [i for i, t in enumerate(chunk) if isinstance(t, RenderedPrompt)]
        lengths = [0] * len(chunk)
        for idx, special in ((plain, True), (rendered, False)):
            if idx:
                ids = tokenizer([chunk[i] for i in idx], add_special_tokens=special)["input_ids"]
                for i, row in zip(idx, ids, strict=True):
                    lengths[i] = len(row)
        for i, n in enumerate(lengths):
            if n > longest:
                longest, where = n, examples[start + i]
    return longest, where


def check_context_lengths(cfg: Config, examples: Iterable[Example], *, student, student_tokenizer,
                          teachers: Sequence[tuple[str, object, object, Callable[[list[Example]], list[str]]]] = ()
                          ) -> None:
    """Every prompt plus the completion budget fits each model's context window.

    ``teachers``: ``(name, model, tokenizer, prompt_texts_fn)`` per in-process teacher, where
    ``prompt_texts_fn(examples)`` gives the texts that teacher reads before the completion.

    Raises:
        PreflightError: naming the longest prompt (and where it came from), the model, both lengths
            and the options that fix it.
    """
    examples = list(examples)
    if not examples:
        return
    budget = max(cfg.rollout.prefix_tokens or cfg.rollout.max_new_tokens,
                 cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    checks = [("the student", student, student_tokenizer, lambda ex: [e.prompt for e in ex])]
    checks += list(teachers)
    for name, model, tokenizer, texts_fn in checks:
        window = context_window(model)
        if window is None:
            continue
        longest, example = _longest(tokenizer, texts_fn(examples), examples)
        if longest + budget > window:
            where = f" ({example.origin})" if example is not None and example.origin else ""
            raise PreflightError(
                f"a prompt{where} is {longest} tokens long for {name}, and with the completion budget of {budget} "
                f"tokens (rollout.max_new_tokens / eval.max_new_tokens) it needs {longest + budget} positions, but "
                f"{name} reads at most {window} (its config's position limit); shorten or drop such prompts, or lower "
                "rollout.max_new_tokens")
