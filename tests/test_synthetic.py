import json

import numpy as np
import pytest
from scipy import stats

from gemini_sim.failures import synthetic
from gemini_sim.errors import UserError
from gemini_sim.failures.synthetic import SyntheticSpec, fit_trace, generate


def test_seeded_and_reproducible():
    spec = SyntheticSpec("poisson", 1000, 30, 64, seed=7)
    assert generate(spec).events == generate(spec).events
    assert generate(spec).events != generate(SyntheticSpec("poisson", 1000, 30, 64, seed=8)).events
    assert generate(spec).synthetic


def test_poisson_rate_matches_per_machine_mtbf():
    spec = SyntheticSpec("poisson", mtbf_hours=500, days=400, machines=50, seed=1)
    t = generate(spec)
    expected = 400 * 24 * 50 / 500
    # 99.9% Poisson interval on the count
    lo, hi = stats.poisson.ppf([0.0005, 0.9995], expected)
    assert lo <= len(t.events) <= hi
    gaps = np.diff(t.times_h)
    assert stats.kstest(gaps, "expon", args=(0, 500 / 50)).pvalue > 1e-3


def test_weibull_gaps_have_the_right_mean_and_fit_recovers_the_shape():
    spec = SyntheticSpec("weibull", mtbf_hours=200, days=2000, machines=20, seed=3, weibull_shape=0.6)
    t = generate(spec)
    gaps = np.diff(np.concatenate([[0], t.times_h]))
    assert gaps.mean() == pytest.approx(10, rel=0.05)
    fit = fit_trace(t)
    assert fit.weibull_shape == pytest.approx(0.6, rel=0.05)
    assert fit.weibull_ks_pvalue > fit.exponential_ks_pvalue


@pytest.mark.parametrize("shape", [0.1, 100.0])
def test_the_extreme_weibull_shapes_give_a_sound_trace(shape):
    t = generate(SyntheticSpec("weibull", mtbf_hours=200, days=100, machines=20, seed=1, weibull_shape=shape))
    assert len(t.events) > 0 and np.all(np.isfinite(t.times_h)) and np.all(np.diff(t.times_h) >= 0)
    assert t.times_h[-1] <= 100 * 24


@pytest.mark.parametrize("shape", [0.099, 1e-300, 100.5])
def test_weibull_shapes_outside_the_range_are_refused(shape):
    with pytest.raises(UserError, match=r"'weibull-shape' must be in \[0.1, 100\]"):
        SyntheticSpec("weibull", mtbf_hours=200, days=100, machines=20, weibull_shape=shape)


def test_fit_rate_interval_covers_true_rate():
    t = generate(SyntheticSpec("poisson", 100, 100, 10, seed=5))
    fit = fit_trace(t, machines=10)
    lo, hi = fit.rate_ci95
    assert lo <= 0.1 <= hi and fit.per_machine_mtbf_h == pytest.approx(100, rel=0.1)


def test_bursts_take_a_rack_and_keep_the_per_machine_rate():
    spec = SyntheticSpec("burst", 300, 1000, 40, seed=2, burst_probability=0.25, burst_size=4)
    t = generate(spec)
    sizes = np.array([e.machines for e in t.events])
    assert set(sizes) == {1, 4}
    assert (sizes == 4).mean() == pytest.approx(0.25, abs=0.03)
    machines_lost_per_hour = sizes.sum() / t.duration_h
    assert machines_lost_per_hour == pytest.approx(40 / 300, rel=0.05)


def test_kind_mix_follows_llama3_aggregate():
    t = generate(SyntheticSpec("poisson", 50, 200, 100, seed=4))
    counts = t.kind_counts()
    total = sum(counts.values())
    for kind, n in synthetic.LLAMA3_MIX.items():
        assert counts[kind] / total == pytest.approx(n / 419, abs=0.02)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(model="gamma"), "unknown synthetic model"),
    (dict(mtbf_hours=0), "mtbf-hours"),
    (dict(days=-1), "days"),
    (dict(burst_size=100), "burst size"),
])
def test_bad_specs(kwargs, needle):
    base = dict(model="poisson", mtbf_hours=10, days=1, machines=8)
    with pytest.raises(UserError, match=needle):
        SyntheticSpec(**{**base, **kwargs})


def test_fit_needs_two_failures():
    t = generate(SyntheticSpec("poisson", 1e9, 1, 1, seed=0, burst_size=1))
    with pytest.raises(UserError, match="at least 2"):
        fit_trace(t)


def test_fit_of_a_trace_that_lasts_no_time_is_a_one_line_error(tmp_path, cli):
    """Found by the fuzz test: two failures at hour 0 and no duration divided by zero."""
    f = tmp_path / "t.csv"
    f.write_text("time_hours,kind,machines,note\n0,hardware,1,n\n0,hardware,1,n\n")
    rc, _, err = cli("fit", "--trace", f, "--json", check_rc=2)
    assert "lasts 0 h" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    f.write_text("# duration_hours: 5\n" + f.read_text())
    rc, text, _ = cli("fit", "--trace", f, "--json")
    assert json.loads(text)["rate_per_hour"] == pytest.approx(2 / 5)


def test_cli_synth_and_fit(tmp_path, cli):
    out = tmp_path / "s.csv"
    cli("synth", "--synthetic", "weibull", "--mtbf-hours", "100", "--days", "50", "--preset", "gemini-paper",
        "-o", out)
    rc, text, err = cli("fit", "--trace", out, "--json")
    import json
    d = json.loads(text)
    assert d["failures"] > 100 and 0 < d["weibull_shape"] < 2
