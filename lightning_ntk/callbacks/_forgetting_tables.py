"""What both forgetting monitors share: the definitions, the two tables, the tracker."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from ..forgetting import ForgettingTracker
from ..store import Field
from ._declared import TableSpec
from ._indices import ForgettingCaptureError  # noqa: F401 - re-exported

TRAIN_DEFINITION = ("Toneva et al. 2019: correctness of each example at each presentation, from the training "
                    "forward pass of its batch (train mode), before the optimiser step")
PROBE_DEFINITION = ("NOT Toneva et al.'s definition: correctness from an eval-mode pass over a fixed probe on a "
                    "schedule; each snapshot counts as one presentation and one cartography epoch")

def events_and_examples(group: str, index: np.ndarray, attrs: Dict[str, Any]) -> List[TableSpec]:
    events = [Field("step", (), "int64"), Field("epoch", (), "int64"), Field("index", (), "int64"),
              Field("correct", (), "bool"), Field("loss", (), "float32"), Field("margin", (), "float32"),
              Field("p_true", (), "float32")]
    examples = [Field("index", (), "int64"), Field("presentations", (), "int64"),
                Field("forgetting_count", (), "int64"), Field("learning_count", (), "int64"),
                Field("first_learned_step", (), "int64"), Field("first_learned_presentation", (), "int64"),
                Field("never_learned", (), "bool"), Field("unforgettable", (), "bool"),
                Field("confidence", (), "float64"), Field("variability", (), "float64"),
                Field("correctness", (), "float64")]
    return [TableSpec(f"{group}/events", events, key="step", row_dim="event", attrs=attrs),
            TableSpec(f"{group}/examples", examples, row_dim="example", coords={"example": index}, attrs=attrs,
                      n_rows=int(index.shape[0]))]


def forgetting_scalars(tracker: Optional[ForgettingTracker]) -> Dict[str, float]:
    if tracker is None or len(tracker.index) == 0:
        return {}
    counts = tracker.forgetting_count
    return {"forgotten_fraction": float(np.mean(counts > 0)), "unforgettable_fraction": float(np.mean(tracker.unforgettable)),
            "never_learned_fraction": float(np.mean(tracker.never_learned)), "mean_forgetting_count": float(np.mean(counts))}


class TrackedExamples:
    """The tracker of a monitor and its resumable state (shared by both forgetting monitors)."""

    def __init__(self) -> None:
        self.tracker: Optional[ForgettingTracker] = None
        self.loaded: Optional[Dict[str, Any]] = None

    def ensure(self, index: np.ndarray, owner: str) -> ForgettingTracker:
        if self.tracker is not None and np.array_equal(self.tracker.index, index):
            return self.tracker
        if self.loaded is not None:
            tracker, self.loaded = ForgettingTracker.from_state_dict(self.loaded), None
            if not np.array_equal(tracker.index, index):
                raise RuntimeError(f"{owner}: the checkpoint tracks {tracker.index.shape[0]} examples, this run "
                                   f"{index.shape[0]} (or different dataset indices); resume with the same data and "
                                   "settings")
        else:
            tracker = ForgettingTracker(index=index)
        self.tracker = tracker
        return tracker
