import copy
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_sim.cluster import config
from gemini_sim import interleave, optimize as optimizer, plan
from gemini_sim.placement import layouts as placement, survival as recovery
from gemini_sim.errors import UserError
from gemini_sim.failures.synthetic import SyntheticSpec, generate

PAPER = config.load_preset("gemini-paper")


def small_preset(machines=8, layers=4):
    c = dataclasses.replace(PAPER.cluster, machines=machines)
    m = dataclasses.replace(PAPER.model, layers=layers, parameters=39e9 * layers / 48,
                            global_batch_tokens=PAPER.model.global_batch_tokens * machines / 16)
    return dataclasses.replace(PAPER, cluster=c, model=m, name="small")


def a_plan(**kw):
    base = dict(machines=4, processes_per_machine=2, placement_strategy="group",
                holders=placement.group(4, 2).holders, schedule="gemini", chunk_bytes=1 << 20,
                buffer_bytes=1 << 21, interval_iters=1, persist_interval_iters=100,
                spans=[(0.1, 0.2, 5e5)], predicted={"overhead_pct": 0.0})
    return plan.make(**{**base, **kw})


def test_round_trip(tmp_path):
    d = a_plan()
    plan.write(d, tmp_path / "p.json")
    assert plan.read(tmp_path / "p.json") == d


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 24), m=st.integers(1, 4), ppm=st.integers(1, 8), k=st.integers(1, 10),
       persist=st.integers(1, 5000), schedule=st.sampled_from(list(plan.RULES)),
       strategy=st.sampled_from(["mixed", "ring", "random"]))
def test_round_trip_property(tmp_path_factory, n, m, ppm, k, persist, schedule, strategy):
    m = min(m, n)
    pl = placement.build(strategy, n, m)
    d = plan.make(machines=n, processes_per_machine=ppm, placement_strategy=strategy, holders=pl.holders,
                  schedule=schedule, chunk_bytes=1000, buffer_bytes=2000, interval_iters=k,
                  persist_interval_iters=persist)
    path = tmp_path_factory.mktemp("p") / "plan.json"
    plan.write(d, path)
    again = plan.read(path)
    assert again == d
    assert again["checkpoint"]["persist_interval_iters"] % k == 0


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("cluster"), "$: 'cluster' is a required property"),
    (lambda d: d["checkpoint"].update(interval_iters=0), "$.checkpoint.interval_iters: 0 is less than the minimum"),
    (lambda d: d["schedule"].update(rule="whenever"), "$.schedule.rule"),
    (lambda d: d["placement"]["holders"][1].__setitem__(0, 0), "$.placement.holders[1]: must start with machine 1"),
    (lambda d: d["placement"]["holders"][2].__setitem__(1, 9), "$.placement.holders[2]: machine index out of range"),
    (lambda d: d["cluster"]["rank_to_machine"].pop(), "$.cluster.rank_to_machine: has 7 ranks"),
    (lambda d: d["checkpoint"].update(persist_interval_iters=3, interval_iters=2), "multiple of interval_iters"),
    (lambda d: d.update(extra=1), "Additional properties are not allowed"),
    (lambda d: d["placement"].update(replicas="two"), "$.placement.replicas: 'two' is not of type 'integer'"),
    (lambda d: d.update(schema_version=2), "schema_version 2 is newer"),
    (lambda d: d.update(schema_version="1"), "$.schema_version: expected an integer"),
    (lambda d: d["placement"].update(replica_groups=3), "$.placement.replica_groups: 3 replica groups do not divide"),
    (lambda d: d["placement"].update(replica_groups=2), "$.placement.holders[0]: with 2 replica groups every holder"),
    (lambda d: d["placement"].update(replica_groups=0), "$.placement.replica_groups: 0 is less than the minimum"),
])
def test_schema_errors_name_the_path(mutate, needle):
    d = copy.deepcopy(a_plan())
    mutate(d)
    with pytest.raises(UserError) as exc:
        plan.validate(d, "p.json")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_invalid_json_file(tmp_path, cli):
    f = tmp_path / "p.json"
    f.write_text("{not json")
    rc, out, err = cli("plan", "validate", f, check_rc=2)
    assert "invalid JSON at line 1" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def optimized():
    trace = generate(SyntheticSpec("poisson", mtbf_hours=2000, days=60, machines=8, seed=1))
    return optimizer.optimize(small_preset(), trace, 1.0, schedules=["blocking", "naive", "gemini"],
                              replicas=[1, 2, 4])


def test_optimizer_choice_is_at_least_as_good_as_every_candidate(optimized):
    best = optimized.best
    assert best.feasible
    for c in optimized.candidates:
        if c.feasible:
            assert best.rank <= c.rank
    assert best in optimized.pareto
    # Pareto: no front member is dominated by any candidate
    for f in optimized.pareto:
        assert not any(all(a <= b for a, b in zip(c.key, f.key)) and c.key != f.key for c in optimized.candidates)


def test_optimizer_rejects_over_the_limit(optimized):
    for c in optimized.candidates:
        assert c.feasible == (c.overhead_pct <= 1.0 + 1e-9 and c.reason != "memory")
    assert any(c.reason == "overhead" for c in optimized.candidates)  # blocking every iteration costs > 1%


def test_optimized_plan_is_valid_and_consistent(optimized):
    d = plan.validate(optimized.plan)
    b = optimized.best
    assert d["placement"]["replicas"] == b.replicas and d["schedule"]["name"] == b.schedule
    assert d["checkpoint"]["interval_iters"] == b.interval_iters
    assert d["provenance"]["predicted"]["overhead_pct"] == pytest.approx(b.overhead_pct)
    assert len(d["cluster"]["rank_to_machine"]) == 8 * PAPER.cluster.gpus_per_machine


def test_the_host_cost_counts_in_every_candidate():
    """A measured host cost per checkpoint (host_cpu_s(m)) adds its share to every candidate's overhead, so a
    checkpoint every iteration that was free on the network alone may no longer fit the limit."""
    trace = generate(SyntheticSpec("poisson", 2000, 10, 8, seed=1))
    kw = dict(schedules=["gemini"], replicas=[2], placements=["group"], max_interval=4)
    free = optimizer.optimize(small_preset(), trace, 1.0, **kw)
    t = free.best.iteration_time_s
    costly = optimizer.optimize(small_preset(), trace, 1.0, host_cpu_s=lambda m: 0.01 * t * m, **kw)
    assert free.best.interval_iters == 1
    for c in costly.candidates:  # 0.02 t per checkpoint, spread over its interval
        plain = interleave.simulate(small_preset(), interleave.InterleaveConfig("gemini", replicas=2,
                                                                                interval=c.interval_iters),
                                    find_interval=False)
        extra = 100 * 0.02 * t / c.interval_iters / plain.baseline_iteration_time_s
        assert c.overhead_pct == pytest.approx(plain.overhead_pct + extra, rel=1e-9)
    assert costly.best.interval_iters > 1 and costly.best.overhead_pct <= 1.0


def test_an_hsdp_job_is_planned_with_its_copies_on_its_replicas():
    """``hsdp=R``: only the hsdp placement, at most R copies; each copy off the machine is an HSDP replica's, so
    it costs no traffic (every candidate simulated as the job with no copy on the network) and no memory (one
    checkpoint per machine, whatever m), so copies that would not fit as whole shards do; P(recover) is the hsdp
    placement's; the plan names the replica groups."""
    trace = generate(SyntheticSpec("poisson", 2000, 10, 8, seed=1))
    preset = small_preset()
    shard_gb = preset.checkpoint_bytes_per_machine / 1e9
    preset = dataclasses.replace(preset, cluster=dataclasses.replace(preset.cluster, cpu_memory_gb=1.5 * shard_gb))
    kw = dict(schedules=["naive", "gemini"], max_interval=4)
    with pytest.raises(UserError, match="no replica count fits"):  # 2 whole shards do not fit
        optimizer.optimize(preset, trace, 0.5, replicas=[2], **kw)
    res = optimizer.optimize(preset, trace, 0.5, hsdp=4, **kw)
    plain = optimizer.optimize(preset, trace, 0.5, replicas=[1], **kw)
    one = {(c.schedule, c.interval_iters): c for c in plain.candidates}
    assert {c.replicas for c in res.candidates} == {1, 2, 3, 4}
    for c in res.candidates:
        assert c.placement == ("hsdp" if c.replicas > 1 else "none")
        assert c.memory_gb_per_machine == pytest.approx(shard_gb) and c.reason != "memory"
        assert c.overhead_pct == one[(c.schedule, c.interval_iters)].overhead_pct
        if c.replicas > 1:
            exact = recovery.probability(placement.hsdp(8, c.replicas, 4), 2).probability
            assert c.recovery_probability_k2 == pytest.approx(exact)
    d = plan.validate(res.plan)
    assert d["placement"]["replica_groups"] == 4 and d["placement"]["strategy"] == "hsdp"
    assert d["placement"]["holders"] == [list(h) for h in placement.hsdp(8, res.best.replicas, 4).holders]
    with pytest.raises(UserError, match="HSDP's 3 replica groups must divide the 8 machines"):
        optimizer.optimize(preset, trace, 0.5, hsdp=3, **kw)


def test_infeasible_requests_are_clear_errors():
    trace = generate(SyntheticSpec("poisson", 2000, 10, 8, seed=1))
    with pytest.raises(UserError, match="no plan meets --max-overhead 0.001%"):
        optimizer.optimize(small_preset(), trace, 0.001, schedules=["blocking"], replicas=[2])
    tiny = dataclasses.replace(small_preset(), cluster=dataclasses.replace(small_preset().cluster, cpu_memory_gb=1))
    with pytest.raises(UserError, match="no replica count fits"):
        optimizer.optimize(tiny, trace, 1.0, replicas=[2])
    with pytest.raises(UserError, match="processes per machine"):
        optimizer.optimize(small_preset(), trace, 1.0, processes_per_machine=0)


def test_cli_plan_validate_show(tmp_path, cli):
    f = tmp_path / "p.json"
    plan.write(a_plan(), f)
    rc, out, err = cli("plan", "validate", f)
    assert "valid plan" in out
    rc, out, err = cli("plan", "show", f)
    assert "group, 2 copies" in out and "local -> peer -> storage" in out
    rc, out, err = cli("plan", "frobnicate", f, check_rc=2)
    assert "unknown plan action" in err
    rc, out, err = cli("plan", "--preset", "gemini-paper", check_rc=2)
    assert "-o PLAN.json" in err


SPEC = """
kind = "placement"
[grid]
machines = [6, 8]
replicas = [2]
strategy = ["mixed", "group", "nonsense"]
failures = [2, 3]
"""


def test_sweep_reports_failed_cells_and_skips_done(tmp_path):
    from gemini_sim import sweeps as sweep

    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    rows, ran, skipped = sweep.run_sweep(spec, tmp_path / "out", workers=1)
    assert ran == 12 and skipped == 0 and len(rows) == 12
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 4 and all("unknown placement strategy" in r["error"] for r in bad)
    good = [r for r in rows if r["status"] == "ok"]
    assert {(int(r["machines"]), int(r["failures"])) for r in good if r["strategy"] == "group"} == \
        {(6, 2), (6, 3), (8, 2), (8, 3)}
    g = next(r for r in good if r["strategy"] == "group" and int(r["machines"]) == 8 and int(r["failures"]) == 2)
    assert float(g["probability"]) == pytest.approx(1 - 4 / 28)
    assert (tmp_path / "out" / "sweep.png").exists()
    rows2, ran2, skipped2 = sweep.run_sweep(spec, tmp_path / "out", workers=1)
    assert skipped2 == 8 and ran2 == 4 and len(rows2) == 12  # only the failed cells run again


def test_sweep_spec_errors(tmp_path):
    from gemini_sim import sweeps as sweep

    spec = tmp_path / "s.toml"
    for text, needle in [('kind = "x"\n[grid]\na=[1]', "key 'kind'"),
                         ('kind = "replay"\n[grid]\npreset=["gemini-paper"]', "missing key 'grid.trace'"),
                         ('kind = "placement"\n[grid]\nmachines=4', "must be a non-empty list"),
                         ('kind = "placement"\n[grid]\nmachines=[4]\nflavour=[1]', "unknown key 'grid.flavour'"),
                         ('kind = "placement"\n[grid]\nmachines=[1000000000]', "'grid.machines': must be"),
                         ('kind = "placement"\n[grid]\nmachines=[true]', "'grid.machines' must be a number"),
                         ('kind = "placement"\n[grid]\nmachines=[nan]', "out of range"),
                         ('kind = "placement"\n[grid]\nstrategy=[3]', "'grid.strategy' must be a non-empty str"),
                         ('kind = "replay"\n[grid]\nseed=[-1]', "'grid.seed': must be >= 0"),
                         ('kind = "replay"\n[grid]\npreset=["gemini-paper"]\ntrace=["t.csv"]\nstrategy=["gemini"]\n[options]\nsamples=0', "'options.samples'"),
                         ('kind = "replay"\n[grid]\npreset=["gemini-paper"]\ntrace=["t.csv"]\nstrategy=["gemini"]\n[options]\nbursts=1', "true or false"),
                         ('kind = "placement"\n[grid]\nmachines=[8]\nreplicas=[2]\nstrategy=["ring"]\nseed='
                          + str(list(range(400))) + '\nfailures=' + str(list(range(400))),
                          "160,000 cells; at most 100,000")]:
        spec.write_text(text)
        with pytest.raises(UserError, match=needle):
            sweep.load_spec(spec)


def test_one_vocabulary_for_simulator_plan_and_runtime():
    """Schedules, tiers and the 'auto' placement rule are defined once, in the Plan's module, and every side uses
    them: the simulator's schedule registry, the schema's enums, the replay's tiers, the runtime's registry."""
    from gemini_sim import interleave
    from gemini_sim.placement import layouts as placement, survival as recovery
    from gemini_sim.replay import engine as replay
    from gemini_sim import plan as contract
    from runtime import schedules as runtime_schedules

    assert tuple(interleave.SCHEDULES) == contract.SCHEDULES
    assert set(runtime_schedules.SCHEDULES) | set(runtime_schedules.NOT_RUN) == set(contract.SCHEDULES)
    schema = contract.schema()
    assert tuple(schema["properties"]["recovery"]["properties"]["order"]["items"]["enum"]) == contract.TIERS
    assert replay.TIER_ORDER == contract.TIERS
    assert [placement.resolve("auto", n, 2) for n in (4, 5)] == ["group", "mixed"]
    assert placement.resolve("ring", 5, 2) == "ring"
    d = contract.default(5, 2, replicas=2)
    assert d["placement"]["strategy"] == "mixed" and d["recovery"]["order"] == list(contract.TIERS)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 4), ppm=st.integers(1, 4),
       strategy=st.sampled_from(["group", "mixed", "ring", "random"]))
def test_a_machine_holds_the_shards_of_every_rank_its_placement_names_it_for(n, m, ppm, strategy):
    """The runtime's view of a plan: machine j's store holds rank r's shard exactly when j is one of the holders of
    r's machine, so every shard is held on m machines (what the store keeps and recycles, runtime/store.py)."""
    from runtime.plan import Plan

    m = min(m, n)
    if strategy == "group" and n % m:
        strategy = "mixed"
    holders = placement.build(strategy, n, m).holders
    p = Plan.of(plan.make(machines=n, processes_per_machine=ppm, placement_strategy=strategy, holders=holders,
                          schedule="naive", chunk_bytes=1000, buffer_bytes=2000, interval_iters=1,
                          persist_interval_iters=5), "test")
    world = n * ppm
    for j in range(n):
        assert p.held_on(j) == [r for r in range(world) if j in holders[r // ppm]]
    assert sorted(r for j in range(n) for r in p.held_on(j)) == sorted(list(range(world)) * m)
