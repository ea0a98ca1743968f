"""lightning_ntk.task: each layout of outputs and targets, the ambiguous ones refused with the fix."""
from __future__ import annotations

import pytest
import torch

from lightning_ntk.task import IGNORE_INDEX, Task, TaskError, detect_task

B = 6


@pytest.mark.parametrize("outputs, targets, task, expected", [
    (torch.randn(B, 4), torch.tensor([0, 3, 1, 2, 0, 1]), None, Task("multiclass", 4)),
    (torch.randn(B), torch.tensor([0, 1, 1, 0, 0, 1]), None, Task("binary", 1)),
    (torch.randn(B, 1), torch.tensor([True, False, True, True, False, False]), None, Task("binary", 1)),
    (torch.randn(B, 3), torch.randint(0, 2, (B, 3)), None, Task("multilabel", 3)),
    (torch.randn(B, 5, 11), torch.randint(0, 11, (B, 5)), None, Task("sequence", 11, IGNORE_INDEX)),
    (torch.randn(B, 1), torch.randn(B), None, Task("regression", 1)),
    (torch.randn(B), torch.randn(B, 1), None, Task("regression", 1)),
    (torch.randn(B, 2), torch.randn(B, 2), None, Task("regression", 2)),
    (torch.randn(B, 1), torch.tensor([0., 1., 1., 0., 0., 1.]), "binary", Task("binary", 1)),
    (torch.randn(B, 1), torch.tensor([0., 1., 1., 0., 0., 1.]), "regression", Task("regression", 1)),
    (torch.randn(B, 3), torch.randint(0, 2, (B, 3)).float(), "multilabel", Task("multilabel", 3)),
    (torch.randn(B, 4), torch.tensor([0., 3., 1., 2., 0., 1.]), "multiclass", Task("multiclass", 4)),
    (torch.randn(B, 4), None, None, Task("none", 4)),
])
def test_layouts_are_detected(outputs, targets, task, expected):
    assert detect_task(outputs, targets, task) == expected


@pytest.mark.parametrize("outputs, targets, task, message", [
    # one real output with 0/1 targets: binary or regression, never guessed
    (torch.randn(B, 1), torch.tensor([0., 1., 1., 0., 0., 1.]), None,
     "real targets that are all 0 or 1 are binary classification as often as regression; pass task='binary' or "
     "task='regression'"),
    (torch.randn(B, 3), torch.randint(0, 2, (B, 3)).float(), None, "pass task='multilabel' or task='regression'"),
    # a generator's images against class labels
    (torch.randn(B, 1, 8, 8), torch.randint(0, 10, (B,)), None, "not per-example predictions.*forward_fn="),
    (torch.randn(B, 4), torch.tensor([0, 4, 1, 2, 0, 1]), None, r"class labels must lie in \[0, 3\]"),
    (torch.randn(B, 4), torch.randn(B), None, "real targets of another shape"),
    (torch.randn(B, 4), torch.randint(0, 4, (B - 1,)), None, "first axes differ"),
    (torch.randn(B, 5, 11), torch.randint(0, 11, (B,)), None, r"per-token outputs \(B, T, V\) need integer targets"),
    (torch.randn(B, 4), torch.randint(0, 4, (B,)), "binary", "no task fits task='binary'"),
    (torch.randn(B, 2), torch.randn(B, 2), "binary", "task='binary' does not fit"),
    (torch.randn(B, 2), torch.randn(B, 2), "classification", "task must be one of"),
    (torch.randn(B, 2), None, "regression", "task='regression' needs targets"),
])
def test_ambiguous_or_unfit_layouts_are_refused_with_the_fix(outputs, targets, task, message):
    with pytest.raises(TaskError, match=message) as info:
        detect_task(outputs, targets, task, owner="SomeMonitor")
    assert str(info.value).startswith("SomeMonitor: ")
