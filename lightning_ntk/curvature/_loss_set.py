"""LossSet: the mean loss over a fixed set of examples, functionally in the parameters.

    L(theta) = (1/N) sum_i l(f(x_i; theta), y_i)

Built once (parameters selected, batches read and cast, loss chosen, examples counted) and
shared by every estimator: ``hessian_eigs(loss_set, k)``, ``hessian_trace(loss_set)``, ...
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch
from torch import nn

from .._args import function
from .._losses import per_example_loss
from ..probe import BatchFormat, ProbeSet, batch_to_xy
from ._common import (
    Batches,
    LossFn,
    Tensor,
    _check_dropout,
    _check_mode,
    _check_sync_batchnorm,
    _flatten,
    _hygiene,
    _unflatten,
)
from ._hvp import _HVP
from ._parallel import _ALL_REDUCE

ParamsLike = Optional[Iterable[Union[str, Tensor]]]
F = TypeVar("F", bound=Callable[..., Any])


def squared_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cohen et al.'s squared loss: mean over examples of ``0.5 * ||f(x) - y||^2``.

    The squared error is summed over the output dimensions (not averaged), as in their
    ``SquaredLoss`` (sum-reduced, then divided by the number of examples); it is C/2 times
    ``torch.nn.MSELoss()`` for C outputs. Targets must be float and shaped like the outputs
    (one-hot 0/1 for classification).
    """
    if not targets.dtype.is_floating_point:
        raise ValueError(
            f"squared_loss needs float targets shaped like the outputs (one-hot for classes), got {targets.dtype}"
        )
    return per_example_loss(outputs, targets).mean()


def _is_single_batch(obj: Any) -> bool:
    """An (x, y, ...) tuple/list of tensors or a dict, as opposed to an iterable of batches.

    (For a model with tuple inputs pass a list of batches: ``[((x1, x2), y)]``.)
    """
    if isinstance(obj, Mapping):
        return True
    return (
        isinstance(obj, (tuple, list))
        and len(obj) >= 2
        and isinstance(obj[1], Tensor)
        and not isinstance(obj[0], (tuple, list, Mapping))
    )


class LossSet:
    """The mean loss over a fixed set of examples, as a function of the model's parameters.

    ``L(theta) = (1/N) sum_i l(f(x_i; theta), y_i)`` (Cohen et al. 2021 measure sharpness
    on such a fixed set). Build it once and pass it to every estimator; each then skips the
    setup below.

    * Parameters: the trainable ones (``requires_grad``, tied ones once) or ``params=``
      (names or tensors); ``theta`` holds detached copies (cast to ``dtype``), ``fixed``
      the other parameters and copies of the buffers (BatchNorm statistics never change).
    * Batches (an ``(x, y)`` pair, a :class:`ProbeSet`, an iterable of batches or a
      DataLoader; layouts of :func:`lightning_ntk.probe.batch_to_xy`) are read once and kept
      on the parameters' device: a shuffling DataLoader is frozen into one fixed set. Each
      batch's mean loss is weighted by its size / N, so cutting the set differently does
      not change L.
    * ``loss_fn(outputs, targets)`` returns per-example losses (N,) or their mean; None:
      cross-entropy for integer targets, ``0.5 * ||f - y||^2`` summed over outputs for float
      targets (``lightning_ntk._losses.per_example_loss``).
    * ``dtype`` casts the functional copies and floating data, never the model.
    * Built inside :func:`data_parallel`, N and every loss, gradient and HVP are summed
      over processes.
    * ``mode``: ``"train"`` (default, Cohen et al. 2021, who take Hessian-vector products
      of the network in training mode): BatchNorm layers normalise with the statistics of
      each batch of the set, as in a training step (so the answer then depends on how the
      set is cut into batches: cut it like the training batches), without updating their
      running statistics; every other module is in eval mode (dropout off: a random loss
      has no Hessian, and Cohen et al.'s networks have none; an InstanceNorm that tracks
      running statistics keeps using them). ``"eval"``: every module in eval mode
      (BatchNorm on its running statistics). ``"current"``: the modules' own flags (refused
      while dropout is active). Without BatchNorm or InstanceNorm layers, "train" and
      "eval" give the same numbers. Running statistics never change in any mode: the
      buffers are passed as copies.

    The model is used functionally (``torch.func.functional_call``): its parameters,
    ``.grad``, modes and the global RNG are left as they were (see :meth:`measuring`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[LossFn],
        batches: Batches,
        *,
        dtype: Optional[torch.dtype] = None,
        params: ParamsLike = None,
        mode: str = "train",
        batch_format: BatchFormat = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (or pass a LossSet), got {type(model).__name__}")
        function(loss_fn, "loss_fn", signature="loss_fn(outputs, targets) -> per-example or mean loss")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype (e.g. torch.float64), got {dtype!r}")
        self.model = model
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else per_example_loss
        self.mode = _check_mode(mode)
        self.batch_format = batch_format
        self._depth = 0
        self._select(params, dtype)
        self.all_reduce = _ALL_REDUCE.get()
        self.batches: List[Tuple[Any, Tensor, int]] = self._materialise(batches)
        local = sum(b[2] for b in self.batches)
        if self.all_reduce is not None:
            local = int(self.all_reduce(torch.tensor([float(local)], dtype=torch.float64)).item())
            if local == 0:
                raise ValueError("batches holds no examples on any process")
        self.n_examples: int = local

    def __repr__(self) -> str:
        return (f"LossSet(n_examples={self.n_examples}, batches={len(self.batches)}, n_params={self.n_params}, "
                f"dtype={self.dtype}, device={self.device}, loss_fn={getattr(self.loss_fn, '__qualname__', '?')})")

    # -- parameters -----------------------------------------------------------------------
    def _select(self, params: ParamsLike, dtype: Optional[torch.dtype]) -> None:
        named = dict(self.model.named_parameters())  # deduplicates tied parameters
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            by_id = {id(p): n for n, p in named.items()}
            names = []
            for p in params:
                if isinstance(p, str):
                    if p not in named:
                        raise ValueError(f"params: {p!r} is not a parameter name of the model")
                    names.append(p)
                elif isinstance(p, Tensor):
                    if id(p) not in by_id:
                        raise ValueError("params: a tensor given is not a parameter of the model")
                    names.append(by_id[id(p)])
                else:
                    raise TypeError("params must be an iterable of parameter names or of the model's parameters")
            names = list(dict.fromkeys(names))
        if not names:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to take the Hessian of")
        sel = [named[n] for n in names]
        devices = {p.device for p in sel}
        if len(devices) != 1:
            raise ValueError(f"selected parameters live on several devices {devices}; move the model to one device")
        self.device: torch.device = sel[0].device
        if dtype is None:
            dts = {p.dtype for p in sel}
            if len(dts) != 1:
                raise ValueError(f"selected parameters have mixed dtypes {dts}: pass dtype= (e.g. torch.float64)")
            dtype = sel[0].dtype
            if not dtype.is_floating_point:
                raise ValueError(f"parameters must be floating point, got {dtype}")
        self.dtype: torch.dtype = dtype
        self.names: List[str] = names
        self.shapes: List[Tuple[int, ...]] = [tuple(p.shape) for p in sel]
        self.n_params: int = sum(p.numel() for p in sel)

        def cast(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

        chosen = set(names)
        self.theta: List[Tensor] = [cast(p) for p in sel]
        # Fixed tensors: other parameters (detached) and copies of buffers (running stats
        # must never change, even in train mode).
        self.fixed: Dict[str, Tensor] = {n: cast(p) for n, p in named.items() if n not in chosen}
        for n, b in self.model.named_buffers():
            self.fixed[n] = cast(b).clone()

    def select(self, params: Iterable[Union[str, Tensor]]) -> "LossSet":
        """The same examples and loss over other parameters (names or tensors of the model).

        The batches already read are shared, not read again; the dtype stays.
        """
        other = copy.copy(self)  # shares the batches; _select rebinds every parameter attribute
        other._depth = 0
        other._select(params, self.dtype)
        return other

    # -- data -----------------------------------------------------------------------------
    def _cast_data(self, t: Any) -> Any:
        if isinstance(t, Tensor):
            t = t.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t
        if isinstance(t, (tuple, list)):
            return type(t)(self._cast_data(u) for u in t)
        if isinstance(t, dict):
            return {k: self._cast_data(u) for k, u in t.items()}
        return t

    def _materialise(self, batches: Batches) -> List[Tuple[Any, Tensor, int]]:
        if batches is None:
            raise ValueError("batches is None: pass an (x, y) pair, a list of (x, y) pairs or a DataLoader")
        if isinstance(batches, ProbeSet):
            batches = (batches.x, batches.y)
        if _is_single_batch(batches):
            items: Iterable[Any] = [batches]
        else:
            try:
                items = iter(batches)
            except TypeError:
                raise TypeError(
                    f"batches must be an (x, y) pair, an iterable of (x, y) pairs or a DataLoader; "
                    f"got {type(batches).__name__}"
                ) from None
        out = []
        for i, b in enumerate(items):
            try:
                x, y = batch_to_xy(b, self.batch_format)
            except TypeError as exc:  # BatchLayoutError is a TypeError
                raise type(exc)(f"batch {i}: {exc}. Every batch must hold (inputs, targets)") from exc
            if not isinstance(y, Tensor) or y.dim() == 0:
                raise TypeError(f"batch {i}: targets must be a tensor with a batch dimension")
            n = int(y.shape[0])
            if n == 0:
                continue
            out.append((self._cast_data(x), self._cast_data(y), n))
        if not out and self.all_reduce is None:
            raise ValueError("batches holds no examples")
        return out

    # -- evaluation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def measuring(self) -> Iterator["LossSet"]:
        """The modules' modes of ``mode``, forked RNG, gradients on; every module's
        mode restored on exit. Reentrant: estimators hold it across many products, and the
        methods below enter it too, so they are safe to call on their own."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        with _hygiene(self.model, self.mode):
            _check_dropout(self.model, self.mode)
            _check_sync_batchnorm(self.model, self.mode)
            self._depth = 1
            try:
                yield self
            finally:
                self._depth = 0

    def reduce(self, t: Tensor) -> Tensor:
        """Sum over data-parallel processes (identity outside :func:`data_parallel`)."""
        return t if self.all_reduce is None else self.all_reduce(t)

    def batch_loss(self, theta: Sequence[Tensor], b: int) -> Tensor:
        """Batch b's mean loss times its weight n_b / N (so the sum over b is the set mean)."""
        x, y, n = self.batches[b]
        tensors = dict(self.fixed)
        tensors.update(zip(self.names, theta))
        if isinstance(x, (tuple, list)):
            out = torch.func.functional_call(self.model, tensors, tuple(x))
        else:
            out = torch.func.functional_call(self.model, tensors, (x,))
        loss = self.loss_fn(out, y)
        if isinstance(loss, Tensor) and loss.dim() == 1 and loss.shape[0] == n and n > 1:
            loss = loss.mean()  # per-example losses
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return per-example losses of shape ({n},) or their mean (a scalar); got {shape}"
            )
        return loss.reshape(()) * (n / self.n_examples)

    def loss(self, theta: Optional[Sequence[Tensor]] = None) -> float:
        """Mean loss L(theta) over the set (float64 accumulation); ``theta`` defaults to the model's."""
        theta = self.theta if theta is None else theta
        with self.measuring(), torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            for b in range(len(self.batches)):
                total = total + self.batch_loss(theta, b).double().cpu()
            return float(self.reduce(total.reshape(1)).sum())

    def loss_and_gradient(self, theta: Optional[Sequence[Tensor]] = None) -> Tuple[float, Tensor]:
        """``(L(theta), grad L(theta))``, the gradient flat (P,) in ``dtype`` on ``device``."""
        theta = self.theta if theta is None else theta
        total = 0.0
        g = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
        with self.measuring():
            for b in range(len(self.batches)):
                leaves = [t.detach().requires_grad_(True) for t in theta]
                loss = self.batch_loss(leaves, b)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                g += _flatten([gi if gi is not None else torch.zeros_like(t) for gi, t in zip(grads, leaves)])
                total += float(loss.detach())
        if self.all_reduce is not None:
            g = self.reduce(g)
            total = float(self.reduce(torch.tensor([total], dtype=torch.float64)).sum())
        return total, g

    def gradient(self, theta: Optional[Sequence[Tensor]] = None) -> Tensor:
        """``grad L(theta)``, flat (P,) in the parameter order of ``names``."""
        return self.loss_and_gradient(theta)[1]

    def hvp(self, v: Union[Tensor, Sequence[Tensor]], method: str = "double_backward") -> Any:
        """One Hessian-vector product ``H v`` at the model's parameters.

        ``v`` flat (P,) gives a flat result; a list of per-parameter tensors gives a list.
        For many products use :meth:`hvp_operator` (it can keep the gradient graphs).
        """
        per_param = not isinstance(v, Tensor)
        flat = _flatten(list(v)) if per_param else v
        if flat.shape != (self.n_params,):
            raise ValueError(f"v must have P={self.n_params} entries, got shape {tuple(flat.shape)}")
        with self.measuring(), self.hvp_operator(method) as op:
            out = op(flat)
        return self.unflatten(out) if per_param else out

    def hvp_operator(self, method: str = "auto") -> _HVP:
        """A counting operator ``op(v) -> H v`` on flat vectors (``op.count``, ``op.method``).

        ``method``: "double_backward", "double_backward_retain" (gradient graphs kept until
        ``op.release()`` or the end of a ``with`` block), "forward_over_reverse" or "auto"
        (which may time products: see ``_choose_auto``). Create and use it inside
        :meth:`measuring`.
        """
        return _HVP(self, method)

    def unflatten(self, v: Tensor) -> List[Tensor]:
        """Split a flat (P,) vector into tensors shaped like the selected parameters."""
        return _unflatten(v, self.shapes)


def _LossSet(model: nn.Module, loss_fn: Optional[LossFn], batches: Batches, params: ParamsLike,
             dtype: Optional[torch.dtype], mode: str, batch_format: BatchFormat = None) -> LossSet:
    """The pre-package positional form (``benchmarks/sharpness.py`` builds one this way)."""
    return LossSet(model, loss_fn, batches, dtype=dtype, params=params, mode=mode,
                   batch_format=batch_format)


LOSS_SET_KEYWORDS = ("dtype", "params", "mode", "batch_format")


def accepts_model_form(lead: int = 0, keywords: Sequence[str] = LOSS_SET_KEYWORDS) -> Callable[[F], F]:
    """Let an estimator ``fn(loss_set, *lead_args, *rest, **kw)`` also be called in the model
    form ``fn(model, *lead_args, loss_fn, batches, *rest, dtype=, params=, mode=,
    batch_format=)``, which builds the LossSet first (the API before LossSet existed).

    ``keywords``: the LossSet settings the model form takes for this estimator.
    """
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(first: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(first, LossSet):
                given = [k for k in ("loss_fn", "batches", *LOSS_SET_KEYWORDS) if k in kwargs]
                if given:
                    raise TypeError(
                        f"{fn.__name__}: {', '.join(given)} belong to the LossSet, not to a call with one: "
                        f"LossSet(model, loss_fn, batches, dtype=..., params=...)"
                    )
                return fn(first, *args, **kwargs)
            lead_args, rest = list(args[:lead]), list(args[lead:])
            loss_fn = rest.pop(0) if rest else kwargs.pop("loss_fn", None)
            batches = rest.pop(0) if rest else kwargs.pop("batches", None)
            settings = {k: kwargs.pop(k) for k in keywords if k in kwargs}
            ls = LossSet(first, loss_fn, batches, **settings)
            return fn(ls, *lead_args, *rest, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
