"""Seeded synthetic failure traces and fits of failure models to real traces.

Every generator takes a ``numpy.random.Generator`` seed and returns a :class:`~gemini_sim.failures.traces.Trace` marked
``synthetic``. ``mtbf_hours`` is always the mean time between failures of ONE machine; a job on N machines sees
failures N times as often.

Kinds are drawn from a category mix. The default mix is Llama 3 405B's 419 unexpected interruptions in 54 days
("The Llama 3 Herd of Models", arXiv:2407.21783), mapped to our kinds in ``traces/llama3_405b.aggregate.json``:
289 hardware, 56 software, 35 network, 39 unknown.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from gemini_sim.errors import UserError, unknown_name
from gemini_sim.failures.traces import KINDS, FailureEvent, Trace

LLAMA3_MIX = {"hardware": 289, "software": 56, "network": 35, "unknown": 39}

# Weibull shape below 1 (a failure is followed by more failures soon after) is what large-system failure logs show;
# Schroeder and Gibson (DSN 2006) report shapes of 0.7-0.8 for LANL's node failures. Our default.
DEFAULT_WEIBULL_SHAPE = 0.75
# Shapes a synthetic trace may take. Below 0.1 nearly every gap is ~0 and the mean rests on a few astronomically long
# ones (at 0.0058 the Weibull mean's Gamma(1 + 1/shape) overflows a float); failure logs show 0.5-1.5.
WEIBULL_SHAPES = (0.1, 100.0)


MAX_FAILURES = 1_000_000  # expected failures in one synthetic trace (a million-failure replay takes minutes)

# Llama 3 405B: 419 unexpected interruptions in 54 days on 2,048 machines (arXiv:2407.21783) -> per-machine MTBF.
DEFAULT_MTBF_HOURS = round(54 * 24 / 419 * 2048)


@dataclass(frozen=True)
class SyntheticSpec:
    model: str  # poisson | weibull | burst
    mtbf_hours: float  # per machine
    days: float
    machines: int
    seed: int = 0
    weibull_shape: float = DEFAULT_WEIBULL_SHAPE
    burst_probability: float = 0.1  # fraction of failure events that take a whole rack/switch
    burst_size: int = 4  # machines lost in a burst (a rack)
    mix: tuple[tuple[str, float], ...] = tuple(LLAMA3_MIX.items())

    def __post_init__(self):
        if self.model not in MODELS:
            raise unknown_name("synthetic model", self.model, MODELS)
        for key in ("mtbf_hours", "days", "weibull_shape"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"synthetic trace: '{key.replace('_', '-')}' must be a positive number, got {value}")
        lo, hi = WEIBULL_SHAPES
        if not lo <= self.weibull_shape <= hi:
            raise UserError(f"synthetic trace: 'weibull-shape' must be in [{lo:g}, {hi:g}], got {self.weibull_shape}")
        if self.machines < 1:
            raise UserError(f"synthetic trace: machines must be >= 1, got {self.machines}")
        expected = self.days * 24 * self.machines / self.mtbf_hours
        if expected > MAX_FAILURES:  # checked before any array is sized by it
            raise UserError(f"synthetic trace: {self.days:g} days of {self.machines} machines with a per-machine MTBF "
                            f"of {self.mtbf_hours:g} h is about {expected:.3g} failures; at most {MAX_FAILURES:,} "
                            "(raise --mtbf-hours or lower --days)")
        if not 0 <= self.burst_probability <= 1:
            raise UserError(f"synthetic trace: burst probability must be in [0, 1], got {self.burst_probability}")
        if not 1 <= self.burst_size <= self.machines:
            raise UserError(f"synthetic trace: burst size must be in [1, {self.machines}], got {self.burst_size}")
        bad = [k for k, _ in self.mix if k not in KINDS]
        if bad:
            raise unknown_name("failure kind", bad[0], KINDS)


def _kinds(rng: np.random.Generator, n: int, mix) -> list[str]:
    names = [k for k, _ in mix]
    weights = np.array([w for _, w in mix], dtype=float)
    return list(rng.choice(names, size=n, p=weights / weights.sum()))


def _interarrivals(rng: np.random.Generator, mean_h: float, horizon_h: float, draw) -> np.ndarray:
    """Arrival times in [0, horizon) from i.i.d. inter-arrival gaps drawn in blocks by ``draw(size)``."""
    times: list[np.ndarray] = []
    t = 0.0
    block = max(16, int(1.2 * horizon_h / mean_h) + 16)
    while t < horizon_h:
        arrivals = t + np.cumsum(draw(block))
        times.append(arrivals)
        t = arrivals[-1]
    out = np.concatenate(times) if times else np.empty(0)
    return out[out < horizon_h]


def generate(spec: SyntheticSpec) -> Trace:
    rng = np.random.default_rng(spec.seed)
    horizon = spec.days * 24.0
    burst = spec.model == "burst"
    # Mean machines lost per event; keep the per-machine failure rate at 1/mtbf.
    per_event = 1 + (spec.burst_size - 1) * spec.burst_probability if burst else 1.0
    mean_gap = spec.mtbf_hours * per_event / spec.machines
    if spec.model == "weibull":
        k = spec.weibull_shape
        scale = mean_gap / math.gamma(1 + 1 / k)
        times = _interarrivals(rng, mean_gap, horizon, lambda n: scale * rng.weibull(k, n))
    else:
        times = _interarrivals(rng, mean_gap, horizon, lambda n: rng.exponential(mean_gap, n))
    kinds = _kinds(rng, len(times), spec.mix)
    if burst:
        is_burst = rng.random(len(times)) < spec.burst_probability
        sizes = np.where(is_burst, spec.burst_size, 1)
    else:
        sizes = np.ones(len(times), dtype=int)
    events = tuple(
        FailureEvent(float(t), str(kind) if size == 1 else "hardware", int(size),
                     "rack/switch burst" if size > 1 else "")
        for t, kind, size in zip(times, kinds, sizes)
    )
    desc = (f"{spec.model}, per-machine MTBF {spec.mtbf_hours:g} h, {spec.machines} machines, "
            f"{spec.days:g} days, seed {spec.seed}")
    return Trace(name=f"synthetic-{spec.model}", events=events, duration_h=horizon, source_machines=spec.machines,
                 synthetic=True, description=desc)


MODELS = ("poisson", "weibull", "burst")


@dataclass(frozen=True)
class FitReport:
    """Fit of inter-arrival times: exponential (Poisson process) and Weibull, with Kolmogorov-Smirnov checks."""

    trace: str
    failures: int
    duration_h: float
    rate_per_hour: float  # maximum-likelihood Poisson rate: failures / duration
    rate_ci95: tuple[float, float]  # exact (chi-square) interval for the Poisson rate
    exponential_ks_pvalue: float
    weibull_shape: float | None  # None when the gaps are (nearly) all equal: the shape is then unbounded
    weibull_scale_h: float | None
    weibull_ks_pvalue: float | None
    per_machine_mtbf_h: float | None  # needs the machine count of the run
    warning: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        lo, hi = self.rate_ci95
        out = [
            f"trace {self.trace}: {self.failures} failures in {self.duration_h:g} h",
            f"  Poisson rate   {self.rate_per_hour:.4g}/h (95% CI {lo:.3g}-{hi:.3g}), job MTBF "
            f"{1 / self.rate_per_hour:.4g} h, KS p={self.exponential_ks_pvalue:.3f}",
            f"  Weibull        shape {self.weibull_shape:.3g}, scale {self.weibull_scale_h:.4g} h, "
            f"KS p={self.weibull_ks_pvalue:.3f}" if self.weibull_shape is not None
            else "  Weibull        no fit (the gaps between failures are all equal)",
        ]
        if self.per_machine_mtbf_h:
            out.append(f"  per-machine MTBF {self.per_machine_mtbf_h:.4g} h")
        if self.warning:
            out.append(f"  note: {self.warning}")
        return out


def fit_trace(trace: Trace, machines: int | None = None) -> FitReport:
    """Fit rate and shape to a trace's inter-arrival times with scipy.stats."""
    from scipy import stats  # here, not at the top: scipy.stats costs every command 0.5 s to import

    n = len(trace.events)
    if n < 2:
        raise UserError(f"trace {trace.name}: need at least 2 failures to fit a model, got {n}")
    if not trace.duration_h > 0:  # every failure at hour 0 and no duration_hours: no time to spread a rate over
        raise UserError(f"trace {trace.name}: its {n} failures are all at hour 0 and it lasts 0 h, so no rate can be "
                        "fitted (give the job's length as '# duration_hours: H' above the header)")
    gaps = np.diff(np.concatenate([[0.0], trace.times_h]))
    gaps = np.maximum(gaps, 1e-6)  # simultaneous events: keep the likelihood finite
    rate = n / trace.duration_h
    # Exact Poisson interval for the count, scaled by the exposure time.
    lo = stats.chi2.ppf(0.025, 2 * n) / 2 / trace.duration_h
    hi = stats.chi2.ppf(0.975, 2 * (n + 1)) / 2 / trace.duration_h
    ks_exp = stats.kstest(gaps, "expon", args=(0, gaps.mean())).pvalue
    notes = []
    if n < 20:
        notes.append(f"only {n} failures: the fit is weak (KS p-values computed with fitted parameters are "
                     f"optimistic, and the interval on the rate is wide)")
    shape = scale = ks_wb = None
    if np.ptp(gaps) > 1e-9 * gaps.mean():  # equal gaps: the Weibull likelihood grows without bound in the shape
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fitted, _, fitted_scale = stats.weibull_min.fit(gaps, floc=0)
            p_wb = stats.kstest(gaps, "weibull_min", args=(fitted, 0, fitted_scale)).pvalue
        shape, scale, ks_wb = float(fitted), float(fitted_scale), float(p_wb)
        if caught:
            notes.append("the Weibull fit is numerically unreliable (gaps nearly equal)")
    else:
        notes.append("the gaps between failures are all equal, so no Weibull shape fits them")
    machines = machines or trace.source_machines
    return FitReport(trace.name, n, trace.duration_h, rate, (lo, hi), float(ks_exp), shape, scale, ks_wb,
                     machines / rate if machines else None, "; ".join(notes))


def for_cluster(model: str, machines: int, machines_per_rack: int | None = None, *,
                mtbf_hours: float = DEFAULT_MTBF_HOURS, days: float = 30.0, seed: int = 0,
                burst_size: int | None = None, **options) -> Trace:
    """A synthetic trace for a cluster of ``machines``: a burst takes ``burst_size`` machines, by default a rack
    (``machines_per_rack``), else 4, never more than the cluster. ``options``: the other :class:`SyntheticSpec`
    fields (``weibull_shape``, ``burst_probability``, ``mix``)."""
    burst = burst_size or machines_per_rack or 4
    spec = SyntheticSpec(model, mtbf_hours, days, machines, seed, burst_size=min(burst, machines), **options)
    return generate(spec)
