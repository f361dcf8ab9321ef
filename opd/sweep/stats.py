"""Statistics over seeds: mean ± Student-t confidence interval, and paired differences.

For ``n`` finite values with mean ``m`` and sample standard deviation ``s`` (divisor ``n − 1``), the
two-sided ``c`` confidence interval of the mean is ``m ± t_{(1+c)/2, n−1} · s / √n`` (Student,
1908). The t quantile is exact for the integer degrees of freedom used here: the two-sided
probability ``A(t | ν) = P(|T| ≤ t)`` has a finite closed form in ``θ = atan(t / √ν)``
(Abramowitz & Stegun 26.7.3–26.7.4), inverted by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Summary", "paired_difference", "summarize", "t_abs_probability", "t_quantile"]


def t_abs_probability(t: float, df: int) -> float:
    """``P(|T| ≤ t)`` for Student's t with ``df`` (a positive integer) degrees of freedom.

    ``θ = atan(t/√ν)``; odd ν: ``(2/π)(θ + sinθ cosθ Σ_{k=0}^{(ν−3)/2} c_k cos^{2k}θ)`` with
    ``c_0 = 1, c_k = c_{k−1}·2k/(2k+1)`` (ν = 1: ``2θ/π``); even ν: ``sinθ Σ_{k=0}^{(ν−2)/2} d_k
    cos^{2k}θ`` with ``d_0 = 1, d_k = d_{k−1}(2k−1)/(2k)``.
    """
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if t <= 0:
        return 0.0
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        total, term = 1.0, 1.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * 2 * k / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    total, term = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| ≤ t) = confidence`` (the two-sided critical value; 0.95, df 4 → 2.776)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    lo, hi = 0.0, 1.0
    while t_abs_probability(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_abs_probability(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, count and CI half-width (``ci``; NaN when n < 2)."""

    mean: float
    sd: float
    n: int
    ci: float
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.ci

    @property
    def high(self) -> float:
        return self.mean + self.ci

    def format(self, digits: int = 3) -> str:
        """``"0.912 ± 0.021"`` (``"0.912"`` when n = 1, ``"–"`` when n = 0)."""
        if self.n == 0:
            return "–"
        if self.n == 1 or math.isnan(self.ci):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.ci:.{digits}f}"

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n, "ci": self.ci, "low": self.low, "high": self.high,
                "confidence": self.confidence}


def summarize(values: Iterable[float | None], confidence: float = 0.95) -> Summary:
    """Mean ± ``t_{(1+c)/2, n−1}·s/√n`` over the finite values (None and NaN are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, confidence)
    mean = sum(xs) / n
    if n == 1:
        return Summary(mean, math.nan, 1, math.nan, confidence)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(mean, sd, n, t_quantile(confidence, n - 1) * sd / math.sqrt(n), confidence)


def paired_difference(a: Mapping[int, float | None], b: Mapping[int, float | None],
                      confidence: float = 0.95) -> Summary:
    """``a − b`` paired by seed (the keys both have with finite values), summarized as :func:`summarize`."""
    common = [k for k in a if k in b and a[k] is not None and b[k] is not None
              and math.isfinite(float(a[k])) and math.isfinite(float(b[k]))]  # type: ignore[arg-type]
    return summarize([float(a[k]) - float(b[k]) for k in sorted(common)], confidence)  # type: ignore[arg-type]
