"""Every refusal a monitor makes about the user's model, data or task names three things:
the monitor, what it found, and the argument that fixes it (issue "Bad input": a test per
message).

* Train-start refusals (setup, train start, first batch): under the default
  ``on_error="warn"`` each is a RuntimeWarning and a row of the run file's ``/errors``; the
  monitor is disabled, the fit runs to its last step and a second, healthy monitor in the
  same Trainer records its rows to the end. One case per message in ``REFUSALS``.
* Constructor argument errors: raised at once, naming the monitor, the argument and what
  it accepts. One case per message in ``BAD_ARGUMENTS``.

The regexes state what a user must read; none is copied from the code under test. One
Lightning namespace: the refusal path (the fit session's error policy) does not depend on
it, and tests/test_monitor_contract.py runs the failure contract under both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_ntk import callbacks, open_run
from lightning_ntk.probe import Probe

from .models import (
    NAMESPACES,
    TokenData,
    blob_data,
    loader,
    make_lm_module,
    make_manual_module,
    make_module,
    namespace,
    tiny_net,
    trainer,
)

L = namespace(NAMESPACES[0])
STEPS = 6  # blob_data(): 96 examples, batches of 16, one epoch


# ------------------------------------------------------------------ modules and data
def module_with_loss(net: nn.Module, loss: Callable[[torch.Tensor, Any], torch.Tensor]):
    """make_module's module with ``net`` and another training loss."""

    class Module(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss(self(x), y)

    torch.manual_seed(0)
    module = Module()
    module.net = net
    return module


def classifier(**net_kwargs):
    torch.manual_seed(0)
    return make_module(L, tiny_net(**net_kwargs))


def regression_data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x[:, :1] * 2.0 + 0.1 * torch.randn(n, 1, generator=g))


def regression():
    return module_with_loss(tiny_net(classes=1), nn.functional.mse_loss), loader(regression_data())


def multilabel():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 6, generator=g)
    data = TensorDataset(x, (x[:, :3] > 0).long())  # three labels per example, each 0 or 1
    return (module_with_loss(tiny_net(classes=3), lambda z, y: nn.functional.binary_cross_entropy_with_logits(
        z, y.float())), loader(data))


def real_zero_one():
    """One real output against real targets that are all 0.0 or 1.0: binary or regression?"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 6, generator=g)
    data = TensorDataset(x, (x[:, :1] > 0).float())
    return (module_with_loss(tiny_net(classes=1), nn.functional.binary_cross_entropy_with_logits), loader(data))


def generator_images():
    """A generator: noise -> (B, 1, 4, 4) images; the batches carry class labels (a
    conditional GAN's), which the images are not predictions of."""
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Unflatten(1, (1, 4, 4)))
    return module_with_loss(net, lambda images, y: images.pow(2).mean()), loader(blob_data())


def tanh_classifier():
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    return module_with_loss(net, nn.functional.cross_entropy), loader(blob_data())


def one_class():
    x, _ = blob_data().tensors
    return classifier(), loader(TensorDataset(x, torch.zeros(96, dtype=torch.long)))


def blobs():
    return classifier(), loader(blob_data())


def manual_optimisation():
    torch.manual_seed(0)
    return make_manual_module(L, tiny_net()), loader(blob_data())


class ChunkSampler:
    """A batch sampler of its own (not torch's BatchSampler): consecutive chunks of 16."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter([list(range(i, min(i + 16, self.n))) for i in range(0, self.n, 16)])

    def __len__(self) -> int:
        return (self.n + 15) // 16


def custom_batch_sampler():
    data = blob_data()
    return classifier(), DataLoader(data, batch_sampler=ChunkSampler(len(data)))


class Stream(IterableDataset):
    """The blobs as a stream: no sampler, no dataset indices."""

    def __init__(self) -> None:
        self.x, self.y = blob_data().tensors

    def __iter__(self):
        return iter(zip(self.x, self.y))


class SizedStream(Stream):
    """A stream that knows its length."""

    def __len__(self) -> int:
        return len(self.y)


def stream(dataset: type = Stream):
    return lambda: (classifier(), DataLoader(dataset(), batch_size=16))


def inputs_only():
    """A dataset without targets, batches (x,), and a module trained without them."""

    class Unsupervised(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self(x).logsumexp(dim=1).mean()

    torch.manual_seed(0)
    x, _ = blob_data().tensors
    return Unsupervised(), loader(TensorDataset(x))


def no_logits():
    """training_step calls the inner network, never the module: no logits to capture."""

    class NoLogits(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

    torch.manual_seed(0)
    return NoLogits(), loader(blob_data())


def one_based_labels():
    """Labels 1..3, shifted to 0..2 by the module's own loss."""
    x, y = blob_data().tensors
    module = module_with_loss(tiny_net(), lambda z, labels: nn.functional.cross_entropy(z, labels - 1))
    return module, loader(TensorDataset(x, y + 1))


def counts():
    """Integer targets 0..4 predicted by one real output (a count regression)."""
    x, _ = blob_data().tensors
    y = (x[:, 0].abs() * 2).clamp(max=4).long()
    module = module_with_loss(tiny_net(classes=1), lambda z, t: nn.functional.mse_loss(z.squeeze(1), t.float()))
    return module, loader(TensorDataset(x, y))


def two_loaders():
    """Two training dataloaders (a dict): batches {"a": (x, y), "b": (x, y)}."""

    class TwoSources(type(make_module(L))):
        def training_step(self, batch, batch_idx):
            return sum(nn.functional.cross_entropy(self(x), y) for x, y in batch.values())

    torch.manual_seed(0)
    return TwoSources(), {"a": loader(blob_data()), "b": loader(blob_data(seed=1))}


def padded_lm():
    torch.manual_seed(0)
    return make_lm_module(L), DataLoader(TokenData(n=48, pad=2), batch_size=8, shuffle=True)


# ------------------------------------------------------------------ healthy witnesses
def witness_metrics(path, **kwargs):
    settings = dict(name="witness", schedule=3, probe=Probe(size=24), budget=False, on_error="raise")
    settings.update(kwargs)
    return callbacks.ProbeMetricsMonitor(path, **settings)


def witness_codes(path):
    """Needs no targets' meaning (label-free measures): healthy where the outputs are not predictions."""
    return callbacks.ActivationCodeMonitor(path, name="witness", schedule=3, probe=Probe(size=24), heldout=None,
                                           measures=("redundancy", "code_change"), budget=False, on_error="raise")


def witness_on_tensors(path):
    """For data a probe cannot be drawn from: the probe given as tensors."""
    x, y = blob_data().tensors
    return witness_metrics(path, probe=(x[:24], y[:24]))


def per_example_mean(outputs, targets):  # module level: picklable
    return nn.functional.cross_entropy(outputs, targets)  # the batch mean, not per example


def passthrough(pl_module, x):
    return pl_module(x)


# ------------------------------------------------------------------ train-start refusals
@dataclass
class Refusal:
    subject: Callable[[str], Any]  # path -> the monitor that must refuse
    setup: Callable[[], Tuple[Any, Any]]  # -> (LightningModule, training DataLoader)
    monitor: str  # the monitor's class name, as the user reads it
    finding: str  # regex: what was found
    fix: str  # regex: the argument (or setting) that fixes it
    witness: Callable[[str], Any] = witness_metrics
    steps: int = STEPS


P12 = dict(probe=Probe(size=12), schedule=3, budget=False)
PROBE30 = dict(probe=Probe(size=30), heldout=None, schedule=3, budget=False)

REFUSALS = {
    # ---- sharpness in train mode: batch statistics need two examples per chunk
    "sharpness train-mode BatchNorm on one example": Refusal(
        lambda p: callbacks.SharpnessMonitor(p, sharpness_set=1, schedule=3, budget=False),
        lambda: (classifier(batchnorm=True), loader(blob_data())), "SharpnessMonitor",
        r"mode='train' normalises the BatchNorm layers.*a chunk here holds 1 example",
        r"sharpness_set= of at least 2 examples.*or mode='eval'"),
    # ---- the task: what outputs and targets mean
    "forgetting regression without tolerance": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), regression, "ForgettingMonitor",
        r"real predictions of real targets \(regression", r"pass tolerance="),
    "forgetting multi-label": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), multilabel, "ForgettingMonitor",
        r"multi-label outputs", r"task='multiclass'"),
    "forgetting generator images": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), generator_images, "ForgettingMonitor",
        r"outputs of shape \(1, 1, 4, 4\).*not per-example predictions", r"outputs_key=", witness=witness_codes),
    "ntk generator images": Refusal(
        lambda p: callbacks.NTKMonitor(p, **P12), generator_images, "NTKMonitor",
        r"outputs of shape \(12, 1, 4, 4\).*not per-example predictions", r"forward_fn=", witness=witness_codes),
    "probe_metrics generator images": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, **P12), generator_images, "ProbeMetricsMonitor",
        r"outputs of shape \(12, 1, 4, 4\).*not per-example predictions", r"forward_fn=", witness=witness_codes),
    "forgetting real 0/1 targets": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), real_zero_one, "ForgettingMonitor",
        r"real targets that are all 0 or 1", r"task='binary' or task='regression'",
        witness=lambda p: witness_metrics(p, task="binary")),
    "ntk real 0/1 targets": Refusal(
        lambda p: callbacks.NTKMonitor(p, **P12), real_zero_one, "NTKMonitor",
        r"real targets that are all 0 or 1", r"task='binary' or task='regression'",
        witness=lambda p: witness_metrics(p, task="regression")),
    "probe_metrics real 0/1 targets": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, **P12), real_zero_one, "ProbeMetricsMonitor",
        r"real targets that are all 0 or 1", r"task='binary' or task='regression'",
        witness=lambda p: witness_metrics(p, task="binary")),
    "probe_metrics labels out of range": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, **P12), one_based_labels, "ProbeMetricsMonitor",
        r"class labels must lie in \[0, 2\], got values in \[1, 3\]", r"batch_format=", witness=witness_codes),
    "probe_metrics integer targets of one real output": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, **P12), counts, "ProbeMetricsMonitor",
        r"targets of shape \(12,\) \(torch.int64\): no task fits", r"task='regression'",
        witness=lambda p: witness_metrics(p, task="regression")),
    "ntk task= that does not fit": Refusal(
        lambda p: callbacks.NTKMonitor(p, task="binary", **P12), blobs, "NTKMonitor",
        r"no task fits task='binary'", r"task=None"),
    "ntk pooled kernel of padded sequences": Refusal(
        lambda p: callbacks.NTKMonitor(p, sequence_kernel="pooled", probe=Probe(size=8), schedule=3, budget=False),
        padded_lm, "NTKMonitor", r"ignore_index.*padding", r"sequence_kernel='positions'",
        witness=lambda p: witness_metrics(p, probe=Probe(size=8))),  # 48 sequences, batches of 8
    # ---- the loss
    "sharpness manual optimisation": Refusal(
        lambda p: callbacks.SharpnessMonitor(p, sharpness_set=16, schedule=3, budget=False), manual_optimisation,
        "SharpnessMonitor", r"manual optimisation", r"loss_fn="),
    "sharpness forward_fn without loss_fn": Refusal(
        lambda p: callbacks.SharpnessMonitor(p, sharpness_set=16, forward_fn=passthrough, schedule=3, budget=False),
        blobs, "SharpnessMonitor", r"forward_fn= gives the model's outputs.*training_step", r"loss_fn="),
    "probe_metrics loss_fn returns the batch mean": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, loss_fn=per_example_mean, **P12), blobs, "ProbeMetricsMonitor",
        r"per-example losses of shape \(12,\), got \(\)", r"loss_fn=.*reduction='none'"),
    # ---- classes
    "representations regression targets": Refusal(
        lambda p: callbacks.RepresentationMonitor(p, **PROBE30), regression, "RepresentationMonitor",
        r"integer class labels.*real-valued targets", r"probe= or batch_format="),
    "codes classifier measures on regression targets": Refusal(
        lambda p: callbacks.ActivationCodeMonitor(p, measures=("knn",), **PROBE30), regression,
        "ActivationCodeMonitor", r"integer class labels.*real-valued targets",
        r"measures=\('redundancy', 'code_change'\)"),
    "codes k-NN k larger than the probe": Refusal(
        lambda p: callbacks.ActivationCodeMonitor(p, k=20, measures=("knn",), **PROBE30), blobs,
        "ActivationCodeMonitor", r"k-NN with k=20 needs at least 20 codes.*has 15", r"probe=.*k="),
    "representations too few classes for few-shot": Refusal(
        lambda p: callbacks.RepresentationMonitor(p, few_shot=((5, 1),), n_query=2, linear_probe=False, **PROBE30),
        blobs, "RepresentationMonitor", r"5-way 1-shot.*needs 5 classes.*it has 3", r"few_shot=.*n_query="),
    "representations one class for the linear probe": Refusal(
        lambda p: callbacks.RepresentationMonitor(p, few_shot=(), **PROBE30), one_class, "RepresentationMonitor",
        r"at least two classes", r"linear_probe=False"),
    # ---- the model
    "codes without ReLU": Refusal(
        lambda p: callbacks.ActivationCodeMonitor(p, **PROBE30), tanh_classifier, "ActivationCodeMonitor",
        r"no ReLU-family activation", r"module_types=|modules="),
    # ---- probes and row sizes
    "probe larger than the dataset": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, probe=Probe(size=500), schedule=3, budget=False), blobs,
        "ProbeMetricsMonitor", r"asks for 500 examples but the train dataset has only 96",
        r"probe=Probe\(size=500.*pass size<=96"),
    "held-out probe without validation data": Refusal(
        lambda p: callbacks.NTKMonitor(p, heldout=Probe(size=8, source="val"), **P12), blobs, "NTKMonitor",
        r"needs a validation dataloader, and this run has none",
        r"heldout=Probe\(.*source='train', or pass the examples as tensors: ProbeSet.from_tensors"),
    "held-out probe named like the training probe": Refusal(
        lambda p: callbacks.ActivationCodeMonitor(p, probe=Probe(size=30, name="probe"),
                                                  heldout=Probe(size=15, seed=3, name="probe"), schedule=3,
                                                  budget=False),
        blobs, "ActivationCodeMonitor", r"both named 'probe'", r"another name="),
    "probe from an iterable dataset": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, schedule=3, budget=False), stream(), "ProbeMetricsMonitor",
        r"cannot draw a probe from a Stream.*map-style", r"probe=Probe\(.*ProbeSet.from_tensors",
        witness=witness_on_tensors),
    "sharpness set from an iterable dataset": Refusal(
        lambda p: callbacks.SharpnessMonitor(p, schedule=3, budget=False), stream(), "SharpnessMonitor",
        r"cannot draw a probe from a Stream.*map-style", r"sharpness_set=Probe\(.*ProbeSet.from_tensors",
        witness=witness_on_tensors),
    "ntk row over max_row_mb": Refusal(
        lambda p: callbacks.NTKMonitor(p, max_row_mb=1e-4, **P12), blobs, "NTKMonitor",
        r"one row of /ntk takes .* MB, over max_row_mb=0.0001",
        r"pass a smaller probe= \(or k=\) or a larger max_row_mb="),
    "probe_metrics row over max_row_mb": Refusal(
        lambda p: callbacks.ProbeMetricsMonitor(p, max_row_mb=1e-5, **P12), blobs, "ProbeMetricsMonitor",
        r"one row of /probe_metrics takes .* MB, over max_row_mb=1e-05 \(largest: example_loss \(12,\)",
        r"pass a smaller probe= or a larger max_row_mb=",
        witness=witness_codes),
    "codes row over max_row_mb": Refusal(
        lambda p: callbacks.ActivationCodeMonitor(p, store_codes=True, max_row_mb=1e-4, **PROBE30), blobs,
        "ActivationCodeMonitor", r"one row of /codes takes .* MB, over max_row_mb=0.0001 \(largest: codes_train",
        r"store_codes=False or a larger max_row_mb="),
    "sharpness row over max_row_mb": Refusal(
        # refused before any Lanczos step: the density's 2 x 20000 float64 nodes and weights take 0.3 MB
        lambda p: callbacks.SharpnessMonitor(p, sharpness_set=16, density=True, density_steps=20000, max_row_mb=0.1,
                                             schedule=3, budget=False), blobs,
        "SharpnessMonitor", r"one row of /sharpness takes 0\.3 MB, over max_row_mb=0.1 \(largest: density_\w+ "
                            r"\(20000,\)",
        r"pass a smaller k= \(or density_steps=\) or a larger max_row_mb="),
    # ---- which examples a batch holds (ForgettingMonitor)
    "forgetting custom batch sampler": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), custom_batch_sampler, "ForgettingMonitor",
        r"batch_sampler is a ChunkSampler, whose batches the monitor cannot follow", r"index_key="),
    "forgetting iterable dataset": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), stream(), "ForgettingMonitor",
        r"dataset \(Stream\) has no length", r"num_examples=", witness=witness_on_tensors),
    "forgetting iterable dataset with a length": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), stream(SizedStream), "ForgettingMonitor",
        r"IterableDataset, which has no sampler indices", r"index_key=", witness=witness_on_tensors),
    "forgetting two training dataloaders": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), two_loaders, "ForgettingMonitor",
        r"records one training dataloader, and this run has 2", r"index_key=.*num_examples=.*batch_format="),
    "forgetting no targets": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), inputs_only, "ForgettingMonitor",
        r"length 1 has no targets", r"batch_format=", witness=witness_on_tensors),
    "forgetting batch_format without targets": Refusal(
        lambda p: callbacks.ForgettingMonitor(p, batch_format=lambda b: (b[0], None)), blobs, "ForgettingMonitor",
        r"no targets in the batch", r"batch_format= returning \(x, y\)"),
    "forgetting no logits": Refusal(
        lambda p: callbacks.ForgettingMonitor(p), no_logits, "ForgettingMonitor",
        r"found no logits.*not called", r"return \{'loss': loss, 'logits': logits\}"),
}


def _fit(case: Refusal, path: str):
    subject, witness = case.subject(path), case.witness(path)
    module, train_loader = case.setup()
    t = trainer(L, [subject, witness], max_epochs=1)
    with pytest.warns(RuntimeWarning) as record:
        t.fit(module, train_loader)
    return subject, witness, t, [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("case_id", list(REFUSALS))
def test_refusal_names_monitor_finding_and_fix(tmp_path, case_id):
    case = REFUSALS[case_id]
    path = str(tmp_path / "run.h5")
    subject, witness, t, warned = _fit(case, path)
    # the warning: the monitor, what it found, the argument that fixes it
    refusals = [m for m in warned if re.match(rf"{case.monitor} \(\w+\) failed at step \d+", m)]
    assert len(refusals) == 1, warned
    message = refusals[0]
    assert re.search(case.finding, message), message
    assert re.search(case.fix, message), message
    assert subject.disabled and not witness.disabled
    assert t.global_step == case.steps  # training went on to the end
    with open_run(path) as run:
        [error] = run.errors()  # one row, for the monitor that refused
        assert error["monitor"] == subject.group, error
        assert re.search(case.finding, error["message"]) and re.search(case.fix, error["message"]), error
        # nothing measured: its tables (declared before a first-batch refusal) hold no row
        assert all(len(run[g]) == 0 for g in run.tables if g.split("/")[0] == subject.group), run.tables
        steps = list(run[witness.group]["step"])  # the other monitor recorded to the end
        assert steps[0] == 0 and steps[-1] == case.steps, steps


# ------------------------------------------------------------------ the strategy
MONITOR_CLASSES = ["ProbeMetricsMonitor", "NTKMonitor", "SharpnessMonitor", "ForgettingMonitor",
                   "ActivationCodeMonitor", "RepresentationMonitor"]


@pytest.mark.parametrize("cls", MONITOR_CLASSES)
def test_sharding_strategy_is_refused_at_setup_and_training_goes_on(tmp_path, monkeypatch, cls):
    """FSDP and DeepSpeed cannot run on this CPU machine: the single-device strategy is made
    to count as sharding, so the whole fit goes through the refusal (every monitor refuses;
    no witness can record)."""
    monkeypatch.setattr("lightning_ntk.callbacks._lightning._SHARDED_STRATEGIES", ("SingleDeviceStrategy",))
    path = str(tmp_path / "run.h5")
    monitor = getattr(callbacks, cls)(path, **({} if cls == "ForgettingMonitor" else dict(schedule=3, budget=False)))
    t = trainer(L, [monitor], max_epochs=1)
    module, train_loader = blobs()
    with pytest.warns(RuntimeWarning, match=rf"{cls} \(\w+\) failed at step 0.*strategy is SingleDeviceStrategy, "
                                            r"which shards.*strategy='ddp'"):
        t.fit(module, train_loader)
    assert monitor.disabled and t.global_step == STEPS
    with open_run(path) as run:
        [error] = run.errors()
        assert error["monitor"] == monitor.group and "strategy='ddp'" in error["message"]
        assert [g for g in run.tables if g.split("/")[0] == monitor.group] == []


# ------------------------------------------------------------------ constructor arguments
# (class, bad keyword arguments, argument named, what is accepted)
BAD_ARGUMENTS = {
    "max_row_mb zero": ("ProbeMetricsMonitor", dict(max_row_mb=0), "max_row_mb", r"None or a finite number > 0"),
    "probe_metrics task": ("ProbeMetricsMonitor", dict(task="classification"), "task", r"one of 'multiclass'"),
    "ntk k": ("NTKMonitor", dict(k=0), "k", r"a positive integer"),
    "ntk projections": ("NTKMonitor", dict(projections=1), "projections", r"an integer >= 2"),
    "ntk dtype": ("NTKMonitor", dict(dtype=torch.float16), "dtype", r"one of None, torch.float32, torch.float64"),
    "ntk sequence_kernel": ("NTKMonitor", dict(sequence_kernel="mean"), "sequence_kernel",
                            r"one of 'positions', 'pooled'"),
    "ntk token_positions": ("NTKMonitor", dict(token_positions=0), "token_positions", r"None or a positive integer"),
    "ntk task": ("NTKMonitor", dict(task="binary-ish"), "task", r"one of 'multiclass'"),
    "ntk heldout string": ("NTKMonitor", dict(heldout="val"), "heldout", r"'auto', None, a Probe"),
    "ntk heldout type": ("NTKMonitor", dict(heldout=3), "heldout", r"'auto', None, a lightning_ntk.Probe"),
    "probe type": ("NTKMonitor", dict(probe="train"), "probe", r"a lightning_ntk.Probe, a ProbeSet or a pair"),
    "sharpness probe=": ("SharpnessMonitor", dict(probe=Probe(size=8)), "sharpness_set", r"not probe="),
    "sharpness sharpness_set": ("SharpnessMonitor", dict(sharpness_set=0), "sharpness_set",
                                r"a positive number of examples"),
    "sharpness k": ("SharpnessMonitor", dict(k=0), "k", r"an integer >= 1"),
    "sharpness trace_queries": ("SharpnessMonitor", dict(trace_queries=2), "trace_queries", r"an integer >= 3"),
    "sharpness tol": ("SharpnessMonitor", dict(tol=1.0), "tol", r"in \(0, 1\)"),
    "sharpness max_hvp": ("SharpnessMonitor", dict(k=3, max_hvp=4), "max_hvp", r"None or an integer >= 2k = 6"),
    "sharpness sam_rho": ("SharpnessMonitor", dict(sam_rho=-0.1), "sam_rho", r"None or a positive radius"),
    "sharpness loss_fn": ("SharpnessMonitor", dict(loss_fn="mse"), "loss_fn", r"callable \(outputs, targets\)"),
    "sharpness dtype": ("SharpnessMonitor", dict(dtype=torch.float16), "dtype", r"None, torch.float32 or"),
    "forgetting mode": ("ForgettingMonitor", dict(mode="probe"), "mode", r"one of 'train'.*ProbeForgettingMonitor"),
    "forgetting index_key": ("ForgettingMonitor", dict(index_key=1.5), "index_key",
                             r"None, a dict key \(str\) or a tuple position \(int\)"),
    "forgetting outputs_key": ("ForgettingMonitor", dict(outputs_key=""), "outputs_key", r"a non-empty string"),
    "forgetting batch_format": ("ForgettingMonitor", dict(batch_format=("x",)), "batch_format",
                                r"None, a pair \(x_key, y_key\) or a function"),
    "forgetting num_examples": ("ForgettingMonitor", dict(num_examples=0), "num_examples",
                                r"None or a positive integer"),
    "forgetting tolerance": ("ForgettingMonitor", dict(tolerance=-1.0), "tolerance", r"None or a finite number > 0"),
    "forgetting task": ("ForgettingMonitor", dict(task="classification"), "task", r"one of 'multiclass'"),
    "forgetting token_positions": ("ForgettingMonitor", dict(token_positions=0), "token_positions",
                                   r"a positive integer"),
    "forgetting flush_every": ("ForgettingMonitor", dict(flush_every=0), "flush_every", r"None or a positive integer"),
    "forgetting write_interval": ("ForgettingMonitor", dict(write_interval=-1), "write_interval", r"a finite number >= 0"),
    "forgetting schedule": ("ForgettingMonitor", dict(schedule=3), "schedule", r"does not apply.*every training batch"),
    "forgetting probe": ("ForgettingMonitor", dict(probe=Probe(size=8)), "probe", r"does not apply"),
    "forgetting forward_fn": ("ForgettingMonitor", dict(forward_fn=passthrough), "forward_fn", r"does not apply"),
    "forgetting budget": ("ForgettingMonitor", dict(budget=0.1), "budget", r"does not apply"),
    "probe forgetting outputs_key": ("ProbeForgettingMonitor", dict(outputs_key=""), "outputs_key",
                                     r"a non-empty string"),
    "codes capture": ("ActivationCodeMonitor", dict(capture="hooks"), "capture", r"'modules' or 'functional'"),
    "codes modules with functional capture": ("ActivationCodeMonitor", dict(capture="functional", modules=["0"]),
                                              "modules", r"only applies to capture='modules'"),
    "codes measures string": ("ActivationCodeMonitor", dict(measures="knn"), "measures", r"a sequence of names from"),
    "codes measures unknown": ("ActivationCodeMonitor", dict(measures=("knn", "svm")), "measures",
                               r"a non-empty selection of \('redundancy', 'knn'.*unknown: \['svm'\]"),
    "codes measures empty": ("ActivationCodeMonitor", dict(measures=()), "measures", r"a non-empty selection"),
    "codes k": ("ActivationCodeMonitor", dict(k=0), "k", r"a positive integer"),
    "codes kmeans_n_init": ("ActivationCodeMonitor", dict(kmeans_n_init=0), "kmeans_n_init", r"a positive integer"),
    "codes seed": ("ActivationCodeMonitor", dict(seed=-1), "seed", r"an integer >= 0"),
    "codes classifier_threads": ("ActivationCodeMonitor", dict(classifier_threads=0), "classifier_threads",
                                 r"None or a positive integer"),
    "representations layer": ("RepresentationMonitor", dict(layer=3), "layer",
                              r"None \(penultimate layer\), a module name or an nn.Module"),
    "representations few_shot pair": ("RepresentationMonitor", dict(few_shot=(5,)), "few_shot",
                                      r"\(n_way, k_shot\) pairs"),
    "representations few_shot n_way": ("RepresentationMonitor", dict(few_shot=((1, 5),)), "few_shot n_way",
                                       r"an integer >= 2"),
    "representations few_shot twice": ("RepresentationMonitor", dict(few_shot=((5, 1), (5, 1))), "few_shot",
                                       r"lists a setting twice"),
    "representations classifiers": ("RepresentationMonitor", dict(classifiers=("svm",)), "classifiers",
                                    r"a non-empty selection of \('centroid_euclidean'"),
    "representations nothing": ("RepresentationMonitor", dict(few_shot=(), linear_probe=False), "few_shot",
                                r"nothing to measure.*linear_probe is False"),
    "representations n_query": ("RepresentationMonitor", dict(n_query=0), "n_query", r"a positive integer"),
    "representations episodes": ("RepresentationMonitor", dict(episodes=1), "episodes", r"an integer >= 2"),
}


@pytest.mark.parametrize("case_id", list(BAD_ARGUMENTS))
def test_bad_argument_names_monitor_argument_and_what_is_accepted(case_id):
    cls, kwargs, argument, accepted = BAD_ARGUMENTS[case_id]
    with pytest.raises((TypeError, ValueError)) as info:
        getattr(callbacks, cls)("run.h5", **kwargs)
    message = str(info.value)
    assert message.startswith(f"{cls}: "), message
    assert re.search(rf"\b{re.escape(argument)}\b", message), message
    assert re.search(accepted, message), message
