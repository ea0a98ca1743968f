"""Per-example forgetting events (Toneva et al. 2019) and dataset cartography
(Swayamdipta et al. 2020), as a streaming, O(N)-memory tracker over dataset indices.

Definitions (one example, presentations t = 1, 2, ... in training order; acc_t in {0, 1}
is the correctness of the example at presentation t, from the training forward pass of
that batch, before the optimiser step):

* forgetting event at t > 1: acc_{t-1} = 1 and acc_t = 0 (Toneva et al., Sec. 2: a
  decrease of accuracy between two consecutive presentations). The first presentation
  is never a forgetting event.
* learning event at t: acc_t = 1 and the example was not correct at the previous
  presentation, with the state before the first presentation taken as "not correct".
  So a first presentation that is correct is a learning event, and
  ``learning_count - forgetting_count == last correctness`` always holds.
* first learned: the first presentation with acc_t = 1 (Toneva's released code,
  ``first_learned``); recorded as a step and as a 0-based presentation number.
* never learned: no presentation was correct (this includes examples never presented).
* unforgettable: learned at least once and no forgetting event (Toneva's released code
  counts as unforgettable the examples whose forgetting score is 0, where a never-learned
  example is scored as maximally forgotten).

Cartography (Swayamdipta et al. 2020, Sec. 2), over the epochs in which the example was
presented: confidence = mean_e p_e(gold), variability = population standard deviation of
p_e(gold) (``np.std``, ddof = 0, as in their released code), correctness = fraction of
epochs in which the prediction was correct. When an example is presented more than once
in one epoch, its epoch value is the mean over that epoch's presentations (p(gold), and
the fraction correct); the default of one presentation per epoch gives their definition
exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from ._args import integer, number, one_of, text

__all__ = [
    "WithIndex",
    "read_examples",
    "PresentationOutcomes",
    "presentation_outcomes",
    "ForgettingTracker",
    "ForgettingRanking",
    "rank",
    "CartographyRegions",
    "cartography_regions",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[Any]]


# --------------------------------------------------------------------------------------
# Per-batch outcomes from logits
# --------------------------------------------------------------------------------------
class PresentationOutcomes(NamedTuple):
    """Per-example outcomes of one batch (all detached tensors of shape (B,))."""

    correct: torch.Tensor  # bool: argmax of the logits equals the target
    loss: torch.Tensor  # cross-entropy in nats
    margin: torch.Tensor  # logit of the target minus the largest other logit
    p_true: torch.Tensor  # softmax probability of the target


def presentation_outcomes(logits: torch.Tensor, targets: torch.Tensor, *,
                          check_targets: bool = True) -> PresentationOutcomes:
    """Correctness, loss, margin and p(gold) per example, from a batch of logits.

    Multi-class: ``logits`` (B, C) with C >= 2 and integer ``targets`` (B,).
    correct = [argmax_c z_c == y] (first maximum wins a tie, as ``torch.argmax``);
    loss = -log softmax(z)_y; margin = z_y - max_{c != y} z_c (Toneva et al.'s
    misclassification margin); p_true = softmax(z)_y.

    Binary with a single logit: ``logits`` (B,) or (B, 1), targets in {0, 1}. The logit z
    is treated as the two-class logits (0, z), so correct = [(z > 0) == y],
    loss = binary cross-entropy with logits, margin = z if y = 1 else -z,
    p_true = sigmoid(z) if y = 1 else 1 - sigmoid(z).

    ``check_targets=False`` skips the checks that read target values (integer-valued, in
    range), which synchronise with an accelerator; for callers whose targets were already
    used by a loss that checks them.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensor; got "
                        f"{type(logits).__name__} and {type(targets).__name__}")
    z = logits.detach()
    if z.ndim == 1 or (z.ndim == 2 and z.shape[1] == 1):
        z = z.reshape(-1)
        z = torch.stack([torch.zeros_like(z), z], dim=1)
    elif z.ndim != 2:
        raise ValueError("logits must have shape (B, C) for C classes, or (B,) / (B, 1) for "
                         f"one binary logit; got shape {tuple(logits.shape)}")
    y = targets.detach().reshape(-1)
    if y.shape[0] != z.shape[0]:
        raise ValueError(f"targets has {y.shape[0]} entries but logits has {z.shape[0]} rows; "
                         "pass one integer class label per example")
    if y.is_floating_point():
        if check_targets and not torch.all(y == torch.round(y)):
            raise ValueError("targets must be integer class labels (soft targets are not "
                             "supported for correctness)")
    y = y.long()
    n_classes = z.shape[1]
    if check_targets and y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"targets must lie in [0, {n_classes - 1}] for {n_classes} classes; "
                         f"got values in [{int(y.min())}, {int(y.max())}]")
    zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    # log softmax(z)_y = z_y - logsumexp(z), computed for the target only (on CPU, a full
    # log_softmax over a short class axis costs several times more).
    column = y.unsqueeze(1)
    z_true = zf.gather(1, column).squeeze(1)
    log_p_true = z_true - torch.logsumexp(zf, dim=1)
    margin = z_true - zf.scatter(1, column, -torch.inf).amax(dim=1)
    if zf.is_cuda or not y.numel():
        correct = zf.argmax(dim=1) == y
    else:
        # On CPU an argmax over a short class axis costs more than the rest together. A
        # positive margin means the target is the only maximum, a negative one that it is
        # not a maximum; ties (margin 0) and non-finite logits are settled by argmax on
        # those rows alone, so the result is argmax's, first maximum winning a tie.
        correct = margin > 0
        unsettled = (margin == 0) | ~torch.isfinite(margin)
        if bool(unsettled.any()):
            rows = unsettled.nonzero().squeeze(1)
            correct[rows] = zf[rows].argmax(dim=1) == y[rows]
    return PresentationOutcomes(correct=correct, loss=-log_p_true, margin=margin,
                                p_true=log_p_true.exp())


def regression_outcomes(predictions: torch.Tensor, targets: torch.Tensor, tolerance: float) -> PresentationOutcomes:
    """Outcomes of real-valued predictions, for forgetting on a regression task.

    Toneva et al. define forgetting for classification; for regression an example counts as
    correct when every output is within ``tolerance`` of its target:
    correct = [max_k |f_k - y_k| <= tolerance]; loss = mean_k (f_k - y_k)² (``F.mse_loss``
    per example); margin = tolerance - max_k |f_k - y_k| (positive when correct);
    p_true = NaN (there is no probability of the gold label: cartography's confidence and
    variability are undefined).
    """
    f = predictions.detach()
    b = f.shape[0]
    f = f.reshape(b, -1).double()
    y = targets.detach().reshape(b, -1).to(f.device, torch.float64)
    if y.shape != f.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match predictions of shape "
                         f"{tuple(predictions.shape)}; pass one target per prediction")
    error = (f - y).abs().amax(dim=1)
    return PresentationOutcomes(correct=error <= tolerance, loss=((f - y) ** 2).mean(dim=1), margin=tolerance - error,
                                p_true=torch.full((b,), float("nan"), dtype=torch.float64, device=f.device))


# --------------------------------------------------------------------------------------
# Streaming tracker
# --------------------------------------------------------------------------------------
def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


# state arrays of one slot (one example), with their dtype and initial value
_SLOT_FIELDS: Dict[str, tuple] = {
    "presentations": (np.int64, 0),
    "forgetting_count": (np.int64, 0),
    "learning_count": (np.int64, 0),
    "first_correct": (np.int8, -1),  # correctness at the first presentation (-1: none yet)
    "last_correct": (np.int8, -1),  # correctness at the latest presentation (-1: none yet)
    "first_step": (np.int64, -1),
    "last_step": (np.int64, -1),
    "first_learned_step": (np.int64, -1),
    "first_learned_presentation": (np.int64, -1),  # 0-based presentation number
    # cartography, folded at end_epoch: per-epoch values of p(gold) (Welford) and correctness
    "conf_epochs": (np.int64, 0),
    "conf_mean": (np.float64, 0.0),
    "conf_m2": (np.float64, 0.0),
    "corr_epochs": (np.int64, 0),
    "corr_sum": (np.float64, 0.0),
    # accumulators of the current (unfinished) epoch
    "epoch_presentations": (np.int64, 0),
    "epoch_correct": (np.int64, 0),
    "epoch_p_count": (np.int64, 0),
    "epoch_p_sum": (np.float64, 0.0),
}


class ForgettingTracker:
    """Streaming per-example forgetting and cartography statistics, keyed by dataset index.

    Memory is O(N): a fixed set of arrays with one slot per tracked example. Feed it one
    call of :meth:`update` per batch (in training order) and one :meth:`end_epoch` per
    epoch; read the statistics from the properties or :meth:`summary`.

    Args:
        num_examples: track dataset indices ``0 .. num_examples - 1``.
        index: or: the dataset indices to track (any distinct integers, e.g. a subset of a
            large dataset). Slot ``i`` of every array belongs to ``index[i]``.
    """

    def __init__(self, num_examples: Optional[int] = None, *, index: Optional[ArrayLike] = None) -> None:
        if (num_examples is None) == (index is None):
            raise ValueError("give exactly one of num_examples (track indices 0..num_examples-1) "
                             "or index= (an array of the distinct dataset indices to track)")
        if index is None:
            num_examples = integer(int(num_examples), "num_examples", "ForgettingTracker", minimum=0)
            idx = np.arange(num_examples, dtype=np.int64)
        else:
            idx = _as_numpy(index, "index")
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise ValueError("index must be a 1-D array of integer dataset indices; got "
                                 f"shape {idx.shape} and dtype {idx.dtype}")
            idx = idx.astype(np.int64)
        self._set_index(idx)
        for name, (dtype, init) in _SLOT_FIELDS.items():
            setattr(self, "_" + name, np.full(idx.shape[0], init, dtype=dtype))
        self._num_updates = 0
        self._scratch: Optional[np.ndarray] = None  # see _has_repeats

    # ---- index handling --------------------------------------------------------------
    def _set_index(self, idx: np.ndarray) -> None:
        n = idx.shape[0]
        self._index = idx
        self._contiguous = bool(n == 0 or np.array_equal(idx, np.arange(n, dtype=np.int64)))
        if not self._contiguous:
            self._sorter = np.argsort(idx, kind="stable")
            sorted_idx = idx[self._sorter]
            if n > 1 and np.any(sorted_idx[1:] == sorted_idx[:-1]):
                dup = sorted_idx[1:][sorted_idx[1:] == sorted_idx[:-1]][:5]
                raise ValueError(f"index must hold distinct dataset indices; repeated: {dup.tolist()}")
            self._sorted_index = sorted_idx

    def slots(self, indices: ArrayLike) -> np.ndarray:
        """Slot positions of the given dataset indices (ValueError for untracked ones)."""
        ind = _as_numpy(indices, "indices").reshape(-1)
        if ind.size and not np.issubdtype(ind.dtype, np.integer):
            raise ValueError(f"indices must be integer dataset indices, got dtype {ind.dtype}")
        ind = ind.astype(np.int64)
        n = self._index.shape[0]
        if self._contiguous:
            bad = (ind < 0) | (ind >= n)
            pos = ind
        else:
            p = np.searchsorted(self._sorted_index, ind)
            p_clip = np.minimum(p, max(n - 1, 0))
            bad = (p >= n) | (self._sorted_index[p_clip] != ind) if n else np.ones(ind.shape, bool)
            pos = self._sorter[p_clip] if n else ind
        if np.any(bad):
            raise ValueError(f"dataset indices {ind[bad][:5].tolist()} are not tracked; create the "
                             "tracker with num_examples= larger than every index, or with index= "
                             "listing every dataset index you will pass")
        return pos

    # ---- recording -------------------------------------------------------------------
    def update(self, indices: ArrayLike, correct: ArrayLike, p_true: Optional[ArrayLike] = None,
               *, step: Union[None, int, ArrayLike] = None, duplicates: str = "sequential") -> None:
        """Record one batch of presentations.

        Args:
            indices: dataset index of each example in the batch, shape (B,).
            correct: whether each example was classified correctly, shape (B,).
            p_true: optional softmax probability of the gold label, shape (B,); needed for
                cartography confidence and variability.
            step: training step of this batch (e.g. ``trainer.global_step``), or one step
                per example, shape (B,), to record several consecutive batches of one
                epoch in one call (exact with ``duplicates="sequential"``: each example's
                presentations are taken in the order given); defaults to the number of
                earlier ``update`` calls. Steps should not decrease: they order
                presentations for :meth:`merge`.
            duplicates: what an index repeated within one batch means. ``"sequential"``:
                successive presentations, in batch order (sampling with replacement);
                ``"first"``: keep the first occurrence only (e.g. the padding duplicates of
                a ``DistributedSampler`` after gathering ranks); ``"error"``: raise.
        """
        one_of(duplicates, "duplicates", ("sequential", "first", "error"), "ForgettingTracker.update")
        pos = self.slots(indices)
        c = _as_numpy(correct, "correct").reshape(-1)
        if c.shape[0] != pos.shape[0]:
            raise ValueError(f"correct has {c.shape[0]} entries but indices has {pos.shape[0]}; "
                             "pass one value per example")
        if c.dtype != np.bool_:
            if c.size and not np.all((c == 0) | (c == 1)):
                raise ValueError("correct must be boolean (or 0/1) per example")
            c = c.astype(bool)
        p = None
        if p_true is not None:
            p = _as_numpy(p_true, "p_true").reshape(-1).astype(np.float64)
            if p.shape[0] != pos.shape[0]:
                raise ValueError(f"p_true has {p.shape[0]} entries but indices has {pos.shape[0]}")
            if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
                raise ValueError("p_true must hold probabilities in [0, 1]")
        if step is None or np.ndim(step) == 0:
            st = np.full(pos.shape[0], self._num_updates if step is None else int(step), dtype=np.int64)
        else:
            st = _as_numpy(step, "step").reshape(-1).astype(np.int64)
            if st.shape[0] != pos.shape[0]:
                raise ValueError(f"step has {st.shape[0]} entries but indices has {pos.shape[0]}; pass one "
                                 "step for the batch or one per example")
        if pos.size == 0:
            self._num_updates += 1
            return
        if not self._has_repeats(pos):  # the common case: each example once in this batch
            self._num_updates += 1
            self._record(pos, c, p, st)
            return
        # occurrence number of each slot within this batch (0 for a first occurrence)
        order = np.argsort(pos, kind="stable")
        sp = pos[order]
        new_run = np.ones(sp.shape[0], dtype=bool)
        new_run[1:] = sp[1:] != sp[:-1]
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(sp.shape[0]), 0))
        occ = np.empty_like(pos)
        occ[order] = np.arange(sp.shape[0]) - run_start
        if occ.max() > 0:
            if duplicates == "error":
                repeated = np.unique(self._index[pos[occ > 0]])[:5].tolist()
                raise ValueError(f"dataset indices {repeated} repeat within one batch; pass "
                                 "duplicates='sequential' (successive presentations) or 'first'")
            if duplicates == "first":
                keep = occ == 0
                pos, c, occ, st = pos[keep], c[keep], occ[keep], st[keep]
                p = None if p is None else p[keep]
        self._num_updates += 1
        for r in range(int(occ.max()) + 1):
            sel = occ == r
            self._record(pos[sel], c[sel], None if p is None else p[sel], st[sel])

    def _has_repeats(self, pos: np.ndarray) -> bool:
        """Whether a slot occurs more than once in ``pos`` (O(len(pos)), with a scratch
        array of one entry per slot: each position writes its number, and a repeated slot
        reads back another position's)."""
        if pos.shape[0] < 2:
            return False
        scratch = self._scratch
        if scratch is None or scratch.shape[0] != self._index.shape[0]:
            scratch = self._scratch = np.empty(self._index.shape[0], dtype=np.int64)
        numbers = np.arange(pos.shape[0])
        scratch[pos] = numbers
        return not np.array_equal(scratch[pos], numbers)

    def _record(self, s: np.ndarray, c: np.ndarray, p: Optional[np.ndarray], step: np.ndarray) -> None:
        # s holds distinct slots (update() splits repeats into rounds)
        if s.shape[0] == self._index.shape[0] and s.shape[0]:
            self._record_every_slot(s, c, p, step)
            return
        prev = self._last_correct[s]
        self._forgetting_count[s] += (prev == 1) & ~c
        self._learning_count[s] += (prev != 1) & c
        first = self._presentations[s] == 0
        self._first_correct[s[first]] = c[first]
        self._first_step[s[first]] = step[first]
        learned_now = c & (self._first_learned_step[s] < 0)
        self._first_learned_step[s[learned_now]] = step[learned_now]
        self._first_learned_presentation[s[learned_now]] = self._presentations[s[learned_now]]
        self._presentations[s] += 1
        self._last_correct[s] = c
        self._last_step[s] = step
        self._epoch_presentations[s] += 1
        self._epoch_correct[s] += c
        if p is not None:
            self._epoch_p_count[s] += 1
            self._epoch_p_sum[s] += p

    def _record_every_slot(self, s: np.ndarray, c: np.ndarray, p: Optional[np.ndarray], step: np.ndarray) -> None:
        """_record when ``s`` is a permutation of every slot (one epoch of presentations, the
        common case): the inputs are put in slot order once, then whole arrays are updated
        (the same operations per slot, without a gather and a scatter for each)."""
        n = s.shape[0]
        cs = np.empty(n, dtype=bool)
        cs[s] = c
        sts = np.empty(n, dtype=np.int64)
        sts[s] = step
        prev = self._last_correct
        self._forgetting_count += (prev == 1) & ~cs
        self._learning_count += (prev != 1) & cs
        first = self._presentations == 0
        if first.any():
            self._first_correct[first] = cs[first]
            self._first_step[first] = sts[first]
        learned_now = cs & (self._first_learned_step < 0)
        if learned_now.any():
            self._first_learned_step[learned_now] = sts[learned_now]
            self._first_learned_presentation[learned_now] = self._presentations[learned_now]
        self._presentations += 1
        self._last_correct[:] = cs
        self._last_step[:] = sts
        self._epoch_presentations += 1
        self._epoch_correct += cs
        if p is not None:
            ps = np.empty(n, dtype=np.float64)
            ps[s] = p
            self._epoch_p_count += 1
            self._epoch_p_sum += ps

    def end_epoch(self) -> None:
        """Fold the current epoch's presentations into the cartography statistics."""
        seen = self._epoch_presentations > 0
        has_p = self._epoch_p_count > 0
        # Every slot presented (the common case): whole arrays instead of boolean masks.
        seen = slice(None) if seen.all() else seen
        has_p = slice(None) if has_p.all() else has_p
        self._corr_epochs[seen] += 1
        self._corr_sum[seen] += self._epoch_correct[seen] / self._epoch_presentations[seen]
        v = self._epoch_p_sum[has_p] / self._epoch_p_count[has_p]
        n = self._conf_epochs[has_p] + 1
        delta = v - self._conf_mean[has_p]
        mean = self._conf_mean[has_p] + delta / n
        self._conf_m2[has_p] += delta * (v - mean)
        self._conf_mean[has_p] = mean
        self._conf_epochs[has_p] = n
        for name in ("epoch_presentations", "epoch_correct", "epoch_p_count", "epoch_p_sum"):
            getattr(self, "_" + name)[:] = 0

    # ---- reading ---------------------------------------------------------------------
    @property
    def index(self) -> np.ndarray:
        """Dataset index of each slot."""
        return self._index.copy()

    @property
    def presentations(self) -> np.ndarray:
        return self._presentations.copy()

    @property
    def forgetting_count(self) -> np.ndarray:
        return self._forgetting_count.copy()

    @property
    def learning_count(self) -> np.ndarray:
        return self._learning_count.copy()

    @property
    def first_learned_step(self) -> np.ndarray:
        """Step of the first correct presentation; -1 if never learned."""
        return self._first_learned_step.copy()

    @property
    def first_learned_presentation(self) -> np.ndarray:
        """0-based number of the first correct presentation; -1 if never learned."""
        return self._first_learned_presentation.copy()

    @property
    def last_correct(self) -> np.ndarray:
        """Correctness at the latest presentation: 1, 0, or -1 if never presented."""
        return self._last_correct.astype(np.int64)

    @property
    def never_learned(self) -> np.ndarray:
        """True where no presentation was correct (including never-presented examples)."""
        return self._learning_count == 0

    @property
    def unforgettable(self) -> np.ndarray:
        """Learned at least once and never forgotten."""
        return (self._learning_count > 0) & (self._forgetting_count == 0)

    @property
    def confidence(self) -> np.ndarray:
        """Mean over epochs of p(gold); NaN where no epoch with p_true was completed."""
        out = np.full(self._conf_mean.shape, np.nan)
        ok = self._conf_epochs > 0
        out[ok] = self._conf_mean[ok]
        return out

    @property
    def variability(self) -> np.ndarray:
        """Population standard deviation over epochs of p(gold); NaN where no epoch."""
        out = np.full(self._conf_mean.shape, np.nan)
        ok = self._conf_epochs > 0
        out[ok] = np.sqrt(np.maximum(self._conf_m2[ok] / self._conf_epochs[ok], 0.0))
        return out

    @property
    def correctness(self) -> np.ndarray:
        """Fraction of epochs in which the example was correct; NaN where no epoch."""
        out = np.full(self._corr_sum.shape, np.nan)
        ok = self._corr_epochs > 0
        out[ok] = self._corr_sum[ok] / self._corr_epochs[ok]
        return out

    def summary(self) -> Dict[str, np.ndarray]:
        """Per-example table (the ``/forgetting/examples`` rows of the run file)."""
        return {
            "index": self.index,
            "presentations": self.presentations,
            "forgetting_count": self.forgetting_count,
            "learning_count": self.learning_count,
            "first_learned_step": self.first_learned_step,
            "first_learned_presentation": self.first_learned_presentation,
            "never_learned": self.never_learned,
            "unforgettable": self.unforgettable,
            "confidence": self.confidence,
            "variability": self.variability,
            "correctness": self.correctness,
        }

    # ---- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        """All state as plain numpy arrays (copies), for checkpoints and gathering."""
        state = {"index": self._index.copy(),
                 "num_updates": np.asarray(self._num_updates, dtype=np.int64)}
        for name in _SLOT_FIELDS:
            state[name] = getattr(self, "_" + name).copy()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore state written by :meth:`state_dict` (tensors or arrays accepted)."""
        missing = [k for k in ("index", "num_updates", *_SLOT_FIELDS) if k not in state]
        if missing:
            raise KeyError(f"state is missing {missing}; pass a dict from ForgettingTracker.state_dict()")
        idx = _as_numpy(state["index"], "index").astype(np.int64).reshape(-1)
        arrays = {}
        for name, (dtype, _) in _SLOT_FIELDS.items():
            a = _as_numpy(state[name], name).reshape(-1)
            if a.shape[0] != idx.shape[0]:
                raise ValueError(f"state[{name!r}] has {a.shape[0]} entries but index has {idx.shape[0]}")
            arrays[name] = a.astype(dtype)
        self._set_index(idx)
        for name, a in arrays.items():
            setattr(self, "_" + name, a)
        self._num_updates = int(_as_numpy(state["num_updates"], "num_updates"))

    @classmethod
    def from_state_dict(cls, state: Dict[str, Any]) -> "ForgettingTracker":
        tracker = cls(index=np.zeros(0, dtype=np.int64))
        tracker.load_state_dict(state)
        return tracker

    # ---- merging ---------------------------------------------------------------------
    def merge(self, other: "ForgettingTracker") -> "ForgettingTracker":
        """Combine ``other`` into this tracker (in place; returns ``self``).

        Exact when, for every example, the presentations recorded by the two trackers do
        not interleave in time: either the example was seen by only one of them (disjoint
        shards), or all of one tracker's presentations of it come at steps <= all of the
        other's (consecutive segments of one run). Forgetting and learning events across
        the junction are then restored from the first and last correctness of each
        segment. Interleaved presentations cannot be ordered from summaries: a
        ValueError is raised, and the records themselves must be gathered and fed to one
        tracker in step order (the DDP recipe: all-gather each step's indices and
        outcomes, then ``update`` every rank's tracker with the gathered batch).
        Cartography statistics merge exactly in every case (Chan et al.'s parallel
        variance), and the current-epoch accumulators are summed.
        """
        if not isinstance(other, ForgettingTracker):
            raise TypeError(f"can only merge a ForgettingTracker, got {type(other).__name__}")
        if not np.array_equal(self._index, other._index):
            raise ValueError("trackers track different dataset indices (or a different slot "
                             "order); build every tracker with the same num_examples/index")
        a = {k: getattr(self, "_" + k) for k in _SLOT_FIELDS}
        b = {k: getattr(other, "_" + k) for k in _SLOT_FIELDS}
        in_a, in_b = a["presentations"] > 0, b["presentations"] > 0
        both = in_a & in_b
        a_first = both & (a["last_step"] <= b["first_step"])
        b_first = both & ~a_first & (b["last_step"] <= a["first_step"])
        clash = both & ~a_first & ~b_first
        if np.any(clash):
            raise ValueError(
                f"{int(clash.sum())} examples (e.g. dataset indices {self._index[clash][:5].tolist()}) "
                "were presented to both trackers at interleaved steps, so the order of their "
                "presentations is lost; gather the per-batch records and update one tracker in "
                "step order instead of merging summaries")
        # x = earlier segment, y = later segment; where only one tracker saw the example,
        # the other one is an empty segment and composition leaves the seen one unchanged.
        x_is_a = a_first | (in_a & ~in_b)
        x = {k: np.where(x_is_a, a[k], b[k]) for k in a}
        y = {k: np.where(x_is_a, b[k], a[k]) for k in a}
        y_seen = y["presentations"] > 0
        x_seen = x["presentations"] > 0
        both = x_seen & y_seen
        junction_forget = both & (x["last_correct"] == 1) & (y["first_correct"] == 0)
        junction_relearn = both & (x["last_correct"] == 1) & (y["first_correct"] == 1)
        out: Dict[str, np.ndarray] = {}
        out["presentations"] = x["presentations"] + y["presentations"]
        out["forgetting_count"] = x["forgetting_count"] + y["forgetting_count"] + junction_forget
        out["learning_count"] = x["learning_count"] + y["learning_count"] - junction_relearn
        out["first_correct"] = np.where(x_seen, x["first_correct"], y["first_correct"])
        out["first_step"] = np.where(x_seen, x["first_step"], y["first_step"])
        out["last_correct"] = np.where(y_seen, y["last_correct"], x["last_correct"])
        out["last_step"] = np.where(y_seen, y["last_step"], x["last_step"])
        x_learned = x["first_learned_step"] >= 0
        out["first_learned_step"] = np.where(x_learned, x["first_learned_step"], y["first_learned_step"])
        out["first_learned_presentation"] = np.where(
            x_learned, x["first_learned_presentation"],
            np.where(y["first_learned_presentation"] >= 0,
                     y["first_learned_presentation"] + x["presentations"], -1))
        # cartography: parallel Welford merge (order-free)
        na, nb = a["conf_epochs"], b["conf_epochs"]
        n = na + nb
        safe = np.maximum(n, 1)
        delta = b["conf_mean"] - a["conf_mean"]
        out["conf_epochs"] = n
        out["conf_mean"] = np.where(n > 0, a["conf_mean"] + delta * nb / safe, 0.0)
        out["conf_m2"] = a["conf_m2"] + b["conf_m2"] + delta ** 2 * na * nb / safe
        for k in ("corr_epochs", "corr_sum", "epoch_presentations", "epoch_correct",
                  "epoch_p_count", "epoch_p_sum"):
            out[k] = a[k] + b[k]
        for k, (dtype, _) in _SLOT_FIELDS.items():
            setattr(self, "_" + k, out[k].astype(dtype))
        # a later update without step= continues after every step recorded so far
        latest = int(self._last_step.max()) + 1 if self._last_step.size else 0
        self._num_updates = max(self._num_updates, other._num_updates, latest)
        return self


# --------------------------------------------------------------------------------------
# Ranking for pruning
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ForgettingRanking:
    """Examples ordered by forgetting, least forgotten first (the first to prune).

    ``order`` holds dataset indices; ``forgetting_count`` (float, ``inf`` for an example
    never learned in some run when never-learned is infinite) and ``never_learned_runs``
    are aligned with ``order``.
    """

    order: np.ndarray
    forgetting_count: np.ndarray
    never_learned_runs: np.ndarray
    seed: int

    def __len__(self) -> int:
        return int(self.order.shape[0])

    def _cut(self, fraction: float) -> int:
        fraction = number(float(fraction), "fraction", "ForgettingRanking", minimum=0, maximum=1)
        return int(math.floor(fraction * len(self) + 1e-9))

    def indices_to_prune(self, fraction: float) -> np.ndarray:
        """The floor(fraction * N) least-forgotten examples (dataset indices)."""
        return self.order[: self._cut(fraction)].copy()

    def indices_to_keep(self, fraction: float) -> np.ndarray:
        """Complement of :meth:`indices_to_prune` (dataset indices, in ranking order)."""
        return self.order[self._cut(fraction):].copy()


def _as_runs(x: Any, name: str) -> List[np.ndarray]:
    if isinstance(x, (list, tuple)) and len(x) and not np.isscalar(x[0]):
        runs = [_as_numpy(r, name).reshape(-1) for r in x]
    else:
        a = _as_numpy(x, name)
        runs = [a.reshape(-1)] if a.ndim <= 1 else [r.reshape(-1) for r in a]
    if not runs:
        raise ValueError(f"{name} is empty; pass one array per run")
    return runs


def _presentations_runs(presentations: Any, n_runs: int, n: int) -> List[np.ndarray]:
    """``presentations=`` as one (N,) array per run: an int (every example, every run), one
    array shared by every run, or one per run."""
    if isinstance(presentations, (int, np.integer)) and not isinstance(presentations, bool):
        return [np.full(n, float(presentations))] * n_runs
    runs = _as_runs(presentations, "presentations")
    if len(runs) == 1:
        runs = runs * n_runs
    if len(runs) != n_runs or any(r.shape[0] != n for r in runs):
        raise ValueError(f"presentations must be an int, one array of N={n} counts shared by every run, or one "
                         f"per run ({n_runs}); got {len(runs)} arrays of lengths {[r.shape[0] for r in runs]}")
    return [r.astype(np.float64) for r in runs]


def rank(forgetting_counts: Any, never_learned: Any = None, seed: int = 0, *,
         index: Any = None, presentations: Any = None,
         never_learned_value: Union[str, float] = "presentations",
         group: str = "forgetting") -> ForgettingRanking:
    """Order examples by forgetting count, ascending, summed over runs (Toneva et al. 2019).

    Two ways to call it::

        rank("runs/seed0.h5", seed=0)                       # a run file (path or open Run)
        rank(["runs/seed0.h5", "runs/seed1.h5"], seed=0)    # several runs: counts summed
        rank(counts, never_learned, seed=0, presentations=20)   # arrays

    Args:
        forgetting_counts: a run file written by ``ForgettingMonitor`` (a path or an open
            :class:`~lightning_ntk.store.Run`), or a list of them (one per run/seed); or
            per-example forgetting counts of one run, a list of such arrays (one per
            run/seed), or a 2-D array (runs, examples). From a file, the counts, the
            never-learned flags, the presentations and the dataset indices come from
            :func:`read_examples` (the ``/<group>/examples`` summary, or a replay of
            ``/<group>/events`` when the summary is missing or older than the event log).
        never_learned: per-example booleans with the same structure as the counts (arrays
            only; leave it out for run files).
        seed: seed of the random tie-breaking among equal scores.
        index: dataset index of each entry (default: positions 0..N-1); one array shared
            by all runs, or one per run (runs are then aligned by dataset index and must
            cover the same examples).
        presentations: arrays only, needed when some example was never learned under the
            default rule: the number of presentations of each example in each run (an int
            for all, e.g. the number of epochs, one array shared by every run, or one per
            run). Run files carry it.
        never_learned_value: the count given to an example in a run where it was never
            learned (never correct at any presentation):

            * ``"presentations"`` (default): the number of presentations of that example in
              that run, then summed over runs with the other runs' counts, as in Toneva et
              al.'s released code (``sort_examples_by_forgetting`` in
              github.com/mtoneva/example_forgetting adds ``npresentations``, the number of
              epochs, for each run in which the example was never learned). A real count of
              one run is at most presentations / 2, so within one run never-learned
              examples sort last; summed over runs, an example never learned in one run can
              sort before one forgotten often in every run.
            * ``"inf"``: infinitely forgotten (this package's rule before issue 25):
              examples sort first by the number of runs in which they were never learned,
              then by the summed count of the other runs; their ``forgetting_count`` is inf.
            * a number: that value replaces the count of a never-learned run, then summed.
        group: the run-file group of the monitor (``"forgetting"``, or
            ``"forgetting_<name>"`` for a monitor given ``name=``); run files only.

    Returns:
        a :class:`ForgettingRanking`; ``indices_to_prune(f)`` gives the examples to remove.
    """
    if isinstance(never_learned_value, str):
        one_of(never_learned_value, "never_learned_value", ("presentations", "inf"), "rank")
    else:
        never_learned_value = number(float(never_learned_value), "never_learned_value", "rank", minimum=0)
    if _is_run_like(forgetting_counts):
        if never_learned is not None:
            raise TypeError("rank(run_or_runs, ...) reads never_learned from the run file; pass seed= by "
                            "keyword (rank(path, seed=0)), not as the second positional argument")
        if index is not None or presentations is not None:
            raise TypeError("rank(run_or_runs, ...) reads the dataset indices and presentations from the run file; "
                            "drop index= and presentations=")
        runs = list(forgetting_counts) if isinstance(forgetting_counts, (list, tuple)) else [forgetting_counts]
        tables = [read_examples(r, group=group) for r in runs]
        return rank([t["forgetting_count"] for t in tables], [t["never_learned"] for t in tables], seed,
                    index=[t["index"] for t in tables], presentations=[t["presentations"] for t in tables],
                    never_learned_value=never_learned_value)
    if never_learned is None:
        raise TypeError("rank(forgetting_counts, never_learned, seed=0): never_learned is required with arrays "
                        "(or pass a run file path / Run / list of them as the first argument)")
    counts = _as_runs(forgetting_counts, "forgetting_counts")
    never = _as_runs(never_learned, "never_learned")
    if len(counts) != len(never):
        raise ValueError(f"got {len(counts)} runs of forgetting_counts but {len(never)} of never_learned")
    n = counts[0].shape[0]
    for c, nl in zip(counts, never):
        if c.shape[0] != n or nl.shape[0] != n:
            raise ValueError("every run must hold one entry per example: got lengths "
                             f"{[c.shape[0] for c in counts]} and {[v.shape[0] for v in never]}")
    shown = [np.zeros(n)] * len(counts)
    if never_learned_value == "presentations":
        if presentations is not None:
            shown = _presentations_runs(presentations, len(counts), n)
        elif any(np.any(nl.astype(bool)) for nl in never):
            raise ValueError("rank: some examples were never learned, and the default never_learned_value="
                             "'presentations' (Toneva et al.'s code) counts each such run as the example's number of "
                             "presentations in it; pass presentations= (e.g. the number of epochs), or "
                             "never_learned_value='inf' or a number")
    if index is None:
        idx_runs = [np.arange(n, dtype=np.int64)] * len(counts)
    else:
        idx_runs = _as_runs(index, "index")
        if len(idx_runs) == 1:
            idx_runs = idx_runs * len(counts)
        if len(idx_runs) != len(counts):
            raise ValueError(f"index holds {len(idx_runs)} arrays for {len(counts)} runs; pass one "
                             "shared index array or one per run")
        idx_runs = [i.astype(np.int64) for i in idx_runs]
    # canonical order: sorted dataset index (makes the result independent of input order)
    ref = np.sort(idx_runs[0])
    if ref.shape[0] != n or (n > 1 and np.any(ref[1:] == ref[:-1])):
        raise ValueError("index must hold N distinct dataset indices")
    total = np.zeros(n, dtype=np.float64)
    n_never = np.zeros(n, dtype=np.int64)
    for c, nl, shown_run, idx in zip(counts, never, shown, idx_runs):
        perm = np.argsort(idx, kind="stable")
        if not np.array_equal(idx[perm], ref):
            raise ValueError("runs cover different dataset indices; rank the common examples only")
        c = c[perm].astype(np.float64)
        nl = nl[perm].astype(bool)
        if np.any(c[~nl] < 0):
            raise ValueError("forgetting_counts must be >= 0")
        if never_learned_value == "inf":
            value: Any = 0.0
        elif never_learned_value == "presentations":
            value = shown_run[perm]
        else:
            value = float(never_learned_value)
        total += np.where(nl, value, c)
        n_never += nl
    tiebreak = np.random.default_rng(seed).permutation(n)
    if never_learned_value == "inf":
        order = np.lexsort((tiebreak, total, n_never))
        score = np.where(n_never > 0, np.inf, total)
    else:
        order = np.lexsort((tiebreak, total))
        score = total
    return ForgettingRanking(order=ref[order], forgetting_count=score[order],
                             never_learned_runs=n_never[order], seed=int(seed))


# --------------------------------------------------------------------------------------
# Cartography regions
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CartographyRegions:
    """Boolean masks (aligned with the inputs) of the three data-map regions.

    The masks are selected independently, as in Swayamdipta et al.'s experiments, and may
    overlap (an example can be both ambiguous and hard-to-learn).
    """

    easy: np.ndarray
    ambiguous: np.ndarray
    hard: np.ndarray


def cartography_regions(confidence: ArrayLike, variability: ArrayLike,
                        fraction: float = 0.33) -> CartographyRegions:
    """Easy-to-learn / ambiguous / hard-to-learn regions of a data map.

    Swayamdipta et al. 2020 (Sec. 3-4) select, each among the N examples with finite
    statistics and k = floor(fraction * N): ambiguous = the k highest variability;
    easy-to-learn = the k highest confidence; hard-to-learn = the k lowest confidence.
    Ties are broken by position (stable sort). Examples with NaN statistics (never
    completed an epoch) belong to no region.
    """
    conf = _as_numpy(confidence, "confidence").astype(np.float64).reshape(-1)
    var = _as_numpy(variability, "variability").astype(np.float64).reshape(-1)
    if conf.shape != var.shape:
        raise ValueError(f"confidence and variability differ in length: {conf.shape[0]} vs {var.shape[0]}")
    fraction = number(float(fraction), "fraction", "cartography_regions", minimum=0, maximum=1)
    valid = np.flatnonzero(np.isfinite(conf) & np.isfinite(var))
    k = int(math.floor(fraction * valid.shape[0] + 1e-9))

    def pick(values: np.ndarray) -> np.ndarray:
        mask = np.zeros(conf.shape[0], dtype=bool)
        mask[valid[np.argsort(values[valid], kind="stable")[:k]]] = True
        return mask

    return CartographyRegions(easy=pick(-conf), ambiguous=pick(-var), hard=pick(conf))


# --------------------------------------------------------------------------------------
# Dataset indices in the batch (fallback for training loops that cannot record them)
# --------------------------------------------------------------------------------------
class WithIndex(torch.utils.data.Dataset):
    """A map-style dataset whose items carry their own dataset index.

    Item ``i`` of the wrapped dataset becomes: ``(x, y, ..., i)`` for a tuple/list item
    (read it with ``index_key=-1``), the dict with ``key`` set to ``i`` for a dict item
    (``index_key="index"``), ``(item, i)`` otherwise. Other attributes (``targets``,
    ``classes``, ...) are those of the wrapped dataset.

    ``ForgettingMonitor`` needs it only where the dataset indices of a batch cannot be
    recorded from the DataLoader's sampler (an iterable dataset, a custom loader).
    """

    def __init__(self, dataset: Any, key: str = "index") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"WithIndex needs a map-style dataset (with __len__ and __getitem__), got "
                            f"{type(dataset).__name__}")
        text(key, "key", "WithIndex")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, tuple):
            return item + (i,)
        if isinstance(item, list):
            return item + [i]
        if isinstance(item, dict):
            out = dict(item)
            out[self.key] = i
            return out
        return item, i

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "key") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


# --------------------------------------------------------------------------------------
# Run files written by ForgettingMonitor
# --------------------------------------------------------------------------------------
_SUMMARY_FIELDS = ("index", "presentations", "forgetting_count", "learning_count", "first_learned_step",
                   "first_learned_presentation", "never_learned", "unforgettable", "confidence",
                   "variability", "correctness")
_REPLAY_CHUNK = 1 << 20


def _is_run_like(x: Any) -> bool:
    from .store import Run

    kinds = (str, os.PathLike, Run)
    if isinstance(x, kinds):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(r, kinds) for r in x)


def read_examples(run: Any, group: str = "forgetting", *, replay: Optional[bool] = None) -> Dict[str, np.ndarray]:
    """The per-example summary of a run file written by ``ForgettingMonitor``.

    Returns the columns of :meth:`ForgettingTracker.summary` (``index`` = dataset indices,
    ``presentations``, ``forgetting_count``, ..., ``correctness``), one entry per tracked
    example.

    The ``/<group>/examples`` table is rewritten at epoch ends (at most every
    ``write_interval`` seconds) and at the end of training; every presentation is one row
    of the ``/<group>/events`` log. The summary is used when it was completely written and
    its ``presentations`` sum to the number of event rows. Otherwise (a crash between two
    rewrites, a resumed run that has not rewritten it yet, a rewrite interrupted)
    the event log is replayed, in file order, through a :class:`ForgettingTracker` (one
    ``update`` per epoch with per-row steps, which takes each example's presentations in
    file order); an epoch ends where the ``epoch`` column changes (in probe mode, where the
    step changes); the last epoch of the log is folded into the cartography statistics
    even if it was not finished.

    Args:
        run: a path or an open :class:`~lightning_ntk.store.Run`.
        group: ``"forgetting"``, or ``"forgetting_<name>"`` for a monitor given ``name=``.
        replay: ``None`` (default): as above; ``True``: always replay the event log;
            ``False``: never (ValueError if the summary is not up to date).
    """
    from .store import Run, open_run

    if isinstance(run, Run):
        return _read_examples(run, group, replay)
    if not isinstance(run, (str, os.PathLike)):
        raise TypeError(f"run must be a run-file path or an open lightning_ntk Run, got {type(run).__name__}")
    with open_run(run) as opened:
        return _read_examples(opened, group, replay)


def _read_examples(run: Any, group: str, replay: Optional[bool]) -> Dict[str, np.ndarray]:
    examples_name, events_name = f"{group}/examples", f"{group}/events"
    if examples_name not in run or events_name not in run:
        raise KeyError(f"{run.path} has no {examples_name!r} and {events_name!r} tables (written by "
                       f"ForgettingMonitor); groups: {run.tables}. Pass group= the monitor's group "
                       "('forgetting_<name>' for a monitor given name=)")
    examples, events = run[examples_name], run[events_name]
    n_events = len(events)
    up_to_date = examples.written_step is not None and int(examples["presentations"].sum()) == n_events
    if replay is False and not up_to_date:
        raise ValueError(f"{examples_name} in {run.path} does not cover the {n_events} rows of {events_name} "
                         "(written before the last presentations, or interrupted); pass replay=None to replay "
                         "the event log")
    if up_to_date and not replay:
        return {name: examples[name] for name in _SUMMARY_FIELDS}
    index = examples.group[examples.group.attrs.get("row_dim", "example")][()]
    mode = events.attrs.get("mode", "train")
    return _replay_events(events.group, n_events, np.asarray(index, dtype=np.int64), mode).summary()


def _replay_events(group: Any, n_rows: int, index: np.ndarray, mode: str) -> ForgettingTracker:
    tracker = ForgettingTracker(index=index)
    previous_epoch = None
    for start in range(0, n_rows, _REPLAY_CHUNK):
        stop = min(n_rows, start + _REPLAY_CHUNK)
        step = group["step"][start:stop]
        epoch = step if mode == "probe" else group["epoch"][start:stop]
        idx = group["index"][start:stop]
        correct = group["correct"][start:stop]
        p_true = group["p_true"][start:stop]
        # Rows in file order, one update per epoch segment (per-row steps; exact, see update()).
        cuts = np.flatnonzero(epoch[1:] != epoch[:-1]) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, stop - start]):
            if previous_epoch is not None and epoch[a] != previous_epoch:
                tracker.end_epoch()
            previous_epoch = epoch[a]
            tracker.update(idx[a:b], correct[a:b], p_true[a:b], step=step[a:b])
    if previous_epoch is not None:
        tracker.end_epoch()
    return tracker
