"""What both forgetting monitors share: the definitions, the two tables, the tracker, and
which tasks forgetting is defined for."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch

from .._hygiene import measurement_mode
from ..forgetting import ForgettingTracker, PresentationOutcomes, presentation_outcomes, regression_outcomes
from ..probe import batch_to_xy
from ..store import Field
from ..task import Task, TaskError, detect_task, predictions_in
from ._declared import TableSpec
from ._indices import HOW_TO_FIX_INDEX, ForgettingCaptureError

TRAIN_DEFINITION = ("Toneva et al. 2019: correctness of each example at each presentation, from the training "
                    "forward pass of its batch (train mode), before the optimiser step")
#: Why forgetting refuses a batch without targets, and the fix.
NO_TARGETS = "no targets in the batch; pass batch_format= returning (x, y)"
PROBE_DEFINITION = ("NOT Toneva et al.'s definition: correctness from an eval-mode pass over a fixed probe on a "
                    "schedule; each snapshot counts as one presentation and one cartography epoch")


def forgetting_task(logits: torch.Tensor, targets: torch.Tensor, task: Optional[str], tolerance: Optional[float],
                    owner: str, inputs: Any = None) -> Task:
    """The task of a batch, if forgetting is defined for it: multi-class and binary
    classification (Toneva et al.), per token for sequences, regression with a ``tolerance``;
    anything else refused with what was found and the argument that fixes it."""
    found = detect_task(logits, targets, task, owner=owner, inputs=inputs,
                        selector="outputs_key= (or return {'loss': ..., 'logits': ...} from training_step)")
    if found.kind in ("multiclass", "binary", "sequence"):
        return found
    if found.kind == "regression":
        if tolerance is None:
            raise TaskError(f"{owner}: the outputs are real predictions of real targets (regression, {found.num_outputs} "
                            "output(s)); forgetting needs a notion of correct: pass tolerance= (an example is correct "
                            "when every output is within tolerance of its target), or task= if this is classification")
        return found
    reason = {"multilabel": "multi-label outputs (one logit per label): forgetting is defined for single-label "
                            "classification; pass task='multiclass' if the targets are class indices",
              "none": NO_TARGETS}[found.kind]
    raise TaskError(f"{owner}: {reason}")


def outcomes(task: Task, logits: torch.Tensor, targets: torch.Tensor, tolerance: Optional[float]) -> PresentationOutcomes:
    if task.kind == "regression":
        return regression_outcomes(logits, targets, float(tolerance))
    return presentation_outcomes(logits, targets.reshape(-1), check_targets=False)


def task_from_sample(loader: Any, pl_module: Any, batch_format: Any, outputs_key: str, task: Optional[str],
                     tolerance: Optional[float], owner: str) -> Optional[Task]:
    """The task from the first example of a map-style training set, before training: one
    collated example through the module in eval mode, every RNG (torch, NumPy, Python)
    restored. None when that cannot be done (the first batch decides then); a TaskError
    when the example shows that forgetting is not defined for the task."""
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        return None
    try:
        with measurement_mode(pl_module, grad=False):  # eval mode, every RNG and mode restored
            x, y = batch_to_xy(collate([dataset[0]]), batch_format)
            logits = predictions_in(pl_module(x.to(next(pl_module.parameters()).device)), outputs_key)
    except Exception:  # noqa: BLE001 - an unusual layout: the first batch decides
        return None
    if logits is None or not isinstance(y, torch.Tensor):
        return None
    return forgetting_task(logits, y, task, tolerance, owner, inputs=x)


def examples_to_track(loaders: Any, num_examples: Optional[int], index_key: Any, owner: str) -> int:
    """How many dataset indices to track: ``num_examples``, or the training dataset's length."""
    if isinstance(loaders, (Mapping, list, tuple)) and not (index_key is not None and num_examples is not None):
        raise ForgettingCaptureError(
            f"{owner} records one training dataloader, and this run has {len(loaders)}; pass index_key= (where "
            "each batch carries its dataset index), num_examples= and a batch_format= function returning (x, y)")
    if num_examples is not None:
        return num_examples
    dataset = getattr(loaders, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise ForgettingCaptureError(
            f"{owner} cannot tell how many examples to track: the training loader's dataset "
            f"({type(dataset).__name__}) has no length. Pass num_examples= (one more than the largest dataset "
            "index). " + HOW_TO_FIX_INDEX) from None


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
