"""Bias lab: exact bias and variance of the OPD temporal-credit estimators (``opd bias-lab``).

A tiny autoregressive problem is solved exactly, without sampling. One prompt, sequences of
fixed length ``H`` over a vocabulary of ``V`` tokens; student and teacher are **tabular**: one
row of seeded random logits per prefix (``Σ_{t<H} V^t`` rows). Every one of the ``V^H``
sequences is enumerated, so expectations are finite sums.

Ground truth (computed here from the definitions, independently of :mod:`opd.math`):

* ``∇J``, the gradient w.r.t. the student table of the sequence reverse KL
  ``J(θ) = Σ_y π_θ(y) (log π_θ(y) − log π_T(y))`` (autograd on the enumerated sum);
* the exact values ``V^π_γ(s) = Σ_v π(v|s) (r(s,v) + γ V^π_γ(s v))`` and
  ``Q^π_γ(s,v)`` by backward recursion on the prefix tree, visitation probabilities ``P(s_t)``;
* the proper targets of the biased estimators: the token-level reverse-KL gradient
  ``Σ_t E_{s_t}[∇RKL_t(s_t)]`` (what immediate credit and route R1 estimate), the
  forward-KL-at-visited-states gradient ``Σ_t E_{s_t}[∇FKL(π_T‖π_θ)(s_t)]`` (what k3-as-loss
  estimates, Tang & Munos arXiv 2506.09477), and the discounted policy-gradient vector
  ``PG_γ = −Σ_t E_{s_t} Σ_v π(v|s_t) Q^π_γ(s_t,v) ∇log π(v|s_t)`` (what discounted returns and
  GAE(γ) estimate: the usual estimator that drops the γ^t state weighting; PG_1 = ∇J).

Estimators (their coefficients are built by calling :mod:`opd.math` — rewards, credit,
divergences, regularizers, policy_gradient — on the enumerated ``[num_sequences, H]`` tensors:
the lab tests the library's code, it is not a second implementation). For each estimator with
per-sequence surrogate loss ``L(y)`` (e.g. ``Σ_t −sg[A_t] log π(y_t|s_t)``), ``g(y) = ∇L(y)``,
the lab reports ``E[g] = Σ_y π(y) g(y)``, its relative L2 error against ``∇J`` and against its
proper target, and the variance ``E‖g − E g‖²``. Group baselines are evaluated on the ``V^{H·G}``
joint draws of ``G`` independent samples with the group-averaged loss ``(1/G) Σ_i L(y^i)``.

Bias boundaries: docs/methods.md §3.2–3.3 (derivations [INFER]); Liu, Jiang & Fu,
https://yuqianfu.notion.site/policy-gradient-bias-and-variance-of-opd ; survey arXiv 2606.22793.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from opd.math.credit import (batch_mean_baseline, closed_form_value, discounted_returns,
                             gae_advantages, temporal_credit)
from opd.math.divergences import reverse_kl
from opd.math.policy_gradient import pg_loss
from opd.math.regularizers import sampled_kl
from opd.math.rewards import log_ratio_reward

DTYPE = torch.float64


@dataclass
class EstimatorResult:
    name: str
    route: str                    # "R2" (sampled-token PG), "R1" (distributional), "loss" (k-estimator)
    rel_err_grad_j: float         # ‖E g − ∇J‖ / ‖∇J‖
    target: str | None            # proper target when it is not ∇J
    rel_err_target: float | None  # ‖E g − target‖ / ‖target‖ (absolute error when ‖target‖ = 0)
    variance: float               # E‖g − E g‖²
    mean_norm: float              # ‖E g‖
    samples: int = 1              # G for group estimators (g averages G samples)


@dataclass
class BiasLabResult:
    vocab: int
    horizon: int
    seed: int
    gammas: list[float]
    lams: list[float]
    group_size: int
    teacher_equal_after_first: bool
    num_sequences: int
    objective: float              # J(θ), the sequence reverse KL
    grad_norm: float              # ‖∇J‖
    estimators: list[EstimatorResult]
    skipped: list[str]
    runtime_s: float
    expectations: dict[str, Tensor] = field(default_factory=dict, repr=False)  # name → E[g]
    targets: dict[str, Tensor] = field(default_factory=dict, repr=False)       # name → vector
    # the tables: row = prefix, ordered by length, then as a base-V number (first token most
    # significant); [Σ_{t<H} V^t, V] student logits and teacher log-probs
    student_logits: Tensor | None = field(default=None, repr=False)
    teacher_logp: Tensor | None = field(default=None, repr=False)

    def get(self, name: str) -> EstimatorResult:
        for e in self.estimators:
            if e.name == name:
                return e
        raise KeyError(f"no estimator {name!r}; have {[e.name for e in self.estimators]}")


# ----------------------------------------------------------------------------- the problem


class _Problem:
    """Tabular student/teacher over all prefixes and the enumeration of all sequences."""

    def __init__(self, vocab: int, horizon: int, seed: int, logit_scale: float,
                 teacher_equal_after_first: bool):
        V, H = vocab, horizon
        self.V, self.H = V, H
        self.offsets = [sum(V ** j for j in range(t)) for t in range(H + 1)]  # depth t rows start
        P = self.offsets[H]
        gen = torch.Generator().manual_seed(seed)
        self.theta = (logit_scale * torch.randn(P, V, generator=gen, dtype=DTYPE))
        teacher = logit_scale * torch.randn(P, V, generator=gen, dtype=DTYPE)
        if teacher_equal_after_first:
            teacher[1:] = self.theta[1:]  # π_T = π_θ at every prefix of depth ≥ 1
        self.teacher_logp = torch.log_softmax(teacher, -1)
        n = torch.arange(V ** H)
        # sequence n written in base V (first token = most significant digit); its prefix of
        # length t is n // V^(H−t), a local index at depth t
        self.ids_NH = torch.stack([(n // V ** (H - 1 - t)) % V for t in range(H)], 1)
        self.prefix_NH = torch.stack([self.offsets[t] + n // V ** (H - t) for t in range(H)], 1)

    def depth(self, table: Tensor, t: int) -> Tensor:
        return table[self.offsets[t]:self.offsets[t + 1]]

    def tree(self, theta: Tensor, gamma: float):
        """Per depth: student log-probs, teacher log-probs, visitation P(s_t) and Q^π_γ(s_t, ·)."""
        logp = [torch.log_softmax(self.depth(theta, t), -1) for t in range(self.H)]
        tlogp = [self.depth(self.teacher_logp, t) for t in range(self.H)]
        visit = [torch.ones(1, dtype=DTYPE)]
        for t in range(self.H - 1):
            visit.append((visit[t][:, None] * logp[t].exp()).reshape(-1))
        q: list[Tensor] = [None] * self.H  # type: ignore[list-item]
        v_next = torch.zeros(self.V ** self.H, dtype=DTYPE)
        for t in range(self.H - 1, -1, -1):
            q[t] = (tlogp[t] - logp[t]) + gamma * v_next.reshape(-1, self.V)
            v_next = (logp[t].exp() * q[t]).sum(-1)
        return logp, tlogp, visit, q

    def values(self, gamma: float) -> Tensor:
        """Exact ``V^π_γ`` as a ``[P]`` table over prefixes (reward convention)."""
        logp, _, _, q = self.tree(self.theta, gamma)
        return torch.cat([(lp.exp() * qt).sum(-1) for lp, qt in zip(logp, q)])


def _grad(scalar_fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(scalar_fn(th), th)
    return g


def _ground_truth(pb: _Problem, gammas: Sequence[float]) -> tuple[float, dict[str, Tensor]]:
    """``J``, ``∇J`` and the proper targets, from the definitions (no opd.math)."""
    def seq_kl(th: Tensor) -> Tensor:
        logp = torch.log_softmax(th[pb.prefix_NH], -1).gather(-1, pb.ids_NH[..., None])[..., 0]
        tlogp = pb.teacher_logp[pb.prefix_NH].gather(-1, pb.ids_NH[..., None])[..., 0]
        return (logp.sum(1).exp() * (logp - tlogp).sum(1)).sum()

    def token_level(kind: str) -> Callable[[Tensor], Tensor]:
        def fn(th: Tensor) -> Tensor:
            logp, tlogp, visit, _ = pb.tree(th, 1.0)
            total = th.new_zeros(())
            for lp, tp, w in zip(logp, tlogp, visit):
                kl = ((lp.exp() * (lp - tp)) if kind == "rkl" else (tp.exp() * (tp - lp))).sum(-1)
                total = total + (w.detach() * kl).sum()
            return total
        return fn

    def pg(gamma: float) -> Callable[[Tensor], Tensor]:
        def fn(th: Tensor) -> Tensor:
            logp, _, visit, q = pb.tree(th, gamma)
            return -sum((w.detach()[:, None] * (lp.exp() * qt).detach() * lp).sum()
                        for lp, w, qt in zip(logp, visit, q))
        return fn

    targets = {"∇J": _grad(seq_kl, pb.theta),
               "Σ_t E∇RKL_t": _grad(token_level("rkl"), pb.theta),
               "Σ_t E∇FKL_t": _grad(token_level("fkl"), pb.theta),
               "0": torch.zeros_like(pb.theta)}
    for g in gammas:
        targets[f"PG_γ={g:g}"] = _grad(pg(g), pb.theta)
    return float(seq_kl(pb.theta)), targets


# ----------------------------------------------------------------------------- evaluation


def _moments(pb: _Problem, prob_M: Tensor, ids_MGH: Tensor, prefix_MGH: Tensor,
             surrogate: Callable[[Tensor], Tensor]) -> tuple[Tensor, float]:
    """Exact ``E[g]`` (a ``[P, V]`` table) and ``E‖g − E g‖²`` for ``g(Y) = ∇ surrogate(Y)``.

    ``surrogate(logp_MGHV)`` returns the ``[M]`` losses of the ``M`` draws; draw ``m`` may only
    depend on ``logp[m]``. The student logits at each visited prefix are leaves ``Z[m,i,t]``,
    so one backward gives every per-draw, per-step logit gradient; a row of the table is
    touched by draw ``m`` at the positions where it visits that prefix.
    """
    Z = pb.theta[prefix_MGH].clone().requires_grad_(True)
    loss_M = surrogate(torch.log_softmax(Z, -1))
    (gz,) = torch.autograd.grad(loss_M.sum(), Z)
    V = pb.V
    mean = torch.zeros_like(pb.theta).index_add_(
        0, prefix_MGH.reshape(-1), (prob_M[:, None, None, None] * gz).reshape(-1, V))
    G = prefix_MGH.shape[1]
    second = prob_M.new_zeros(())
    for i in range(G):  # ‖g‖² = Σ_{i,j} Σ_t [same prefix] ⟨∂_i, ∂_j⟩ (depths never collide)
        for j in range(G):
            same = (prefix_MGH[:, i] == prefix_MGH[:, j]).to(DTYPE)
            second = second + (prob_M * (same * (gz[:, i] * gz[:, j]).sum(-1)).sum(-1)).sum()
    return mean, max(float(second - (mean * mean).sum()), 0.0)


def _pg_surrogate(ids_MGH: Tensor, adv_MGH: Tensor) -> Callable[[Tensor], Tensor]:
    """Route R2: ``(1/G) Σ_i Σ_t −sg[A_t] log π(y_t|s_t)``, via :func:`opd.math.policy_gradient.pg_loss`."""
    M, G, H = ids_MGH.shape

    def fn(logp: Tensor) -> Tensor:
        lp = logp.gather(-1, ids_MGH[..., None])[..., 0]
        loss, _ = pg_loss(lp.reshape(M * G, H), adv_MGH.reshape(M * G, H))
        return loss.reshape(M, G, H).sum((1, 2)) / G
    return fn


def run_bias_lab(vocab: int = 3, horizon: int = 4, seed: int = 0,
                 gammas: Sequence[float] = (0.5, 0.9), lams: Sequence[float] = (0.0, 0.5, 0.95),
                 group_size: int = 2, *, teacher_equal_after_first: bool = False,
                 logit_scale: float = 1.0, max_joint_samples: int = 2 ** 18) -> BiasLabResult:
    """Exact bias/variance of every estimator on one seeded tabular problem (see module doc).

    Runs single-threaded (the previous torch thread count is restored on return): the tensors
    are tiny, and intra-op threads only add overhead (30x slower on a loaded 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(vocab, horizon, seed, gammas, lams, group_size, teacher_equal_after_first,
                    logit_scale, max_joint_samples)
    finally:
        torch.set_num_threads(threads)


def _run(vocab: int, horizon: int, seed: int, gammas: Sequence[float], lams: Sequence[float],
         group_size: int, teacher_equal_after_first: bool, logit_scale: float,
         max_joint_samples: int) -> BiasLabResult:
    if not 2 <= vocab <= 5 or not 1 <= horizon <= 5:
        raise ValueError(f"need 2 <= vocab <= 5 and 1 <= horizon <= 5, got vocab={vocab}, "
                         f"horizon={horizon}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    for g in (*gammas, *lams):
        if not 0.0 <= g <= 1.0:
            raise ValueError(f"gammas and lams must lie in [0, 1], got {g}")
    start = time.perf_counter()
    pb = _Problem(vocab, horizon, seed, logit_scale, teacher_equal_after_first)
    gammas, lams = list(gammas), list(lams)
    objective, targets = _ground_truth(pb, sorted({0.0, 1.0, *gammas}))
    results: list[EstimatorResult] = []
    expectations: dict[str, Tensor] = {}
    skipped: list[str] = []
    grad_j = targets["∇J"]

    def rel(a: Tensor, b: Tensor) -> float:
        nb = float(b.norm())
        return float((a - b).norm()) / nb if nb > 0 else float((a - b).norm())

    def record(name: str, route: str, mean: Tensor, var: float, target: str | None,
               samples: int = 1) -> None:
        expectations[name] = mean
        results.append(EstimatorResult(
            name, route, rel(mean, grad_j), target,
            None if target is None else rel(mean, targets[target]), var, float(mean.norm()),
            samples))

    # ---- single-sample estimators on the N = V^H enumerated sequences
    N, H = pb.ids_NH.shape
    ids, prefix = pb.ids_NH[:, None], pb.prefix_NH[:, None]      # G = 1
    zs = pb.theta[pb.prefix_NH]
    logp_NHV = torch.log_softmax(zs, -1)
    tlogp_NHV = pb.teacher_logp[pb.prefix_NH]
    logp_NH = logp_NHV.gather(-1, pb.ids_NH[..., None])[..., 0]
    tlogp_NH = tlogp_NHV.gather(-1, pb.ids_NH[..., None])[..., 0]
    prob_N = logp_NH.sum(1).exp()
    mask = torch.ones(N, H, dtype=torch.bool)
    r = log_ratio_reward(logp_NH, tlogp_NH, mask_BT=mask)
    rkl = reverse_kl(logp_NHV, tlogp_NHV)                     # RKL_t at the visited states
    neg_rkl = closed_form_value(rkl)                          # vOPD value −RKL_t
    v_exact = {g: pb.values(g)[pb.prefix_NH] for g in {1.0, *gammas}}
    gen = torch.Generator().manual_seed(seed + 1)
    v_random = (3.0 * torch.randn(pb.theta.shape[0], generator=gen, dtype=DTYPE))[pb.prefix_NH]

    def r2(name: str, adv: Tensor, target: str | None = None) -> None:
        mean, var = _moments(pb, prob_N, ids, prefix, _pg_surrogate(ids, adv[:, None]))
        record(name, "R2", mean, var, target)

    def credit(**kw) -> Tensor:
        return temporal_credit(r, mask, **kw)

    rtg = credit(kind="return_to_go")
    r2("immediate", credit(kind="immediate"), "Σ_t E∇RKL_t")
    r2("return-to-go", rtg)
    r2("sequence (E-seq: A_t = G_1)", rtg[:, :1].expand(N, H))
    for g in gammas:
        r2(f"discounted γ={g:g}", credit(kind="discounted", gamma=g), f"PG_γ={g:g}")
    r2("rtg − constant", credit(kind="return_to_go", baseline="value",
                                values_BT=torch.full((N, H), 1.0, dtype=DTYPE)))
    r2("rtg − V^π (exact)", credit(kind="return_to_go", baseline="value", values_BT=v_exact[1.0]))
    r2("rtg − b(s) (random state fn)", credit(kind="return_to_go", baseline="value",
                                              values_BT=v_random))
    r2("rtg − (−RKL_t)", credit(kind="return_to_go", baseline="value", values_BT=neg_rkl))
    r2("vOPD (GAE γ=0, V=−RKL_t)",
       gae_advantages(r, neg_rkl, mask, gamma=0.0, lam=1.0)[0], "Σ_t E∇RKL_t")
    # E-RB: A_t = r_t − Σ_{t'>t} RKL_{t'} (future sampled ratios replaced by their means)
    future_neg_rkl = discounted_returns(neg_rkl, mask, 1.0) - neg_rkl
    r2("E-RB (r_t − Σ_{t'>t} RKL_t')", r + future_neg_rkl)
    r2("length-normalised rtg (MiniLLM)", credit(kind="return_to_go", length_normalize=True), None)
    for lam in sorted({*lams, 1.0}):
        r2(f"GAE γ=1 λ={lam:g} V=exact", credit(kind="gae", gamma=1.0, lam=lam,
                                                  values_BT=v_exact[1.0]))
    for g in gammas:
        for lam in sorted({*lams, 1.0}):
            r2(f"GAE γ={g:g} λ={lam:g} V=exact_γ", credit(kind="gae", gamma=g, lam=lam,
                                                         values_BT=v_exact[g]), f"PG_γ={g:g}")
    for lam in [x for x in lams if x < 1.0]:
        r2(f"GAE γ=1 λ={lam:g} V≡0", credit(kind="gae", gamma=1.0, lam=lam,
                                             values_BT=torch.zeros(N, H, dtype=DTYPE)))
        r2(f"GAE γ=1 λ={lam:g} V=−RKL_t", credit(kind="gae", gamma=1.0, lam=lam, values_BT=neg_rkl))
    r2("GAE γ=1 λ=1 V=random", credit(kind="gae", gamma=1.0, lam=1.0, values_BT=v_random))

    # ---- route R1 and k-estimators used as losses (gradient through the student at fixed y)
    t_ids = pb.teacher_logp[pb.prefix_NH][:, None]                      # [N,1,H,V]
    t_sampled = tlogp_NH[:, None]

    def loss_row(name: str, route: str, fn: Callable[[Tensor], Tensor], target: str) -> None:
        mean, var = _moments(pb, prob_N, ids, prefix, fn)
        record(name, route, mean, var, target)

    loss_row("route-1 full-vocab RKL", "R1",
             lambda lp: reverse_kl(lp, t_ids).sum((1, 2)), "Σ_t E∇RKL_t")
    long_adv = (rtg - r)[:, None]                                       # G_{t+1}: future return
    hybrid_pg = _pg_surrogate(ids, long_adv)
    loss_row("MiniLLM hybrid (R1 + future rtg)", "R1+R2",
             lambda lp: reverse_kl(lp, t_ids).sum((1, 2)) + hybrid_pg(lp), "∇J")

    def k_loss(est: str) -> Callable[[Tensor], Tensor]:
        def fn(lp: Tensor) -> Tensor:
            s = lp.gather(-1, ids[..., None])[..., 0]
            return sampled_kl(s.reshape(N, H), t_sampled.reshape(N, H), estimator=est).sum(1)
        return fn

    loss_row("k1 as loss", "loss", k_loss("k1"), "0")
    loss_row("k2 as loss", "loss", k_loss("k2"), "Σ_t E∇RKL_t")
    loss_row("k3 as loss", "loss", k_loss("k3"), "Σ_t E∇FKL_t")

    # ---- group baselines: all N^G joint draws of G independent samples of the prompt
    G = group_size
    M = N ** G
    if M > max_joint_samples:
        skipped.append(f"group baselines (G={G}): {N}^{G} = {M} joint samples > cap "
                       f"{max_joint_samples}; use a smaller vocab/horizon/group size")
    else:
        m = torch.arange(M)
        members = torch.stack([(m // N ** (G - 1 - i)) % N for i in range(G)], 1)  # [M, G]
        ids_g, prefix_g = pb.ids_NH[members], pb.prefix_NH[members]               # [M, G, H]
        prob_M = prob_N[members].prod(1)
        r_g = r[members].reshape(M * G, H)
        mask_g = torch.ones(M * G, H, dtype=torch.bool)
        group_index = torch.arange(M).repeat_interleave(G)
        rtg_g = temporal_credit(r_g, mask_g, kind="return_to_go")
        # batch_mean_baseline averages each column over the rows of one batch; laying the draws
        # out as [G, M·H] makes each column one (draw, position) pair: one batch per draw.
        batch_b = batch_mean_baseline(rtg_g.reshape(M, G, H).transpose(0, 1).reshape(G, M * H),
                                      torch.ones(G, M * H, dtype=torch.bool))
        batch_b = batch_b.reshape(G, M, H).transpose(0, 1)
        advs = {
            f"rtg, mean of G={G} (no baseline)": rtg_g,
            f"rtg − batch mean (incl. self, G={G})": rtg_g.reshape(M, G, H) - batch_b,
            f"rtg − group mean (incl. self, G={G})": temporal_credit(
                r_g, mask_g, kind="return_to_go", baseline="group_mean", group_index_B=group_index),
            f"rtg − leave-one-out (G={G})": temporal_credit(
                r_g, mask_g, kind="return_to_go", baseline="leave_one_out",
                group_index_B=group_index),
        }
        targets[f"(1−1/G)∇J, G={G}"] = (1.0 - 1.0 / G) * grad_j
        for name, adv in advs.items():
            mean, var = _moments(pb, prob_M, ids_g, prefix_g,
                                 _pg_surrogate(ids_g, adv.reshape(M, G, H)))
            tgt = f"(1−1/G)∇J, G={G}" if "incl. self" in name else None
            record(name, "R2", mean, var, tgt, samples=G)

    return BiasLabResult(vocab, horizon, seed, gammas, lams, group_size, teacher_equal_after_first,
                         N, objective, float(grad_j.norm()), results, skipped,
                         time.perf_counter() - start, expectations, targets, pb.theta,
                         pb.teacher_logp)


# ----------------------------------------------------------------------------- output


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2e}"


def format_table(result: BiasLabResult) -> str:
    """Markdown table: relative bias vs ∇J, vs the proper target, and variance per estimator."""
    lines = [
        f"bias lab: vocab={result.vocab} horizon={result.horizon} seed={result.seed} "
        f"sequences={result.num_sequences} group_size={result.group_size}"
        + (" teacher=student after the first token" if result.teacher_equal_after_first else ""),
        f"J = {result.objective:.6g}   ‖∇J‖ = {result.grad_norm:.6g}   "
        f"runtime {result.runtime_s:.2f} s   (exact enumeration, float64)",
        "",
        "| estimator | route | ‖Eg−∇J‖/‖∇J‖ | target | ‖Eg−target‖/‖target‖ | E‖g−Eg‖² |",
        "|---|---|---|---|---|---|",
    ]
    for e in result.estimators:
        lines.append(f"| {e.name} | {e.route} | {_fmt(e.rel_err_grad_j)} | {e.target or '—'} | "
                     f"{_fmt(e.rel_err_target)} | {e.variance:.4g} |")
    for s in result.skipped:
        lines.append(f"| skipped: {s} | | | | | |")
    lines += ["", "targets: ∇J = sequence reverse-KL gradient; Σ_t E∇RKL_t / Σ_t E∇FKL_t = "
              "token-level KL gradients at the visited states (state distribution held fixed); PG_γ = "
              "−Σ_t E[Q^π_γ(s_t,y_t) ∇log π(y_t|s_t)] (discounted PG without γ^t weighting); "
              "group rows average the G samples' losses."]
    return "\n".join(lines)


def to_json(result: BiasLabResult) -> dict:
    """JSON-serialisable summary (tensors left out; non-finite numbers as strings)."""
    skip = ("expectations", "targets", "student_logits", "teacher_logp")
    d = {k: v for k, v in asdict(result).items() if k not in skip}
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(d)


def main(argv: list[str] | None = None) -> int:
    """``opd bias-lab``: run the lab, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(prog="opd bias-lab", description=(
        "Exact bias and variance of OPD temporal-credit estimators on a tiny tabular problem."))
    p.add_argument("--vocab", type=int, default=3, help="vocabulary size, 2..5 (default 3)")
    p.add_argument("--horizon", type=int, default=4, help="sequence length, 1..5 (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=float, action="append",
                   help="discount for the discounted / GAE rows (repeatable; default 0.5 0.9)")
    p.add_argument("--lam", type=float, action="append",
                   help="GAE λ (repeatable; default 0 0.5 0.95)")
    p.add_argument("--group-size", type=int, default=2, help="G for group baselines (default 2)")
    p.add_argument("--teacher-equal-after-first", action="store_true",
                   help="teacher = student after the first token (immediate credit becomes exact)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = p.parse_args(argv)
    try:
        res = run_bias_lab(a.vocab, a.horizon, a.seed, tuple(a.gamma or (0.5, 0.9)),
                           tuple(a.lam or (0.0, 0.5, 0.95)), a.group_size,
                           teacher_equal_after_first=a.teacher_equal_after_first)
    except ValueError as exc:
        p.error(str(exc))
    print(format_table(res))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(res), fh, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
