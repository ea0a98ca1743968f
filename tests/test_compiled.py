"""Monitors on a torch.compile'd network: the measurements run the eager module (same
parameters), so the compiled graphs, their guards and RNG use, and so the training, are
exactly those of the compiled run without monitors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ntk import callbacks, open_run
from lightning_ntk._hygiene import eager, measurement_mode, original_module
from lightning_ntk.probe import Probe
from lightning_ntk.schedule import EveryNEpochs

from .models import blob_data, loader, make_module, trainer


def test_original_module_is_the_eager_module_torch_compile_wraps():
    """The one place that reads a torch internal (OptimizedModule._orig_mod): fails if a torch
    release moves it."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    compiled = torch.compile(net)
    assert original_module(compiled) is net
    assert original_module(net) is None
    outer = nn.Sequential(compiled, nn.Linear(4, 2))
    with eager(outer) as measured:
        assert measured is outer and outer[0] is net  # swapped in place, same parameters
    assert outer[0] is compiled
    with measurement_mode(outer) as measured:
        assert outer[0] is net and not net.training
    assert outer[0] is compiled and net.training


def _compiled_module(L):
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return make_module(L, torch.compile(net))


@pytest.mark.slow
def test_every_monitor_leaves_a_compiled_training_unchanged(L, tmp_path):
    path = str(tmp_path / "run.h5")
    data = blob_data()

    def fit(monitors):
        torch.manual_seed(0)
        module = _compiled_module(L)
        trainer(L, monitors, max_epochs=2).fit(module, loader(data))
        return [p.detach().clone() for p in module.parameters()]

    bare = fit([])
    common = dict(path=path, budget=False, on_error="raise", schedule=EveryNEpochs(1))
    monitors = [
        callbacks.NTKMonitor(probe=Probe(size=24), k=4, **common),
        callbacks.SharpnessMonitor(sharpness_set=24, trace=True, trace_queries=6, **common),
        callbacks.ProbeMetricsMonitor(probe=Probe(size=24), **common),
        callbacks.ActivationCodeMonitor(probe=Probe(size=24), heldout=None, measures=("redundancy", "code_change"),
                                        **common),
        callbacks.RepresentationMonitor(probe=Probe(size=30), heldout=None, few_shot=[(3, 1)], n_query=5, episodes=4,
                                        classifiers=("centroid_euclidean",), linear_probe=False, **common),
        callbacks.ForgettingMonitor(path, on_error="raise"),
    ]
    monitored = fit(monitors)
    for a, b in zip(bare, monitored):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with open_run(path) as run:
        for table in ("ntk", "sharpness", "probe_metrics", "codes", "representations", "forgetting/events"):
            assert len(run[table]) > 0, table
        assert np.all(run["codes"]["redundancy_ratio_train"] >= 0)  # hooks on the inner ReLU fired
        assert len(run["forgetting/events"]) == 2 * 96


def test_measurement_mode_restores_every_global_rng():
    """A measurement may run the user's training_step, which may draw from NumPy's or Python's
    global generators (mixup, augmentations): the training's streams are unchanged after it."""
    import random

    net = nn.Linear(2, 2)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with measurement_mode(net):
        torch.rand(3), np.random.rand(3), random.random()
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
