"""The one place that imports Lightning.

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of Lightning with distinct
``Callback`` classes; a Trainer of one rejects (or silently mishandles) a callback of the
other. :data:`CALLBACK_BASES` holds the ``Callback`` of every installed namespace; the
monitors' base class subclasses all of them, so one object works with
``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

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
