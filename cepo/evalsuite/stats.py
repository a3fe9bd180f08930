"""Mean ± 95% confidence interval of per-question scores, and paired differences.

The interval is a t-interval over per-question means: question i of n has k sampled scores, m_i is
their mean, the estimate is mean(m_i) and its standard error sd(m_i) / sqrt(n) (sample sd, n - 1).
Treating questions as the unit (a cluster-robust standard error with equal cluster sizes) counts
both sources of noise: which questions the benchmark happens to hold and which responses the
sampler happens to draw; k > 1 shrinks the second. The five-benchmark average is the plain mean of
the benchmark means (as the paper's Avg column); its standard error is sqrt(sum se_b^2) / B, with
Welch-Satterthwaite degrees of freedom for the t quantile.

A paired difference between two runs uses d_i = m_A,i - m_B,i over the same questions: the same
t-interval on d, so that the (large) between-question variance cancels.

Pure Python: the t quantile comes from the regularized incomplete beta function, no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float  # the 95% CI is mean ± half_width (nan with fewer than 2 questions)
    se: float
    df: float  # degrees of freedom of the t quantile
    n: int  # questions

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "half_width": self.half_width,
                "se": self.se, "df": self.df, "n": self.n}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (bisection on `t_cdf`, to ~1e-12)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def _interval(mean: float, se: float, df: float, n: int, level: float) -> Estimate:
    if n < 2 or not df > 0:
        return Estimate(mean, math.nan, se, df, n)
    half = t_quantile(0.5 + level / 2.0, df) * se if se > 0 else 0.0
    return Estimate(mean, half, se, df, n)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """t-interval for the mean of `values` (one value per question)."""
    n = len(values)
    if n == 0:
        raise ValueError("no questions to average")
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, 0.0, n)
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return _interval(mean, math.sqrt(var / n), n - 1, n, level)


def question_means(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Per-question mean over its k samples; every question needs at least one score."""
    empty = [q for q, s in scores.items() if len(s) == 0]
    if empty:
        raise ValueError(f"question(s) {empty[:5]} have no scores")
    return {q: math.fsum(s) / len(s) for q, s in scores.items()}


def benchmark_ci(scores: Mapping[str, Sequence[float]], level: float = 0.95) -> Estimate:
    """Mean ± CI of one benchmark from ``{question: [k scores]}``."""
    return mean_ci(list(question_means(scores).values()), level)


def average_ci(estimates: Sequence[Estimate], level: float = 0.95) -> Estimate:
    """The unweighted mean of per-benchmark estimates, benchmarks independent."""
    if not estimates:
        raise ValueError("no benchmarks to average")
    b = len(estimates)
    mean = math.fsum(e.mean for e in estimates) / b
    var_terms = [e.se ** 2 for e in estimates]
    n = sum(e.n for e in estimates)
    if any(math.isnan(v) for v in var_terms):
        return Estimate(mean, math.nan, math.nan, 0.0, n)
    se = math.sqrt(math.fsum(var_terms)) / b
    denom = math.fsum(v * v / e.df for v, e in zip(var_terms, estimates) if v > 0)
    df = math.fsum(var_terms) ** 2 / denom if denom > 0 else float(n - b)
    return _interval(mean, se, df, n, level)


def paired_ci(scores_a: Mapping[str, Sequence[float]], scores_b: Mapping[str, Sequence[float]],
              level: float = 0.95, *, what: str = "benchmark") -> Estimate:
    """Mean ± CI of A - B over the same questions (an error if the question sets differ)."""
    only_a, only_b = sorted(set(scores_a) - set(scores_b)), sorted(set(scores_b) - set(scores_a))
    if only_a or only_b:
        raise ValueError(
            f"{what}: the runs scored different questions ({len(only_a)} only in A, e.g. "
            f"{only_a[:3]}; {len(only_b)} only in B, e.g. {only_b[:3]}); a paired difference "
            "needs the same questions"
        )
    ma, mb = question_means(scores_a), question_means(scores_b)
    return mean_ci([ma[q] - mb[q] for q in sorted(ma)], level)
