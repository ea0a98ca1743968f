"""Spawning: train children from a parent's saved states with the user's own module, data
and Trainer settings, and record what they become (Frankle et al. 2020; Fort et al. 2020).

A child of the parent state at step t starts from the parent's checkpoint (weights,
optimiser, LR scheduler, loops: ``Trainer.fit(ckpt_path=...)``) at the parent's position in
the data (the batches of t's epoch already taken are skipped, at the sampler, without
loading them) and differs from its siblings only in the random stream that follows: at
the start of its first (partial) epoch every global RNG is seeded with the child's own
seed, so its data order, augmentation draws and dropout masks are its own (the SGD noise;
a loader or sampler with a ``generator=`` of its own is reseeded too). A *replay* child
(``seed=None``) instead restores the parent's recorded RNG states and repeats the parent's
own continuation: on CPU its weights equal the parent's at every later step, bit for bit.

:func:`spawn_children` trains k children from each chosen parent state, measures them
(:func:`lightning_ntk.children.compare_children`: barriers, distances, disagreement, eNTK
distances; optionally the linearised network trained alike, next to the real one) and
writes the rows into the parent's run file under ``/landscape`` (docs/format.md).
Lightning is imported only through :mod:`._lightning`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import _args
from ..children import ChildrenComparison, compare_children, evaluate
from ..landscape import LossSlice, filter_normalized_direction, linearize, slice_1d
from ..landscape_records import (
    CHILDREN,
    LINEARIZED,
    PAIRS,
    SLICES,
    LandscapeRows,
    child_fields,
    linearized_fields,
    pair_fields,
    slice_fields,
    write_landscape,
)
from ..parent_states import ParentState, child_seed, read_parent_states, restore_rng, seed_rng
from ..probe import ProbeSet, draw_probe
from ..store import RunStore, StoreError
from ._lightning import CALLBACK_BASES, NAMESPACES

#: Trainer arguments a child's Trainer sets itself (a child is a fit of its own).
_CHILD_TRAINER = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                  "enable_model_summary": False}
#: Arguments that only decide when a fit stops: the child's step budget decides.
_STOPPING = ("max_epochs", "min_epochs", "max_steps", "min_steps", "max_time")


class SpawnError(RuntimeError):
    """Children cannot be spawned as asked (the message names what and the argument that fixes it)."""


# ---------------------------------------------------------------------------- data order
class _SkipFirst:
    """An index sampler without its first ``skip`` items (drawn, never loaded)."""

    def __init__(self, inner: Any, skip: int):
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.inner)
        for _ in range(self.skip):
            next(it, None)
        yield from it

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


class _ChildLoader:
    """The user's training DataLoader for one child: the first epoch starts at the parent's
    next batch, from the child's RNG state; later epochs are the loader's own.

    Iteration is lazy (a generator): Lightning calls ``iter`` once only to check the loader,
    and the RNG is set when the first batch is drawn. ``state_dict``/``load_state_dict``
    make Lightning treat it as resumable (it is: the position is set here)."""

    def __init__(self, inner: Any, skip: int, start: Callable[[], None]):
        self.inner, self._skip, self._start, self._first = inner, int(skip), start, True
        self.dataset = inner.dataset
        self.sampler, self.batch_sampler = inner.sampler, inner.batch_sampler

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        if not self._first:
            yield from self.inner
            return
        self._first = False
        self._start()
        first = copy.copy(self.inner)
        if self.inner.batch_sampler is not None:
            object.__setattr__(first, "batch_sampler", _SkipFirst(self.inner.batch_sampler, self._skip))
        else:
            object.__setattr__(first, "sampler", _SkipFirst(self.inner.sampler, self._skip))
        object.__setattr__(first, "_iterator", None)
        yield from first

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def _check_loader(loader: Any, owner: str, replay: bool) -> None:
    """A child's data order is set through the loader's sampler: a torch DataLoader over a
    map-style dataset, and (for children of their own seed) an order that depends on the RNG."""
    from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

    if not isinstance(loader, DataLoader):
        raise SpawnError(f"{owner}: the training data must be one torch DataLoader (a child's data order is set "
                         f"through its sampler); got {type(loader).__name__}. Return a DataLoader from "
                         "train_dataloader()")
    if isinstance(loader.dataset, IterableDataset):
        raise SpawnError(f"{owner}: the training DataLoader reads an IterableDataset ({type(loader.dataset).__name__}),"
                         " whose order a sampler cannot set; spawning needs a map-style dataset (__getitem__, __len__)")
    sampler = loader.sampler if loader.batch_sampler is None else getattr(loader.batch_sampler, "sampler", None)
    if not replay and isinstance(sampler, SequentialSampler):
        raise SpawnError(f"{owner}: the training DataLoader does not shuffle (SequentialSampler): children of "
                         "different seeds would see the same batches and differ in nothing. Pass shuffle=True")


def _reseed_generators(loader: Any, seed: int) -> None:
    """A loader or sampler with a generator of its own draws its order from it, not the global RNG."""
    samplers = [loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    seen = set()
    for obj in samplers:
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and id(gen) not in seen:
            seen.add(id(gen))
            gen.manual_seed(seed)


# ---------------------------------------------------------------------------- the child's Trainer
class _ChildControl(*CALLBACK_BASES):  # type: ignore[misc]
    """In a child's Trainer: a replay child starts its first batch from the parent's RNG state."""

    def __init__(self, next_batch_rng: Optional[Mapping[str, Any]]):
        self.next_batch_rng, self._started = next_batch_rng, False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._started:
            self._started = True
            if self.next_batch_rng is not None:
                restore_rng(self.next_batch_rng)


def _namespace(module: Any, owner: str) -> Any:
    for ns in NAMESPACES.values():
        if isinstance(module, ns.LightningModule):
            return ns
    raise TypeError(f"{owner}: module must be a LightningModule (lightning.pytorch or pytorch_lightning), got "
                    f"{type(module).__name__}")


@dataclass
class SpawnData:
    """Where a child's training data comes from: ``datamodule``, ``train_dataloaders`` (with
    ``val_dataloaders``), or neither (the module's own ``train_dataloader``)."""

    datamodule: Any = None
    train_dataloaders: Any = None
    val_dataloaders: Any = None

    @contextlib.contextmanager
    def fit_kwargs(self, module: Any, wrap: Callable[[Any], Any]) -> Iterator[Dict[str, Any]]:
        """``Trainer.fit`` arguments with the training loader wrapped by ``wrap``."""
        if self.train_dataloaders is not None:
            yield {"train_dataloaders": wrap(self.train_dataloaders), "val_dataloaders": self.val_dataloaders}
            return
        owner = self.datamodule if self.datamodule is not None else module
        original = owner.train_dataloader
        owner.train_dataloader = lambda: wrap(original())  # the instance's, removed below
        try:
            yield {"datamodule": self.datamodule} if self.datamodule is not None else {}
        finally:
            owner.__dict__.pop("train_dataloader", None)

    def train_loader(self, module: Any) -> Any:
        if self.train_dataloaders is not None:
            return self.train_dataloaders
        return (self.datamodule if self.datamodule is not None else module).train_dataloader()

    def val_loader(self, module: Any) -> Any:
        if self.val_dataloaders is not None:
            return self.val_dataloaders
        owner = self.datamodule if self.datamodule is not None else (module if self.train_dataloaders is None else None)
        if owner is None:
            return None
        try:
            return owner.val_dataloader()
        except Exception:  # noqa: BLE001 - Lightning's default raises when there is none
            return None


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Children are many short fits: Lightning's per-fit banners and restore lines are dropped."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric",
                                               "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _child_trainer(ns: Any, trainer_kwargs: Optional[Mapping[str, Any]], max_steps: int, control: Any,
                   owner: str) -> Any:
    kwargs = dict(trainer_kwargs or {})
    for name in ("devices", "num_nodes"):
        value = kwargs.get(name, 1)
        if value not in (1, "1", None, "auto") and not (isinstance(value, (list, tuple)) and len(value) == 1):
            raise SpawnError(f"{owner}: trainer_kwargs has {name}={value!r}; children are trained on one device of "
                             "one process. Pass devices=1")
    if kwargs.get("devices") in ("auto", None):
        kwargs["devices"] = 1
    callbacks = list(kwargs.pop("callbacks", None) or [])
    for name in _STOPPING:
        kwargs.pop(name, None)
    kwargs.update(_CHILD_TRAINER, max_steps=int(max_steps), max_epochs=-1)
    return ns.Trainer(callbacks=[control, *callbacks], **kwargs)


def _fresh_module(module: Any) -> Any:
    return module() if callable(module) and not isinstance(module, nn.Module) else copy.deepcopy(module)


def train_child(parent: ParentState, module: Any, data: SpawnData, *, until: int, seed: Optional[int],
                trainer_kwargs: Optional[Mapping[str, Any]] = None, ckpt_path: Optional[str] = None,
                owner: str = "train_child") -> Any:
    """Train one child of ``parent`` to step ``until`` and return its LightningModule.

    Args:
        module: a LightningModule (deep-copied) or a function returning a new one.
        seed: the child's seed (its data order and every random draw after the spawn);
            None: replay the parent's own continuation (its recorded RNG states).
        ckpt_path: the checkpoint to start from (default the parent's file; the linearised
            network passes a converted one).
    """
    replay = seed is None
    if replay and not parent.can_replay:
        raise SpawnError(f"{owner}: the parent state at step {parent.step} cannot be replayed: {parent.replayable}")
    if until <= parent.step:
        raise SpawnError(f"{owner}: a child of the state at step {parent.step} must train past it; got until={until}")
    child = _fresh_module(module)
    ns = _namespace(child, owner)
    info = parent.info

    def wrap(loader: Any) -> _ChildLoader:
        _check_loader(loader, owner, replay)

        def start() -> None:
            if replay:
                restore_rng(info["epoch_rng"])
            else:
                seed_rng(seed)
                _reseed_generators(loader, seed)

        return _ChildLoader(loader, parent.next_batch, start)

    control = _ChildControl(info["next_batch_rng"] if replay else None)
    with _quiet_lightning():
        trainer = _child_trainer(ns, trainer_kwargs, until, control, owner)
        with data.fit_kwargs(child, wrap) as fit_kwargs:
            trainer.fit(child, ckpt_path=ckpt_path or parent.path, **fit_kwargs)
    if trainer.global_step != until:
        raise SpawnError(f"{owner}: the child of step {parent.step} stopped at step {trainer.global_step}, not "
                         f"{until} (a callback or the module stopped the fit: trainer.should_stop)")
    return child


# ---------------------------------------------------------------------------- spawning
@dataclass(frozen=True)
class LinearizedResult:
    """The linearised network trained from θ(t) and the real network trained alike (child 0)."""

    linear_loss: float
    linear_error: float
    real_loss: float
    real_error: float
    parent_loss: float
    parent_error: float
    seed: int


@dataclass(frozen=True)
class Spawn:
    """Children of one parent state: their seeds, the step they trained to, the comparison."""

    step: int
    epoch: float
    seeds: Tuple[int, ...]
    until: int
    comparison: ChildrenComparison
    linearized: Optional[LinearizedResult] = None
    slice: Optional[LossSlice] = None
    seconds: float = 0.0


@dataclass(frozen=True)
class SpawnResult:
    """What :func:`spawn_children` measured, per parent state (also in the run file)."""

    run: Optional[str]
    spawns: List[Spawn] = field(default_factory=list)
    eval_set: str = ""
    probe: Optional[ProbeSet] = None


def _linearized_checkpoint(parent: ParentState, lin_module: nn.Module, folder: str) -> str:
    """The parent's checkpoint with the linearised module's state_dict (θ = θ₀ = the parent's
    weights; optimiser and scheduler states as the parent's: the parameters keep their order)."""
    ckpt = parent.checkpoint()
    ckpt["state_dict"] = {k: v.detach().cpu().clone() for k, v in lin_module.state_dict().items()}
    path = os.path.join(folder, f"linearized_step_{parent.step}.ckpt")
    torch.save(ckpt, path)
    return path


def _as_probe(probe: Any, eval_loader: Any, owner: str) -> ProbeSet:
    if isinstance(probe, ProbeSet):
        return probe
    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        return ProbeSet.from_tensors(probe[0], probe[1], name="given")
    size = _args.positive_int(probe, "probe", owner, hint="an int (examples drawn from the evaluation data), a "
                                                           "ProbeSet or a pair (x, y)")
    dataset = getattr(eval_loader, "dataset", None)
    if dataset is None:
        raise SpawnError(f"{owner}: probe={size} draws from the evaluation DataLoader's dataset, but eval_data is a "
                         f"{type(eval_loader).__name__}; pass probe=(x, y) or a ProbeSet")
    return draw_probe(dataset, min(size, len(dataset)), seed=0, name="spawn",
                      collate_fn=getattr(eval_loader, "collate_fn", None))


def spawn_children(run: Union[str, "os.PathLike[str]"], module: Any, *, datamodule: Any = None,
                   train_dataloaders: Any = None, val_dataloaders: Any = None,
                   trainer_kwargs: Optional[Mapping[str, Any]] = None, children: int = 2,
                   steps: Optional[int] = None, until: Optional[int] = None,
                   spawn_steps: Optional[Sequence[int]] = None, seed: int = 0, eval_data: Any = None,
                   probe: Any = 128, points: int = 11, kernel: str = "trace", linearized: bool = False,
                   slices: Optional[Sequence[float]] = None,
                   forward_fn: Optional[Callable[..., Any]] = None, loss_fn: Optional[Callable[..., Any]] = None,
                   error_fn: Optional[Callable[..., Any]] = None, task: Optional[str] = None, write: bool = True,
                   replace: bool = False, progress: bool = True) -> SpawnResult:
    """Train ``children`` children from each parent state of ``run`` and measure them.

    Args:
        run: the parent's run file (states in ``<run>.parents``, written by
            :class:`~lightning_ntk.callbacks.ParentStateMonitor`), or that folder (then
            ``write=False``: there is no run file to write to).
        module: the user's LightningModule (deep-copied per child) or a function returning
            a new one; its weights, optimiser and scheduler come from the parent state.
        datamodule, train_dataloaders, val_dataloaders: the training data, as given to
            ``Trainer.fit`` (neither: the module's own ``train_dataloader``). The training
            loader must be a DataLoader over a map-style dataset.
        trainer_kwargs: the parent's Trainer arguments (precision, clipping, accumulation,
            validation settings, callbacks ...). Children run on one device; stopping
            arguments are replaced by the step budget; no logger or checkpointing.
        children: k ≥ 2 children per parent state, of seeds ``child_seed(seed, t, i)``.
        steps, until: each child trains ``steps`` steps past its spawn step t, or to the
            absolute step ``until`` (Frankle et al. and Fort et al. train children to the end
            of the parent's budget). Exactly one.
        spawn_steps: the parent states to spawn from (default: every one saved, below ``until``).
        eval_data: the set of barriers, errors and losses (default: the validation loader,
            else the training loader; the choice is the tables' ``eval_set`` attribute).
        probe: examples of the disagreement and the eNTKs: an int (drawn from the
            evaluation data's dataset, stratified, seed 0), a ProbeSet or ``(x, y)``.
        points, kernel: points on each linear path; the eNTK kind.
        linearized: also train the linearised network f(θ_t) + J(θ_t)(θ − θ_t) from each
            state with child 0's seed and budget (:func:`lightning_ntk.linearize`; the
            module's network must be its one child holding every trainable parameter), and
            record its loss and error next to child 0's.
        slices: coordinates of a 1-D slice of the loss and error around each parent state,
            L(θ_t + a d) on the evaluation set, d a filter-normalised random direction (Li et
            al. 2018; :func:`lightning_ntk.slice_1d`) drawn with ``seed`` (None: no slices).
        forward_fn, loss_fn, error_fn, task: as for :func:`lightning_ntk.linear_path`.
        write: write the rows into ``run`` (``/landscape/spawn_pairs``, ``spawn_children``,
            ``linearized``, ``slices``) after each parent state; rows of the same spawn steps
            are replaced.
        replace: drop the file's earlier ``/landscape`` spawn rows measured with other
            settings (otherwise such a mix is refused).
        progress: a line per child (and per parent state) on stderr.
    """
    owner = "spawn_children"
    children = _args.integer(children, "children", owner, minimum=2, hint="a barrier joins two children")
    if (steps is None) == (until is None):
        raise ValueError(f"{owner}: pass exactly one of steps= (steps each child trains past its spawn step) and "
                         f"until= (the absolute step every child trains to); got steps={steps!r}, until={until!r}")
    steps = _args.positive_int(steps, "steps", owner, optional=True)
    until = _args.positive_int(until, "until", owner, optional=True)
    points = _args.integer(points, "points", owner, minimum=2)
    if sum(x is not None for x in (datamodule, train_dataloaders)) > 1:
        raise ValueError(f"{owner}: pass datamodule= or train_dataloaders=, not both")
    run_path = os.fspath(run)
    is_dir = os.path.isdir(run_path)
    if write and is_dir:
        raise ValueError(f"{owner}: {run_path} is a folder of parent states; writing needs the run file (pass the run "
                         "file, or write=False)")
    if write and not os.path.exists(run_path):
        raise FileNotFoundError(f"{owner}: run file {run_path} does not exist; pass write=False to measure without "
                                "writing")
    if write and RunStore.is_open(run_path):  # refused now, not after training the children
        raise StoreError(f"{owner}: run file {run_path} is still open for writing in this process (its training "
                         "has not ended); spawn children after Trainer.fit returns")
    states = read_parent_states(run_path, spawn_steps)
    if until is not None:
        later = [s for s in states if s.step < until]
        if spawn_steps is not None and len(later) < len(states):
            raise ValueError(f"{owner}: spawn step(s) {[s.step for s in states if s.step >= until]} are not before "
                             f"until={until}")
        states = later
    if not states:
        raise ValueError(f"{owner}: no parent state before until={until}")
    template = _fresh_module(module)
    _namespace(template, owner)
    data = SpawnData(datamodule, train_dataloaders, val_dataloaders)
    spawns: List[Spawn] = []
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    eval_loader, eval_set, probe_set, train_loader = None, "", None, None
    for parent in states:
        started = time.perf_counter()
        target = until if until is not None else parent.step + steps
        seeds = tuple(child_seed(seed, parent.step, i) for i in range(children))
        trained = []
        for i, s in enumerate(seeds):
            t0 = time.perf_counter()
            child = train_child(parent, module, data, until=target, seed=s, trainer_kwargs=trainer_kwargs, owner=owner)
            trained.append(child)
            say(f"spawn at step {parent.step} (epoch {parent.epoch:.2f}): child {i + 1}/{children} (seed {s}) trained "
                f"to step {target} in {time.perf_counter() - t0:.1f} s")
        model = trained[0]
        if eval_loader is None:  # after a fit: the datamodule is set up
            train_loader = data.train_loader(model)
            eval_loader, eval_set = ((eval_data, "given") if eval_data is not None else
                                     (data.val_loader(model), "validation"))
            if eval_loader is None:
                eval_loader, eval_set = train_loader, "train"
            probe_set = _as_probe(probe, eval_loader, owner)
        parent_weights = parent.checkpoint()["state_dict"]
        comparison = compare_children(model, [c.state_dict() for c in trained], parent_weights, eval_loader,
                                      probe_set.x, points=points, kernel=kernel, batchnorm_data=train_loader,
                                      loss_fn=loss_fn, error_fn=error_fn, task=task, forward_fn=forward_fn)
        same = [(int(a), int(b)) for (a, b), d in zip(comparison.pairs, comparison.weight_distance) if d == 0
                and comparison.distance_to_parent[a] > 0]
        if same:  # a barrier of 0 here would say "stable" about networks that never differed
            raise SpawnError(f"{owner}: children {same} of the state at step {parent.step} trained to identical "
                             "weights although their seeds differ: the training data order does not depend on the "
                             f"RNG (sampler {type(getattr(train_loader, 'sampler', None)).__name__}). Use a loader "
                             "that shuffles with the global RNG (shuffle=True)")
        lin = None
        if linearized:
            lin = _train_linearized(parent, module, data, target, seeds[0], trained[0], trainer_kwargs, eval_loader,
                                    owner, dict(loss_fn=loss_fn, error_fn=error_fn, task=comparison.task,
                                                forward_fn=forward_fn))
            say(f"spawn at step {parent.step}: linearised network trained to step {target}: error "
                f"{lin.linear_error:.4f} (real network {lin.real_error:.4f})")
        cut = None
        if slices is not None:
            at_parent = _fresh_module(module)
            at_parent.load_state_dict(parent_weights)
            direction = filter_normalized_direction(at_parent, generator=int(seed))
            cut = slice_1d(at_parent, eval_loader, direction, coords=slices, loss_fn=loss_fn, error_fn=error_fn,
                           task=comparison.task, forward_fn=forward_fn)
        spawn = Spawn(step=parent.step, epoch=parent.epoch, seeds=seeds, until=target, comparison=comparison,
                      linearized=lin, slice=cut, seconds=time.perf_counter() - started)
        spawns.append(spawn)
        say(f"spawn at step {parent.step}: error barrier {np.mean(comparison.error_barrier):.4f}, kernel distance "
            f"{np.mean(comparison.kernel_distance):.4f} (mean of {len(comparison.pairs)} pair(s)) on the "
            f"{eval_set} set")
        if write:
            write_landscape(run_path, spawn_rows(spawn, eval_set=eval_set, probe_size=len(probe_set), spawn_seed=seed),
                            replace=replace)
    return SpawnResult(run=None if is_dir else run_path, spawns=spawns, eval_set=eval_set, probe=probe_set)


def _train_linearized(parent: ParentState, module: Any, data: SpawnData, until: int, seed: int, real: Any,
                      trainer_kwargs: Optional[Mapping[str, Any]], eval_loader: Any, owner: str,
                      measure: Dict[str, Any]) -> LinearizedResult:
    """The linearisation around θ(t) trained like child 0 (same seed, budget, optimiser state)."""
    base = _fresh_module(module)
    base.load_state_dict(parent.checkpoint()["state_dict"])
    parent_loss, parent_error, _ = evaluate(base, eval_loader, **measure)
    lin_module = linearize(base, inplace=True)
    with tempfile.TemporaryDirectory(prefix="lightning_ntk_linearized_") as folder:
        ckpt = _linearized_checkpoint(parent, lin_module, folder)
        trained = train_child(parent, lambda: lin_module, data, until=until, seed=seed,
                              trainer_kwargs=trainer_kwargs, ckpt_path=ckpt, owner=owner)
    linear_loss, linear_error, _ = evaluate(trained, eval_loader, **measure)
    real_loss, real_error, _ = evaluate(real, eval_loader, **measure)
    return LinearizedResult(linear_loss=linear_loss, linear_error=linear_error, real_loss=real_loss,
                            real_error=real_error, parent_loss=parent_loss, parent_error=parent_error, seed=seed)


def spawn_rows(spawn: Spawn, *, eval_set: str, probe_size: int, spawn_seed: int = 0) -> List[LandscapeRows]:
    """The ``/landscape`` rows of one spawn step (see :mod:`lightning_ntk.landscape_records`)."""
    c = spawn.comparison
    P, k = len(c.pairs), len(spawn.seeds)
    settings = {"points": int(c.alpha.size), "kernel": c.kernel_kind, "eval_set": eval_set,
                "probe_size": int(probe_size), "task": c.task}
    seeds = np.asarray(spawn.seeds, dtype=np.int64)
    const = lambda value, n, dtype: np.full(n, value, dtype=dtype)  # noqa: E731
    pairs = LandscapeRows(PAIRS, pair_fields(int(c.alpha.size)), {
        "spawn_step": const(spawn.step, P, np.int64), "spawn_epoch": const(spawn.epoch, P, np.float64),
        "trained_to": const(spawn.until, P, np.int64), "child_a": c.pairs[:, 0], "child_b": c.pairs[:, 1],
        "seed_a": seeds[c.pairs[:, 0]], "seed_b": seeds[c.pairs[:, 1]], "error_barrier": c.error_barrier,
        "loss_barrier": c.loss_barrier, "weight_distance": c.weight_distance, "disagreement": c.disagreement,
        "kernel_distance": c.kernel_distance, "path_error": c.path_error, "path_loss": c.path_loss},
        key="spawn_step", row_dim="pair", settings=settings, replaces=[spawn.step])
    kids = LandscapeRows(CHILDREN, child_fields(), {
        "spawn_step": const(spawn.step, k, np.int64), "spawn_epoch": const(spawn.epoch, k, np.float64),
        "trained_to": const(spawn.until, k, np.int64), "child": np.arange(k, dtype=np.int64), "seed": seeds,
        "error": c.child_error, "loss": c.child_loss, "distance_to_parent": c.distance_to_parent,
        "kernel_distance_to_parent": c.kernel_distance_to_parent, "parent_norm": const(c.parent_norm, k, np.float64)},
        key="spawn_step", row_dim="child_row", settings=settings, replaces=[spawn.step])
    tables = [pairs, kids]
    if spawn.linearized is not None:
        lin = spawn.linearized
        tables.append(LandscapeRows(LINEARIZED, linearized_fields(), {
            "step": const(spawn.step, 1, np.int64), "epoch": const(spawn.epoch, 1, np.float64),
            "trained_to": const(spawn.until, 1, np.int64), "seed": const(lin.seed, 1, np.int64),
            "linear_error": [lin.linear_error], "linear_loss": [lin.linear_loss], "real_error": [lin.real_error],
            "real_loss": [lin.real_loss], "parent_error": [lin.parent_error], "parent_loss": [lin.parent_loss]},
            key="step", row_dim="step", settings={"eval_set": eval_set, "task": c.task}, replaces=[spawn.step]))
    if spawn.slice is not None:
        cut = spawn.slice
        coords = np.asarray(cut.coords[0], dtype=np.float64)
        tables.append(LandscapeRows(SLICES, slice_fields(coords.size), {
            "step": const(spawn.step, 1, np.int64), "epoch": const(spawn.epoch, 1, np.float64),
            "loss": cut.loss[None], "error": cut.error[None]},
            key="step", row_dim="step", coords={"coordinate": coords},
            settings={"eval_set": eval_set, "task": cut.task, "direction": "filter_normalized", "seed": spawn_seed,
                      "coordinates": coords.tolist()}, replaces=[spawn.step]))
    return tables


def _import(path: str, what: str, owner: str) -> Any:
    """The object named ``"package.module:QualName"``."""
    import importlib

    module_name, _, qualname = path.partition(":")
    if "<locals>" in qualname:
        raise SpawnError(f"{owner}: the parent's {what} {path} was defined inside a function and cannot be imported; "
                         "pass a factory (--factory) that builds it")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SpawnError(f"{owner}: cannot import the parent's {what} {path} ({exc}); run from the environment that "
                         "trained the parent, or pass a factory (--factory) that builds it") from None
    return obj


def setup_from_parent(parent: ParentState, owner: str = "spawn") -> Dict[str, Any]:
    """``module``, ``datamodule`` and ``trainer_kwargs`` for :func:`spawn_children` rebuilt
    from what the parent state recorded: the LightningModule and datamodule classes with
    their saved hyperparameters (``load_from_checkpoint``) and the Trainer settings."""
    info = parent.info
    if not info.get("datamodule"):
        raise SpawnError(f"{owner}: the parent was trained with dataloaders passed to Trainer.fit, which a parent "
                         "state cannot rebuild; pass a factory (--factory) returning the module and the data")
    module_cls = _import(info["module"], "LightningModule", owner)
    datamodule_cls = _import(info["datamodule"], "datamodule", owner)
    try:
        module = module_cls.load_from_checkpoint(parent.path, map_location="cpu", weights_only=False)
        datamodule = datamodule_cls.load_from_checkpoint(parent.path, weights_only=False)
    except TypeError as exc:  # a required __init__ argument that save_hyperparameters() did not keep
        raise SpawnError(f"{owner}: cannot rebuild {info['module']} or {info['datamodule']} from the parent state "
                         f"({exc}); call self.save_hyperparameters() in their __init__, or pass a factory (--factory)"
                         ) from None
    settings = {k: v for k, v in (info.get("trainer") or {}).items() if v is not None}
    return {"module": module, "datamodule": datamodule, "trainer_kwargs": settings}
