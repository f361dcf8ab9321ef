"""Calls the linear-divergence functions with flat keyword arguments (as the tests write them):
``spec=``, ``divergence=``, the knobs and ``chunk_size=`` go into a
:class:`~opd.math.fused.DivergenceOptions`, ``teacher_*=``, ``sampled_ids_N=`` and
``student_topk_ids_NK=`` into a :class:`~opd.math.fused.SupportTokens`, the rest as they are."""

from __future__ import annotations

from dataclasses import fields

from opd.math.fused import DivergenceOptions, SupportTokens

OPTION_KEYS = {f.name for f in fields(DivergenceOptions)}
TOKEN_KEYS = {f.name for f in fields(SupportTokens)}


def call(fn, h, W, w, **kw):
    options = DivergenceOptions(**{k: kw.pop(k) for k in list(kw) if k in OPTION_KEYS})
    tokens = SupportTokens(**{k: kw.pop(k) for k in list(kw) if k in TOKEN_KEYS})
    return fn(h, W, w, options, tokens, **kw)
