"""Memory-efficient distributional losses from hidden states: the lm_head is fused into the loss.

A full-vocabulary loss on ``N = B·T`` tokens naively materialises several ``[N, V]`` fp32 tensors
(logits, log-softmaxes, mixtures, and what autograd keeps for backward). Here the student's
lm_head ``z = h Wᵀ + b`` is applied to chunks of ``chunk_size`` tokens, and the gradient of each
chunk is computed inside the forward pass (the grad-in-forward design of Liger-Kernel's chunked
losses, https://github.com/linkedin/Liger-Kernel; written here from the chain rule, not copied):

    loss = Σ_n w_n · D_n,         D_n = divergence(student support dist, teacher support dist)
    for each chunk c:   z_c = h_c Wᵀ + b   (fp32, a leaf),   dz_c = ∂(Σ_{n∈c} w_n D_n)/∂z_c
                        ∂loss/∂h_c = dz_c W,   ∂loss/∂W += dz_cᵀ h_c,   ∂loss/∂b += Σ_n dz_c[n]

so peak memory is ``O(chunk · V)`` instead of ``O(N · V)``, with no recomputation (backward only
multiplies the stored gradients by the incoming scalar). The per-chunk math reuses
:func:`opd.math.support.support_from_logprobs` and :mod:`opd.math.divergences` — there is no second
implementation of any divergence. The teacher is given as hidden states + lm_head weights
(projected chunk by chunk, no grad), as logits (sliced per chunk), or as top-k log-probs.

The matmuls run in fp32 (inputs are upcast per chunk), which avoids the bf16 logit rounding that
makes fused-JSD gradients 4–23 % off (Liger-Kernel issue #1432, https://github.com/linkedin/Liger-Kernel/issues/1432).

:func:`dense_linear_divergence` is the same computation with the logits materialised (the reference
and the small-vocabulary path); :func:`fused_linear_token_logprobs` (:mod:`opd.math.fused_token`,
re-exported here) gives ``log π(y_n | h_n)`` with a chunked, recomputing backward (route R2's
sampled-token log-probs). Every log-softmax subtracts the row max first (precise at large logits,
:mod:`opd.math.chunking`); a float64 student (hidden states or head) is computed in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from opd.math.chunking import (
    CHUNK_ELEMENTS,
    MIN_CHUNK_TOKENS,
    auto_chunk_size,
    check_chunk,
    check_head,
    compute_dtype,
    log_softmax_inplace,
)
from opd.math.divergences import DivergenceShaping, resolve_divergence
from opd.math.fused_token import fused_linear_token_logprobs
from opd.math.reduce import masked_sum
from opd.math.support import SupportSpec, support_from_logprobs, tempered_log_softmax

__all__ = ["CHUNK_ELEMENTS", "MIN_CHUNK_TOKENS", "DivergenceOptions", "SupportTokens", "auto_chunk_size",
           "dense_linear_divergence", "fused_linear_divergence", "fused_linear_token_logprobs"]

ExtraFn = Callable[[Tensor, Tensor | None, slice], dict[str, Tensor]]


@dataclass(frozen=True)
class DivergenceOptions:
    """What a linear-divergence call computes: ``divergence`` (a name of
    :data:`opd.math.divergences.DIVERGENCES`) with its knobs ``beta``, ``alpha``, ``mu`` and optional
    ``shaping`` (:class:`~opd.math.divergences.DivergenceShaping`), on the support ``spec``, in chunks
    of ``chunk_size`` tokens (``None``: :func:`auto_chunk_size` ``(V)``, about ``CHUNK_ELEMENTS``
    logits per chunk and at least ``MIN_CHUNK_TOKENS`` tokens)."""

    divergence: str = "rkl"
    spec: SupportSpec = field(default_factory=SupportSpec)
    beta: float = 0.5
    alpha: float = 0.1
    mu: float = 0.5
    shaping: DivergenceShaping | None = None
    chunk_size: int | None = None

    def resolve(self) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """``fn(student_logp, teacher_logp, valid)``: the shaped divergence (validates the knobs)."""
        return resolve_divergence(self.divergence, beta=self.beta, alpha=self.alpha, mu=self.mu,
                                  shaping=self.shaping)


@dataclass(frozen=True)
class SupportTokens:
    """The per-token inputs of the ``N`` tokens besides the student's hidden states.

    The teacher's signal in one of three forms: its hidden states with its LM head
    (``teacher_hidden_NH``, ``teacher_weight_VH``, optional ``teacher_bias_V``: projected chunk by
    chunk, no grad), its logits ``teacher_logits_NV`` (sliced per chunk), or its top-k
    (``teacher_topk_ids_NK`` with ``teacher_topk_logprobs_NK``). ``sampled_ids_N`` are the sampled
    tokens (the ``sampled`` supports); ``student_topk_ids_NK`` fix a ``student_topk`` support (see
    ``student_topk_ids`` of :func:`opd.math.support.build_support`; the teacher's log-probs there come
    as the top-k columns).
    """

    teacher_hidden_NH: Tensor | None = None
    teacher_weight_VH: Tensor | None = None
    teacher_bias_V: Tensor | None = None
    teacher_logits_NV: Tensor | None = None
    teacher_topk_ids_NK: Tensor | None = None
    teacher_topk_logprobs_NK: Tensor | None = None
    sampled_ids_N: Tensor | None = None
    student_topk_ids_NK: Tensor | None = None


def fused_linear_divergence(student_hidden_NH: Tensor, student_weight_VH: Tensor, weights_N: Tensor,
                            options: DivergenceOptions, tokens: SupportTokens, *, student_bias_V: Tensor | None = None,
                            extra_fn: ExtraFn | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Chunked ``loss = Σ_n weights_N[n] · D_n`` without ever holding ``[N, V]`` logits.

    ``D_n`` is ``options.divergence`` (see :mod:`opd.math.divergences`, shaped by ``options.shaping``)
    between the student's and the teacher's distributions on the support ``options.spec`` of token
    ``n`` (the teacher and the support's ids from ``tokens``), with the student's logits
    ``h_n Wᵀ + b``. ``weights_N`` are detached per-token weights (mask × gates × reducer weights from
    :func:`opd.math.reduce.reduction_weights`); rows with weight 0 contribute exactly 0 to the loss
    and its gradient.

    Returns ``(loss, per_token_N, extras)``: the fp32 scalar loss (differentiable w.r.t. the student
    hidden states, weight and bias), the detached ``D_n``, and the detached per-token tensors that
    ``extra_fn(student_logp_chunk, teacher_logp_chunk, rows)`` returns for each chunk, concatenated.
    ``extra_fn`` sees the tempered full-vocabulary log-probs of the chunk (the teacher's is ``None``
    when the teacher is given only as top-k) and ``rows``, the chunk's ``slice`` of the ``N`` tokens;
    those chunk tensors are buffers reused by the next chunk, so ``extra_fn`` must not keep them.
    The loss supports one backward pass (no double backward).
    """
    h, W, b = student_hidden_NH, student_weight_VH, student_bias_V
    args = _Args(h, W, b, weights_N, options, tokens, extra_fn)
    needs = (h.requires_grad, W.requires_grad, b is not None and b.requires_grad)
    if not (torch.is_grad_enabled() and any(needs)):
        with torch.no_grad():
            loss, per_token, extras, _ = _run_chunks(args, (False, False, False))
        return loss, per_token, extras
    out: dict = {}
    loss = _FusedLinearDivergence.apply(h, W, b, lambda: _run_chunks(args, needs), out)
    return loss, out["per_token"], out["extras"]


def dense_linear_divergence(student_hidden_NH: Tensor, student_weight_VH: Tensor, weights_N: Tensor,
                            options: DivergenceOptions, tokens: SupportTokens, *, student_bias_V: Tensor | None = None,
                            extra_fn: ExtraFn | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`fused_linear_divergence` with the ``[N, V]`` logits materialised and plain autograd.

    The reference for the chunked path and the right choice for small vocabularies
    (``options.chunk_size`` is ignored).
    """
    args = _Args(student_hidden_NH, student_weight_VH, student_bias_V, weights_N, options, tokens, extra_fn)
    rows, spec, dt = slice(0, student_hidden_NH.shape[0]), args.spec, args.dtype
    z = student_hidden_NH.to(dt) @ student_weight_VH.to(dt).T
    if student_bias_V is not None:
        z = z + student_bias_V.to(dt)
    s_logp = tempered_log_softmax(z, spec.student_temperature)
    per_token, extras = _chunk_divergence(args, s_logp, rows)
    loss = masked_sum(per_token, args.weights)
    return loss, per_token.detach(), {k: v.detach() for k, v in extras.items()}


# ----------------------------------------------------------------------------- internals


class _Args:
    """Checked arguments of the linear-divergence functions (one place for the shape rules)."""

    def __init__(self, h: Tensor, W: Tensor, b: Tensor | None, weights: Tensor, options: DivergenceOptions,
                 tokens: SupportTokens, extra_fn: ExtraFn | None) -> None:
        spec = options.spec
        th, tW, tb = tokens.teacher_hidden_NH, tokens.teacher_weight_VH, tokens.teacher_bias_V
        t_logits = tokens.teacher_logits_NV
        topk_ids, topk_logprobs = tokens.teacher_topk_ids_NK, tokens.teacher_topk_logprobs_NK
        sampled, student_ids = tokens.sampled_ids_N, tokens.student_topk_ids_NK
        check_head("student_hidden_NH", h, "student_weight_VH", W, "student_bias_V", b)
        N, V = h.shape[0], W.shape[0]
        if weights.shape != (N,):
            raise ValueError(f"weights_N has shape {tuple(weights.shape)}; expected ({N},) to match "
                             f"student_hidden_NH {tuple(h.shape)}")
        if (th is None) != (tW is None):
            raise ValueError("teacher_hidden_NH and teacher_weight_VH go together: pass both or neither")
        if th is not None:
            if t_logits is not None:
                raise ValueError("pass the teacher either as teacher_hidden_NH + teacher_weight_VH or as "
                                 "teacher_logits_NV, not both")
            check_head("teacher_hidden_NH", th, "teacher_weight_VH", tW, "teacher_bias_V", tb)
            if th.shape[0] != N or tW.shape[0] != V:
                raise ValueError(f"teacher_hidden_NH {tuple(th.shape)} / teacher_weight_VH {tuple(tW.shape)} "
                                 f"must have N = {N} rows / V = {V} rows like the student's")
        elif tb is not None:
            raise ValueError("teacher_bias_V needs teacher_hidden_NH and teacher_weight_VH")
        if t_logits is not None and t_logits.shape != (N, V):
            raise ValueError(f"teacher_logits_NV has shape {tuple(t_logits.shape)}; expected ({N}, {V})")
        for name, t in (("teacher_topk_ids_NK", topk_ids), ("teacher_topk_logprobs_NK", topk_logprobs)):
            if t is not None and (t.dim() != 2 or t.shape[0] != N):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({N}, K)")
        if sampled is not None and sampled.shape != (N,):
            raise ValueError(f"sampled_ids_N has shape {tuple(sampled.shape)}; expected ({N},)")
        has_teacher_logits = th is not None or t_logits is not None
        if spec.needs_teacher_logits and not has_teacher_logits and student_ids is None:
            raise ValueError(f"support kind {spec.kind!r} needs the teacher's full distribution: pass "
                             "teacher_hidden_NH with teacher_weight_VH, or teacher_logits_NV")
        if not has_teacher_logits and topk_ids is None:
            raise ValueError("no teacher given: pass teacher_hidden_NH with teacher_weight_VH, "
                             "teacher_logits_NV, or teacher_topk_ids_NK with teacher_topk_logprobs_NK")
        if spec.kind in ("sampled", "teacher_topk_sampled") and sampled is None:
            raise ValueError(f"support kind {spec.kind!r} needs the sampled tokens: pass sampled_ids_N")
        chunk_size = check_chunk(options.chunk_size, V)
        self.div_fn = options.resolve()
        # full-support RKL / FKL (also as JSD at β = 1 / 0): closed-form logit gradient per chunk
        # (only for the plain divergence: a shaped one goes through autograd)
        name, beta, shaping = options.divergence, options.beta, options.shaping
        rkl = name == "rkl" or (name == "jsd" and beta == 1.0)
        fkl = name == "fkl" or (name == "jsd" and beta == 0.0)
        plain = shaping is None or shaping.plain
        self.closed_form = ("rkl" if rkl else "fkl" if fkl else None) if (spec.kind == "full" and plain) else None
        self.h, self.W, self.b = h, W, b
        self.dtype = compute_dtype(h, W)  # fp32, or fp64 for a float64 student
        self.weights = weights.detach().to(self.dtype)
        self.spec, self.chunk_size, self.extra_fn = spec, chunk_size, extra_fn
        self.th, self.tb, self.t_buf, self.p_buf = th, tb, None, None
        self.tW = None if tW is None else tW.detach().to(self.dtype)
        self.t_logits, self.topk_ids, self.topk_logprobs, self.sampled = t_logits, topk_ids, topk_logprobs, sampled
        self.student_ids = student_ids


def _chunk_divergence(args: _Args, s_logp: Tensor, rows: slice) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token divergence ``[n]`` from the student's tempered log-probs ``[n, V]`` of tokens ``rows``."""
    spec = args.spec
    t_logp = _teacher_chunk(args, rows)
    sup = support_from_logprobs(
        s_logp, spec,
        sampled_ids=None if args.sampled is None else args.sampled[rows],
        teacher_logp=t_logp,
        teacher_topk_ids=None if args.topk_ids is None else args.topk_ids[rows],
        teacher_topk_logprobs=None if args.topk_logprobs is None else args.topk_logprobs[rows],
        student_topk_ids=None if args.student_ids is None else args.student_ids[rows],
    )
    per_token = args.div_fn(sup.student_logp, sup.teacher_logp, None if spec.kind == "full" else sup.valid)
    return per_token, _chunk_extras(args, s_logp, t_logp, rows)


def _closed_form_chunk(args: _Args, s_logp: Tensor, rows: slice, w_c: Tensor,
                       tau: float) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Full-support reverse or forward KL of a chunk with its logit gradient in closed form.

    With ``S = log softmax(z/τ)``, ``p = exp S``, ``q = exp T`` and ``ℓ = S − T``:
    ``∂RKL/∂z = p (ℓ − RKL) / τ`` and ``∂FKL/∂z = (p − q) / τ`` (module docstring of
    :mod:`opd.math.divergences`), so ``dz = w · ∂D/∂z`` takes a few in-place passes over the chunk
    instead of autograd through the divergence and the log-softmax (the per-token values are the
    same operations as :func:`~opd.math.divergences.reverse_kl` / ``forward_kl`` on finite inputs).
    Returns ``dz = None`` when a value is not finite (``-inf`` / NaN entries): the caller then takes
    the general path, which defines those cases.
    """
    t_logp = _teacher_chunk(args, rows)
    extras = _chunk_extras(args, s_logp, t_logp, rows)  # before the teacher's buffer is overwritten
    scale = (w_c / tau)[:, None]
    # every [chunk, V] value lives in the teacher's buffer or in args.p_buf (allocated once per
    # call): fresh tensors of this size cost page faults on every chunk; s_logp stays intact for
    # the general path
    if args.p_buf is None or args.p_buf.shape[1:] != s_logp.shape[1:] or args.p_buf.shape[0] < s_logp.shape[0]:
        args.p_buf = torch.empty_like(s_logp)
    buf = args.p_buf[: s_logp.shape[0]]
    if args.closed_form == "rkl":
        p = torch.exp(s_logp, out=buf)
        m = t_logp.neg_().add_(s_logp).mul_(p)  # p·ℓ with ℓ = S − T, in the teacher's buffer
        d = m.sum(dim=-1)
        if not bool(torch.isfinite(d).all()):
            return d, extras, None
        return d, extras, m.addcmul_(p, d[:, None], value=-1.0).mul_(scale)  # p·ℓ − p·RKL = p (ℓ − RKL)
    q = torch.exp(t_logp, out=buf)
    d = t_logp.sub_(s_logp).mul_(q).sum(dim=-1)  # Σ q (T − S), in the teacher's buffer
    if not bool(torch.isfinite(d).all()):
        return d, extras, None
    return d, extras, torch.exp(s_logp, out=t_logp).sub_(q).mul_(scale)  # (p − q), in the teacher's buffer


def _chunk_extras(args: _Args, s_logp: Tensor, t_logp: Tensor | None, rows: slice) -> dict[str, Tensor]:
    extras: dict[str, Tensor] = {}
    if args.extra_fn is not None:
        extras = args.extra_fn(s_logp.detach(), t_logp, rows)
        n = s_logp.shape[0]
        for key, value in extras.items():
            if value.shape != (n,):
                raise ValueError(f"extra_fn returned {key!r} with shape {tuple(value.shape)}; expected ({n},)")
    return extras


def _teacher_chunk(args: _Args, rows: slice) -> Tensor | None:
    """The teacher's tempered full log-probs ``[n, V]`` of tokens ``rows`` (None for a top-k teacher)."""
    spec = args.spec
    t_logp = None
    if args.th is not None:
        with torch.no_grad():
            th_c = args.th[rows].detach().to(args.dtype)
            if args.t_buf is not None:  # the chunked path reuses one buffer for every chunk
                t_logp = torch.matmul(th_c, args.tW.T, out=args.t_buf[: th_c.shape[0]])
            else:
                t_logp = th_c @ args.tW.T
            if args.tb is not None:
                t_logp += args.tb.detach().to(args.dtype)
            log_softmax_inplace(t_logp, spec.teacher_temperature)
    elif args.t_logits is not None:
        # the chunk's math runs in the student's compute dtype: a teacher of another dtype is cast
        # here, so the in-place closed-form gradient never mixes dtypes (it would fail in ``dz @ W``)
        t_logp = tempered_log_softmax(args.t_logits[rows].detach().to(args.dtype), spec.teacher_temperature)
    return t_logp


def _run_chunks(args: _Args, needs: tuple[bool, bool, bool]):
    """Loss, per-token values, extras and (grad_h, grad_W, grad_b) of ``Σ w D``, chunk by chunk.

    Every long-lived output is allocated before the loop and filled in place: a small tensor
    allocated per chunk would land inside the hole freed by the chunk's ``[chunk, V]`` temporaries
    and fragment the heap (glibc), growing the resident memory by about one such tensor per chunk.
    """
    h, N, dt = args.h.detach(), args.h.shape[0], args.dtype
    W32 = args.W.detach().to(dt)  # "32": the compute dtype, fp32 unless the student is float64
    b32 = None if args.b is None else args.b.detach().to(dt)
    grad_h = torch.zeros(h.shape, dtype=h.dtype, device=h.device) if needs[0] else None
    grad_W = torch.zeros(W32.shape, dtype=dt, device=h.device) if needs[1] else None
    grad_b = torch.zeros(W32.shape[0], dtype=dt, device=h.device) if needs[2] else None
    tau = args.spec.student_temperature
    loss = torch.zeros((), dtype=dt, device=h.device)
    per_token_N = torch.zeros(N, dtype=dt, device=h.device)
    extras_N: dict[str, Tensor] = {}
    # the student's and the teacher's [chunk, V] logits live in two buffers reused by every chunk
    C = min(args.chunk_size, N)
    s_buf = torch.empty(C, W32.shape[0], dtype=dt, device=h.device)
    args.t_buf = None if args.th is None else torch.empty_like(s_buf)
    for start in range(0, N, args.chunk_size):
        rows = slice(start, min(N, start + args.chunk_size))
        h_c = h[rows].to(dt)
        s_logp = torch.matmul(h_c, W32.T, out=s_buf[: h_c.shape[0]])
        if b32 is not None:
            s_logp += b32
        log_softmax_inplace(s_logp, tau)  # the logits' buffer now holds log softmax(z/τ)
        w_c = args.weights[rows]
        with_grad = any(needs) and bool((w_c != 0).any())
        dz = None
        if with_grad and args.closed_form is not None:
            d_c, e_c, dz = _closed_form_chunk(args, s_logp, rows, w_c, tau)
            loss_c = masked_sum(d_c, w_c)
        if dz is None:
            s_logp.requires_grad_(with_grad)
            with torch.set_grad_enabled(with_grad):
                d_c, e_c = _chunk_divergence(args, s_logp, rows)
                loss_c = masked_sum(d_c, w_c)
        loss += loss_c.detach()
        per_token_N[rows] = d_c.detach()
        for key, value in e_c.items():  # copied out before s_logp's buffer is reused below
            if key not in extras_N:
                extras_N[key] = torch.zeros(N, dtype=value.dtype, device=value.device)
            extras_N[key][rows] = value.detach()
        del d_c, e_c
        if with_grad:
            if dz is None:
                (dz,) = torch.autograd.grad(loss_c, s_logp)
                # chain rule through log_softmax(z/τ): ∂/∂z = (g − softmax(z/τ) · Σ_v g) / τ, in place
                total = dz.sum(dim=-1, keepdim=True)
                dz.sub_(s_logp.detach().exp_().mul_(total))
                if tau != 1.0:
                    dz /= tau
                del total
            if grad_h is not None:
                grad_h[rows] = dz @ W32
            if grad_W is not None:
                grad_W.addmm_(dz.T, h_c)
            if grad_b is not None:
                grad_b += dz.sum(dim=0)
            del dz
        del s_logp, loss_c
    args.t_buf = args.p_buf = None
    grad_W = None if grad_W is None else grad_W.to(args.W.dtype)
    grad_b = None if grad_b is None else grad_b.to(args.b.dtype)
    return loss, per_token_N, extras_N, (grad_h, grad_W, grad_b)


class _FusedLinearDivergence(torch.autograd.Function):
    """Grad-in-forward: ``forward`` computes the gradients; ``backward`` scales them by the scalar."""

    @staticmethod
    def forward(ctx, h, W, b, run, out):  # noqa: ARG004 (h, W, b register the autograd edges)
        loss, per_token, extras, grads = run()
        out["per_token"], out["extras"] = per_token, extras
        ctx.grads = grads
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if bool(grad_loss == 1.0):
            return (*grads, None, None)
        return (*(None if g is None else g * grad_loss.to(g.dtype) for g in grads), None, None)
