"""Sizing snapshots to the budget: cost models, allowances and size choices, by hand."""
from __future__ import annotations

import itertools

import pytest

from lightning_ntk.sizing import (
    FORCED_SHARE,
    FORCED_SNAPSHOTS,
    CostModel,
    LighterWork,
    TrainingLength,
    choose_size,
    forced_allowance,
    timed,
)


def test_a_linear_cost_model_goes_through_its_two_timings():
    cost = CostModel.from_timings((10, 30), (0.5, 1.1))  # slope 0.03, intercept 0.2
    assert cost.per_example == pytest.approx(0.03)
    assert cost.fixed == pytest.approx(0.2)
    assert cost.predict(100) == pytest.approx(0.2 + 3.0)


def test_a_pair_cost_model_recovers_its_quadratic():
    # t = 0.01 n + 0.001 n²: t(8) = 0.144, t(16) = 0.416
    cost = CostModel.from_timings((8, 16), (0.144, 0.416), pairs=True, fixed=0.5)
    assert cost.per_example == pytest.approx(0.01)
    assert cost.per_pair == pytest.approx(0.001)
    assert cost.predict(100) == pytest.approx(0.5 + 1.0 + 10.0)


@pytest.mark.parametrize("timings,pairs", [((1.0, 0.8), False), ((0.5, 0.2), True), ((1.0, 1.2), True)])
def test_noisy_timings_never_predict_a_cost_falling_with_size(timings, pairs):
    cost = CostModel.from_timings((10, 20), timings, pairs=pairs)
    assert cost.per_example >= 0 and cost.per_pair >= 0 and cost.fixed >= 0
    assert cost.predict(40) >= cost.predict(20) >= cost.predict(10)
    assert cost.predict(20) >= max(timings) - 1e-12


def test_timed_takes_the_fastest_call_of_a_fake_clock():
    ticks = itertools.chain([0.0, 5.0, 10.0, 11.0])  # first call 5 s (warm-up), second 1 s
    assert timed(lambda: None, clock=lambda: next(ticks), repeats=2) == 1.0


def test_training_length_and_the_allowance():
    length = TrainingLength(steps=1000, step_seconds=0.02)
    assert length.seconds == pytest.approx(20.0)
    assert TrainingLength(None, 0.02).seconds is None
    # 5 % of 20 s = 1 s; half of it for the forced snapshots, less 0.1 s of unsized monitors, over 3 monitors
    assert forced_allowance(0.05, 20.0, 3, fixed_seconds=0.1) == pytest.approx((FORCED_SHARE * 1.0 - 0.1) / 3)
    assert forced_allowance(0.05, 1.0, 2, fixed_seconds=10.0) == 0.0


def test_choose_size_halves_the_default_until_the_forced_snapshots_fit():
    cost = CostModel(per_example=0.01)  # 2.56 s at 256
    choice = choose_size(cost, allowance=FORCED_SNAPSHOTS * 0.7, default=256, floor=32)
    assert choice.size == 64 and choice.fits  # 128 -> 1.28 s > 0.7 s; 64 -> 0.64 s
    assert choice.predicted_seconds == pytest.approx(0.64)
    assert "64 (default 256)" in choice.explain("probe size")


def test_choose_size_keeps_the_default_when_it_fits_and_flags_the_floor_when_nothing_does():
    cost = CostModel(per_example=0.01)
    assert choose_size(cost, allowance=100.0, default=256, floor=32).size == 256
    floor = choose_size(cost, allowance=0.01, default=256, floor=32)
    assert floor.size == 32 and not floor.fits
    with pytest.raises(ValueError, match="floor"):
        choose_size(cost, 1.0, default=16, floor=32)


def test_choose_size_tries_the_lighter_work_only_at_the_floor():
    cost = CostModel(per_example=0.01)
    lighter = [LighterWork({"episodes": 50}, CostModel(per_example=0.005)),
               LighterWork({"episodes": 25}, CostModel(per_example=0.0025))]
    halved = choose_size(cost, allowance=2 * 0.64, default=256, floor=32, lighter=lighter)
    assert (halved.size, halved.work, halved.fits) == (64, {}, True)  # a smaller size first
    lighter_fits = choose_size(cost, allowance=2 * 0.1, default=256, floor=32, lighter=lighter)
    assert (lighter_fits.size, lighter_fits.work, lighter_fits.fits) == (32, {"episodes": 25}, True)
    assert lighter_fits.predicted_seconds == pytest.approx(0.08)
    assert "with episodes=25" in lighter_fits.explain("probe size")
    none_fits = choose_size(cost, allowance=0.01, default=256, floor=32, lighter=lighter)
    assert (none_fits.size, none_fits.work, none_fits.fits) == (32, {"episodes": 25}, False)
