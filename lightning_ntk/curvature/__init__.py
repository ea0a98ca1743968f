"""Loss-landscape curvature: Hessian eigenpairs, trace, spectral density, sharpness.

Everything here works on the Hessian of the *mean training loss over a fixed set of
examples* with respect to the model's trainable parameters,

    L(theta) = (1/N) sum_i l(f(x_i; theta), y_i),      H = d^2 L / d theta^2,

as in Cohen et al. 2021 ("Gradient descent on neural networks typically occurs at the edge
of stability"), who measure sharpness as the top eigenvalue of H on a fixed subset of the
training set. Batches may have different sizes: each batch's mean loss is weighted by its
size / N, so the result does not depend on how the set is cut into batches.

All functions are matrix-free (Hessian-vector products, "HVPs") and plain PyTorch. They are
safe to call in the middle of training:

* the model's parameters are never written (a functional copy is used, via
  ``torch.func.functional_call``), so they are bit-identical afterwards;
* ``.grad`` is never touched (``torch.autograd.grad`` / ``torch.func``, no ``.backward``);
* by default every module is put in eval mode for the computation (dropout off, BatchNorm
  on its running statistics) and each module's own train/eval flag is restored afterwards
  (PyHessian calls ``model.eval()`` and leaves it there); BatchNorm buffers are passed as
  copies, so running statistics never change;
* the global RNG is forked around the computation, and random start vectors come from a
  local ``torch.Generator`` (seeded by ``generator``; default seed 0).

Default losses (``loss_fn=None``, the package's ``per_example_loss``): integer targets ->
cross-entropy; floating targets -> Cohen et al.'s squared loss ``0.5 * ||f(x) - y||^2``
summed over the outputs (their ``SquaredLoss``, used with one-hot 0/1 targets); both
averaged over examples. A user ``loss_fn(outputs, targets)`` returns per-example losses
(N,) or their mean.

Batches: an ``(x, y)`` pair (or ``(x, y, ...)``, a dict, a :class:`ProbeSet`), an iterable
of batches or a DataLoader; layouts as in :func:`lightning_ntk.probe.batch_to_xy`
(``batch_format=`` for others).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from torch import nn

from .._hygiene import _cuda_devices, measurement_mode
from .._lanczos import lanczos_eigs, lanczos_quadrature
from .._losses import per_example_loss
from ..probe import BatchFormat, ProbeSet, batch_to_xy

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = Any  # (x, y) | iterable of (x, y) | DataLoader
GeneratorLike = Union[None, int, torch.Generator]

HVP_METHODS = ("auto", "double_backward", "double_backward_retain", "forward_over_reverse")
WHICH = ("LA", "SA", "LM")
TRACE_METHODS = ("hutch++", "hutchinson")

__all__ = [
    "CurvatureMemoryError",
    "HessianEigenResult",
    "HessianTraceResult",
    "HessianDensityResult",
    "SAMSharpnessResult",
    "EdgeOfStability",
    "PreconditionedSharpnessResult",
    "data_parallel",
    "hessian_eigs",
    "hessian_trace",
    "hessian_density",
    "smoothed_density",
    "gradient_norm",
    "sam_sharpness",
    "edge_of_stability_threshold",
    "preconditioned_sharpness",
    "squared_loss",
]


# ---------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------
@dataclass
class HessianEigenResult:
    """Output of :func:`hessian_eigs`.

    eigenvalues: (k,) float64, wanted order (LA: largest first; SA: smallest first;
        LM: largest magnitude first).
    residuals: (k,) float64, absolute residual norms ``||H v - lambda v||`` of the returned
        unit Ritz vectors (true residuals of the computed HVPs, from the Lanczos relation;
        see :mod:`lightning_ntk._lanczos`). ``relative_residuals`` divides by ``|lambda|``.
        For a symmetric H some eigenvalue lies within ``residual`` of each Ritz value, and
        within ``residual**2 / gap`` when the Ritz value is separated by ``gap`` from the
        rest of the spectrum.
    n_hvp: number of full-set Hessian-vector products used.
    converged: True when every wanted pair met ``residual <= tol * |lambda| + atol``.
    converged_pairs: (k,) bool, the same test per pair.
    eigenvectors: (k, P) unit vectors in the flat parameter order of ``param_names``
        (``return_eigenvectors=True``), else None. ``eigenvector_params(i)`` reshapes one.
    """

    eigenvalues: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool
    converged_pairs: Tensor
    eigenvectors: Optional[Tensor] = None
    which: str = "LA"
    tol: float = 1e-3
    hvp_method: str = ""
    n_examples: int = 0
    param_names: List[str] = field(default_factory=list)
    param_shapes: List[Tuple[int, ...]] = field(default_factory=list)

    @property
    def relative_residuals(self) -> Tensor:
        """``residuals / |eigenvalues|`` (inf where an eigenvalue is exactly zero)."""
        return self.residuals / self.eigenvalues.abs()

    def eigenvector_params(self, i: int) -> List[Tensor]:
        """Eigenvector ``i`` split into tensors shaped like the parameters."""
        if self.eigenvectors is None:
            raise ValueError("no eigenvectors stored: call hessian_eigs(..., return_eigenvectors=True)")
        return _unflatten(self.eigenvectors[i], self.param_shapes)


@dataclass
class HessianTraceResult:
    """Output of :func:`hessian_trace`: ``trace`` estimate, its ``stderr``, HVPs used.

    ``samples`` are the Hutchinson terms the standard error is computed from (for Hutch++:
    those of the residual part, the low-rank part being exact given the sketch).
    """

    trace: float
    stderr: float
    n_hvp: int
    method: str
    samples: Tensor
    low_rank_part: float = 0.0
    hvp_method: str = ""


@dataclass
class HessianDensityResult:
    """Output of :func:`hessian_density` (stochastic Lanczos quadrature).

    nodes, weights: (n_runs, m) float64; each run's weights sum to one. The spectral
    density estimate is ``phi(t) = mean_runs sum_j weights[r, j] * delta(t - nodes[r, j])``
    (a probability measure: multiply by ``n_params`` for eigenvalue counts). Use
    :meth:`density` for a Gaussian-smoothed version on a grid.
    """

    nodes: Tensor
    weights: Tensor
    n_hvp: int
    n_params: int
    hvp_method: str = ""

    def density(self, grid: Union[Tensor, Sequence[float]], sigma: Optional[float] = None) -> Tensor:
        """Gaussian-smoothed density on ``grid``; see :func:`smoothed_density`."""
        return smoothed_density(self.nodes, self.weights, grid, sigma)


@dataclass
class SAMSharpnessResult:
    """Output of :func:`sam_sharpness`: ``sharpness = perturbed_loss - loss``."""

    sharpness: float
    loss: float
    perturbed_loss: float
    gradient_norm: float
    rho: float


class EdgeOfStability(NamedTuple):
    """``(threshold, description)`` from :func:`edge_of_stability_threshold`."""

    threshold: Optional[float]
    description: str


@dataclass
class PreconditionedSharpnessResult:
    """Output of :func:`preconditioned_sharpness` (Adam / AdamW)."""

    eigenvalues: Tensor
    residuals: Tensor
    n_hvp: int
    converged: bool
    threshold: float
    description: str


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------
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


def _default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return per_example_loss(outputs, targets).mean()


# ---------------------------------------------------------------------------------------
# the loss over a fixed set, functionally in the parameters
# ---------------------------------------------------------------------------------------
def _unflatten(v: Tensor, shapes: Sequence[Tuple[int, ...]]) -> List[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return [p.view(s) for p, s in zip(torch.split(v, sizes), shapes)]


def _flatten(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


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


class CurvatureMemoryError(MemoryError):
    """A curvature computation would need more memory than the device has free; raised
    before the allocation (the message states the estimate and the setting to lower)."""


#: The share of the memory free on the device one Lanczos basis or Hutch++ sketch may take.
MEMORY_FRACTION = 0.8
_MEMORY_CHECK_FROM = 64 * 2**20  # bytes: smaller allocations are not checked


def _memory_guard(what: str, P: int, device: torch.device, knob: str) -> Callable[[int, int], None]:
    """``reserve(vectors, nbytes)``: raise :class:`CurvatureMemoryError` when ``nbytes`` exceed
    :data:`MEMORY_FRACTION` of the memory free on ``device`` now."""
    from ..ntk._memory import available_memory, format_bytes

    def reserve(vectors: int, nbytes: int) -> None:
        if nbytes <= _MEMORY_CHECK_FROM:
            return  # reading the free memory costs ~0.5 ms: not worth it for small buffers
        free = available_memory(device)
        if nbytes > MEMORY_FRACTION * free:
            raise CurvatureMemoryError(
                f"{what}: {vectors} vectors of P={P:,} parameters need {format_bytes(nbytes)} on {device}, more "
                f"than {MEMORY_FRACTION:.0%} of the {format_bytes(free)} free. {knob}"
            )

    return reserve


def _make_generator(generator: GeneratorLike) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(
            f"generator must be None (seed 0), an int seed or a torch.Generator; got {type(generator).__name__}"
        )
    g = torch.Generator(device="cpu")
    g.manual_seed(int(generator))
    return g


@contextlib.contextmanager
def _hygiene(model: nn.Module, eval_mode: bool) -> Iterator[None]:
    """Eval mode (or the current modes), forked RNG, grad enabled; every module's mode restored."""
    if eval_mode:
        with measurement_mode(model, train=False, grad=True):
            yield
        return
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "curvature functions need autograd, but torch.inference_mode is active (e.g. in "
            "a Lightning validation hook): call them from a training hook or outside "
            "inference mode."
        )
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)), torch.enable_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag


_ALL_REDUCE: "contextvars.ContextVar[Optional[Callable[[Tensor], Tensor]]]" = contextvars.ContextVar(
    "lightning_ntk_curvature_all_reduce", default=None)


@contextlib.contextmanager
def data_parallel(all_reduce: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within this block, each process passes its own shard of the fixed set as ``batches``
    and every function here works on the mean loss over the union of the shards.

    ``all_reduce(t)`` must return the sum of ``t`` over the processes (every process
    calls the same functions with the same arguments besides its batches, so that the
    collectives line up). Losses, gradients and Hessian-vector products are summed over
    processes, the example count too; random start vectors come from the same seed on
    every process, so all processes compute identical results. An empty shard is allowed.
    """
    token = _ALL_REDUCE.set(all_reduce)
    try:
        yield
    finally:
        _ALL_REDUCE.reset(token)


class _LossSet:
    """The mean loss over a fixed set of batches as a function of a flat parameter list.

    Batches are read once and kept on the parameters' device (a shuffling DataLoader is
    thereby frozen into one fixed set). ``dtype`` casts a functional copy of every floating
    parameter and buffer, and the floating inputs / targets, never the model itself.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[LossFn],
        batches: Batches,
        params: Optional[Iterable[Union[str, Tensor]]],
        dtype: Optional[torch.dtype],
        eval_mode: bool,
        batch_format: BatchFormat = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be None or a callable loss_fn(outputs, targets) -> per-example or mean loss")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype (e.g. torch.float64), got {dtype!r}")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else _default_loss
        self.eval_mode = bool(eval_mode)

        named = dict(model.named_parameters())  # deduplicates tied parameters
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
        self.device = sel[0].device
        if dtype is None:
            dts = {p.dtype for p in sel}
            if len(dts) != 1:
                raise ValueError(f"selected parameters have mixed dtypes {dts}: pass dtype= (e.g. torch.float64)")
            dtype = sel[0].dtype
            if not dtype.is_floating_point:
                raise ValueError(f"parameters must be floating point, got {dtype}")
        self.dtype = dtype
        self.names = names
        self.shapes = [tuple(p.shape) for p in sel]
        self.n_params = sum(p.numel() for p in sel)

        def cast(t: Tensor) -> Tensor:
            t = t.detach()
            return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t

        sel_set = set(names)
        self.theta = [cast(p) for p in sel]
        # Fixed tensors: other parameters (detached) and copies of buffers (running stats
        # must never change, even in train mode).
        self.fixed: Dict[str, Tensor] = {n: cast(p) for n, p in named.items() if n not in sel_set}
        for n, b in model.named_buffers():
            self.fixed[n] = cast(b).clone()

        self.batch_format = batch_format
        self.all_reduce = _ALL_REDUCE.get()
        self.batches = self._materialise(batches)
        local = sum(b[2] for b in self.batches)
        if self.all_reduce is not None:
            local = int(self.all_reduce(torch.tensor([float(local)], dtype=torch.float64)).item())
            if local == 0:
                raise ValueError("batches holds no examples on any process")
        self.n_examples = local

    def reduce(self, t: Tensor) -> Tensor:
        """Sum over data-parallel processes (identity outside :func:`data_parallel`)."""
        return t if self.all_reduce is None else self.all_reduce(t)

    # -- data ---------------------------------------------------------------------------
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

    # -- functional loss ------------------------------------------------------------------
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
        theta = self.theta if theta is None else theta
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            for b in range(len(self.batches)):
                total = total + self.batch_loss(theta, b).double().cpu()
            return float(self.reduce(total.reshape(1)).sum())

    def loss_and_grad(self, theta: Optional[Sequence[Tensor]] = None) -> Tuple[float, Tensor]:
        theta = self.theta if theta is None else theta
        total = 0.0
        g = torch.zeros(self.n_params, dtype=self.dtype, device=self.device)
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


class _HVP:
    """Full-set Hessian-vector products v -> H v on flat vectors, counted in ``count``.

    ``only`` restricts the sum to some batch indices (used to time methods on one batch).
    """

    def __init__(self, ls: _LossSet, method: str, only: Optional[List[int]] = None) -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {method!r}")
        self.ls = ls
        self.count = 0
        self.idx = list(range(len(ls.batches))) if only is None else list(only)
        self._local = only is not None  # timing products stay on this process
        self._graphs: Optional[List[Tuple[List[Optional[Tensor]], List[Tensor]]]] = None
        if method == "auto":
            method = _choose_auto(ls)
        self.method = method

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


def _auto_key(ls: _LossSet) -> Any:
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


#: ``hvp="auto"`` keeps the gradient graphs of several batches when they take at most this
#: share of the free memory, and at most RETAIN_MAX_BYTES.
RETAIN_FRACTION = 0.25
RETAIN_MAX_BYTES = 4 * 2**30


def _retained_graphs_fit(ls: _LossSet) -> bool:
    """Whether the gradient graphs of every batch fit: the bytes autograd saves while
    building the first batch's graph (forward and ``create_graph`` backward), scaled by
    the examples of all batches, against the free memory."""
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
    return need <= min(RETAIN_FRACTION * available_memory(ls.device), RETAIN_MAX_BYTES)


def _choose_auto(ls: _LossSet) -> str:
    """Pick the HVP method for ``hvp="auto"``.

    Rule: keep the gradient graphs (``double_backward_retain``, the fastest: one backward
    pass per product) when the set is a single batch, i.e. the caller has shown that one
    forward/backward over the whole set fits in memory, or when the graphs of all batches,
    measured on the first one, take at most :data:`RETAIN_FRACTION` of the free memory
    (and :data:`RETAIN_MAX_BYTES`). Otherwise time one product on the first batch (minimum
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
    timings = {}
    for m in ("double_backward", "forward_over_reverse"):
        h = _HVP(ls, m, only=[0])
        try:
            h(v)  # warm-up
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
    best = min(timings, key=timings.get)  # ties: double_backward (first)
    _AUTO_CACHE[key] = best
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _validate_common(k: Optional[int] = None, which: Optional[str] = None, tol: Optional[float] = None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int (number of eigenpairs), got {k!r}")
    if which is not None and which not in WHICH:
        raise ValueError(f"which must be 'LA' (largest), 'SA' (smallest) or 'LM' (largest magnitude); got {which!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive float (relative residual tolerance), got {tol!r}")


def _start_vector(
    n: int,
    init: Any,
    shapes: Sequence[Tuple[int, ...]],
    gen: torch.Generator,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Random Gaussian start, or a warm start mixed half-and-half with a random vector.

    A warm start ``init`` (previous eigenvectors) is summed into one unit vector u; the
    start is ``(u + r) / ||u + r||`` with r a random unit vector. The u part makes the
    previous top directions converge in few steps; the r part keeps every other direction
    present with the weight of a cold start, so an eigenvalue that has overtaken the
    previous ones is still found.
    """
    r = torch.randn(n, generator=gen, dtype=torch.float64)
    r = r / torch.linalg.vector_norm(r)
    if init is None:
        return r.to(dtype=dtype, device=device)
    if isinstance(init, HessianEigenResult):
        if init.eigenvectors is None:
            raise ValueError("init: the HessianEigenResult has no eigenvectors (use return_eigenvectors=True)")
        init = init.eigenvectors
    vecs: List[Tensor] = []
    if isinstance(init, Tensor):
        t = init.detach()
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] != n:
            raise ValueError(f"init must have shape (P,) or (k, P) with P={n} parameters, got {tuple(init.shape)}")
        vecs = list(t)
    elif isinstance(init, (list, tuple)):
        for item in init:
            if isinstance(item, Tensor) and item.dim() >= 1 and item.numel() == n and (item.dim() == 1):
                vecs.append(item.detach())
            elif isinstance(item, (list, tuple)) and all(isinstance(t, Tensor) for t in item):
                if [tuple(t.shape) for t in item] != list(shapes):
                    raise ValueError("init: per-parameter tensors do not match the parameter shapes")
                vecs.append(_flatten([t.detach() for t in item]))
            else:
                raise ValueError(
                    f"init entries must be flat tensors of length P={n} or lists of per-parameter tensors"
                )
    else:
        raise TypeError("init must be None, a HessianEigenResult, a (k, P) tensor or a list of vectors")
    u = torch.zeros(n, dtype=torch.float64)
    for v in vecs:
        v = v.double().cpu().reshape(-1)
        nv = torch.linalg.vector_norm(v)
        if not torch.isfinite(nv) or nv == 0:
            raise ValueError("init vectors must be finite and nonzero")
        u += v / nv
    nu = torch.linalg.vector_norm(u)
    if nu > 0:
        r = r + u / nu
    return (r / torch.linalg.vector_norm(r)).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------
# eigenvalues
# ---------------------------------------------------------------------------------------
def hessian_eigs(
    model: nn.Module,
    loss_fn: Optional[LossFn],
    batches: Batches,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-3,
    atol: Optional[float] = None,
    max_hvp: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    params: Optional[Iterable[Union[str, Tensor]]] = None,
    return_eigenvectors: bool = False,
    init: Any = None,
    hvp: str = "auto",
    generator: GeneratorLike = None,
    eval_mode: bool = True,
    batch_format: BatchFormat = None,
    guard: int = 0,
    warn: bool = True,
) -> HessianEigenResult:
    """k extreme eigenpairs of the Hessian of the mean loss over ``batches``.

    Lanczos with full reorthogonalisation on Hessian-vector products (Lanczos 1950; for
    Hessians of networks: Ghorbani et al. 2019, Cohen et al. 2021). After each product the
    Ritz pairs of the Krylov space are formed and the iteration stops as soon as every
    wanted pair (theta_i, y_i) has a residual

        ||H y_i - theta_i y_i|| <= tol * |theta_i| + atol,

    an accuracy bound, unlike power iteration's relative-change test: some eigenvalue of H
    lies within the residual of theta_i (and within residual^2 / gap for an isolated one).
    ``atol=None`` is a rounding floor, 50 * eps(dtype) * ||H|| (estimated by the largest
    Lanczos coefficient).

    What the residual cannot tell is *which* eigenvalue theta_i is close to. By interlacing,
    theta_i <= lambda_i for "LA" (theta_i >= lambda_i for "SA"); with a random start the
    extreme eigenvalues are found in order with probability one, but when lambda_k sits in a
    tight cluster and the start vector happens to be nearly orthogonal to its eigenvector,
    Lanczos can stop on the next eigenvalue of the cluster (an error of about the cluster
    spacing). ``guard=g`` also requires the next g Ritz pairs to converge, which makes this
    much rarer at the cost of a few more products. Single-vector Lanczos finds one copy of
    a repeated eigenvalue.

    Args:
        model: the network; its parameters, modes, ``.grad`` and RNG are left as they are.
        loss_fn: ``loss_fn(outputs, targets)`` -> per-example losses (N,) or their mean,
            or None (cross-entropy for integer targets, Cohen et al.'s
            ``0.5 * ||f - y||^2`` for float targets).
        batches: an ``(x, y)`` pair, a :class:`ProbeSet`, an iterable of batches or a
            DataLoader; read once. The loss is the mean over all examples (batch means
            weighted by size / total).
        k: number of eigenpairs.
        which: "LA" largest algebraic (sharpness), "SA" smallest algebraic (most negative
            curvature), "LM" largest magnitude.
        tol: relative residual tolerance (see above).
        max_hvp: most Hessian-vector products (default ``min(P, 100 + 10 k)``).
        dtype: e.g. ``torch.float64`` to compute on a float64 copy of the parameters,
            buffers and float data (the model is not changed).
        params: subset of parameters (names or tensors); default all with requires_grad.
        return_eigenvectors: keep the (k, P) unit eigenvectors in the result.
        init: warm start from previous eigenvectors (a result, a (k, P) tensor or a list);
            see ``_start_vector``: mixed with a random vector, so it only saves work.
        hvp: "double_backward" (reverse-over-reverse, graph rebuilt per product),
            "double_backward_retain" (gradient graph of every batch kept: fastest, memory
            of the whole set's graph), "forward_over_reverse" (``torch.func.jvp`` of
            ``torch.func.grad``) or "auto" (see ``_choose_auto``).
        generator: None (seed 0), an int seed or a ``torch.Generator`` for the start.
        eval_mode: compute with every module in eval mode (restored afterwards). False
            keeps the current modes (BatchNorm then uses batch statistics; its running
            buffers are still not updated); refused if dropout is active.
        batch_format: how to find (x, y) in a batch, as in
            :func:`lightning_ntk.probe.batch_to_xy` (None: tuples ``(x, y, ...)`` and
            dicts with usual keys).
        guard: extra Ritz pairs beyond the k wanted that must also converge (see above).
        warn: emit a RuntimeWarning when ``max_hvp`` is reached before convergence.
    """
    _validate_common(k, which, tol)
    if atol is not None and not (atol >= 0 and math.isfinite(atol)):
        raise ValueError(f"atol must be None or a finite float >= 0, got {atol!r}")
    ls = _LossSet(model, loss_fn, batches, params, dtype, eval_mode, batch_format)
    P = ls.n_params
    if k > P:
        raise ValueError(f"k={k} exceeds the number of parameters P={P}")
    if max_hvp is None:
        max_hvp = min(P, 100 + 10 * k)
    if isinstance(max_hvp, bool) or not isinstance(max_hvp, int) or max_hvp < k:
        raise ValueError(f"max_hvp must be an int >= k={k} (products allowed), got {max_hvp!r}")
    if isinstance(guard, bool) or not isinstance(guard, int) or guard < 0:
        raise ValueError(f"guard must be an int >= 0 (extra Ritz pairs to converge), got {guard!r}")
    gen = _make_generator(generator)
    with _hygiene(model, ls.eval_mode):
        _check_dropout(model, ls.eval_mode)
        op = _HVP(ls, hvp)
        v0 = _start_vector(P, init, ls.shapes, gen, ls.dtype, ls.device)
        try:
            reserve = _memory_guard("hessian_eigs (Lanczos basis)", P, ls.device,
                                    f"Lower max_hvp (now {max_hvp}) or k, loosen tol, compute in float32 "
                                    "(dtype=torch.float32), or restrict params=.")
            out = lanczos_eigs(
                op, v0, k, which, float(tol), atol, max_hvp, gen, return_eigenvectors, guard=guard,
                reserve=reserve,
            )
        finally:
            op.release()
    converged = bool(out["converged"].all())
    if warn and not converged:
        warnings.warn(
            f"hessian_eigs: not converged after {op.count} Hessian-vector products "
            f"(max relative residual {float((out['residuals'] / out['eigenvalues'].abs()).max()):.2e} "
            f"> tol={tol}); raise max_hvp or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return HessianEigenResult(
        eigenvalues=out["eigenvalues"].clone(),
        residuals=out["residuals"].clone(),
        n_hvp=op.count,
        converged=converged,
        converged_pairs=out["converged"].clone(),
        eigenvectors=out.get("eigenvectors"),
        which=which,
        tol=float(tol),
        hvp_method=op.method,
        n_examples=ls.n_examples,
        param_names=list(ls.names),
        param_shapes=list(ls.shapes),
    )


def _check_dropout(model: nn.Module, eval_mode: bool) -> None:
    if eval_mode:
        return
    drop = [n for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    if drop:
        raise ValueError(
            f"eval_mode=False but dropout is active in {drop[:3]}: the loss would be random and its "
            "Hessian undefined. Use eval_mode=True (default) or put those modules in eval mode."
        )


# ---------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------
def hessian_trace(
    model: nn.Module,
    loss_fn: Optional[LossFn],
    batches: Batches,
    *,
    n_queries: int = 60,
    method: str = "hutch++",
    dtype: Optional[torch.dtype] = None,
    params: Optional[Iterable[Union[str, Tensor]]] = None,
    hvp: str = "auto",
    generator: GeneratorLike = None,
    eval_mode: bool = True,
    batch_format: BatchFormat = None,
) -> HessianTraceResult:
    """Stochastic estimate of tr(H) with a standard error, from ``n_queries`` HVPs.

    ``method="hutchinson"`` (Hutchinson 1989): ``mean_i g_i^T H g_i`` over Rademacher g_i;
    stderr = sample standard deviation / sqrt(m).

    ``method="hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): with m = n_queries split in
    thirds, S (P x m/3) Rademacher, Q = orth(H S), and G (P x m/3) Rademacher,

        tr(H) ~ tr(Q^T H Q) + mean_i (P_Q g_i)^T H (P_Q g_i),     P_Q = I - Q Q^T.

    Standard error: conditionally on Q the first term is a constant (exact), and the second
    is a mean of independent, identically distributed terms whose expectation is
    tr(P_Q H P_Q) = tr(H) - tr(Q^T H Q); the estimator is therefore unbiased given Q, and
    its conditional standard deviation is estimated by the sample standard deviation of
    those terms / sqrt(#terms), which is what ``stderr`` reports. (Hutch++'s deflation
    removes the top of the spectrum from the Hutchinson part, so this stderr is smaller than
    Hutchinson's when the top few eigenvalues carry much of the trace.)

    Memory: Hutch++ keeps P x n_queries/3 float64 numbers (the sketch and its basis Q).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {TRACE_METHODS}, got {method!r}")
    min_q = 6 if method == "hutch++" else 2
    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < min_q:
        raise ValueError(f"n_queries must be an int >= {min_q} for method={method!r}, got {n_queries!r}")
    ls = _LossSet(model, loss_fn, batches, params, dtype, eval_mode, batch_format)
    P = ls.n_params
    gen = _make_generator(generator)

    dev, dt = ls.device, ls.dtype

    def rademacher() -> Tensor:  # drawn on the CPU generator, so results do not depend on the device
        r = torch.randint(0, 2, (P,), generator=gen, dtype=torch.int8)
        return (2 * r - 1).to(device=dev, dtype=torch.float64)

    with _hygiene(model, ls.eval_mode):
        _check_dropout(model, ls.eval_mode)
        op = _HVP(ls, hvp)
        try:
            low = 0.0
            Q = None
            if method == "hutchinson":
                n_res = n_queries
            else:
                s = min(n_queries // 3, P)
                # the s sketch columns and their QR factor, float64
                _memory_guard("hessian_trace (Hutch++ sketch)", P, dev,
                              f"Lower n_queries (now {n_queries}) or use method='hutchinson' (no sketch).")(
                    s, 2 * s * P * 8)
                HS = torch.stack([op(rademacher().to(dt)).double() for _ in range(s)], 1)
                Q, _ = torch.linalg.qr(HS, mode="reduced")
                del HS
                for i in range(Q.shape[1]):
                    q = Q[:, i]
                    low += float(q @ op(q.to(dt)).double())
                n_res = n_queries - 2 * s
            samples = torch.empty(n_res, dtype=torch.float64)
            for i in range(n_res):
                g = rademacher()
                if Q is not None:
                    g = g - Q @ (Q.T @ g)
                samples[i] = float(g @ op(g.to(dt)).double())
        finally:
            op.release()
    m = samples.numel()
    est = low + float(samples.mean()) if m else low
    stderr = float(samples.std(unbiased=True) / math.sqrt(m)) if m > 1 else float("nan")
    return HessianTraceResult(
        trace=est, stderr=stderr, n_hvp=op.count, method=method, samples=samples, low_rank_part=low,
        hvp_method=op.method,
    )


# ---------------------------------------------------------------------------------------
# spectral density
# ---------------------------------------------------------------------------------------
def hessian_density(
    model: nn.Module,
    loss_fn: Optional[LossFn],
    batches: Batches,
    *,
    n_steps: int = 80,
    n_runs: int = 1,
    dtype: Optional[torch.dtype] = None,
    params: Optional[Iterable[Union[str, Tensor]]] = None,
    hvp: str = "auto",
    generator: GeneratorLike = None,
    eval_mode: bool = True,
    batch_format: BatchFormat = None,
) -> HessianDensityResult:
    """Spectral density of H by stochastic Lanczos quadrature (SLQ).

    Ghorbani, Krishnan & Xiao 2019 (as in PyHessian's ``density``): for each of ``n_runs``
    random unit Rademacher vectors v, ``n_steps`` Lanczos steps (full reorthogonalisation)
    give T_m = S diag(theta) S^T; then ``v^T delta(t - H) v ~ sum_j S_{0j}^2 delta(t - theta_j)``
    (Gauss quadrature), and averaging over runs estimates the density
    ``(1/P) sum_i delta(t - lambda_i)``. Nodes are exact extreme eigenvalues once converged.
    """
    for name, val, lo in (("n_steps", n_steps, 1), ("n_runs", n_runs, 1)):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
    ls = _LossSet(model, loss_fn, batches, params, dtype, eval_mode, batch_format)
    P = ls.n_params
    m = min(n_steps, P)
    gen = _make_generator(generator)
    nodes = torch.full((n_runs, m), float("nan"), dtype=torch.float64)
    weights = torch.zeros((n_runs, m), dtype=torch.float64)
    with _hygiene(model, ls.eval_mode):
        _check_dropout(model, ls.eval_mode)
        op = _HVP(ls, hvp)
        reserve = _memory_guard("hessian_density (Lanczos basis)", P, ls.device,
                                f"Lower n_steps (now {n_steps}), compute in float32 (dtype=torch.float32), "
                                "or restrict params=.")
        try:
            for r in range(n_runs):
                v = 2.0 * torch.randint(0, 2, (P,), generator=gen, dtype=torch.int8).double() - 1.0
                th, w, steps = lanczos_quadrature(op, v.to(ls.dtype).to(ls.device), m, gen, reserve)
                nodes[r, :steps] = th
                weights[r, :steps] = w
        finally:
            op.release()
    # Runs that stopped early (invariant subspace) pad with zero-weight nodes at their mean.
    for r in range(n_runs):
        bad = torch.isnan(nodes[r])
        if bad.any():
            nodes[r, bad] = float((nodes[r, ~bad] * weights[r, ~bad]).sum())
    return HessianDensityResult(nodes=nodes, weights=weights, n_hvp=op.count, n_params=P, hvp_method=op.method)


def smoothed_density(
    nodes: Tensor,
    weights: Tensor,
    grid: Union[Tensor, Sequence[float]],
    sigma: Optional[float] = None,
) -> Tensor:
    """Gaussian-smoothed SLQ density on ``grid``:

        phi_sigma(t) = mean_runs sum_j w_rj * exp(-(t - theta_rj)^2 / (2 sigma^2)) / (sigma sqrt(2 pi))

    It integrates to one. ``sigma=None`` uses 1% of the node range (PyHessian's plot uses
    sigma^2 = 1e-5 of it).
    """
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes and weights must have the same shape, got {tuple(nodes.shape)} and {tuple(weights.shape)}")
    if nodes.dim() == 1:
        nodes, weights = nodes[None], weights[None]
    grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if sigma is None:
        span = float(nodes.max() - nodes.min())
        sigma = 0.01 * span if span > 0 else 1.0
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    z = (grid[:, None, None] - nodes[None]) / sigma
    dens = (weights[None] * torch.exp(-0.5 * z * z)).sum(-1).mean(-1)
    return dens / (sigma * math.sqrt(2 * math.pi))


# ---------------------------------------------------------------------------------------
# gradient norm, SAM sharpness
# ---------------------------------------------------------------------------------------
def gradient_norm(
    model: nn.Module,
    loss_fn: Optional[LossFn],
    batches: Batches,
    *,
    dtype: Optional[torch.dtype] = None,
    params: Optional[Iterable[Union[str, Tensor]]] = None,
    eval_mode: bool = True,
    batch_format: BatchFormat = None,
) -> float:
    """Euclidean norm ``||grad L(theta)||`` of the full-set mean-loss gradient."""
    ls = _LossSet(model, loss_fn, batches, params, dtype, eval_mode, batch_format)
    with _hygiene(model, ls.eval_mode):
        _check_dropout(model, ls.eval_mode)
        _, g = ls.loss_and_grad()
    return float(torch.linalg.vector_norm(g.double()))


def sam_sharpness(
    model: nn.Module,
    loss_fn: Optional[LossFn],
    batches: Batches,
    rho: float = 0.05,
    *,
    dtype: Optional[torch.dtype] = None,
    params: Optional[Iterable[Union[str, Tensor]]] = None,
    eval_mode: bool = True,
    batch_format: BatchFormat = None,
) -> SAMSharpnessResult:
    """rho-sharpness of SAM (Foret et al. 2021), first-order ascent, on the full set:

        eps = rho * g / ||g||,   g = grad L(theta),   sharpness = L(theta + eps) - L(theta).

    (Foret et al.'s ``max_{||eps|| <= rho} L(theta + eps) - L(theta)`` with their one-step
    approximation of the maximiser; m-sharpness with m = the whole set.) The perturbed
    loss is evaluated on a functional copy: the model's parameters are never modified.
    A zero gradient gives eps = 0 and sharpness 0.
    """
    if not (isinstance(rho, (int, float)) and not isinstance(rho, bool) and rho >= 0 and math.isfinite(rho)):
        raise ValueError(f"rho must be a finite float >= 0 (ascent radius), got {rho!r}")
    ls = _LossSet(model, loss_fn, batches, params, dtype, eval_mode, batch_format)
    with _hygiene(model, ls.eval_mode):
        _check_dropout(model, ls.eval_mode)
        loss, g = ls.loss_and_grad()
        gn = float(torch.linalg.vector_norm(g.double()))
        if gn == 0.0 or rho == 0.0:
            return SAMSharpnessResult(0.0, loss, loss, gn, float(rho))
        eps = _unflatten(g * (rho / gn), ls.shapes)
        theta_eps = [t + e for t, e in zip(ls.theta, eps)]
        loss_eps = ls.loss(theta_eps)
    return SAMSharpnessResult(loss_eps - loss, loss, loss_eps, gn, float(rho))


# ---------------------------------------------------------------------------------------
# edge of stability
# ---------------------------------------------------------------------------------------
_ADAPTIVE = {
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
    "Rprop", "Adafactor",
}


def _unwrap_optimizer(optimizer: Any) -> Any:
    # Lightning's LightningOptimizer keeps the torch optimizer in ``_optimizer``.
    inner = getattr(optimizer, "_optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    return optimizer


def _group_value(groups: List[dict], key: str, default: Any = None) -> Tuple[bool, Any]:
    vals = [float(g.get(key, default)) if g.get(key, default) is not None else None for g in groups]
    same = all(v == vals[0] for v in vals)
    return same, vals[0]


def edge_of_stability_threshold(optimizer: Any) -> EdgeOfStability:
    """Sharpness at which the optimiser's step becomes unstable on a quadratic.

    On a quadratic with curvature lambda, with the current learning rate eta:

    * plain gradient descent (SGD, momentum 0): ``2 / eta``;
    * heavy-ball momentum beta (PyTorch SGD, dampening tau): ``(2 + 2 beta) / ((1 - tau) eta)``
      (``(2 + 2 beta) / eta`` for tau = 0, Cohen et al. 2021);
    * Nesterov momentum beta: ``(2 + 2 beta) / ((1 + 2 beta) eta)`` (Cohen et al. 2021);

    from the characteristic polynomial of the linear recursion (instability at the root -1).
    L2 ``weight_decay`` wd adds wd to every Hessian eigenvalue of the objective the optimiser
    follows; the threshold returned is for the Hessian of the loss *without* that term,
    i.e. the value above minus wd (said in the description).

    Adaptive optimisers (Adam, AdamW, RMSprop, ...): ``(None, "adaptive optimiser: no simple
    threshold ...")`` (for Adam see :func:`preconditioned_sharpness`). Param groups with
    different learning rates or momenta: None. Accepts a Lightning ``LightningOptimizer``.
    """
    opt = _unwrap_optimizer(optimizer)
    name = type(opt).__name__
    groups = getattr(opt, "param_groups", None)
    if not groups:
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with param_groups), got {name}")
    if name in _ADAPTIVE or isinstance(opt, (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)):
        extra = "; see preconditioned_sharpness" if name in ("Adam", "AdamW") else ""
        return EdgeOfStability(None, f"adaptive optimiser: no simple threshold ({name}{extra})")
    if not isinstance(opt, torch.optim.SGD):
        return EdgeOfStability(None, f"optimiser {name}: no stability threshold known")
    same_lr, lr = _group_value(groups, "lr")
    same_mom, beta = _group_value(groups, "momentum", 0.0)
    same_damp, tau = _group_value(groups, "dampening", 0.0)
    same_wd, wd = _group_value(groups, "weight_decay", 0.0)
    nesterovs = {bool(g.get("nesterov", False)) for g in groups}
    if not (same_lr and same_mom and same_damp and same_wd) or len(nesterovs) != 1:
        return EdgeOfStability(None, f"{name}: param groups differ in lr/momentum/dampening/weight_decay: no single threshold")
    if any(g.get("maximize", False) for g in groups):
        return EdgeOfStability(None, f"{name} with maximize=True: no threshold for ascent")
    if lr is None or lr <= 0:
        return EdgeOfStability(None, f"{name}: learning rate {lr} <= 0")
    nesterov = nesterovs.pop()
    if beta == 0.0:
        thr, desc = 2.0 / lr, f"GD/SGD: 2/lr, lr={lr:g}"
    elif nesterov:
        thr = (2.0 + 2.0 * beta) / ((1.0 + 2.0 * beta) * lr)
        desc = f"Nesterov momentum: (2+2b)/((1+2b) lr), b={beta:g}, lr={lr:g}"
    else:
        thr = (2.0 + 2.0 * beta) / ((1.0 - tau) * lr)
        desc = f"heavy-ball momentum: (2+2b)/lr, b={beta:g}, lr={lr:g}"
        if tau:
            desc = f"heavy-ball momentum with dampening: (2+2b)/((1-d) lr), b={beta:g}, d={tau:g}, lr={lr:g}"
    if wd:
        thr -= wd
        desc += f"; minus weight_decay={wd:g} (threshold for the loss Hessian without the L2 term)"
    return EdgeOfStability(thr, desc)


# ---------------------------------------------------------------------------------------
# preconditioned sharpness (Adam)
# ---------------------------------------------------------------------------------------
def preconditioned_sharpness(
    model: nn.Module,
    optimizer: Any,
    loss_fn: Optional[LossFn],
    batches: Batches,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_hvp: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    hvp: str = "auto",
    generator: GeneratorLike = None,
    eval_mode: bool = True,
    batch_format: BatchFormat = None,
) -> PreconditionedSharpnessResult:
    """Top eigenvalues of Adam's preconditioned Hessian ``P^{-1/2} H P^{-1/2}``.

    Cohen et al. 2022 ("Adaptive gradient methods at the edge of stability"): with Adam's
    diagonal preconditioner ``P = diag(sqrt(v_t / (1 - beta2^t)) + eps)`` (bias-corrected
    second moment, ``max_exp_avg_sq`` under amsgrad), the preconditioned sharpness
    ``lambda_max(P^{-1} H) = lambda_max(P^{-1/2} H P^{-1/2})`` equilibrates at
    ``(2 + 2 beta1) / ((1 - beta1) eta)`` (38/eta for beta1 = 0.9), returned as ``threshold``.
    The parameters taken are those in the optimiser that have Adam state (call after at
    least one step). Same Lanczos and stopping rule as :func:`hessian_eigs`.
    """
    _validate_common(k, "LA", tol)
    opt = _unwrap_optimizer(optimizer)
    if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"preconditioned_sharpness supports torch.optim.Adam and AdamW, got {type(opt).__name__}")
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    names, diag, groups_seen = [], [], []
    for g in opt.param_groups:
        b1, b2 = g["betas"]
        for p in g["params"]:
            if not p.requires_grad or id(p) not in by_id:
                continue
            st = opt.state.get(p, {})
            if "exp_avg_sq" not in st:
                raise ValueError(
                    "the optimizer has no Adam state for some parameters yet: call after at least one optimizer step"
                )
            step = float(st["step"])
            v = st["max_exp_avg_sq"] if g.get("amsgrad", False) else st["exp_avg_sq"]
            pre = (v.detach().double() / (1.0 - b2 ** step)).sqrt() + g["eps"]
            names.append(by_id[id(p)])
            diag.append(pre.reshape(-1))
            groups_seen.append((float(g["lr"]), float(b1)))
    if not names:
        raise ValueError("none of the optimizer's parameters belong to the model")
    if len(set(groups_seen)) != 1:
        thr, desc = float("nan"), "param groups differ in lr or beta1: no single threshold"
    else:
        lr, b1 = groups_seen[0]
        thr = (2.0 + 2.0 * b1) / ((1.0 - b1) * lr)
        desc = f"Adam: lambda_max(P^-1 H) vs (2+2b1)/((1-b1) lr), b1={b1:g}, lr={lr:g}"
    ls = _LossSet(model, loss_fn, batches, names, dtype, eval_mode, batch_format)
    # diag in _LossSet order
    order = {n: i for i, n in enumerate(names)}
    d = torch.cat([diag[order[n]] for n in ls.names]).rsqrt().to(ls.dtype).to(ls.device)
    P = ls.n_params
    if max_hvp is None:
        max_hvp = min(P, 100 + 10 * k)
    gen = _make_generator(generator)
    with _hygiene(model, ls.eval_mode):
        _check_dropout(model, ls.eval_mode)
        op = _HVP(ls, hvp)
        try:
            v0 = _start_vector(P, None, ls.shapes, gen, ls.dtype, ls.device)
            reserve = _memory_guard("preconditioned_sharpness (Lanczos basis)", P, ls.device,
                                    f"Lower max_hvp (now {max_hvp}) or k, or restrict params=.")
            out = lanczos_eigs(lambda v: d * op(d * v), v0, k, "LA", float(tol), None, max_hvp, gen,
                               reserve=reserve)
        finally:
            op.release()
    return PreconditionedSharpnessResult(
        eigenvalues=out["eigenvalues"].clone(), residuals=out["residuals"].clone(), n_hvp=op.count,
        converged=bool(out["converged"].all()), threshold=thr, description=desc,
    )
