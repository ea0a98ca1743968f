"""What a monitor declares once and the base converts: its settings (``config``, from the
``__init__`` signature), its resumable state (checkpoints and pickling) and its probes."""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .._hygiene import module_device
from ..budget import Governor
from ..probe import Probe, ProbeSet, _trainer_dataloader
from ..schedule import Schedule
from ..store import Field

ProbeLike = Union[Probe, ProbeSet, Tuple[torch.Tensor, torch.Tensor], None]
#: ``heldout=``: ``"auto"`` (the validation set when there is one), None, a Probe, a ProbeSet or (x, y).
HeldoutLike = Union[str, Probe, ProbeSet, Tuple[torch.Tensor, torch.Tensor], None]


@dataclass
class TableSpec:
    """A table a monitor writes: an append table, or a fixed one when ``n_rows`` is set."""

    group: str
    fields: List[Field]
    key: str = "step"
    row_dim: Optional[str] = None
    coords: Dict[str, Any] = field(default_factory=dict)
    attrs: Dict[str, Any] = field(default_factory=dict)
    n_rows: Optional[int] = None
    #: Fields left out (named in the table's attributes) when a row would exceed the size cap.
    optional: Tuple[str, ...] = ()


#: Default cap on the bytes one row of a monitor's table may take (``max_row_mb``).
DEFAULT_MAX_ROW_MB = 16.0


def field_bytes(spec: Field) -> int:
    n = 1
    for s in spec.shape:
        n *= int(s)
    return n * np.dtype(spec.dtype).itemsize


def cap_rows(specs: List[TableSpec], max_row_mb: Optional[float], owner: str,
             smaller: str = "a smaller probe= (or k=)") -> Dict[str, List[str]]:
    """Keep each table's row under ``max_row_mb`` MB: its optional fields (logits, stored
    kernels) are left out, largest first, until it fits; the cap and what was left out go
    into the table's attributes (``max_row_mb``, ``dropped_fields``). A row whose required
    fields alone exceed the cap is refused, naming them and the arguments that fix it
    (``smaller``: the owner's arguments that make a row smaller, "" if none).
    Returns ``{group: dropped field names}``."""
    dropped: Dict[str, List[str]] = {}
    if max_row_mb is None:
        return dropped
    cap = float(max_row_mb) * 2 ** 20
    for spec in specs:
        total = sum(field_bytes(f) for f in spec.fields)
        gone: List[str] = []
        for f in sorted((f for f in spec.fields if f.name in spec.optional), key=field_bytes, reverse=True):
            if total <= cap:
                break
            gone.append(f.name)
            total -= field_bytes(f)
        if total > cap:
            largest = sorted((f for f in spec.fields if f.name not in gone), key=field_bytes, reverse=True)[:3]
            mb = total / 2 ** 20
            size = f"{mb:.1f}" if mb >= 0.1 else f"{mb:.2g}"
            raise ValueError(f"{owner}: one row of /{spec.group} takes {size} MB, over max_row_mb={max_row_mb:g} "
                             "(largest: " + ", ".join(f"{f.name} {f.shape}" for f in largest)
                             + f"); pass {smaller + ' or ' if smaller else ''}a larger max_row_mb=")
        spec.fields = [f for f in spec.fields if f.name not in gone]
        spec.attrs.update(max_row_mb=float(max_row_mb), dropped_fields=list(gone))
        if gone:
            dropped[spec.group] = gone
    return dropped


# ------------------------------------------------------------------------- settings
def init_arguments(cls: type) -> List[str]:
    """Keyword arguments of ``cls.__init__`` and of the ``__init__`` of its bases that
    receive its ``**kwargs``, in declaration order (subclass first)."""
    names: List[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - builtins
            continue
        takes_kwargs = False
        for p in parameters:
            if p.kind is p.VAR_KEYWORD:
                takes_kwargs = True
            elif p.name != "self" and p.kind is not p.VAR_POSITIONAL and p.name not in names:
                names.append(p.name)
        if not takes_kwargs:
            break
    return names


def config_value(value: Any) -> Any:
    """A setting as JSON: schedules and probes by their ``to_config``, functions by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Schedule, Probe)):
        return value.to_config()
    if isinstance(value, ProbeSet):
        return {"name": value.name, "size": len(value), "source": value.source}
    if isinstance(value, Governor):
        return value.budget
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [config_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): config_value(v) for k, v in value.items()}
    if isinstance(value, type):
        return value.__name__
    if callable(value):
        return getattr(value, "__qualname__", type(value).__name__)
    if isinstance(value, nn.Module):
        return type(value).__name__
    return repr(value)


# ------------------------------------------------------------------------- state
def to_checkpoint(value: Any) -> Any:
    """State for ``torch.save``: NumPy arrays become tensors, so checkpoints load under
    ``torch.load(weights_only=True)``; dicts and lists are converted inside."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: to_checkpoint(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    return value


def from_checkpoint(value: Any, kind: str) -> Any:
    """The inverse of :func:`to_checkpoint` for a state declared as ``kind``: ``"array"``
    (a NumPy array), ``"arrays"`` (a dict of NumPy arrays) or ``"value"`` (as stored)."""
    if value is None or kind == "value":
        return value
    if kind == "array":
        return np.asarray(value.cpu().numpy() if isinstance(value, torch.Tensor) else value)
    if kind == "arrays":
        return {k: from_checkpoint(v, "array") for k, v in dict(value).items()}
    raise ValueError(f"unknown state kind {kind!r}")


#: The base's per-fit state (besides each monitor's declared ``state``).
_PER_FIT = ("_rows", "_last_step", "_pending_epoch_end", "_loaded_state", "next_due", "snapshot_step",
            "snapshot_epoch", "timings", "probe", "_probe", "_heldout", "sizing")  # probes: sized per fit

#: Arguments that say where the file goes, not what is measured: not in ``config``.
_NOT_SETTINGS = ("path", "overwrite")


class Declared:
    """What a monitor declares once: ``config`` from its ``__init__`` arguments, checkpointed
    ``state`` (converted for ``torch.load(weights_only=True)``), ``runtime`` attributes that
    are rebuilt for each fit and never pickled."""

    #: Resumable state: attribute -> ``"array"`` | ``"arrays"`` | ``"value"`` (checkpointed
    #: under the attribute's name without the leading underscore).
    state: ClassVar[Dict[str, str]] = {}
    #: Other attributes a new fit starts from their initial value (state kept across snapshots
    #: that is converted for checkpoints by the monitor itself).
    per_fit: ClassVar[Tuple[str, ...]] = ()
    #: ``__init__`` arguments that do not apply to this monitor: not in ``config``.
    config_exclude: ClassVar[Tuple[str, ...]] = ()
    #: Attributes rebuilt for each fit (:meth:`_reset_runtime`), never pickled.
    runtime: ClassVar[Tuple[str, ...]] = ()

    def _reset_runtime(self) -> None:
        """Set every attribute named in ``runtime`` (subclasses extend it)."""

    def _new_fit(self) -> None:
        """Start a fit from the monitor's initial state: a monitor fitted before (or a copy of
        one) keeps nothing of that fit (the state it holds at its first fit is its initial one)."""
        initial = self.__dict__.setdefault("_initial_state", {
            name: copy.deepcopy(getattr(self, name)) for name in (*self.state, *self.per_fit, *_PER_FIT)
            if hasattr(self, name)})
        for name, value in initial.items():
            setattr(self, name, copy.deepcopy(value))

    def __getstate__(self) -> Dict[str, Any]:
        drop = {n for klass in type(self).__mro__ for n in getattr(klass, "runtime", ())}
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def config_extra(self) -> Dict[str, Any]:
        """Settings decided at run time, recorded beside the ``__init__`` arguments."""
        return {"model_mode": "eval"}

    def config(self) -> Dict[str, Any]:
        """Settings recorded in the run file's ``config`` attribute: every ``__init__``
        argument (as the attribute of that name holds it) and :meth:`config_extra`."""
        out: Dict[str, Any] = {"class": type(self).__name__, "group": self.group}
        for arg in init_arguments(type(self)):
            if arg not in _NOT_SETTINGS and arg not in self.config_exclude and hasattr(self, arg):
                out[arg] = config_value(getattr(self, arg))
        if "probe" in out:
            out["probe"] = self._probe.config()
        if self._heldout is not None:
            out["heldout"] = self._heldout.config()
        if self.budget is None:
            from ._session import default_budget  # (the session module imports this one)

            out["budget"] = default_budget()
        out.update(self.config_extra())
        if getattr(self, "sizing", None):
            out["sizing"] = self.sizing
        return out

    def extra_state(self) -> Dict[str, Any]:
        return {name.lstrip("_"): to_checkpoint(getattr(self, name)) for name in self.state}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        for name, kind in self.state.items():
            if name.lstrip("_") in state:
                setattr(self, name, from_checkpoint(state[name.lstrip("_")], kind))


# ------------------------------------------------------------------------- probes
def as_probe(owner: str, probe: ProbeLike, default_size: Optional[int], name: str = "given") -> Union[Probe, ProbeSet]:
    if probe is None:
        return Probe(size=default_size)
    if isinstance(probe, (Probe, ProbeSet)):
        return probe
    if isinstance(probe, (tuple, list)) and len(probe) == 2:
        return ProbeSet.from_tensors(probe[0], probe[1], name=name)
    raise TypeError(f"{owner}: probe must be a lightning_ntk.Probe, a ProbeSet or a pair of tensors (x, y); "
                    f"got {type(probe).__name__}")


def as_heldout(owner: str, heldout: HeldoutLike) -> Union[str, Probe, ProbeSet, None]:
    if heldout is None or isinstance(heldout, (Probe, ProbeSet)):
        return heldout
    if isinstance(heldout, str):
        if heldout != "auto":
            raise ValueError(f"{owner}: heldout must be 'auto', None, a Probe, a ProbeSet or a pair of tensors "
                             f"(x, y); got the string {heldout!r}")
        return heldout
    if isinstance(heldout, (tuple, list)) and len(heldout) == 2:
        return ProbeSet.from_tensors(heldout[0], heldout[1], name="heldout")
    raise TypeError(f"{owner}: heldout must be 'auto', None, a lightning_ntk.Probe, a ProbeSet or a pair of "
                    f"tensors (x, y); got {type(heldout).__name__}")


def map_style_length(loader: Any) -> Optional[int]:
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return None
    return len(dataset)


def skipped_table(group: str, budget: float) -> TableSpec:
    """``/skipped/<group>``: the snapshots the budget governor skipped, and why."""
    from ..budget import SKIP_REASONS

    return TableSpec(f"skipped/{group}", [Field("step", (), "int64"), Field("epoch"), Field("reason", (), "int8"),
                                          Field("expected_cost"), Field("overhead")],
                     attrs={"reasons": list(SKIP_REASONS), "budget": budget})


def draw_probes(slots: List["ProbeSlot"], trainer: Any, owner: str, loaded: Optional[Mapping[str, Any]]) -> None:
    """Draw every probe of a monitor for this fit, checked against a checkpoint's indices."""
    first = slots[0].setting if slots else None  # the training probe's batch layout serves "auto" too
    batch_format = first.batch_format if isinstance(first, Probe) else None
    for slot in slots:
        if slot.setting is not None:
            slot.loaded_index = (loaded or {}).get(f"{slot.role}_index")
            slot.draw(trainer, owner, batch_format)
    names = [slot.drawn.name for slot in slots if slot.drawn is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: the held-out probe and the training probe are both named {names[0]!r}; give the "
                         "held-out Probe another name= (each is stored as /probe/<name>)")


class ProbeSlot:
    """One set of examples a monitor measures on (the probe, or the held-out probe): its
    setting, the set drawn at train start, a copy on the model's device, and the dataset
    indices a checkpoint recorded (a resumed run must draw the same examples)."""

    def __init__(self, role: str, setting: Union[str, Probe, ProbeSet, None], auto_size: int = 512,
                 clamp: bool = False) -> None:
        self.role = role
        self.argument = role  # the monitor's argument that gives this set (named when drawing it fails)
        self.setting = setting
        self.auto_size = auto_size
        self.clamp = clamp  # a default Probe (not the user's): at most the whole dataset
        self.drawn: Optional[ProbeSet] = None
        self.loaded_index: Optional[List[int]] = None
        self._on_device: Optional[ProbeSet] = None

    def draw(self, trainer: Any, owner: str, batch_format: Any = None) -> Optional[ProbeSet]:
        """Draw the set for this fit (``"auto"``: up to ``auto_size`` validation examples, in
        ``batch_format``, none without a validation set) and check it against the checkpoint's."""
        setting = self.setting
        if isinstance(setting, str):  # "auto"
            setting = self._auto_validation(trainer, owner, batch_format)
        if self.clamp and isinstance(setting, Probe) and setting.size is not None:
            n = map_style_length(_trainer_dataloader(trainer, setting.source))
            if n is not None and n < setting.size:  # the default size fits the user's data, not the demo's
                setting = setting.resized(n)
        try:
            drawn = setting.draw(trainer) if isinstance(setting, Probe) else setting
        except (TypeError, ValueError) as exc:  # what could not be drawn, and from which argument
            raise type(exc)(f"{owner}: {self.argument}={setting!r}: {exc}") from exc
        self.drawn, self._on_device = drawn, None
        index = None if drawn is None else drawn.index.tolist()
        if self.loaded_index is not None and index != self.loaded_index:
            what = "probe" if self.role == "probe" else "held-out probe"
            raise RuntimeError(f"{owner}: the {what} drawn on resume differs from the checkpoint's (the dataset or "
                               f"the {self.role}= setting changed); resume with the same data and settings")
        return drawn

    def _auto_validation(self, trainer: Any, owner: str, batch_format: Any) -> Optional[Probe]:
        try:
            loader = _trainer_dataloader(trainer, "val")
        except ValueError:  # no validation dataloader in this run
            return None
        n = map_style_length(loader)
        if n is None:
            warnings.warn(f"{owner}: the validation dataloader has no map-style dataset to draw a held-out probe "
                          "from; going on without one (pass heldout=(x, y) to give it)", RuntimeWarning, stacklevel=3)
            return None
        return Probe(size=min(self.auto_size, n), source="val", batch_format=batch_format) if n else None

    def on(self, pl_module: nn.Module) -> Optional[ProbeSet]:
        """The drawn set on the model's device (moved once)."""
        if self.drawn is None:
            return None
        device = module_device(pl_module)
        if self._on_device is None or self._on_device.x.device != device:
            self._on_device = self.drawn.to(device)
        return self._on_device

    @property
    def store_inputs(self) -> Optional[bool]:
        return self.setting.store_inputs if isinstance(self.setting, Probe) else None

    def config(self) -> Any:
        if isinstance(self.setting, Probe):
            return self.setting.to_config()
        if self.drawn is not None:
            return {"name": self.drawn.name, "size": len(self.drawn), "source": self.drawn.source}
        return self.setting if isinstance(self.setting, str) else None

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _on_device=None)
