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

:func:`build_engine` picks the engine named by ``rollout.engine``; adding an engine is a module
with a class that satisfies :class:`RolloutEngine` and one entry in :func:`build_engine`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.rollout.generate import generate_rollouts
from opd.tasks.base import Example
from opd.types import Rollouts

__all__ = ["HFEngine", "RolloutEngine", "Sampling", "build_engine", "sampling_from_config"]


@dataclass(frozen=True)
class Sampling:
    """How the behaviour policy μ samples: ``μ = softmax(filter_top_p(filter_top_k(logits / τ)))``.

    ``greedy`` takes the argmax (evaluation; the recorded log-probs are then the untempered
    model's). ``prefix_tokens`` generates only that many tokens (partial rollouts, never marked
    truncated). ``samples_per_prompt`` is ``G``: rows of one prompt are adjacent.
    """

    max_new_tokens: int
    samples_per_prompt: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    prefix_tokens: int | None = None
    greedy: bool = False


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

    def generate(self, examples: Sequence[Example], sampling: Sampling, *, group_offset: int = 0) -> Rollouts:
        """``len(examples) · G`` rollouts (layout of :func:`opd.rollout.generate.generate_rollouts`)."""
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

    def generate(self, examples: Sequence[Example], sampling: Sampling, *, group_offset: int = 0) -> Rollouts:
        s = sampling
        return generate_rollouts(self.model, self.tokenizer, examples, samples_per_prompt=s.samples_per_prompt,
                                 max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                 top_k=s.top_k, greedy=s.greedy, prefix_tokens=s.prefix_tokens,
                                 group_offset=group_offset)

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


def build_engine(cfg, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """The engine named by ``cfg.rollout.engine`` sampling from ``model`` (the unwrapped student)."""
    name = cfg.rollout.engine
    if name == "hf":
        return HFEngine(model, tokenizer, own_copy=cfg.rollout.overlap)
    if name == "vllm":
        return _vllm_engine(cfg, model, tokenizer)
    raise ValueError(f"unknown rollout.engine={name!r}; choose hf or vllm")


def _vllm_engine(cfg, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> RolloutEngine:
    """``rollout.engine=vllm``: the server at ``rollout.server``, else a colocated ``vllm.LLM`` loaded
    from the student's checkpoint (the loop pushes the live weights before the first rollout)."""
    from opd.rollout.vllm_engine import VLLMEngine, VLLMServerEngine

    r = cfg.rollout
    if r.server:
        from opd.serve.client import ServiceClient

        client = ServiceClient(r.server, role="rollout server", timeout=r.server_timeout, retries=r.server_retries)
        return VLLMServerEngine(client, tokenizer, sync_every=r.sync_every, sync_dir=r.sync_dir)
    from opd.build import resolve_model_path

    return VLLMEngine(resolve_model_path(cfg.student.model), tokenizer, sync_every=r.sync_every,
                      memory=r.vllm_memory, max_model_len=r.vllm_max_model_len, dtype=cfg.student.dtype,
                      seed=cfg.seed,
                      tokenizer_path=resolve_model_path(cfg.student.tokenizer) if cfg.student.tokenizer else None)
