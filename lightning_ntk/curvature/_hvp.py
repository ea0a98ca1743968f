"""Full-set Hessian-vector products ``v -> H v`` (Pearlmutter 1994), three ways, and the rule
that picks one for ``hvp="auto"``."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch

from .._args import one_of
from ._common import Tensor, _flatten, _unflatten, setting

if TYPE_CHECKING:
    from ._loss_set import LossSet

HVP_METHODS = ("auto", "double_backward", "double_backward_retain", "forward_over_reverse")


class _HVP:
    """Full-set Hessian-vector products v -> H v on flat vectors, counted in ``count``.

    ``only`` restricts the sum to some batch indices (used to time methods on one batch).
    A context manager: leaving the ``with`` block frees retained graphs (``release``).
    """

    def __init__(self, ls: "LossSet", method: str, only: Optional[List[int]] = None) -> None:
        one_of(method, "hvp", HVP_METHODS)
        self.ls = ls
        self.count = 0
        self.idx = list(range(len(ls.batches))) if only is None else list(only)
        self._local = only is not None  # timing products stay on this process
        self._graphs: Optional[List[Tuple[List[Optional[Tensor]], List[Tensor]]]] = None
        if method == "auto":
            method = _choose_auto(ls)
        self.method = method

    def __enter__(self) -> "_HVP":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __call__(self, v: Tensor) -> Tensor:
        self.count += 1
        vs = _unflatten(v.to(self.ls.dtype), self.ls.shapes)
        if not self.idx:  # an empty data-parallel shard contributes zero
            out = self._zeros()
        elif self.method == "forward_over_reverse":
            out = self._forward_over_reverse(vs)
        elif self.method == "double_backward_retain":
            out = self._double_backward_retain(vs)
        else:
            out = self._double_backward(vs)
        return out if self._local else self.ls.reduce(out)

    def _zeros(self) -> Tensor:
        return torch.zeros(self.ls.n_params, dtype=self.ls.dtype, device=self.ls.device)

    def _grad_graph(self, b: int) -> Tuple[List[Optional[Tensor]], List[Tensor]]:
        leaves = [t.detach().requires_grad_(True) for t in self.ls.theta]
        loss = self.ls.batch_loss(leaves, b)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return list(grads), leaves

    # reverse-over-reverse, graph rebuilt for each product (memory of one batch)
    def _double_backward(self, vs: List[Tensor]) -> Tensor:
        out = self._zeros()
        for b in self.idx:
            grads, leaves = self._grad_graph(b)
            out += _second_backward(grads, leaves, vs, retain=False)
        return out

    # reverse-over-reverse, gradient graphs of all batches built once and kept
    def _double_backward_retain(self, vs: List[Tensor]) -> Tensor:
        if self._graphs is None:
            self._graphs = [self._grad_graph(b) for b in self.idx]
        if len(self._graphs) == 1:
            grads, leaves = self._graphs[0]
            return _second_backward(grads, leaves, vs, retain=True)
        out = self._zeros()
        for grads, leaves in self._graphs:
            out += _second_backward(grads, leaves, vs, retain=True)
        return out

    # forward-over-reverse (Pearlmutter): jvp of the gradient, torch.func
    def _forward_over_reverse(self, vs: List[Tensor]) -> Tensor:
        out = self._zeros()
        theta = tuple(t.detach() for t in self.ls.theta)
        for b in self.idx:
            grad_fn = torch.func.grad(lambda th, b=b: self.ls.batch_loss(th, b))
            _, hv = torch.func.jvp(grad_fn, (theta,), (tuple(vs),))
            out += _flatten(hv)
        return out

    def release(self) -> None:
        self._graphs = None


def _second_backward(grads: Sequence[Optional[Tensor]], leaves: List[Tensor], vs: List[Tensor], retain: bool) -> Tensor:
    pairs = [(g, v) for g, v in zip(grads, vs) if g is not None and g.requires_grad]
    if not pairs:  # the loss is linear in the parameters: H = 0
        return torch.zeros(sum(t.numel() for t in leaves), dtype=leaves[0].dtype, device=leaves[0].device)
    hv = torch.autograd.grad(
        [g for g, _ in pairs], leaves, grad_outputs=[v for _, v in pairs], retain_graph=retain, allow_unused=True
    )
    return _flatten([h if h is not None else torch.zeros_like(t) for h, t in zip(hv, leaves)])


_AUTO_CACHE: Dict[Any, str] = {}


def _auto_key(ls: "LossSet") -> Any:
    x0 = ls.batches[0][0]
    xshape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
    return (
        type(ls.model),
        tuple(ls.shapes),
        str(ls.dtype),
        str(ls.device),
        xshape,
        len(ls.batches),
        getattr(ls.loss_fn, "__qualname__", repr(type(ls.loss_fn))),
    )


def _retained_graphs_fit(ls: "LossSet") -> bool:
    """Whether the gradient graphs of every batch fit: the bytes autograd saves while
    building the first batch's graph (forward and ``create_graph`` backward), scaled by
    the examples of all batches, against the free memory (``RETAIN_FRACTION`` of it, at
    most ``RETAIN_MAX_BYTES``)."""
    from ..ntk._memory import available_memory

    saved = [0]

    def pack(t: Tensor) -> Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    probe = _HVP(ls, "double_backward_retain", only=[0])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        graph = probe._grad_graph(0)
    del graph
    n_first = ls.batches[0][2]
    n_all = sum(b[2] for b in ls.batches)
    need = saved[0] / max(n_first, 1) * n_all
    return need <= min(setting("RETAIN_FRACTION") * available_memory(ls.device), setting("RETAIN_MAX_BYTES"))


def _choose_auto(ls: "LossSet") -> str:
    """Pick the HVP method for ``hvp="auto"``.

    Rule: keep the gradient graphs (``double_backward_retain``, the fastest: one backward
    pass per product) when the set is a single batch, i.e. the caller has shown that one
    forward/backward over the whole set fits in memory, or when the graphs of all batches,
    measured on the first one, take at most ``RETAIN_FRACTION`` of the free memory
    (and ``RETAIN_MAX_BYTES``). Otherwise time one product on the first batch (minimum
    of three runs each) with double backward and with forward-over-reverse and keep the
    faster. The choice is cached per (model class, parameter shapes, dtype, device, input
    shape, number of batches, loss), so repeated calls (a monitor) decide once. The
    measuring and timing products are not counted in ``n_hvp``.
    """
    if ls.all_reduce is not None:
        # Every process must take the same path: the choice may not depend on local timing.
        return "double_backward_retain" if len(ls.batches) <= 1 else "double_backward"
    if len(ls.batches) == 1:
        return "double_backward_retain"
    key = _auto_key(ls)
    if key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    if _retained_graphs_fit(ls):
        _AUTO_CACHE[key] = "double_backward_retain"
        return "double_backward_retain"
    v = torch.ones(ls.n_params, dtype=ls.dtype, device=ls.device) / math.sqrt(ls.n_params)
    timings, products = {}, {}
    for m in ("double_backward", "forward_over_reverse"):
        h = _HVP(ls, m, only=[0])
        try:
            products[m] = h(v)  # warm-up, and the product both methods must agree on
            best_t = math.inf
            for _ in range(3):  # minimum of three: robust to other load on the machine
                _sync(ls.device)
                t0 = time.perf_counter()
                h(v)
                _sync(ls.device)
                best_t = min(best_t, time.perf_counter() - t0)
            timings[m] = best_t
        except Exception:  # forward AD not supported by some op: not a candidate
            timings[m] = math.inf
    if timings["forward_over_reverse"] < math.inf and "double_backward" in products:
        # A forward-mode formula that is missing or wrong for some op would make the products
        # silently wrong: a method that disagrees with double backward is out.
        a, b = products["double_backward"], products["forward_over_reverse"]
        tolerance = (1e-9 if ls.dtype == torch.float64 else 1e-4) * max(float(a.norm()), 1e-30)
        if float((a - b).norm()) > tolerance:
            timings["forward_over_reverse"] = math.inf
    best = min(timings, key=timings.get)  # ties: double_backward (first)
    _AUTO_CACHE[key] = best
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
