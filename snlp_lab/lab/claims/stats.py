"""The statistics of the claims ledger, on numbers read from the notebooks' tables (one number per seed, or
per evaluation of a training curve); docs/design.md §4 lists the claims they test.

Over seeds, a mean with its 95% Student-t interval (`mean_ci`); between two sets of models (regularised vs
baseline), Welch's interval for the difference of means (`diff_ci`), divided by the baseline's mean for a
relative change in % (`relative_change`; the denominator's own spread is left out). With one seed there
is no interval. Wins against losses: a two-sided sign test (`sign_test`). Training curves (columns step,
val_ppl and lr_mult, as `experiments.training_curve` reads them): how much validation PPL still changed
at the end (`last_quarter_change`) and before the learning rate's warm-down (`before_warmdown_change`), in %.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95  # confidence level of every interval


@dataclass(frozen=True)
class Estimate:
    """A mean (or difference of means) with its 95% interval; lo and hi are None without one (fewer than
    2 seeds, or a non-finite value). n: seeds, or (n_a, n_b) for a difference."""
    mean: float
    lo: float | None
    hi: float | None
    n: int | tuple

    @property
    def has_interval(self) -> bool:
        return self.lo is not None

    def text(self, unit: str = "%", fmt: str = "+.1f") -> str:
        n = f"n = {self.n[0]} + {self.n[1]} seeds" if isinstance(self.n, tuple) else \
            f"n = {self.n} seed{'s' * (self.n != 1)}"
        ci = f" [{self.lo:{fmt}}, {self.hi:{fmt}}]" if self.has_interval else ", no interval"
        return f"{self.mean:{fmt}}{unit}{ci} ({n})"

    def below(self, x: float) -> bool:
        """The interval lies below x (False without an interval)."""
        return self.has_interval and self.hi < x

    def above(self, x: float) -> bool:
        return self.has_interval and self.lo > x


def mean_ci(values, level: float = LEVEL) -> Estimate:
    """Mean of `values` (one per seed) with its Student-t interval (scipy's one-sample t)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("mean_ci needs at least one value")
    m = float(x.mean())
    if len(x) < 2 or not np.isfinite(x).all():
        return Estimate(m, None, None, len(x))
    if x.std() == 0:  # every seed gave the same number: scipy's interval would be NaN
        return Estimate(m, m, m, len(x))
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(level)
    return Estimate(m, float(ci.low), float(ci.high), len(x))


def diff_ci(a, b, level: float = LEVEL) -> Estimate:
    """mean(a) - mean(b) with Welch's interval (scipy's two-sample t, unequal variances)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("diff_ci needs at least one value on each side")
    d, n = float(a.mean() - b.mean()), (len(a), len(b))
    if min(n) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Estimate(d, None, None, n)
    if a.std() == 0 and b.std() == 0:
        return Estimate(d, d, d, n)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return Estimate(d, float(ci.low), float(ci.high), n)


def relative_change(a, b, level: float = LEVEL) -> Estimate:
    """100 * (mean(a) / mean(b) - 1) in %, with Welch's interval of mean(a) - mean(b) over mean(b)."""
    d = diff_ci(a, b, level)
    base = float(np.mean(b))
    pct = lambda x: None if x is None else 100 * x / base
    return Estimate(pct(d.mean), pct(d.lo), pct(d.hi), d.n)


def pct(x: float) -> str:
    """A change in %, signed, one decimal (never rounded toward anything: '±0.0%' only for an exact 0)."""
    return "±0.0%" if x == 0 else f"{x:+.1f}%"



def sign_test(wins: int, losses: int) -> float:
    """Two-sided p-value of `wins` against `losses` under a fair coin (scipy's binomtest; ties left out)."""
    return stats.binomtest(wins, wins + losses, 0.5).pvalue


# ------------------------------------------------------------------------------------------ training curves
def last_quarter_change(curve) -> float:
    """How much a training curve still fell at the end: the change (%) of validation PPL from the
    evaluation nearest 3/4 of the steps to the last (NaN with fewer than two evaluations). With a
    learning-rate warm-down this includes it; `before_warmdown_change` leaves it out."""
    if len(curve) < 2:
        return float("nan")
    last = curve.iloc[-1]
    at = curve.iloc[(curve.step - 0.75 * last.step).abs().argmin()]
    return float("nan") if at.step == last.step else 100 * (last.val_ppl / at.val_ppl - 1)


def before_warmdown_change(curve) -> float:
    """Whether a training curve had flattened at its peak learning rate: the change (%) of validation PPL
    over an eighth of training (steps = the last evaluation's step) before the warm-down, from the
    evaluation nearest steps/8 before the last one at the peak rate (lr_mult == 1) to that one. The
    warm-down's own fall (nanochat's schedule: the last fifth of the steps, to zero) says how far the rate
    was annealed, not whether the model was still learning. NaN without an lr_mult column or with fewer
    than two evaluations at the peak rate."""
    if "lr_mult" not in curve or len(curve) < 2:
        return float("nan")
    peak = curve[curve.lr_mult == 1.0]  # `train.lr_multiplier` returns exactly 1.0 there
    if len(peak) < 2:
        return float("nan")
    end = peak.iloc[-1]
    start = peak.iloc[(peak.step - (end.step - curve.step.max() / 8)).abs().argmin()]
    return float("nan") if start.step == end.step else 100 * (end.val_ppl / start.val_ppl - 1)
