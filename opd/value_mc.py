"""Monte-Carlo values of the current student at every state of a rollout batch (GAE-OPD oracle, [INFER]).

For each valid completion position ``t`` of each row — the state ``s_t`` = prompt + ``y_<t`` at which
``y_t`` is chosen — ``K`` continuations are sampled from the student (temperature 1, no filters),
starting at ``s_t`` and running until EOS or the completion length limit, exactly as a rollout would.
Along each continuation the student and teacher are decoded in lockstep (one KV cache each) and the
dense per-state ``KL(π_S ‖ π_T)`` is accumulated with discount γ; :mod:`opd.math.value_targets`
turns the ``K`` sums into ``V̂(s_t)`` and its standard error. Enumeration is out of reach on the case
tasks (vocabulary 17, 8 tokens: ~10^9 sequences), hence Monte Carlo.

Cost: ``K · Σ_b L_b`` continuation rows of at most ``max_new_tokens`` decode steps, two models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from opd.math.value_targets import mc_value
from opd.rollout.forward import _cache_kwarg, _output_cache, position_ids_from_mask
from opd.rollout.generate import sample_from_logprobs

__all__ = ["mc_state_values"]


@torch.no_grad()
def mc_state_values(student: nn.Module, teacher: nn.Module, prompt_ids_BP: Tensor, prompt_mask_BP: Tensor,
                    completion_ids_BT: Tensor, completion_mask_BT: Tensor, *, samples: int, gamma: float,
                    max_new_tokens: int, stop_ids: list[int], teacher_temperature: float = 1.0,
                    max_rows: int = 16384) -> tuple[Tensor, Tensor]:
    """``(V̂_BT, stderr_BT)``: the Monte-Carlo value of the student at each valid state (0 elsewhere).

    ``V̂(s_t) = (1/K) Σ_j Σ_{k ≥ 0} γ^k (−KL(π_S ‖ π_T)(s^{(j)}_{t+k}))`` over ``K = samples`` continuations
    from ``s_t`` sampled from the student at temperature 1; the teacher's logits are divided by
    ``teacher_temperature`` (the feedback's convention). Torch's global RNG draws the tokens.

    Both models run once over the batch's full rows (prompt + completion) with a KV cache; the state
    ``s_t`` of row ``b`` is row ``b``'s cache with the completion columns ``≥ t`` masked out, and its
    first next-token distribution is that forward's output at column ``P − 1 + t``. The continuations
    append after the row (positions follow the mask), and rows that stopped are dropped from the cache.
    ``max_rows`` bounds the continuation rows decoded at once.
    """
    if samples < 1:
        raise ValueError(f"samples (K continuations per state) must be >= 1, got {samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if completion_ids_BT.shape != completion_mask_BT.shape or prompt_ids_BP.shape != prompt_mask_BP.shape:
        raise ValueError("prompt ids/mask and completion ids/mask must have matching shapes")
    device = completion_ids_BT.device
    valid = completion_mask_BT.bool()
    row_S, pos_S = valid.nonzero(as_tuple=True)
    S = row_S.shape[0]
    value_BT = torch.zeros(completion_ids_BT.shape, dtype=torch.float64, device=device)
    stderr_BT = torch.zeros_like(value_BT)
    if S == 0:
        return value_BT, stderr_BT
    ids = torch.cat([prompt_ids_BP, completion_ids_BT], 1)
    mask = torch.cat([prompt_mask_BP.long(), valid.long()], 1)
    row_N, pos_N = row_S.repeat_interleave(samples), pos_S.repeat_interleave(samples)
    returns = torch.empty(S * samples, dtype=torch.float64, device=device)
    stop = torch.tensor(stop_ids, device=device)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    try:
        for lo in range(0, row_N.shape[0], max_rows):
            hi = min(lo + max_rows, row_N.shape[0])
            returns[lo:hi] = _continue(student, teacher, ids, mask, prompt_ids_BP.shape[1], row_N[lo:hi], pos_N[lo:hi],
                                       max_new_tokens, stop, gamma, teacher_temperature)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    v, se = mc_value(returns.view(S, samples))
    value_BT[row_S, pos_S] = v
    stderr_BT[row_S, pos_S] = se
    return value_BT, stderr_BT


class _Branch:
    """One model's KV cache over the continuation rows (rows can be dropped, never added)."""

    def __init__(self, model: nn.Module, ids: Tensor, mask: Tensor, row_N: Tensor, first_col_N: Tensor):
        self.model = model
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        self.cache = _output_cache(out)
        self.cache.batch_select_indices(row_N)
        self.logits = out.logits[row_N, first_col_N]

    def keep(self, sel: Tensor) -> None:
        self.cache.batch_select_indices(sel)

    def step(self, tokens: Tensor, mask: Tensor) -> None:
        positions = mask.sum(dim=1, keepdim=True) - 1
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                         **{_cache_kwarg(self.model): self.cache})
        self.cache = _output_cache(out)
        self.logits = out.logits[:, -1]


def _continue(student: nn.Module, teacher: nn.Module, ids: Tensor, mask: Tensor, P: int, row_N: Tensor,
              pos_N: Tensor, max_new_tokens: int, stop: Tensor, gamma: float, teacher_temperature: float) -> Tensor:
    """``[N]`` discounted sums of ``−KL`` along one continuation of each state ``(row_N, pos_N)``."""
    T = ids.shape[1] - P
    first_col = P - 1 + pos_N
    branches = (_Branch(student, ids, mask, row_N, first_col), _Branch(teacher, ids, mask, row_N, first_col))
    cols = torch.arange(T, device=ids.device)
    mask_N = torch.cat([mask[row_N, :P], (cols[None, :] < pos_N[:, None]).long()], 1)
    remaining = max_new_tokens - pos_N
    acc = torch.zeros(row_N.shape[0], dtype=torch.float64, device=ids.device)
    alive = torch.arange(row_N.shape[0], device=ids.device)
    for k in range(int(remaining.max())):
        logp_s = torch.log_softmax(branches[0].logits.double(), -1)
        logp_t = torch.log_softmax(branches[1].logits.double() / teacher_temperature, -1)
        acc[alive] -= gamma ** k * (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        tok = sample_from_logprobs(logp_s)
        go_on = ~torch.isin(tok, stop) & (k + 1 < remaining[alive])
        if not bool(go_on.any()):
            break
        sel = go_on.nonzero().squeeze(1)
        alive, tok, mask_N = alive[sel], tok[sel], mask_N[sel]
        mask_N = torch.cat([mask_N, torch.ones_like(mask_N[:, :1])], 1)
        for br in branches:
            br.keep(sel)
            br.step(tok, mask_N)
    return acc
