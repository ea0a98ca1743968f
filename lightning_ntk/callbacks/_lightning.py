"""The one place that imports Lightning.

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of Lightning with distinct
``Callback`` classes; a Trainer of one rejects (or silently mishandles) a callback of the
other. :func:`adapter` builds, from one plain monitor class, a callback class that
subclasses the ``Callback`` of every installed namespace, so the same object works with
``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Type

NAMESPACES: Dict[str, Any] = {}
for _name in ("lightning.pytorch", "pytorch_lightning"):
    try:
        NAMESPACES[_name] = importlib.import_module(_name)
    except ImportError:  # pragma: no cover - depends on the environment
        pass

if not NAMESPACES:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lightning_ntk.callbacks needs PyTorch Lightning: pip install pytorch-lightning (or lightning). "
        "The functional API (lightning_ntk.empirical_ntk, hessian_eigs, ...) works without it"
    )

CALLBACK_BASES: Tuple[type, ...] = tuple(ns.Callback for ns in NAMESPACES.values())


def adapter(logic: type, name: str, base: Optional[type] = None, module: str = "lightning_ntk.callbacks") -> Type[Any]:
    """A callback class named ``name``: ``logic`` plus the Callback of each namespace.

    ``base`` (an adapted class) makes the result its subclass, so that every monitor is an
    instance of the adapted ``Monitor``.
    """
    bases = (logic, base) if base is not None else (logic,) + CALLBACK_BASES
    return type(name, bases, {"__module__": module, "__qualname__": name, "__doc__": logic.__doc__})


#: Hooks Lightning calls on every callback once per batch (training, validation, test,
#: predict) that a monitor may leave unimplemented.
PER_BATCH_HOOKS: Tuple[str, ...] = (
    "on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
    "on_validation_batch_start", "on_validation_batch_end", "on_test_batch_start", "on_test_batch_end",
    "on_predict_batch_start", "on_predict_batch_end",
)


@functools.lru_cache(maxsize=None)
def dispatch_skips_non_callables() -> bool:
    """Whether every installed Lightning skips a callback hook attribute that is not callable.

    Lightning's ``_call_callback_hooks`` does ``fn = getattr(callback, hook); if callable(fn):
    with profiler.profile(...): fn(...)`` in every 2.x release; checked on the source so a
    release that drops the test makes :func:`skip_unimplemented_batch_hooks` a no-op.
    """
    for name in NAMESPACES:
        try:
            source = inspect.getsource(importlib.import_module(f"{name}.trainer.call")._call_callback_hooks)
        except (ImportError, AttributeError, OSError, TypeError):
            return False
        if "if callable(fn)" not in source:
            return False
    return bool(NAMESPACES)


def unimplemented_batch_hooks(callback_type: type) -> FrozenSet[str]:
    """The per-batch hooks that ``callback_type`` inherits unchanged from Lightning's Callback."""
    names = []
    for hook in PER_BATCH_HOOKS:
        impl = getattr(callback_type, hook, None)
        if impl is None or any(impl is getattr(base, hook, None) for base in CALLBACK_BASES):
            names.append(hook)
    return frozenset(names)


def skip_unimplemented_batch_hooks(callback: Any) -> None:
    """Let Lightning skip the per-batch hooks ``callback`` does not implement.

    Lightning dispatches every hook to every callback, with a profiler context and the
    callback's ``state_key``, even when the hook is Callback's no-op: about 1-2 µs per
    callback per hook, 5-6 hooks per training step (a few % of a 2.5 ms step with six
    monitors). An instance attribute ``None`` fails Lightning's ``callable`` test, so the
    dispatch is skipped. Only instance attributes are set: a subclass that implements the
    hook (and calls ``super()``) is untouched.
    """
    if not dispatch_skips_non_callables():
        return
    for hook in unimplemented_batch_hooks(type(callback)):
        setattr(callback, hook, None)


def default_namespace() -> Any:
    """``lightning.pytorch`` if installed, else ``pytorch_lightning`` (for the demo and CLI)."""
    return next(iter(NAMESPACES.values()))


def namespace_of(trainer: Any) -> str:
    """Which Lightning copy a Trainer comes from."""
    for name, ns in NAMESPACES.items():
        if isinstance(trainer, ns.Trainer):
            return name
    return type(trainer).__module__


def loggers_of(trainer: Any) -> List[Any]:
    return list(getattr(trainer, "loggers", []) or [])
