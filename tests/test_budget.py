"""The budget governor, driven by a fake clock."""
import math

import pytest

from lightning_ntk.budget import Governor, as_governor


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def costly_monitor(clock, seconds_per_example):
    """A ProbeMetricsMonitor whose snapshots advance ``clock`` by this much per probe example."""
    from lightning_ntk.callbacks import ProbeMetricsMonitor

    class Costly(ProbeMetricsMonitor):
        def measure(self, trainer, pl_module, probe):
            clock.now += seconds_per_example * len(probe)
            return super().measure(trainer, pl_module, probe)

    return Costly


def with_timed_steps(module, clock):
    """``module`` whose training steps advance ``clock`` by 1 s each."""
    step = type(module).training_step

    def timed_step(self, batch, batch_idx):
        clock.now += 1.0
        return step(self, batch, batch_idx)

    type(module).training_step = timed_step
    return module


@pytest.fixture
def one_second_steps(monkeypatch):
    """Sizing predicts 1 s per training step (what it measures is tested on its own below)."""
    from lightning_ntk.callbacks import _sizing

    monkeypatch.setattr(_sizing, "step_seconds", lambda *args: 1.0)


def simulate(governor, clock, *, steps, step_time, due_every, cost, monitor="m"):
    """Training loop: every step takes `step_time`; a snapshot is due every `due_every` steps."""
    taken = []
    governor.start()
    for step in range(steps + 1):
        if step % due_every == 0 or step == steps:
            forced = step == 0 or step == steps
            if governor.allow(monitor, forced=forced):
                clock.now += cost
                governor.record(monitor, cost)
                taken.append(step)
        clock.now += step_time
    return taken


def test_keeps_to_budget_and_never_drops_first_or_last():
    clock = FakeClock()
    gov = Governor(0.05, clock=clock)
    taken = simulate(gov, clock, steps=2000, step_time=0.01, due_every=10, cost=0.2)
    assert taken[0] == 0 and taken[-1] == 2000
    train_time = 2000 * 0.01
    # Every discretionary snapshot left room for the forced final one: the total, final
    # snapshot included, stays within the budget.
    assert gov.spent <= 0.05 * train_time + 1e-9
    # And the budget is used, not wasted: within one snapshot of it.
    assert gov.spent >= 0.05 * train_time - 0.2
    assert gov.skipped("m") > 0


def test_reserve_holds_the_final_snapshots_of_every_monitor():
    """A discretionary snapshot must leave room for one more (final) snapshot of each monitor."""
    clock = FakeClock()
    gov = Governor(0.1, clock=clock)
    gov.start()
    for name, cost in (("a", 0.3), ("b", 0.1)):
        assert gov.allow(name, forced=True)
        clock.now += cost
        gov.record(name, cost)
    assert gov.reserved() == pytest.approx(0.4)
    clock.now += 10.0  # 10 s of training: 1.0 s of budget; 0.4 spent, 0.4 reserved
    assert not gov.allow("a")  # 0.4 + 0.3 + 0.4 = 1.1 > 1.0
    assert gov.allow("b")  # 0.4 + 0.1 + 0.4 = 0.9 <= 1.0
    clock.now += 1.0  # 11 s: 1.1 s of budget
    assert gov.allow("a")
    gov.expect_final("a", False)  # e.g. disabled after a failure: its final snapshot will not come
    assert gov.reserved() == pytest.approx(0.1)
    gov.expect_final("a")
    assert gov.reserved() == pytest.approx(0.4)


def test_cheap_snapshots_are_all_taken():
    clock = FakeClock()
    gov = Governor(0.05, clock=clock)
    taken = simulate(gov, clock, steps=1000, step_time=0.01, due_every=100, cost=0.001)
    assert taken == list(range(0, 1001, 100))
    assert gov.skipped() == 0


def test_shared_budget_covers_all_monitors():
    clock = FakeClock()
    gov = Governor(0.02, clock=clock)
    gov.start()
    spent = {"a": 0, "b": 0}
    for step in range(5001):
        for name, cost in (("a", 0.05), ("b", 0.3)):
            if step % 20 == 0 and gov.allow(name, forced=step == 0):
                clock.now += cost
                gov.record(name, cost)
                spent[name] += 1
        clock.now += 0.01
    train_time = 5001 * 0.01
    assert gov.spent <= 0.02 * train_time + 0.3 + 0.05  # the forced first snapshots
    assert spent["a"] > spent["b"] > 0
    assert gov.overhead() <= 0.02 + 0.35 / train_time


def test_overhead_accounting():
    clock = FakeClock()
    gov = Governor(0.1, clock=clock)
    assert gov.overhead() == 0.0
    gov.start()
    gov.record("m", 1.0)
    clock.now = 1.0  # all of the elapsed time was instrumentation
    assert gov.training_time() == 0.0 and math.isinf(gov.overhead())
    clock.now = 11.0
    assert gov.training_time() == 10.0 and gov.overhead() == pytest.approx(0.1)
    assert gov.expected_cost("m") == 1.0


@pytest.mark.parametrize("bad", [0, -0.1, math.inf, "5%"])
def test_bad_budgets(bad):
    with pytest.raises(ValueError, match="budget must be a finite number > 0"):
        Governor(bad)


def test_as_governor():
    shared = Governor(0.03)
    assert as_governor(shared) is shared
    assert as_governor(0.02).budget == 0.02
    assert as_governor(None) is None and as_governor(False) is None


def test_monitor_keeps_to_its_budget_with_a_fake_clock(L, run_path):
    """A real training whose clock is fake: 1 s per step, 0.5 s per snapshot, budget 10%."""
    import numpy as np

    from lightning_ntk.callbacks import ProbeMetricsMonitor
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    governor = Governor(0.1, clock=clock)

    class Slow(ProbeMetricsMonitor):
        def measure(self, trainer, pl_module, probe):
            clock.now += 0.5
            return super().measure(trainer, pl_module, probe)

    class Tick(L.Callback):
        def on_train_batch_end(self, *args):
            clock.now += 1.0

    x, y = blob_data(n=12, seed=1).tensors  # given tensors: not sized to the budget (no timing at train start)
    monitor = Slow(run_path, schedule=1, probe=(x, y), budget=governor, on_error="raise")
    t = trainer(L, [Tick(), monitor], max_epochs=5)  # Tick first: the step's time is counted before the check
    t.fit(make_module(L, tiny_net()), loader(blob_data(n=48)))
    steps_total = t.global_step
    with open_run(run_path) as run:
        taken = run["probe_metrics"]["step"]
        skipped = run["skipped/probe_metrics"]
        assert taken[0] == 0 and taken[-1] == steps_total  # first and last never dropped
        assert len(taken) + len(skipped) == steps_total + 1  # every scheduled step: taken or recorded
        assert set(skipped["step"]).isdisjoint(taken)
        assert np.all(skipped["reason"] == 1) and run["skipped/probe_metrics"].attrs["reasons"][1] == "budget"
    training_time = steps_total * 1.0
    assert governor.spent <= 0.1 * training_time + 1e-9  # within budget, the forced last one included
    assert governor.spent >= 0.1 * training_time - 0.5 - 1e-9  # and the budget is used (within one snapshot)


def test_charged_time_counts_against_the_budget():
    """Unskippable per-batch time (charge) makes the snapshots give way: spent stays within budget."""
    clock = FakeClock()
    g = Governor(0.1, clock=clock)
    g.start()
    assert g.allow("m", forced=True)
    clock.now += 0.2
    g.record("m", 0.2)
    clock.now += 10.0  # 10 s of training: 1 s of budget, 0.2 spent
    assert g.allow("m")  # 0.2 + 0.2 + 0.2 reserved <= 1
    g.charge(0.85)  # per-batch bookkeeping of another monitor
    clock.now += 0.85
    assert g.spent == pytest.approx(1.05)
    assert not g.allow("m")  # 1.05 + 0.2 (+ 0.2 reserved for the final one) > 0.1 * (11.05 - 1.05)
    assert g.skipped("m") == 1
    clock.now += 3.0
    assert not g.allow("m")  # 1.45 > 0.1 * 13
    clock.now += 2.0
    assert g.allow("m")  # 1.45 <= 0.1 * 15


def test_forgetting_charges_its_per_batch_time(L, run_path):
    from lightning_ntk.callbacks import ForgettingMonitor, set_default_budget

    from .models import blob_data, loader, make_module, tiny_net, trainer

    previous = set_default_budget(0.05)  # the shared governor of the Trainer's monitors
    try:
        monitor = ForgettingMonitor(run_path, on_error="raise")
        t = trainer(L, [monitor], max_epochs=2)
        t.fit(make_module(L, tiny_net()), loader(blob_data(n=48)))
    finally:
        set_default_budget(previous)
    governor = monitor._charged_governor
    assert governor is not None and governor.budget == 0.05
    assert governor.spent > 0 and governor.skipped() == 0  # charged, nothing to skip


def test_default_sizes_follow_the_predicted_budget_and_user_sizes_are_kept(L, run_path, one_second_steps):
    """Sizing with a fake clock: each training step takes 1 s (the module's training_step
    advances the clock; the step time predicted at train start is 1 s), a snapshot 0.01 s per
    probe example. 30 steps at budget 10 %: the forced snapshots of the two monitors may take
    0.5 × 0.1 × 30 s = 1.5 s, 0.75 s each, i.e. 0.375 s per snapshot: the default probe (48
    examples, 0.48 s) is halved to the floor 32 (0.32 s); the user's Probe(size=48) is kept,
    with a warning giving its predicted cost."""
    from lightning_ntk.probe import Probe
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    governor = Governor(0.1, clock=clock)
    Costly = costly_monitor(clock, 0.01)
    module = with_timed_steps(make_module(L, tiny_net()), clock)
    sized = Costly(run_path, schedule=5, budget=governor, on_error="raise", name="sized")
    given = Costly(run_path, schedule=5, probe=Probe(size=48), budget=governor, on_error="raise", name="given")
    t = trainer(L, [sized, given], max_epochs=10)
    with pytest.warns(RuntimeWarning, match=r"Costly: the size you gave \(48 examples\) is predicted to take 0\.5 s "
                                            r"per snapshot; .*pass a larger budget="):
        t.fit(module, loader(blob_data(n=48)))
    assert t.global_step == 30
    assert len(sized.probe_set) == 32 and len(given.probe_set) == 48
    with open_run(run_path) as run:
        stored = {c["group"]: c.get("sizing") for c in run.config.values()}  # the choice is in the file
        steps = run["probe_metrics_sized"]["step"]
        assert steps[0] == 0 and steps[-1] == 30  # first and last never skipped
        assert run.probe("train_32")["index"].shape == (32,)
    record = stored["probe_metrics_sized"]
    assert record["size"] == 32 and record["default"] == 48 and record["fits"]
    assert record["predicted_seconds"] == pytest.approx(0.32)
    assert record["allowance_seconds"] == pytest.approx(0.75)
    assert record["training"]["steps"] == 30 and record["training"]["step_seconds"] == pytest.approx(1.0)
    assert stored["probe_metrics_given"]["user_size"] and not stored["probe_metrics_given"]["fits"]
    assert stored["probe_metrics_given"]["size"] == 48


def test_a_resumed_fit_keeps_the_sizes_its_checkpoint_recorded(L, tmp_path, one_second_steps):
    """Sized at 32 of 48 examples in the first fit (fake clock, as above); resumed from its
    checkpoint with a budget so large that sizing would keep 48, the monitor draws the 32
    examples of the checkpoint and appends to the same probe."""
    import numpy as np

    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    Costly = costly_monitor(clock, 0.01)

    def module_with_timed_steps():
        return with_timed_steps(make_module(L, tiny_net()), clock)

    path, ckpt = str(tmp_path / "run.h5"), str(tmp_path / "last.ckpt")
    first = Costly(path, schedule=5, budget=Governor(0.05, clock=clock), on_error="raise")
    t = trainer(L, [first], max_epochs=10)
    t.fit(module_with_timed_steps(), loader(blob_data(n=48)))
    t.save_checkpoint(ckpt)
    assert len(first.probe_set) == 32
    resumed = Costly(path, schedule=5, budget=Governor(10.0, clock=clock), on_error="raise")
    t2 = trainer(L, [resumed], max_epochs=12)
    t2.fit(module_with_timed_steps(), loader(blob_data(n=48)), ckpt_path=ckpt)
    assert len(resumed.probe_set) == 32
    np.testing.assert_array_equal(resumed.probe_set.index, first.probe_set.index)
    with open_run(path) as run:
        assert run["probe_metrics"]["step"][-1] == 36
        assert run["probe_metrics"]["example_loss"].shape[1] == 32


def test_the_step_time_is_a_forward_and_backward_at_the_training_batch_size(L):
    """0.25 s per forward pass (fake clock) on batches of 32: one step predicted at 0.25 s
    (times accumulate_grad_batches), without running training_step (it may step optimisers)
    and without touching the weights or .grad."""
    import torch

    from lightning_ntk.callbacks._sizing import training_length
    from lightning_ntk.probe import ProbeSet

    from .models import blob_data, make_module, tiny_net

    clock = FakeClock()
    module = make_module(L, tiny_net())
    calls = []
    forward = type(module).forward

    def slow_forward(self, x):
        clock.now += 0.25
        return forward(self, x)

    def no_step(self, batch, batch_idx):
        calls.append(batch_idx)
        raise AssertionError("training_step must not run")

    type(module).forward, type(module).training_step = slow_forward, no_step
    data = blob_data(n=48)
    before = [p.detach().clone() for p in module.parameters()]
    sample = ProbeSet.from_tensors(*data.tensors)

    class Loader:
        batch_size = 32

    class FakeTrainer:  # what training_length reads of a Trainer
        train_dataloader = Loader()
        estimated_stepping_batches = 6
        accumulate_grad_batches = 2

    length = training_length(FakeTrainer(), module, sample, clock)
    assert length.steps == 6 and length.step_seconds == pytest.approx(2 * 0.25) and length.seconds == pytest.approx(3.0)
    assert calls == [] and all(p.grad is None for p in module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_a_monitor_whose_smallest_size_breaks_its_share_warns_with_the_budget_that_fits(L, run_path,
                                                                                       one_second_steps):
    """0.02 s per probe example: even the floor (32 examples, 0.64 s per snapshot) is over the
    0.75 s share of a 30 s training at budget 5% (not longer than the training): measured
    at the floor all the same (first and last), with a warning giving the budget that would
    fit it (2 x 0.64 / (0.5 x 30) = 0.085)."""
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    monitor = costly_monitor(clock, 0.02)(run_path, schedule=5, budget=Governor(0.05, clock=clock), on_error="raise")
    t = trainer(L, [monitor], max_epochs=10)
    with pytest.warns(RuntimeWarning, match=r"Costly: this training is short for it: at its smallest probe size "
                                            r"\(32\) .* 1\.28 s.*Pass budget=0\.085"):
        t.fit(make_module(L, tiny_net()), loader(blob_data(n=48)))
    assert len(monitor.probe_set) == 32 and not monitor.sizing["fits"] and not monitor.disabled
    with open_run(run_path) as run:
        steps = run["probe_metrics"]["step"]
        assert steps[0] == 0 and steps[-1] == 30


def test_a_monitor_whose_smallest_size_would_outlast_the_training_is_refused_and_training_goes_on(L, run_path,
                                                                                                 one_second_steps):
    """0.5 s per probe example: the floor's first and last snapshots (32 s) would take longer
    than the 30 s training itself: refused at train start with the budget that fits its
    share (2 x 16 / (0.5 x 30 / 2 monitors) = 4.3, capped at 1) and the arguments that
    measure anyway, in /errors; a cheap monitor beside it (no budget) records to the end."""
    from lightning_ntk.callbacks import ProbeMetricsMonitor
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    monitor = costly_monitor(clock, 0.5)(run_path, schedule=5, budget=Governor(0.05, clock=clock), name="dear")
    witness = ProbeMetricsMonitor(run_path, schedule=5, budget=False, name="witness")
    t = trainer(L, [monitor, witness], max_epochs=10)
    with pytest.warns(RuntimeWarning, match=r"Costly \(probe_metrics_dear\) failed at step 0.*Costly: at its smallest "
                                            r"probe size \(32\) its first and last snapshots are predicted to take "
                                            r"32\.00 s, longer than the whole training \(30\.0 s predicted; "
                                            r"budget 0\.05\).*Pass budget=1 "
                                            r"\(or budget=False\).*probe=Probe\(size=\.\.\.\)"):
        t.fit(with_timed_steps(make_module(L, tiny_net()), clock), loader(blob_data(n=48)))
    assert monitor.disabled and t.global_step == 30
    with open_run(run_path) as run:
        [error] = run.errors()
        assert error["monitor"] == "probe_metrics_dear" and "longer than the whole training" in error["message"]
        assert list(run["probe_metrics_witness"]["step"])[-1] == 30
        assert "probe_metrics_dear" not in run.tables


def lighter_monitor(clock, seconds_per_example):
    """A ProbeMetricsMonitor whose snapshots cost ``seconds_per_example`` x ``work`` per
    probe example, with lighter settings of ``work`` (0.5, then 0.2) for sizing to take."""
    from lightning_ntk.callbacks import ProbeMetricsMonitor
    from lightning_ntk.sizing import CostModel, LighterWork

    class Lighter(ProbeMetricsMonitor):
        per_fit = ("work",)

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.work = 1.0

        def measure(self, trainer, pl_module, probe):
            clock.now += seconds_per_example * self.work * len(probe)
            return super().measure(trainer, pl_module, probe)

        def lighter_work(self, cost):
            return [LighterWork({"work": w}, CostModel(cost.fixed * w, cost.per_example * w)) for w in (0.5, 0.2)]

    return Lighter


def test_at_the_floor_sizing_takes_the_first_lighter_work_that_fits_and_a_resume_keeps_it(L, tmp_path,
                                                                                          one_second_steps):
    """0.05 s per probe example: the floor (32 examples) takes 1.6 s per snapshot, over the
    0.375 s per snapshot of a 30 s training at budget 5% (0.5 x 0.05 x 30 / 2); half the
    work (0.8 s) is still over, a fifth (0.32 s) fits: taken, measured, recorded in the file
    and in the checkpoint. A fit resumed with a budget that would fit the defaults keeps it;
    a new fit of the same monitor starts from the default work again."""
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    Lighter = lighter_monitor(clock, 0.05)
    path, ckpt = str(tmp_path / "run.h5"), str(tmp_path / "last.ckpt")
    monitor = Lighter(path, schedule=5, budget=Governor(0.05, clock=clock), on_error="raise")
    t = trainer(L, [monitor], max_epochs=10)
    t.fit(with_timed_steps(make_module(L, tiny_net()), clock), loader(blob_data(n=48)))
    assert len(monitor.probe_set) == 32 and monitor.work == 0.2
    assert monitor.sizing["work"] == {"work": 0.2} and monitor.sizing["fits"]
    assert monitor.sizing["predicted_seconds"] == pytest.approx(0.32)
    assert monitor.timings["snapshot_s"] == pytest.approx(0.32 * monitor.timings["snapshots"])
    with open_run(path) as run:
        stored = {c["group"]: c.get("sizing") for c in run.config.values()}
        assert stored["probe_metrics"]["work"] == {"work": 0.2}
        assert "work=0.2" in run.summary()
    t.save_checkpoint(ckpt)

    resumed = Lighter(path, schedule=5, budget=Governor(10.0, clock=clock), on_error="raise")
    t2 = trainer(L, [resumed], max_epochs=12)
    t2.fit(with_timed_steps(make_module(L, tiny_net()), clock), loader(blob_data(n=48)), ckpt_path=ckpt)
    assert resumed.work == 0.2 and len(resumed.probe_set) == 32 and resumed.sizing["work"] == {"work": 0.2}

    again = trainer(L, [monitor], max_epochs=2)
    monitor.budget, monitor.overwrite = Governor(10.0, clock=clock), True
    again.fit(with_timed_steps(make_module(L, tiny_net()), clock), loader(blob_data(n=48)))
    assert monitor.work == 1.0 and monitor.sizing["work"] == {}



def _slow_episodes(clock, real):
    def few_shot_accuracy(*args, episodes, **kwargs):
        clock.now += 0.01 * episodes
        return real(*args, episodes=episodes, **kwargs)
    return few_shot_accuracy


def _slow_restarts(clock, real):
    def kmeans_clusters(*args, n_init, **kwargs):
        clock.now += 0.01 * n_init
        return real(*args, n_init=n_init, **kwargs)
    return kmeans_clusters


@pytest.mark.parametrize("case", [
    # 2 settings x 0.01 s per episode: 2 s at 100 episodes, 1 s at 50, 0.5 s at 25; the share
    # of a 30 s training at budget 10% is 0.75 s per snapshot
    dict(monitor="RepresentationMonitor", patch="few_shot_accuracy", slow=_slow_episodes, budget=0.1,
         kwargs=dict(classifiers=("centroid_euclidean",), linear_probe=False), attribute="episodes",
         default=100, chosen=25, given=50),
    # 0.01 s per k-means restart: 0.1 s at 10, 0.03 s at 3; the share at budget 1% is 0.075 s
    dict(monitor="ActivationCodeMonitor", patch="kmeans_clusters", slow=_slow_restarts, budget=0.01,
         kwargs=dict(measures=("redundancy", "kmeans")), attribute="kmeans_n_init", default=10, chosen=3, given=10),
], ids=lambda case: case["monitor"])
def test_classifier_monitors_take_lighter_work_only_where_the_user_left_it(L, tmp_path, one_second_steps,
                                                                          monkeypatch, case):
    """The real monitors at their floor (256 / 128 examples) with their classifier time on a
    fake clock: the default count of episodes / restarts is lowered to the first that fits,
    and the table records it; a count the user gave is kept."""
    from lightning_ntk import callbacks
    from lightning_ntk.callbacks import codes, representations
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    module = {"few_shot_accuracy": representations, "kmeans_clusters": codes}[case["patch"]]
    clock = FakeClock()
    monkeypatch.setattr(module, case["patch"], case["slow"](clock, getattr(module, case["patch"])))
    Monitor = getattr(callbacks, case["monitor"])
    data = blob_data(n=300, classes=5)
    chosen = []
    for name, extra in (("default", {}), ("given", {case["attribute"]: case["given"]})):
        path = str(tmp_path / f"{name}.h5")
        monitor = Monitor(path, schedule=10, heldout=None, budget=Governor(case["budget"], clock=clock),
                          on_error="raise", **case["kwargs"], **extra)
        assert getattr(monitor, case["attribute"]) == extra.get(case["attribute"], case["default"])
        t = trainer(L, [monitor], max_epochs=1, max_steps=30)
        t.fit(with_timed_steps(make_module(L, tiny_net(classes=5)), clock), loader(data, batch_size=10))
        assert len(monitor.probe_set) == monitor.size_floor
        chosen.append(getattr(monitor, case["attribute"]))
        with open_run(path) as run:
            sizing = {c["group"]: c.get("sizing") for c in run.config.values()}[monitor.group]
            table_attrs = dict(run.file[monitor.group].attrs)
        assert sizing["work"] == ({case["attribute"]: case["chosen"]} if name == "default" else {})
        if case["attribute"] == "episodes":  # the table names the episodes its intervals are over
            assert table_attrs["episodes"] == chosen[-1]
    assert chosen == [case["chosen"], case["given"]]


def test_the_sharpness_cost_model_counts_hessian_vector_products():
    """A fake snapshot on n examples takes its Lanczos products (30, or k = 2 when capped)
    plus 2 (gradient graph, loss and gradient), each 1 ms + 0.1 ms per example on a fake
    clock: the cost model predicts (30 + 2) x (1 + 0.1 n) ms on any n; with trace=True each
    snapshot adds its 60 trace products."""
    import torch

    from lightning_ntk.callbacks import SharpnessMonitor
    from lightning_ntk.probe import ProbeSet

    for trace in (False, True):
        clock = FakeClock()
        monitor = SharpnessMonitor("unused.h5", budget=Governor(0.05, clock=clock), trace=trace, trace_queries=60)
        seen = []

        def measure(trainer, pl_module, probe, monitor=monitor, clock=clock, seen=seen):
            n_hvp = monitor.max_hvp or 30
            seen.append((len(probe), monitor.max_hvp, monitor._eigenvectors))
            clock.now += (n_hvp + 2 + (60 if monitor.trace else 0)) * (1e-3 + 1e-4 * len(probe))
            return {"n_hvp": n_hvp}, {}

        monitor.measure = measure
        monitor._governor = Governor(0.05, clock=clock)
        monitor._eigenvectors = torch.ones(3)  # a previous snapshot's: not a warm start for the timing
        x = torch.zeros(64, 2)
        monitor._probe.drawn = ProbeSet("train", x, torch.zeros(64, dtype=torch.long), torch.arange(64), "train")
        cost = monitor.cost_model(None, torch.nn.Linear(2, 2), monitor._probe.drawn)
        assert [(n, cap, v) for n, cap, v in seen] == [(16, None, None), (32, 2, None)]
        assert monitor.max_hvp is None and monitor._eigenvectors is not None  # restored
        products = 32 + (60 if trace else 0)
        for n in (64, 1024):
            assert cost.predict(n) == pytest.approx(products * (1e-3 + 1e-4 * n))


def test_the_sharpness_lighter_work_is_a_looser_tolerance_costed_by_its_own_count():
    """Fake snapshots: 30 Lanczos products at tol 1e-3, 12 at 1e-2, each 1 ms + 0.1 ms per
    example: the lighter work tol=1e-2 costs (12 + 2)/(30 + 2) of the default; a tolerance
    the user gave offers none."""
    import torch

    from lightning_ntk.callbacks import SharpnessMonitor
    from lightning_ntk.probe import ProbeSet

    for given in (None, 1e-3):
        clock = FakeClock()
        monitor = SharpnessMonitor("unused.h5", budget=Governor(0.05, clock=clock), tol=given)

        def measure(trainer, pl_module, probe, monitor=monitor, clock=clock):
            n_hvp = monitor.max_hvp or (30 if monitor.tol == 1e-3 else 12)
            clock.now += (n_hvp + 2) * (1e-3 + 1e-4 * len(probe))
            return {"n_hvp": n_hvp}, {}

        monitor.measure = measure
        monitor._governor = Governor(0.05, clock=clock)
        monitor._probe.drawn = ProbeSet("train", torch.zeros(64, 2), torch.zeros(64, dtype=torch.long),
                                        torch.arange(64), "train")
        cost = monitor.cost_model(None, torch.nn.Linear(2, 2), monitor._probe.drawn)
        lighter = monitor.lighter_work(cost)
        if given is not None:
            assert lighter == []
            continue
        [option] = lighter
        assert option.settings == {"tol": 1e-2} and monitor.tol == 1e-3  # offered, not taken
        for n in (64, 1024):
            assert option.cost.predict(n) == pytest.approx(14 * (1e-3 + 1e-4 * n))


def test_a_stall_during_the_first_timing_does_not_refuse_a_monitor(L, run_path, one_second_steps):
    """The first cost timing (two snapshots) runs at 0.5 s per example, as if the machine
    stalled: its floor's first and last snapshots look like 32 s, longer than the 30 s
    training. The refusal is confirmed by timing again, now at 0.01 s per example (0.32 s
    a snapshot): no refusal, the confirmed prediction recorded, first and last taken."""
    from lightning_ntk.callbacks import ProbeMetricsMonitor
    from lightning_ntk.store import open_run

    from .models import blob_data, loader, make_module, tiny_net, trainer

    clock = FakeClock()
    calls = []

    class Stalled(ProbeMetricsMonitor):
        def measure(self, trainer, pl_module, probe):
            calls.append(len(probe))
            clock.now += (0.5 if len(calls) <= 2 else 0.01) * len(probe)
            return super().measure(trainer, pl_module, probe)

    monitor = Stalled(run_path, schedule=5, budget=Governor(0.05, clock=clock), on_error="raise")
    t = trainer(L, [monitor], max_epochs=10)
    t.fit(with_timed_steps(make_module(L, tiny_net()), clock), loader(blob_data(n=48)))
    assert not monitor.disabled and calls[:4] == [16, 32, 16, 32]
    assert monitor.sizing["predicted_seconds"] == pytest.approx(0.32)
    assert monitor.sizing["fits"] and monitor.sizing["training"]["confirmed"]
    with open_run(run_path) as run:
        steps = run["probe_metrics"]["step"]
        assert steps[0] == 0 and steps[-1] == 30
