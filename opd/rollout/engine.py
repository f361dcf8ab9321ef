"""Rollout engines: who samples the student's completions.

An engine turns examples into :class:`~opd.types.Rollouts` under a :class:`Sampling` spec and
records the behaviour log-probs ``log μ(y_t | s_t)`` of what it sampled. Nothing downstream of the
rollouts knows which engine ran. The loop pushes the student's weights to an engine after each
optimizer step (:meth:`RolloutEngine.sync_weights`); an engine that samples from the live student
module (``hf``) has nothing to do there.

* ``hf`` — :class:`HFEngine`: opd's own batched, KV-cached decode loop over any ``transformers``
  causal LM (:func:`opd.rollout.generate.generate_rollouts`).
* ``vllm`` — :mod:`opd.rollout.vllm_engine`: a ``vllm.LLM`` in the training process, or a vLLM
  server (``rollout.server``), with the student's weights pushed every ``rollout.sync_every`` steps.

:data:`opd.config.engines.ENGINES` names every engine (the choices of ``rollout.engine``);
CONTRIBUTING.md, "Adding a rollout engine", walks through adding one.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.rollout.generate import Sampling, generate_rollouts
from opd.config.engines import ENGINES
from opd.tasks.base import Example
from opd.types import Rollouts

if TYPE_CHECKING:
    from opd.config.schema import Config

__all__ = ["EngineFactory", "HFEngine", "RolloutEngine", "Sampling", "build_engine",
           "hf_engine", "sampling_from_config"]


def sampling_from_config(rollout_cfg) -> Sampling:
    """The training-time :class:`Sampling` of a ``rollout`` config section."""
    r = rollout_cfg
    return Sampling(max_new_tokens=r.prefix_tokens or r.max_new_tokens, samples_per_prompt=r.samples_per_prompt,
                    temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, prefix_tokens=r.prefix_tokens)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples completions of the student. ``generate`` must be reproducible from torch's global
    RNG state (the loop seeds it per step) or from the engine's own seed per call."""

    name: str
    #: the in-process module the engine samples from (its own copy of the weights, or the live
    #: student); None when it samples elsewhere (a vLLM engine or server). The student-top-k support
    #: of a served teacher reads it under ``rollout.overlap``.
    sampling_module: nn.Module | None

    def generate(self, examples: Sequence[Example], sampling: Sampling, *, group_offset: int = 0) -> Rollouts:
        """``len(examples) · G`` rollouts (layout of :func:`opd.rollout.generate.finish_rollouts`)."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (after an optimizer step)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (processes, memory)."""
        ...


class HFEngine:
    """opd's own decode loop over a ``transformers`` causal LM.

    By default it samples the live student module (no copy, nothing to sync). With ``own_copy`` it
    samples a private copy of the weights, refreshed by :meth:`sync_weights` — what rollout–update
    overlap needs (:mod:`opd.overlap`): training can then change the student while this engine
    samples. The copy costs one more set of student weights in memory.
    """

    name = "hf"

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, own_copy: bool = False):
        self.own_copy = own_copy
        self.model = _frozen_copy(model) if own_copy else model
        self.tokenizer = tokenizer

    @property
    def sampling_module(self) -> nn.Module:
        return self.model

    def generate(self, examples: Sequence[Example], sampling: Sampling, *, group_offset: int = 0) -> Rollouts:
        return generate_rollouts(self.model, self.tokenizer, examples, sampling, group_offset=group_offset)

    @torch.no_grad()
    def sync_weights(self, model: nn.Module) -> None:
        if not self.own_copy:
            self.model = model  # the live module: the next call already samples the updated weights
            return
        for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
            mine.copy_(theirs)

    def close(self) -> None:
        return None


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).eval()
    clone.requires_grad_(False)
    return clone


#: How an engine is built: ``factory(cfg, student, tokenizer)``, with ``student`` the unwrapped student
#: module and ``tokenizer`` its tokenizer; it reads its own settings from ``cfg.rollout``.
EngineFactory = Callable[["Config", nn.Module, PreTrainedTokenizerBase], RolloutEngine]


def hf_engine(cfg: Config, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> HFEngine:
    """``rollout.engine=hf``: the live student, or a private copy with ``rollout.overlap``."""
    return HFEngine(model, tokenizer, own_copy=cfg.rollout.overlap)


def build_engine(cfg: Config, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """The engine named by ``cfg.rollout.engine`` sampling from ``model`` (the unwrapped student)."""
    name = cfg.rollout.engine
    if name not in ENGINES:
        raise ValueError(f"unknown rollout.engine={name!r}; choose one of {', '.join(ENGINES)}")
    module, _, factory = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), factory)(cfg, model, tokenizer)
