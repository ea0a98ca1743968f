import pytest

from lightning_ntk.schedule import EveryNEpochs, EveryNSteps, LogSpacedSteps, StepList, as_schedule


def test_every_n_steps():
    assert EveryNSteps(5).steps_up_to(21) == [0, 5, 10, 15, 20]
    assert EveryNSteps(5, initial=False).steps_up_to(11) == [5, 10]


def test_every_n_epochs():
    s = EveryNEpochs(3)
    assert s.steps_up_to(100) == [0]
    assert [e for e in range(10) if s.due_at_epoch_end(e)] == [2, 5, 8]


def test_log_spaced_matches_the_formula():
    per_decade = 8
    expected = sorted({0} | {int(round(10 ** (i / per_decade))) for i in range(0, 25)})
    expected = [s for s in expected if s <= 1000]
    assert LogSpacedSteps(per_decade).steps_up_to(1000) == expected
    # Dense early, sparse late.
    steps = LogSpacedSteps(per_decade).steps_up_to(10_000)
    assert steps[:6] == [0, 1, 2, 3, 4, 6]
    assert len([s for s in steps if s > 1000]) == per_decade


def test_log_spaced_max_interval_caps_gaps():
    steps = LogSpacedSteps(per_decade=4, max_interval=100).steps_up_to(2000)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) <= 100
    assert 1000 in steps and 1778 in steps  # the log points stay
    assert [s for s in steps if s <= 56] == [0, 1, 2, 3, 6, 10, 18, 32, 56]


def test_step_list_and_coercion():
    assert StepList([7, 3, 3]).steps_up_to(10) == [0, 3, 7]
    assert isinstance(as_schedule(4), EveryNSteps) and as_schedule(4).n == 4
    assert as_schedule([1, 2]).steps == [1, 2]
    assert isinstance(as_schedule(None), LogSpacedSteps)


@pytest.mark.parametrize("make, message", [
    (lambda: EveryNSteps(0), "n must be a positive integer"),
    (lambda: EveryNEpochs(1.5), "n must be a positive integer"),
    (lambda: LogSpacedSteps(per_decade=0), "per_decade"),
    (lambda: LogSpacedSteps(max_interval=-1), "max_interval"),
    (lambda: StepList([-1]), "step must be an integer >= 0"),
    (lambda: as_schedule("often"), "schedule must be"),
    (lambda: as_schedule(True), "bool"),
])
def test_bad_schedules(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("schedule", [EveryNSteps(7), EveryNEpochs(3), LogSpacedSteps(8), LogSpacedSteps(3),
                                      LogSpacedSteps(4, max_interval=50), StepList([3, 9, 100, 101]),
                                      EveryNSteps(5, initial=False)])
def test_next_due_after_skips_no_due_step(schedule):
    """next_due_after(s) > s, and no step strictly between them is due (brute force over
    every step); for the exact rules the returned step is itself due."""
    from lightning_ntk.schedule import NEVER

    last = 2500
    due = [schedule.due_at_step(t) for t in range(last + 1)]
    assert schedule.next_due_after(-1) == 0
    for s in range(last):
        nd = schedule.next_due_after(s)
        assert nd > s
        assert not any(due[s + 1:min(nd, last + 1)]), (s, nd)
        exact = not (isinstance(schedule, LogSpacedSteps) and schedule.max_interval is not None)
        if exact and nd <= last:
            assert due[nd], (s, nd)
        if nd == NEVER:
            assert not any(due[s + 1:])


def test_next_due_after_falls_back_to_every_step_for_a_rule_it_does_not_know():
    class Odd(EveryNSteps):  # overrides the rule, not _next_due_after
        def _due_at_step(self, step):
            return step % 2 == 1

    class Custom(EveryNEpochs):
        def due_at_step(self, step):
            return step == 5

    assert [Odd(10).next_due_after(s) for s in (0, 1, 2)] == [1, 2, 3]
    assert Custom(1).next_due_after(3) == 4
    assert EveryNSteps(10).next_due_after(3) == 10
