"""docs/extending.md's worked examples, executed as they stand in the page, checked against
an independent reference: the network's own weights, and the losses training_step saw."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ntk import open_run
from lightning_ntk.schedule import EveryNSteps

from .models import blob_data, loader, make_manual_module, make_module, trainer

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _examples() -> dict:
    """Every Python block of docs/extending.md, executed in one namespace."""
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        assert len(block.splitlines()) <= 60, "a worked example stays short"
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace


def test_the_snapshot_example_records_the_parameter_norm(L, run_path):
    monitor = _examples()["ParameterNormMonitor"](run_path, schedule=EveryNSteps(4), budget=False, on_error="raise")
    torch.manual_seed(0)
    module = make_module(L)
    t = trainer(L, [monitor], max_epochs=2)
    t.fit(module, loader(blob_data()))
    params = [p.detach().double() for p in module.parameters()]
    expected = float(torch.sqrt(sum((p ** 2).sum() for p in params)))
    layers = [float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in layer.parameters())))
              for layer in module.net if any(True for _ in layer.parameters())]
    with open_run(run_path) as run:
        table = run["parameter_norm"]
        steps = t.global_step
        assert list(table["step"]) == sorted(set(range(0, steps + 1, 4)) | {steps})
        assert table["norm"][-1] == pytest.approx(expected, rel=1e-12)
        # one top-level child (net): its norm is the total; the per-layer reference sums squares
        assert table["layer_norm"][-1].tolist() == pytest.approx([float(np.sqrt(np.sum(np.square(layers))))], rel=1e-12)
        assert run.config["ParameterNormMonitor[parameter_norm]"]["schedule"]["n"] == 4


def test_the_per_batch_example_records_every_training_loss(L, run_path):
    seen = []

    class Recording(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            seen.append((self.trainer.global_step + 1, batch_idx, float(loss)))
            return loss

    monitor = _examples()["BatchLossMonitor"](run_path, flush_every=4, on_error="raise")
    torch.manual_seed(0)
    module = Recording()
    trainer(L, [monitor], max_epochs=3).fit(module, loader(blob_data()))
    with open_run(run_path) as run:
        table = run["batch_loss"]
        assert len(table) == len(seen) == 3 * 6
        np.testing.assert_array_equal(table["step"], [s for s, _, _ in seen])
        np.testing.assert_array_equal(table["batch"], [b for _, b, _ in seen])
        np.testing.assert_allclose(table["loss"], [v for _, _, v in seen], rtol=1e-7)


def test_the_per_batch_example_refuses_a_step_without_a_loss(L, run_path):
    monitor = _examples()["BatchLossMonitor"](run_path)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="BatchLossMonitor.*returned no loss to record"):
        trainer(L, [monitor], max_epochs=1).fit(make_manual_module(L), loader(blob_data()))
    with open_run(run_path) as run:
        errors = run["errors"]
        assert len(errors) == 1 and b"returned no loss" in errors["message"][0]
        assert errors["monitor"][0] == b"batch_loss"
