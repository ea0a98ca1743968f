"""Post-hoc: the analytic kernels of a run's probe, written into its run file (``/analytic``).

The run file is written under SWMR during training, when no new object may be created; the
analytic kernels are therefore added after the run is closed, the way the store resumes a
file (``RunStore.acquire(resume=True)``): the file is copied into ``<file>.writing``, the
group is added there, and the copy atomically replaces the file when the store closes (a
crash leaves the previous file intact). The root ``history`` records the event.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .._version import __version__
from ..store import RunStore, StoreError, open_run
from ..store._recover import live_writer
from ._convert import VarianceArg
from ._kernels import AnalyticKernels, analytic_kernels

_OWNER = "record_analytic_kernels"
GROUP = "analytic"
DEFINITION = ("Infinite-width kernels of the module's architecture on the probe, float64: nngp = E[f_c(x) f_c(x')] "
              "(per logit), ntk = the limit of the per-logit eNTK (the trace kind, mean over logits) in the stated "
              "parameterization, for Gaussian weights with the per-layer variances in 'layers' "
              "(sigma_w^2 = fan_in * Var(W), sigma_b^2 = Var(b)).")


def record_analytic_kernels(
    path: "os.PathLike[str] | str",
    module: nn.Module,
    *,
    probe: Optional[str] = None,
    x: Optional[Tensor] = None,
    parameterization: str = "standard",
    weight_var: VarianceArg = None,
    bias_var: VarianceArg = None,
    overwrite: bool = False,
    max_memory: Union[int, str] = "1GiB",
) -> AnalyticKernels:
    """Compute :func:`analytic_kernels` of ``module`` on the probe ``probe`` of the run file at
    ``path`` and store them as ``/analytic/<probe>/`` (``nngp``, ``ntk``; see docs/format.md).
    ``probe=None``: the probe of the ``/ntk`` table (its ``probe`` attribute), else the file's
    only probe.

    Call it after training (the run file must be closed: a file still open for writing, by
    this process or a live one, is refused). ``module``: the network at initialisation (its
    variances are read from it, see :func:`analytic_kernels`), or any module of the same
    architecture with ``weight_var``/``bias_var`` given. ``x``: the probe's inputs in the
    probe's order (``/probe/<probe>/index``) when the file does not store them; when it
    does, a given ``x`` must equal them. ``overwrite``: replace an existing group.
    Returns the kernels.
    """
    real = os.path.realpath(os.fspath(path))
    if not os.path.exists(real):
        raise FileNotFoundError(f"{_OWNER}: no run file at {real}")
    if RunStore.is_open(real):
        raise StoreError(f"{_OWNER}: {real} is still open for writing in this process (a training is running); "
                         "record the analytic kernels after trainer.fit returns")
    pid = live_writer(real)
    if pid is not None:
        raise StoreError(f"{_OWNER}: {real} is being written by process {pid}; record the analytic kernels after "
                         "that training ends")
    with open_run(real) as run:
        if probe is None:
            probe = _default_probe(run, real)
        if probe not in run.probes:
            raise KeyError(f"{_OWNER}: {real} has no probe {probe!r}; probes: {run.probes}")
        stored = run.probe(probe)
        exists = GROUP in run and probe in run.file[GROUP]
    index = np.asarray(stored["index"], dtype=np.int64)
    if exists and not overwrite:
        raise FileExistsError(f"{_OWNER}: {real} already holds /{GROUP}/{probe}; pass overwrite=True to replace it")
    if "x" in stored:
        inputs = torch.as_tensor(np.asarray(stored["x"]))
        if x is not None:
            given = torch.as_tensor(x).detach().cpu()
            if given.shape != inputs.shape or not torch.allclose(given.double(), inputs.double(), rtol=1e-6,
                                                                 atol=1e-6):
                raise ValueError(f"{_OWNER}: x differs from the probe inputs stored in {real} (/probe/{probe}/x, "
                                 f"shape {tuple(inputs.shape)}); leave x=None to use the stored ones")
        source = f"/probe/{probe}/x"
    elif x is None:
        raise ValueError(f"{_OWNER}: {real} does not store the inputs of probe {probe!r} (stored only up to 16 MiB); "
                         f"pass x= the probe's examples in the order of /probe/{probe}/index (e.g. "
                         "torch.stack([dataset[i][0] for i in index]))")
    else:
        inputs = torch.as_tensor(x).detach().cpu()
        source = "x given to record_analytic_kernels"
    if inputs.shape[0] != index.shape[0]:
        raise ValueError(f"{_OWNER}: x has {inputs.shape[0]} examples, probe {probe!r} has {index.shape[0]}")
    kernels = analytic_kernels(module, inputs.to(torch.float64), parameterization=parameterization,
                               weight_var=weight_var, bias_var=bias_var, max_memory=max_memory)
    attrs = {
        "probe": probe,
        "parameterization": parameterization,
        "definition": DEFINITION,
        "layers": json.dumps([v._asdict() for v in kernels.layers]),
        "activations": json.dumps([list(a) for a in kernels.activations]),
        "inputs": source,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lightning_ntk_version": __version__,
    }
    _write(real, probe, index, kernels, attrs)
    return kernels


def _default_probe(run, real: str) -> str:
    if "ntk" in run and run["ntk"].attrs.get("probe"):
        return str(run["ntk"].attrs["probe"])
    if len(run.probes) == 1:
        return run.probes[0]
    raise ValueError(f"{_OWNER}: {real} has no /ntk table naming its probe and {len(run.probes)} probes "
                     f"{run.probes}; pass probe= one of them")


def _write(real: str, probe: str, index: np.ndarray, kernels: AnalyticKernels, attrs: dict) -> None:
    """Rebuild the file with ``/analytic/<probe>`` added, as the store resumes a file: the
    copy replaces the file when the store closes; on an error the copy is dropped."""
    group = f"{GROUP}/{probe}"
    store = RunStore.acquire(real, owner=_OWNER, resume=True)
    try:
        history = json.loads(store.file.attrs.get("history", "[]"))
        if history and history[-1].get("event") == "resumed":
            history[-1] = {**history[-1], "event": "analytic", "groups": [group]}
            store.file.attrs["history"] = json.dumps(history, sort_keys=True)
        if group in store.file:
            del store.file[group]
        coords = {"probe_i": index, "probe_j": index}
        for name in ("nngp", "ntk"):
            store.write_static(group, name, getattr(kernels, name).numpy(), ("probe_i", "probe_j"), coords=coords)
        for key, value in attrs.items():
            store.file[group].attrs[key] = value
        store.flush()
    except BaseException:
        store.abandon()  # the run file stays as it was
        raise
    store.release(_OWNER)

