"""The one place that imports Lightning.

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of Lightning with distinct
``Callback`` classes; a Trainer of one rejects (or silently mishandles) a callback of the
other. :data:`CALLBACK_BASES` holds the ``Callback`` of every installed namespace; the
monitors' base class subclasses all of them, so one object works with
``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple

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


#: Strategies that shard the parameters (or run the model in pieces): a monitor needs every
#: parameter of the model on each rank to differentiate it, and reads its outputs whole.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy")


class StrategyError(RuntimeError):
    """The Trainer's strategy cannot be monitored (it shards the model)."""


def strategy_refusal(trainer: Any, owner: str) -> Optional[StrategyError]:
    """Why ``owner`` cannot run under ``trainer``'s strategy, or None when it can."""
    strategy = getattr(trainer, "strategy", None)
    for ns in NAMESPACES.values():
        for name in _SHARDED_STRATEGIES:
            cls = getattr(ns.strategies, name, None)
            if cls is not None and isinstance(strategy, cls):
                return StrategyError(
                    f"{owner}: the Trainer's strategy is {type(strategy).__name__}, which shards the model's "
                    "parameters across ranks; the monitors need the whole model on every rank. Train with "
                    "strategy='ddp' (or a single device) for the runs you instrument")
    return None
