"""Tests of lightning_ntk.forgetting against independent references written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ntk.forgetting import (
    ForgettingTracker,
    cartography_regions,
    presentation_outcomes,
    rank,
)


# --------------------------------------------------------------------------------------
# Independent reference: one example at a time, plain Python loops
# --------------------------------------------------------------------------------------
def reference_stats(seq):
    """seq: list of (step, correct) in presentation order, for one example."""
    forgetting = learning = 0
    prev = 0  # state before the first presentation: not correct
    first_step = first_pres = -1
    for t, (step, c) in enumerate(seq):
        c = int(c)
        if t > 0 and prev == 1 and c == 0:
            forgetting += 1
        if prev == 0 and c == 1:
            learning += 1
        if c == 1 and first_step < 0:
            first_step, first_pres = step, t
        prev = c
    learned = any(int(c) for _, c in seq)
    return {
        "presentations": len(seq),
        "forgetting_count": forgetting,
        "learning_count": learning,
        "first_learned_step": first_step,
        "first_learned_presentation": first_pres,
        "never_learned": not learned,
        "unforgettable": learned and forgetting == 0,
    }


HAND_SEQUENCES = {
    # name: (correctness sequence, forgetting, learning, first learned presentation)
    "never_learned": ([0, 0, 0, 0, 0], 0, 0, -1),
    "learned_once": ([0, 0, 1, 1, 1], 0, 1, 2),
    "always_correct": ([1, 1, 1, 1, 1], 0, 1, 0),
    "alternating": ([1, 0, 1, 0, 1, 0], 3, 3, 0),
    "alternating_from_wrong": ([0, 1, 0, 1, 0], 2, 2, 1),
    "learned_late": ([0, 0, 0, 0, 1], 0, 1, 4),
    "forgotten_at_end": ([1, 1, 1, 1, 0], 1, 1, 0),
    "relearned": ([0, 1, 1, 0, 0, 1, 1], 1, 2, 1),
}


def test_hand_written_sequences_match_reference_and_hand_counts():
    names = list(HAND_SEQUENCES)
    n_pres = max(len(s) for s, *_ in HAND_SEQUENCES.values())
    tracker = ForgettingTracker(len(names))
    seqs = {i: [] for i in range(len(names))}
    for t in range(n_pres):  # one batch per epoch, every example that still has a presentation
        idx = [i for i, n in enumerate(names) if t < len(HAND_SEQUENCES[n][0])]
        corr = [HAND_SEQUENCES[names[i]][0][t] for i in idx]
        step = 10 * t + 3
        tracker.update(np.array(idx), np.array(corr, dtype=bool), step=step)
        for i, c in zip(idx, corr):
            seqs[i].append((step, c))
    s = tracker.summary()
    for i, name in enumerate(names):
        seq, forget, learn, first = HAND_SEQUENCES[name]
        ref = reference_stats(seqs[i])
        assert ref["forgetting_count"] == forget and ref["learning_count"] == learn, name
        for key, value in ref.items():
            assert s[key][i] == value, (name, key)
        assert s["first_learned_presentation"][i] == first, name
    assert s["never_learned"].tolist() == [n == "never_learned" for n in names]
    assert s["unforgettable"].tolist() == [n in ("learned_once", "always_correct", "learned_late")
                                           for n in names]


def _feed(tracker, events, shuffle_seed):
    """events: list of (step, dataset index, correct, p); one batch per step, shuffled."""
    rng = np.random.default_rng(shuffle_seed)
    by_step = {}
    for step, i, c, p in events:
        by_step.setdefault(step, []).append((i, c, p))
    for step in sorted(by_step):
        rows = by_step[step]
        rows = [rows[j] for j in rng.permutation(len(rows))]  # order within a step is irrelevant
        tracker.update(np.array([r[0] for r in rows], dtype=np.int64),
                       np.array([r[1] for r in rows], dtype=bool),
                       np.array([r[2] for r in rows], dtype=np.float64), step=step)


@st.composite
def training_histories(draw):
    n = draw(st.integers(1, 12))
    n_steps = draw(st.integers(1, 25))
    events = []
    for step in range(n_steps):
        # each example appears at most once per step
        present = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        for i in range(n):
            if present[i]:
                events.append((step, i, draw(st.booleans()), draw(st.floats(0.0, 1.0))))
    return n, events


@settings(max_examples=120, deadline=None)
@given(training_histories())
def test_random_histories_match_reference_and_invariant(history):
    n, events = history
    keys = np.array([7, 1_000_003, 42, 5, 99_999_999_999, 0, 13, 8, 1 << 40, 77, 3, 2])[:n]
    tracker = ForgettingTracker(index=keys[::-1].copy())  # slot order differs from key order
    _feed(tracker, [(s, int(keys[i]), c, p) for s, i, c, p in events], 0)
    s = tracker.summary()
    slot = {int(k): j for j, k in enumerate(s["index"])}
    for i in range(n):
        seq = [(step, c) for step, j, c, _ in events if j == i]
        ref = reference_stats(seq)
        j = slot[int(keys[i])]
        for key, value in ref.items():
            assert s[key][j] == value, key
        # invariant of Toneva et al.'s definition
        assert s["forgetting_count"][j] <= s["presentations"][j] // 2
        # learning - forgetting = last correctness
        last = int(seq[-1][1]) if seq else 0
        assert s["learning_count"][j] - s["forgetting_count"][j] == last


def test_arbitrary_dataset_indices_and_untracked_index_error():
    keys = np.array([10**12, 3, 99, 17])
    tracker = ForgettingTracker(index=keys)
    tracker.update(torch.tensor([99, 10**12]), torch.tensor([True, False]), step=0)
    tracker.update([17, 99], [False, False], step=1)
    assert tracker.presentations.tolist() == [1, 0, 2, 1]
    assert tracker.forgetting_count.tolist() == [0, 0, 1, 0]
    assert tracker.never_learned.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="not tracked"):
        tracker.update([4], [True])
    with pytest.raises(ValueError, match="distinct"):
        ForgettingTracker(index=[1, 2, 1])
    with pytest.raises(ValueError, match="exactly one"):
        ForgettingTracker()
    with pytest.raises(ValueError, match="not tracked"):
        ForgettingTracker(3).update([3], [True])


def test_a_rejected_update_changes_nothing():
    """duplicates="error" raises before any state changes, the update count included (it is
    the default step of the next batch)."""
    tracker = ForgettingTracker(4)
    before = tracker.state_dict()
    with pytest.raises(ValueError, match="repeat"):
        tracker.update([0, 0, 1], [True, False, True], duplicates="error")
    after = tracker.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    tracker.update([2], [True])
    assert tracker.first_learned_step[2] == 0


def test_duplicates_in_one_batch():
    seq = ForgettingTracker(2)
    seq.update([0, 1, 0], [True, True, False], step=5)
    ref = ForgettingTracker(2)
    ref.update([0, 1], [True, True], step=5)
    ref.update([0], [False], step=5)
    for k, v in ref.state_dict().items():
        if k != "num_updates":
            np.testing.assert_array_equal(seq.state_dict()[k], v, err_msg=k)
    first = ForgettingTracker(2)
    first.update([0, 1, 0], [True, True, False], step=5, duplicates="first")
    assert first.presentations.tolist() == [1, 1] and first.forgetting_count.tolist() == [0, 0]
    with pytest.raises(ValueError, match="repeat"):
        ForgettingTracker(2).update([0, 0], [True, True], duplicates="error")


def _random_events(n, n_epochs, seed, drop=0.2):
    rng = np.random.default_rng(seed)
    events = []
    step = 0
    for epoch in range(n_epochs):
        order = rng.permutation(n)
        order = order[rng.random(n) > drop]  # some examples skipped (drop_last-like)
        for chunk in np.array_split(order, 3):
            for i in chunk:
                events.append((epoch, step, int(i), bool(rng.random() < 0.6), float(rng.random())))
            step += 1
    return events


def _run(tracker, events, epochs):
    for e in epochs:
        rows = [r for r in events if r[0] == e]
        for step in sorted({r[1] for r in rows}):
            b = [r for r in rows if r[1] == step]
            tracker.update([r[2] for r in b], [r[3] for r in b], [r[4] for r in b], step=step)
        tracker.end_epoch()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if key == "num_updates":
            continue
        if sa[key].dtype.kind == "f":
            np.testing.assert_allclose(sa[key], sb[key], rtol=1e-12, atol=1e-12, err_msg=key)
        else:
            np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


def test_merge_of_consecutive_segments_equals_single_stream():
    n, n_epochs = 15, 6
    events = _random_events(n, n_epochs, seed=1)
    single = ForgettingTracker(n)
    _run(single, events, range(n_epochs))
    early, late = ForgettingTracker(n), ForgettingTracker(n)
    _run(early, events, range(3))
    _run(late, events, range(3, n_epochs))
    _assert_same_state(single, early.merge(late))
    # the order of the merge call does not matter: segments are ordered by step
    early2, late2 = ForgettingTracker(n), ForgettingTracker(n)
    _run(early2, events, range(3))
    _run(late2, events, range(3, n_epochs))
    _assert_same_state(single, late2.merge(early2))


def test_merge_of_disjoint_shards_equals_single_stream():
    n, n_epochs = 20, 5
    events = _random_events(n, n_epochs, seed=2)
    single = ForgettingTracker(n)
    _run(single, events, range(n_epochs))
    shard_a, shard_b = ForgettingTracker(n), ForgettingTracker(n)
    _run(shard_a, [r for r in events if r[2] % 2 == 0], range(n_epochs))
    _run(shard_b, [r for r in events if r[2] % 2 == 1], range(n_epochs))
    _assert_same_state(single, shard_a.merge(shard_b))


def test_merge_refuses_interleaved_presentations():
    a, b = ForgettingTracker(1), ForgettingTracker(1)
    a.update([0], [True], step=0)
    b.update([0], [False], step=1)
    a.update([0], [True], step=2)
    with pytest.raises(ValueError, match="interleaved"):
        a.merge(b)
    with pytest.raises(ValueError, match="different dataset indices"):
        ForgettingTracker(2).merge(ForgettingTracker(3))


def test_state_round_trip_then_continue():
    n = 10
    events = _random_events(n, 6, seed=3)
    a = ForgettingTracker(index=np.arange(100, 100 + n))
    shifted = [(e, s, i + 100, c, p) for e, s, i, c, p in events]
    _run(a, shifted, range(3))
    # mid-epoch checkpoint: half of epoch 3
    half = [r for r in shifted if r[0] == 3][: 4]
    for r in half:
        a.update([r[2]], [r[3]], [r[4]], step=r[1])
    state = a.state_dict()
    b = ForgettingTracker.from_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    _assert_same_state(a, b)
    for t in (a, b):
        for r in [r for r in shifted if r[0] == 3][4:]:
            t.update([r[2]], [r[3]], [r[4]], step=r[1])
        t.end_epoch()
        _run(t, shifted, range(4, 6))
    _assert_same_state(a, b)
    with pytest.raises(KeyError, match="missing"):
        ForgettingTracker(2).load_state_dict({"index": np.arange(2)})


def test_cartography_statistics_equal_numpy():
    n, n_epochs = 12, 7
    rng = np.random.default_rng(4)
    p = rng.random((n_epochs, n))
    correct = rng.random((n_epochs, n)) < 0.5
    present = rng.random((n_epochs, n)) < 0.8
    present[:, 0] = False  # example 0 never presented
    tracker = ForgettingTracker(n)
    for e in range(n_epochs):
        idx = np.flatnonzero(present[e])
        tracker.update(idx, correct[e, idx], p[e, idx], step=e)
        tracker.end_epoch()
    for i in range(n):
        ep = present[:, i]
        if not ep.any():
            assert math.isnan(tracker.confidence[i]) and math.isnan(tracker.variability[i])
            assert math.isnan(tracker.correctness[i])
            continue
        assert tracker.confidence[i] == pytest.approx(np.mean(p[ep, i]), abs=1e-12)
        assert tracker.variability[i] == pytest.approx(np.std(p[ep, i]), abs=1e-12)
        assert tracker.correctness[i] == pytest.approx(np.mean(correct[ep, i]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_epochs_in_one_update_match_reference(seed):
    """Epochs fed as one update holding every tracked example in shuffled order (the
    monitor's common case, which the tracker updates as whole arrays), mixed with epochs
    missing an example or split into two updates: counts equal the per-example reference,
    cartography equals numpy's mean and std over the epochs each example was seen in."""
    rng = np.random.default_rng(seed)
    keys = np.array([40, 3, 17, 8, 1 << 33, 0, 25, 11, 5])
    n, n_epochs = keys.shape[0], 9
    tracker = ForgettingTracker(index=keys[rng.permutation(n)])
    correct = rng.random((n_epochs, n)) < 0.6
    p = rng.random((n_epochs, n))
    present = np.ones((n_epochs, n), dtype=bool)
    present[3, rng.integers(n)] = False  # an epoch without one example
    step = 0
    history = {i: [] for i in range(n)}
    for e in range(n_epochs):
        order = [i for i in rng.permutation(n) if present[e, i]]
        parts = [order[:4], order[4:]] if e == 5 else [order]  # epoch 5 in two updates
        for part in parts:
            part = np.array(part, dtype=np.int64)
            steps = step + np.arange(part.shape[0]) // 4
            tracker.update(keys[part], correct[e, part], p[e, part], step=steps)
            for i, t in zip(part, steps):
                history[int(i)].append((int(t), bool(correct[e, i])))
            step = int(steps[-1]) + 1
        tracker.end_epoch()
    summary = tracker.summary()
    slot = {int(k): j for j, k in enumerate(summary["index"])}
    for i in range(n):
        j = slot[int(keys[i])]
        for key, value in reference_stats(history[i]).items():
            assert summary[key][j] == value, (i, key)
        state = tracker.state_dict()  # the state merge() orders presentations by
        assert (state["first_step"][j], state["last_step"][j]) == (history[i][0][0], history[i][-1][0])
        assert (state["first_correct"][j], state["last_correct"][j]) == (history[i][0][1], history[i][-1][1])
        seen = present[:, i]
        assert tracker.confidence[j] == pytest.approx(np.mean(p[seen, i]), abs=1e-12)
        assert tracker.variability[j] == pytest.approx(np.std(p[seen, i]), abs=1e-12)
        assert tracker.correctness[j] == pytest.approx(np.mean(correct[seen, i]), abs=1e-12)


def test_cartography_averages_presentations_within_an_epoch():
    tracker = ForgettingTracker(1)
    # epoch 1: two presentations (p 0.2 correct, p 0.6 wrong); epoch 2: one (p 0.9 correct)
    tracker.update([0], [True], [0.2], step=0)
    tracker.update([0], [False], [0.6], step=1)
    tracker.end_epoch()
    tracker.update([0], [True], [0.9], step=2)
    tracker.end_epoch()
    epoch_values = np.array([0.4, 0.9])
    assert tracker.confidence[0] == pytest.approx(epoch_values.mean())
    assert tracker.variability[0] == pytest.approx(epoch_values.std())
    assert tracker.correctness[0] == pytest.approx((0.5 + 1.0) / 2)
    # without p_true only correctness is available
    no_p = ForgettingTracker(1)
    no_p.update([0], [True])
    no_p.end_epoch()
    assert math.isnan(no_p.confidence[0]) and no_p.correctness[0] == 1.0


def test_rank_orders_by_count_with_never_learned_last():
    counts = np.array([3, 0, 1, 0, 5, 2, 0])
    never = np.array([False, False, False, True, False, False, False])
    r = rank(counts, never, seed=0, never_learned_value="inf")
    assert r.order[-1] == 3  # never learned: infinitely forgotten, although its count is 0
    assert np.isinf(r.forgetting_count[-1])
    assert r.forgetting_count[:-1].tolist() == [0, 0, 1, 2, 3, 5]
    assert set(r.order[:2].tolist()) == {1, 6}
    assert r.indices_to_prune(2 / 7).tolist() == r.order[:2].tolist()
    assert sorted(r.indices_to_prune(0.5).tolist() + r.indices_to_keep(0.5).tolist()) == list(range(7))
    assert len(r.indices_to_prune(0.5)) == 3  # floor(0.5 * 7)
    with pytest.raises(ValueError, match="fraction"):
        r.indices_to_prune(1.5)


def test_rank_tie_breaking_is_seeded_random():
    n = 200
    counts = np.zeros(n, dtype=int)
    never = np.zeros(n, dtype=bool)
    a = rank(counts, never, seed=1).order
    b = rank(counts, never, seed=1).order
    c = rank(counts, never, seed=2).order
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(n))
    assert not np.array_equal(a, np.arange(n))  # not the input order
    # ties broken independently of the input order when dataset indices are given
    perm = np.random.default_rng(0).permutation(n)
    d = rank(counts[perm], never[perm], seed=1, index=perm).order
    np.testing.assert_array_equal(a, d)


def test_rank_sums_runs():
    idx = np.array([10, 20, 30, 40])
    run1 = (np.array([1, 0, 2, 0]), np.array([False, False, False, True]))
    run2 = (np.array([0, 3, 0, 0]), np.array([False, False, False, False]))
    # run 2 lists the examples in another order
    perm = np.array([2, 0, 3, 1])
    r = rank([run1[0], run2[0][perm]], [run1[1], run2[1][perm]], seed=0, index=[idx, idx[perm]],
             never_learned_value="inf")
    # totals: 10 -> 1, 20 -> 3, 30 -> 2, 40 -> never learned once (inf)
    assert r.order.tolist() == [10, 30, 20, 40]
    assert r.never_learned_runs.tolist() == [0, 0, 0, 1]
    # Toneva et al.'s released code: a never-learned run scores the number of epochs
    t = rank([run1[0], run2[0][perm]], [run1[1], run2[1][perm]], seed=0, index=[idx, idx[perm]],
             never_learned_value=2)
    # totals: 10 -> 1, 20 -> 3, 30 -> 2, 40 -> 2 + 0 = 2 (tie with 30, broken at random)
    assert t.order[0] == 10 and t.order[-1] == 20
    assert t.forgetting_count.tolist() == [1, 2, 2, 3]
    with pytest.raises(ValueError, match="different dataset indices"):
        rank([run1[0], run2[0]], [run1[1], run2[1]], index=[idx, idx + 1], presentations=2)


def _toneva_sort(counts_per_run, never_per_run, npresentations):
    """Toneva et al.'s sort_examples_by_forgetting (github.com/mtoneva/example_forgetting):
    per example, over runs, add npresentations if never learned in that run, else the
    number of forgetting events; sort ascending. Returns the per-example totals."""
    totals = []
    for i in range(len(counts_per_run[0])):
        total = 0
        for counts, never in zip(counts_per_run, never_per_run):
            total += npresentations if never[i] else counts[i]
        totals.append(total)
    return np.array(totals, dtype=float)


def test_rank_default_follows_tonevas_code_for_never_learned():
    # Three runs of 10 epochs (10 presentations each). Example 0 was never learned in run 1
    # and never forgotten in runs 2-3: 10 + 0 + 0 = 10. Example 1 was forgotten 5 times in
    # every run: 15. Toneva et al.'s code puts example 0 before example 1 (less forgotten);
    # the "inf" rule puts it last.
    counts = [np.array([0, 5, 1, 0]), np.array([0, 5, 2, 3]), np.array([0, 5, 0, 4])]
    never = [np.array([True, False, False, False]), np.zeros(4, bool), np.zeros(4, bool)]
    r = rank(counts, never, seed=0, presentations=10)
    # totals by hand: [10, 15, 3, 7]
    assert r.order.tolist() == [2, 3, 0, 1]
    assert r.forgetting_count.tolist() == [3, 7, 10, 15]
    assert r.never_learned_runs.tolist() == [0, 0, 1, 0]
    np.testing.assert_array_equal(np.sort(_toneva_sort(counts, never, 10)), r.forgetting_count)
    assert rank(counts, never, seed=0, never_learned_value="inf").order.tolist() == [2, 3, 1, 0]
    # per-example presentations (e.g. a run that saw some examples more often) are taken as given
    shown = [np.array([7, 10, 10, 10]), np.full(4, 10), np.full(4, 10)]
    assert rank(counts, never, seed=0, presentations=shown).forgetting_count.tolist() == [3, 7, 7, 15]
    # random cases: the same totals as the authors' loop
    rng = np.random.default_rng(4)
    counts = [rng.integers(0, 4, 50) for _ in range(3)]
    never = [rng.random(50) < 0.1 for _ in range(3)]
    for c, nl in zip(counts, never):
        c[nl] = 0
    r = rank(counts, never, seed=1, presentations=8)
    np.testing.assert_array_equal(r.forgetting_count, np.sort(_toneva_sort(counts, never, 8)))
    np.testing.assert_array_equal(_toneva_sort(counts, never, 8)[r.order], r.forgetting_count)
    with pytest.raises(ValueError, match="presentations="):
        rank(counts, never, seed=0)  # never-learned examples and no presentations
    assert rank(counts[0], np.zeros(50, bool), seed=0).forgetting_count.tolist() == np.sort(counts[0]).tolist()


def test_cartography_regions_equal_direct_selection():
    rng = np.random.default_rng(5)
    conf = rng.random(30)
    var = rng.random(30) * 0.5
    conf[4] = np.nan
    regions = cartography_regions(conf, var, fraction=0.33)
    valid = np.flatnonzero(~np.isnan(conf))
    k = int(0.33 * valid.size)  # 29 valid -> 9
    assert k == 9
    order_conf = valid[np.argsort(conf[valid])]
    order_var = valid[np.argsort(var[valid])]
    assert set(np.flatnonzero(regions.hard)) == set(order_conf[:k])
    assert set(np.flatnonzero(regions.easy)) == set(order_conf[-k:])
    assert set(np.flatnonzero(regions.ambiguous)) == set(order_var[-k:])
    assert not regions.easy[4] and not regions.hard[4] and not regions.ambiguous[4]


def test_presentation_outcomes_equal_manual_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 4, generator=g)
    logits[3] = torch.tensor([1.0, 1.0, 0.0, -1.0])  # tie between classes 0 and 1
    targets = torch.tensor([0, 1, 2, 1, 3, 0, 2, 1, 3])
    out = presentation_outcomes(logits, targets)
    for i in range(9):
        z = logits[i].double().tolist()
        y = int(targets[i])
        m = max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        pred = z.index(max(z))  # first maximum
        other = max(v for c, v in enumerate(z) if c != y)
        assert bool(out.correct[i]) == (pred == y)
        assert float(out.loss[i]) == pytest.approx(lse - z[y], rel=1e-5)
        assert float(out.p_true[i]) == pytest.approx(math.exp(z[y] - lse), rel=1e-5)
        assert float(out.margin[i]) == pytest.approx(z[y] - other, abs=1e-6)
    assert not bool(out.correct[3]) and float(out.margin[3]) == 0.0


def test_presentation_outcomes_correct_is_first_maximum_with_ties_and_non_finite_logits():
    """correct = (first maximum == target), as a Python loop computes it, on integer-valued
    logits (many ties, target first / not first among the maxima) and NaN / inf rows."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(-2, 3, (400, 5), generator=g).float()
    targets = torch.randint(0, 5, (400,), generator=g)
    logits[0] = torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0])
    targets[0] = 0  # tie, target is the first maximum: correct
    logits[1] = torch.tensor([float("nan"), 1.0, 0.0, 0.0, 0.0])
    logits[2] = torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0])
    targets[2] = 1
    logits[3] = torch.tensor([float("-inf")] * 5)
    logits[4] = torch.tensor([0.0, float("inf"), float("inf"), 0.0, 0.0])
    targets[4] = 2  # tie at +inf, not the first: incorrect
    out = presentation_outcomes(logits, targets)
    expected = [int(torch.argmax(row)) == int(t) for row, t in zip(logits, targets)]
    for i in range(logits.shape[0]):
        z = logits[i].tolist()
        if not any(math.isnan(v) for v in z):
            first = max(range(len(z)), key=lambda c: (z[c], -c))
            assert expected[i] == (first == int(targets[i]))
    assert out.correct.tolist() == expected
    assert expected[0] and not expected[4] and expected[2]
    assert 0 < sum(expected) < len(expected)


def test_presentation_outcomes_binary_single_logit():
    # float64: in float32 the loss at z = 2 (logsumexp(0, 2) - 2) cancels to within a few
    # float32 steps, which depend on the CPU's exp/log kernels
    z = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    y = torch.tensor([1, 1, 0, 0])
    out = presentation_outcomes(z[:, None], y)
    sig = [1 / (1 + math.exp(-v)) for v in z.tolist()]
    assert out.correct.tolist() == [True, False, False, True]
    for i in range(4):
        p = sig[i] if y[i] == 1 else 1 - sig[i]
        assert float(out.p_true[i]) == pytest.approx(p, rel=1e-12)
        assert float(out.loss[i]) == pytest.approx(-math.log(p), rel=1e-12)
        assert float(out.margin[i]) == pytest.approx(z[i].item() if y[i] == 1 else -z[i].item())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        presentation_outcomes(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        presentation_outcomes(torch.zeros(2, 2, 2), torch.tensor([0, 1]))
