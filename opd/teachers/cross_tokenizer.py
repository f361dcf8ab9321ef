"""A teacher with its own tokenizer (``teacher.tokenizer=own``): it reads the student's text, not
the student's token ids, and answers in the student's token positions and vocabulary.

For each rollout:

1. the student's completion is decoded in context into its text ``x`` (its final EOS, if any, is
   kept apart) with the character offset after each student token (:func:`opd.tokenization.decode_offsets`);
2. the teacher's prompt is rendered for the teacher (:func:`opd.teachers.teacher_prompt_texts` with
   the teacher's tokenizer: a conversation goes through the *teacher's* chat template), ``x`` is
   re-tokenized by the teacher's tokenizer, followed by the teacher's EOS where the student wrote its
   EOS (student EOS ↔ teacher EOS), and the teacher scores that sequence in one forward pass;
3. the two tokenizations are aligned by character offsets and the teacher's log-probs are merged
   over the spans on which both agree (:func:`opd.token_alignment.align_tokens`): the entry of a student token
   is the teacher's log-prob of the same text given the same prefix, exact on tokens whose both ends
   are teacher boundaries and split within a teacher token by the teacher's own prefix probabilities
   otherwise. ``Σ_t sampled_logprobs_BT[b, t]`` is the teacher's log-prob of the completion.

Distributions (``access="topk"`` / ``"full"``) exist only at student states that are teacher states
(the student token starts on a teacher boundary): there the teacher's next-token distribution is
mapped onto the student vocabulary by token text (:func:`opd.tokenization.vocab_map`), which is exact on the
shared tokens. The teacher mass on tokens no student token maps to is reported for the ULD term
(:class:`opd.types.CrossVocabFeedback`, :mod:`opd.token_alignment.uld`). Elsewhere no teacher distribution over
the student's next token exists: ``topk`` is empty there (ids ``-1``, log-probs ``-inf``; a
``teacher_topk`` support is then empty and the route-1 term 0), and ``logits_BTV`` holds the sampled
token's merged log-prob against a uniform rest **[INFER]** (only so that a full-vocabulary consumer,
e.g. the evaluation's RKL, stays finite).

Nothing downstream needs to know the tokenizers differed. The teacher model is kept as
``teacher_model``, not ``model``: a component that samples from ``model`` with the student's
tokenizer (teacher-mixed rollouts, teacher samples, the teacher's own evaluation) would feed it
foreign ids, so those features are refused for this teacher by the configuration check.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from opd.rollout import completion_forward, encode_prompts, lm_head_vocab_size, model_device
from opd.teachers.base import LocalModel, check_request, teacher_prompt_texts
from opd.token_alignment.align import align_tokens
from opd.tokenization.tokens import PrefixIndex, decode_offsets, token_strings, vocab_map
from opd.types import Access, CrossVocabFeedback, Feedback, Rollouts

__all__ = ["CrossTokenizerTeacher"]

#: Elements of one ``[rows, T, V_T]`` fp32 block of teacher log-probs (≈ 256 MiB).
_BLOCK_ELEMENTS = 1 << 26
_NEG_INF = float("-inf")


@dataclass
class _Distributions:
    """The teacher's distributions mapped onto the student's positions, filled row by row:
    top-k ids / log-probs ``[B, T, K]``, the largest unmapped probabilities ``[B, T, U]``, the
    unmapped mass ``[B, T]`` and (``access="full"``) the full log-probs ``[B, T, V_S]``."""

    top_ids: Tensor
    top_lp: Tensor
    un_top: Tensor
    un_mass: Tensor
    full: Tensor | None

    @classmethod
    def empty(cls, b: int, t: int, k: int, u: int, full_vocab: int | None) -> _Distributions:
        return cls(torch.full((b, t, k), -1, dtype=torch.long), torch.full((b, t, k), _NEG_INF), torch.zeros(b, t, u),
                   torch.zeros(b, t), None if full_vocab is None else torch.zeros(b, t, full_vocab))


class CrossTokenizerTeacher:
    """An in-process causal LM with its own tokenizer, scoring the student's text (module docstring).

    Args:
        model: the teacher (``*ForCausalLM``), run in eval mode under ``no_grad``.
        tokenizer: the teacher's tokenizer (needs an EOS token).
        student_tokenizer: the student's tokenizer (decodes the student's ids; its EOS marks the end).
        student_vocab_size: width of the student's LM head (the last dim of ``logits_BTV``);
            default ``len(student_tokenizer)``.
        temperature: ``τ`` applied to the teacher's logits before every log-softmax.
        use_context, context_template: the teacher-only context, as for :class:`~opd.teachers.ModelTeacher`
            (a conversation gets it as a system prompt in the teacher's own template).
        unmapped_topk: ``U``, how many of the largest unmapped teacher probabilities are returned
            for the ULD term.
        micro_batch_size: rows per teacher forward (None: as many as keep the ``[rows, T, V_T]``
            log-probs under about 256 MiB).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        student_tokenizer: PreTrainedTokenizerBase,
        *,
        student_vocab_size: int | None = None,
        temperature: float = 1.0,
        use_context: bool = False,
        context_template: str = "{context}\n",
        unmapped_topk: int = 32,
        micro_batch_size: int | None = None,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the teacher tokenizer has no eos_token: the student's EOS cannot be mapped to it; set "
                             "tokenizer.eos_token")
        if student_tokenizer.eos_token_id is None:
            raise ValueError("the student tokenizer has no eos_token; set tokenizer.eos_token")
        if tokenizer.pad_token_id is None:
            raise ValueError("the teacher tokenizer has no pad token, so its prompts cannot be batched; set "
                             "tokenizer.pad_token (any token: teacher padding is masked)")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if unmapped_topk < 1:
            raise ValueError(f"unmapped_topk must be >= 1, got {unmapped_topk}")
        self.teacher_model = model
        self.tokenizer = tokenizer
        self.student_tokenizer = student_tokenizer
        self.temperature = float(temperature)
        self.use_context = use_context
        self.context_template = context_template
        self.unmapped_topk = unmapped_topk
        self.micro_batch_size = micro_batch_size
        self.teacher_strings = token_strings(tokenizer)
        self._prefix_index = PrefixIndex(self.teacher_strings)
        v_s = len(student_tokenizer) if student_vocab_size is None else int(student_vocab_size)
        self.map_V = torch.tensor(vocab_map(student_tokenizer, tokenizer, v_s, teacher_strings=self.teacher_strings),
                                  dtype=torch.long)
        v_t = lm_head_vocab_size(model)
        self.map_V = torch.where(self.map_V < v_t, self.map_V, torch.full_like(self.map_V, -1))
        # a teacher id reached from two student ids would be counted twice: keep the first
        seen: set[int] = set()
        for i, t in enumerate(self.map_V.tolist()):
            if t >= 0 and t in seen:
                self.map_V[i] = -1
            seen.add(t)
        #: running totals over every scored batch: student tokens, those whose both ends are teacher
        #: boundaries, completions, and those the teacher's tokenizer spells back exactly
        self.totals = {"tokens": 0, "token_aligned": 0, "completions": 0, "text_match": 0}
        self.report_first_batch = True
        mapped_t = torch.zeros(v_t, dtype=torch.bool)
        mapped_t[self.map_V[self.map_V >= 0]] = True
        self.teacher_unmapped_V = ~mapped_t

    # ---------------------------------------------------------------------------------------
    #: nothing may sample this teacher with the student's ids (its network is :attr:`teacher_model`)
    model = None

    def local_models(self) -> list[LocalModel]:
        return [LocalModel(self, self.teacher_model, self.tokenizer, True, self.use_context, self.context_template)]

    def prompt_texts(self, rollouts: Rollouts) -> list[str]:
        """The teacher's prompt text of every row (its own chat template for conversations); rows
        without examples use the student's prompt decoded to text."""
        if rollouts.examples:
            return teacher_prompt_texts(rollouts.examples, self.use_context, self.context_template,
                                        tokenizer=self.tokenizer)
        if self.use_context:
            raise ValueError("use_context=True needs rollouts with examples (their teacher_context)")
        return [self.student_tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                for ids, m in zip(rollouts.prompt_ids_BP, rollouts.prompt_mask_BP, strict=True)]

    def prompt_batch(self, rollouts: Rollouts) -> tuple[Tensor, Tensor]:
        """The teacher's left-padded prompt ids ``(ids_BP, mask_BP)`` in its own vocabulary."""
        return encode_prompts(self.tokenizer, self.prompt_texts(rollouts), model_device(self.teacher_model))

    def mapped_fraction(self) -> float:
        """Share of the student's tokenizer vocabulary that maps to a teacher token by text."""
        n = len(self.student_tokenizer)
        return float((self.map_V[:n] >= 0).float().mean())

    # ---------------------------------------------------------------------------------------
    def _rows(self, rollouts: Rollouts, t_prompt_ids: Tensor, t_prompt_mask: Tensor) -> list[dict]:
        """Per row: the student's text, its token ends, and the teacher's tokens of that text."""
        s_eos = int(self.student_tokenizer.eos_token_id)
        rows = []
        for b in range(rollouts.batch_size):
            ids = rollouts.completion_ids_BT[b][rollouts.completion_mask_BT[b].bool()].tolist()
            eos = bool(ids) and ids[-1] == s_eos
            text_ids = ids[:-1] if eos else ids
            context = rollouts.prompt_ids_BP[b][rollouts.prompt_mask_BP[b].bool()].tolist()
            text, s_ends = decode_offsets(self.student_tokenizer, text_ids, context)
            t_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            t_context = t_prompt_ids[b][t_prompt_mask[b].bool()].tolist()
            t_text, t_ends = decode_offsets(self.tokenizer, t_ids, t_context)
            rows.append({"n_text": len(text_ids), "eos": eos, "text": text, "s_ends": s_ends, "t_ids": t_ids,
                         "t_ends": t_ends, "match": t_text == text,
                         "t_completion": t_ids + ([int(self.tokenizer.eos_token_id)] if eos else [])})
        return rows

    @torch.no_grad()
    def score(self, rollouts: Rollouts, *, access: Access = "sampled", topk: int = 32) -> Feedback:
        """Teacher feedback in the student's positions and vocabulary (see the module docstring)."""
        check_request(access, topk)
        out_device = rollouts.completion_ids_BT.device
        b, t = rollouts.completion_ids_BT.shape
        v_s = int(self.map_V.shape[0])
        t_prompt_ids, t_prompt_mask = self.prompt_batch(rollouts)
        rows = self._rows(rollouts, t_prompt_ids, t_prompt_mask)
        sampled = torch.zeros(b, t)
        token_aligned = torch.zeros(b, t, dtype=torch.bool)
        state_aligned = torch.zeros(b, t, dtype=torch.bool)
        state_index = torch.full((b, t), -1, dtype=torch.long)
        dist = access != "sampled"
        k = min(topk, v_s)
        u = self.unmapped_topk
        out = _Distributions.empty(b, t, k, u, v_s if access == "full" else None) if dist else None

        width = max([len(r["t_completion"]) for r in rows] + [1])
        v_t = lm_head_vocab_size(self.teacher_model)
        step = self.micro_batch_size or max(1, _BLOCK_ELEMENTS // (width * v_t))
        was_training = self.teacher_model.training
        self.teacher_model.eval()
        try:
            for start in range(0, b, step):
                part = range(start, min(b, start + step))
                logp = self._forward(rows, part, t_prompt_ids, t_prompt_mask, width)
                for i, row_b in enumerate(part):
                    self._score_row(rows[row_b], logp[i], row_b, rollouts, sampled, token_aligned, state_aligned,
                                    state_index)
                    if out is not None:
                        self._distribution_row(logp[i], row_b, rollouts, state_index, sampled, out)
        finally:
            if was_training:
                self.teacher_model.train()
        mask = rollouts.completion_mask_BT.bool().cpu()
        self._count(mask, token_aligned, rows)
        result: dict[str, Tensor | None] = {"sampled_logprobs_BT": torch.where(mask, sampled, 0.0)}
        cross = {"token_aligned_BT": token_aligned & mask, "state_aligned_BT": state_aligned & mask,
                 "student_unmapped_V": (self.map_V < 0)}
        if out is not None:
            keep = mask[..., None]
            result["topk_ids_BTK"] = torch.where(keep, out.top_ids, 0)
            result["topk_logprobs_BTK"] = torch.where(keep, out.top_lp, 0.0)
            if out.full is not None:
                result["logits_BTV"] = torch.where(keep, out.full, 0.0)
            cross["unmapped_topk_BTU"] = torch.where(keep, out.un_top, 0.0)
            cross["unmapped_mass_BT"] = torch.where(mask, out.un_mass, 0.0)
        moved = {key: None if v is None else v.to(out_device) for key, v in result.items()}
        cross_fb = CrossVocabFeedback(**{key: v.to(out_device) for key, v in cross.items()})
        return Feedback(access=access, cross_vocab=cross_fb, **moved)

    def alignment_summary(self) -> str:
        """One line: the shares of aligned tokens and of completions spelled back, over all scored batches."""
        t = self.totals
        return (f"{t['token_aligned'] / max(t['tokens'], 1):.1%} of {t['tokens']} student tokens start and end on teacher "
                f"token boundaries (exact merges; the rest are split within a teacher token); "
                f"{t['text_match'] / max(t['completions'], 1):.1%} of {t['completions']} completions are spelled back "
                "exactly by the teacher's tokenizer")

    def _count(self, mask: Tensor, token_aligned: Tensor, rows: list[dict]) -> None:
        self.totals["tokens"] += int(mask.sum())
        self.totals["token_aligned"] += int((token_aligned & mask).sum())
        self.totals["completions"] += len(rows)
        self.totals["text_match"] += sum(r["match"] for r in rows)
        if self.report_first_batch and os.environ.get("RANK", "0") == "0":
            print(f"opd: cross-tokenizer alignment on the first scored batch: {self.alignment_summary()}",
                  file=sys.stderr)
        self.report_first_batch = False

    def _forward(self, rows: list[dict], part: range, t_prompt_ids: Tensor, t_prompt_mask: Tensor,
                 width: int) -> Tensor:
        """Tempered teacher log-probs ``[rows, width, V_T]`` (fp32, CPU) of the part's teacher sequences."""
        device = model_device(self.teacher_model)
        n = len(part)
        ids = torch.full((n, width), int(self.tokenizer.pad_token_id), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(part):
            seq = rows[r]["t_completion"]
            ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = 1
        # an empty completion still needs one column for the forward; it is masked out
        p_ids = t_prompt_ids[part.start:part.stop].to(device)
        p_mask = t_prompt_mask[part.start:part.stop].to(device)
        logits = completion_forward(self.teacher_model, p_ids, p_mask, ids.to(device), mask.to(device)).float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.log_softmax(logits, dim=-1).cpu()

    def _prefix_logprob(self, logp_TV: Tensor, row: dict):
        """``(j, c) -> log P_j(text of teacher token j's first c characters)`` for :func:`align_tokens`."""
        starts = [0]
        for e in row["t_ends"]:
            starts.append(e if e is not None else starts[-1])
        text = row["text"]

        def fn(j: int, c: int) -> float:
            prefix = text[starts[j]:starts[j] + c]
            ids = self._prefix_index.ids_with_prefix(prefix)
            ids = torch.tensor(sorted(set(ids) | {int(row["t_ids"][j])}), dtype=torch.long)
            return float(torch.logsumexp(logp_TV[j].index_select(0, ids), dim=0))

        return fn

    def _score_row(self, row: dict, logp_TV: Tensor, b: int, rollouts: Rollouts, sampled: Tensor,
                   token_aligned: Tensor, state_aligned: Tensor, state_index: Tensor) -> None:
        seq = row["t_completion"]
        t_lp = logp_TV[torch.arange(len(seq)), torch.tensor(seq, dtype=torch.long)].tolist() if seq else []
        n_text, n_t = row["n_text"], len(row["t_ids"])
        al = align_tokens(row["s_ends"], row["t_ends"], t_lp[:n_t], prefix_logprob=self._prefix_logprob(logp_TV, row),
                          text_matches=row["match"])
        if n_text:
            sampled[b, :n_text] = torch.tensor(al.logprobs)
            token_aligned[b, :n_text] = torch.tensor(al.token_aligned)
            state_aligned[b, :n_text] = torch.tensor(al.state_aligned)
            state_index[b, :n_text] = torch.tensor(al.state_teacher_index)
        if row["eos"]:  # the student's EOS is scored as the teacher's EOS after the same text
            sampled[b, n_text] = t_lp[n_t]
            aligned = row["match"] and all(e is not None for e in row["s_ends"][-1:]) and (
                not row["t_ends"] or row["t_ends"][-1] is not None)
            token_aligned[b, n_text] = aligned
            state_aligned[b, n_text] = aligned
            state_index[b, n_text] = n_t if aligned else -1

    def _distribution_row(self, logp_TV: Tensor, b: int, rollouts: Rollouts, state_index: Tensor, sampled: Tensor,
                          out: _Distributions) -> None:
        """Top-k (and full) teacher distributions mapped onto the student vocabulary for row ``b``."""
        top_ids, top_lp, un_top, un_mass, full = out.top_ids, out.top_lp, out.un_top, out.un_mass, out.full
        k = top_ids.shape[-1]
        n = int(rollouts.completion_mask_BT[b].sum())
        if n == 0:
            return
        ys = rollouts.completion_ids_BT[b, :n].cpu()
        js = state_index[b, :n]
        aligned = js >= 0
        mapped = self.map_V >= 0
        v_s = int(self.map_V.shape[0])
        n_unmapped_s = int((~mapped).sum())
        if bool(aligned.any()):
            lp = logp_TV[js[aligned]]  # [A, V_T]
            s_lp = torch.full((lp.shape[0], v_s), _NEG_INF)
            s_lp[:, mapped] = lp[:, self.map_V[mapped]]
            vals, ids = s_lp.topk(k, dim=-1)
            ids = torch.where(torch.isfinite(vals), ids, torch.full_like(ids, -1))
            top_ids[b, :n][aligned] = ids
            top_lp[b, :n][aligned] = vals
            probs_un = torch.where(self.teacher_unmapped_V, lp.exp(), torch.zeros(()))
            head = probs_un.topk(min(self.unmapped_topk, probs_un.shape[-1]), dim=-1).values
            un_top[b, :n][aligned, :head.shape[-1]] = head
            mass = probs_un.sum(dim=-1).clamp(0.0, 1.0)
            un_mass[b, :n][aligned] = mass
            if full is not None:
                filled = s_lp.clone()
                if n_unmapped_s:  # the unmapped teacher mass, spread over the unmapped student ids [INFER]
                    share = torch.log(mass.clamp(min=1e-12) / n_unmapped_s)
                    filled[:, ~mapped] = share[:, None]
                # normalised (with no unmapped student id the mapped part is renormalised)
                full[b, :n][aligned] = torch.log_softmax(filled, dim=-1)
        if full is not None and bool((~aligned).any()):
            rest = ~aligned
            p_y = sampled[b, :n][rest]
            other = torch.log((-torch.expm1(p_y)).clamp(min=1e-12) / max(v_s - 1, 1))
            block = other[:, None].expand(-1, v_s).clone()
            block.scatter_(1, ys[rest][:, None], p_y[:, None])
            full[b, :n][rest] = block
