"""What a model's outputs and targets mean: the task, detected from one batch, never guessed.

=============  ==========================================  ===================================
kind           outputs                                     targets
=============  ==========================================  ===================================
multiclass     (B, C), C >= 2                              (B,) integer class labels in [0, C)
binary         (B,) or (B, 1): one logit                   (B,) integer (or bool) in {0, 1}
multilabel     (B, C), one logit per label                 (B, C) integer (or bool) in {0, 1}
sequence       (B, T, V): per-token logits                 (B, T) integer tokens; ``ignore_index``
causal_lm      (B, T, V): per-token logits                 (B, T) equal to the input ids: logits at t
                                                           predict the target at t + 1 (Hugging Face)
regression     (B,) or (B, K): real predictions            real values of the outputs' shape
none           anything                                    no targets
=============  ==========================================  ===================================

Ambiguous layouts are refused with the ``task=`` that settles them: one real output with
real targets that are all 0 or 1 is binary classification as often as it is regression
(and (B, C) real targets in {0, 1} multi-label as often as regression). Outputs that are
not per-example predictions of the targets (a generator's images, a feature map) are
refused too.

Sequence tasks are measured per token on (sequence, position) pairs: :func:`aligned_tokens`
pairs each position's logits with its target (shifted by one for ``causal_lm``, the
convention of Hugging Face causal language models, whose loss shifts the labels inside:
detected when the targets equal the integer inputs), :func:`token_positions` picks a
deterministic subset of the positions whose target is not ``ignore_index``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

TASKS = ("multiclass", "binary", "multilabel", "sequence", "causal_lm", "regression", "none")
#: Targets equal to this are ignored in sequence tasks (PyTorch's and Hugging Face's default).
IGNORE_INDEX = -100


class TaskError(ValueError):
    """The outputs and targets do not fit a task (or fit several): the message says which ``task=`` to pass."""


@dataclass(frozen=True)
class Task:
    """A detected (or given) task: its ``kind`` (one of :data:`TASKS`) and its output width
    (classes, labels, vocabulary size or regression outputs)."""

    kind: str
    num_outputs: int
    ignore_index: Optional[int] = None
    #: Sequence tasks: the logits at position t predict the target at t + shift (1 for a
    #: causal language model whose targets are its inputs, as in Hugging Face).
    shift: int = 0

    def to_config(self) -> Dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> str:
        """The ``task=`` that gives this task back (``"causal_lm"`` for a shifted sequence task)."""
        return "causal_lm" if self.kind == "sequence" and self.shift else self.kind


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def _binary_values(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all()) if t.numel() else True


def _describe(outputs: torch.Tensor, targets: Optional[torch.Tensor]) -> str:
    y = "no targets" if targets is None else f"targets of shape {tuple(targets.shape)} ({targets.dtype})"
    return f"outputs of shape {tuple(outputs.shape)} and {y}"


def labels_are_inputs(inputs: Any, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> bool:
    """True when integer ``targets`` equal the integer ``inputs`` wherever they are not
    ``ignore_index``: a causal language model's labels in the Hugging Face convention."""
    if not isinstance(inputs, torch.Tensor) or inputs.shape != targets.shape or not _is_integer(inputs):
        return False
    kept = targets != ignore_index
    return bool(kept.any()) and bool((inputs.to(targets.device)[kept] == targets[kept]).all())


def detect_task(outputs: torch.Tensor, targets: Optional[torch.Tensor], task: Optional[str] = None, *,
                owner: str = "", inputs: Any = None, selector: str = "forward_fn=") -> Task:
    """The task of a batch of ``outputs`` and ``targets`` (see the module docstring).

    ``task`` (one of :data:`TASKS`) overrides detection; it is checked against the shapes.
    ``inputs`` (the batch's inputs) tells a causal language model, whose targets equal its
    inputs, from a per-token tagger (``task="sequence"`` says the targets are aligned).
    ``selector``: the caller's argument that selects other outputs (named in refusals).
    Raises :class:`TaskError` naming what was found and the ``task=`` that fixes it.
    """
    prefix = f"{owner}: " if owner else ""
    if task is not None and task not in TASKS:
        raise TaskError(f"{prefix}task must be one of {', '.join(map(repr, TASKS))} or None (detect), got {task!r}")
    found = _describe(outputs, targets)
    if targets is None or task == "none":
        if task not in (None, "none"):
            raise TaskError(f"{prefix}task={task!r} needs targets, and the batch has none; pass a batch_format= "
                            "returning (x, y), or task=None")
        return Task("none", int(outputs[0].numel()) if outputs.ndim else 1)
    b = outputs.shape[0] if outputs.ndim else 0
    if outputs.ndim == 0 or targets.ndim == 0 or targets.shape[0] != b:
        raise TaskError(f"{prefix}{found}: not one prediction per example (the first axes differ); pass "
                        f"{selector} selecting the per-example predictions")
    y = targets.detach()
    if outputs.ndim == 3:
        if _is_integer(y) and y.shape == outputs.shape[:2] and task in (None, "sequence", "causal_lm"):
            shift = int(task == "causal_lm" or (task is None and labels_are_inputs(inputs, y)))
            if shift and y.shape[1] < 2:
                raise TaskError(f"{prefix}{found}: a causal language model needs sequences of at least 2 tokens; "
                                "pass task='sequence' if the targets are aligned with the outputs")
            return Task("sequence", int(outputs.shape[2]), IGNORE_INDEX, shift)
        raise TaskError(f"{prefix}{found}: per-token outputs (B, T, V) need integer targets (B, T)"
                        + ("" if task in (None, "sequence", "causal_lm") else f"; task={task!r} does not fit them"))
    if task in ("sequence", "causal_lm"):
        raise TaskError(f"{prefix}{found}: task={task!r} needs per-token outputs (B, T, V) and integer targets (B, T)")
    if outputs.ndim > 3:
        raise TaskError(f"{prefix}{found}: the outputs are not per-example predictions of the targets (a "
                        f"generator's images or a feature map?); pass {selector} selecting per-example logits or "
                        "predictions")
    width = 1 if outputs.ndim == 1 else int(outputs.shape[1])
    one_per_example = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
    same_shape = y.reshape(b, -1).shape[1] == width and (y.ndim == outputs.ndim or one_per_example)
    if _is_integer(y) or y.dtype == torch.bool:
        if width == 1 and one_per_example and _binary_values(y) and task in (None, "binary"):
            return Task("binary", 1)
        if width >= 2 and y.ndim == 1 and task in (None, "multiclass"):
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= width):
                raise TaskError(f"{prefix}{found}: class labels must lie in [0, {width - 1}], got values in "
                                f"[{int(y.min())}, {int(y.max())}]; pass a batch_format= (for a probe: "
                                "Probe(batch_format=...)) returning labels in that range")
            return Task("multiclass", width)
        if width >= 2 and y.shape == outputs.shape and _binary_values(y) and task in (None, "multilabel"):
            return Task("multilabel", width)
        if task == "regression" and same_shape:
            return Task("regression", width)
        raise TaskError(f"{prefix}{found}: no task fits" + (f" task={task!r}" if task else "") + ": multiclass "
                        "needs (B, C) logits and (B,) labels, binary one logit and labels in {0, 1}, multilabel "
                        "(B, C) logits and (B, C) labels in {0, 1}; "
                        + ("pass the task= that fits, or task=None to detect it" if task else
                           "pass task='regression' if the targets are values to predict"))
    # real-valued targets
    if task == "multiclass" and width >= 2 and y.ndim == 1 and bool((y == torch.round(y)).all()):
        return Task("multiclass", width)
    if not same_shape:
        raise TaskError(f"{prefix}{found}: real targets of another shape than the outputs are not per-example "
                        f"predictions of them; pass task= and {selector} selecting one prediction per target")
    binary_like = _binary_values(y)
    if task is None and binary_like:
        which = "binary" if width == 1 else "multilabel"
        raise TaskError(f"{prefix}{found}: real targets that are all 0 or 1 are {which} classification as often "
                        f"as regression; pass task='{which}' or task='regression'")
    if task in (None, "regression"):
        return Task("regression", width)
    if task in ("binary", "multilabel") and binary_like and (width == 1) == (task == "binary"):
        return Task(task, width)
    raise TaskError(f"{prefix}{found}: task={task!r} does not fit these outputs and targets; pass the task= "
                    "that does, or task=None to detect it")


# ------------------------------------------------------------------------- sequence tasks
def aligned_tokens(outputs: torch.Tensor, targets: torch.Tensor, task: Task) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token logits (B, T', V) and the targets they predict (B, T'): the targets shifted
    by ``task.shift`` (a causal LM's logits at t predict the token at t + 1)."""
    if task.shift:
        return outputs[:, :-task.shift], targets[:, task.shift:]
    return outputs, targets


def kept_tokens(targets: torch.Tensor, task: Task) -> torch.Tensor:
    """Per sequence, the number of positions whose (shifted) target is not ``ignore_index``."""
    y = targets[:, task.shift:] if task.shift else targets
    return (y != task.ignore_index).sum(dim=1) if task.ignore_index is not None else torch.full(
        (y.shape[0],), y.shape[1], device=y.device)


def token_positions(targets: torch.Tensor, task: Task, per_sequence: int,
                    keys: Optional[np.ndarray] = None) -> np.ndarray:
    """A deterministic subset of at most ``per_sequence`` positions per sequence whose target
    (after the shift) is not ``ignore_index``: (N, P) positions into :func:`aligned_tokens`'s
    time axis, -1 where a sequence has fewer. Spread evenly over each sequence's valid
    positions, each sequence offset by the golden ratio so that the chosen positions cover
    the time axis across the probe (with one position per sequence too)."""
    if per_sequence < 1:
        raise ValueError(f"per_sequence must be >= 1, got {per_sequence}")
    y = targets.detach().cpu()
    if task.shift:
        y = y[:, task.shift:]
    valid = (y != task.ignore_index).numpy() if task.ignore_index is not None else np.ones(tuple(y.shape), bool)
    out = np.full((y.shape[0], per_sequence), -1, dtype=np.int64)
    for i in range(y.shape[0]):
        where = np.flatnonzero(valid[i])
        if where.size == 0:
            continue
        p = min(per_sequence, where.size)
        offset = ((i if keys is None else int(keys[i])) * 0.6180339887498949) % 1.0
        picks = np.floor((np.arange(p) + offset) * where.size / p).astype(np.int64)
        out[i, :p] = where[np.minimum(picks, where.size - 1)]
    return out


def token_targets(targets: torch.Tensor, task: Task, positions: np.ndarray) -> np.ndarray:
    """The target token of each chosen (sequence, position) pair, in row-major pair order
    (positions -1 left out)."""
    y = targets.detach().cpu()
    if task.shift:
        y = y[:, task.shift:]
    rows, cols = np.nonzero(positions >= 0)
    return y.numpy()[rows, positions[rows, cols]]


def predictions_in(output: Any, key: str = "logits") -> Optional[torch.Tensor]:
    """The predictions in a model output: the tensor itself, ``output[key]`` (a dict), the
    attribute ``output.key`` (Hugging Face's ``ModelOutput``) or a tuple's first element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get(key)
    elif isinstance(output, (tuple, list)):
        value = output[0] if output else None
    else:
        value = getattr(output, key, None)
    return value if isinstance(value, torch.Tensor) else None


def tokens_at(values: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """Rows of per-token values (B, T, ...) at the chosen positions (B, P) (-1: none), in
    row-major pair order: (number of chosen pairs, ...)."""
    if values.ndim < 2 or values.shape[0] != positions.shape[0]:
        raise ValueError(f"per-token values (B, T, ...) with B = {positions.shape[0]} expected, got shape "
                         f"{tuple(values.shape)}")
    rows, cols = np.nonzero(positions >= 0)
    picked = positions[rows, cols]
    if picked.size and int(picked.max()) >= values.shape[1]:
        raise ValueError(f"position {int(picked.max())} is beyond the time axis of values of shape {tuple(values.shape)}")
    return values[torch.as_tensor(rows, device=values.device), torch.as_tensor(picked, device=values.device)]
