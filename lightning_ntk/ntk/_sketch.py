"""``sketched_ntk``: an unbiased randomised estimate of the trace eNTK for large output spaces.

The exact ``trace`` kernel K(x, x') = (1/C) sum_c <grad f_c(x), grad f_c(x')> costs one
backward pass per output (C of them): infeasible for 1,000 classes or a vocabulary. With
m random sign vectors s_r in {-1, +1}^C (Rademacher, E[s s^T] = I),

    K_r(x, x') = <grad(s_r . f)(x), grad(s_r . f)(x')> / C = s_r^T Theta(x, x') s_r / C

is an unbiased estimate of K (Hutchinson 1989's trace estimator applied to the C x C block
Theta(x, x') of the full eNTK), for m backward passes instead of C. The estimate is the mean
K_hat = (1/m) sum_r K_r, and its standard error the sample standard deviation over the m
projections divided by sqrt(m).

Implementation: the model is wrapped in a module returning f(x) S^T (shape (B, m)), and the
exact engine :func:`~lightning_ntk.ntk.empirical_ntk` computes its ``diagonal`` kernel
(N1, N2, m), whose r-th slice is s_r^T Theta s_r: every method, tiling rule, dtype and
memory budget of the engine applies unchanged.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._args import integer, one_of, positive_int
from .._hygiene import _cuda_devices
from ._empirical import METHODS, empirical_ntk
from ._memory import NTKMemoryError, format_bytes, resolve_max_memory
from ._model import (
    ParamsArg,
    check_autograd,
    check_modes,
    layer_name,
    prepare_input,
    resolve_dtype,
    select_parameters,
)

OWNER = "sketched_ntk"
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit value


@dataclass(frozen=True, eq=False)
class SketchedNTK:
    """Output of :func:`sketched_ntk`: the estimate of the trace eNTK and its standard error.

    kernel: (N1, N2), K_hat = (1/m) sum_r K_r with K_r = s_r^T Theta(x1_n, x2_j) s_r / C, an
        unbiased estimate of the ``trace`` kernel (1/C) sum_c Theta_cc of
        :func:`~lightning_ntk.ntk.empirical_ntk` (E[s s^T] = I for Rademacher signs).
    stderr: (N1, N2), per-entry standard error std_r(K_r, ddof=1) / sqrt(m); NaN when m = 1
        (one projection has no spread to measure). Its expectation shrinks as 1/sqrt(m).
    projections: m, the number of sign vectors. seed: the seed of their generator.
    num_outputs: C, the number of model outputs per example (after flattening).

    Each K_r is unbiased (E[s s^T] = I), so ``kernel`` is; its error, like ``stderr``,
    falls as 1/sqrt(m).

    The sign matrix S (m, C) is not stored (m * C can be large):
    ``rademacher_projections(r.projections, r.num_outputs, r.seed)`` draws it again, exactly.

    Background: randomised trace estimation (Hutchinson 1989; variance and bounds: Avron &
    Toledo 2011), applied to each C x C block Theta(x, x'). The exact eNTK's cost grows with
    the number of outputs (Novak et al. 2022 give the costs); the pseudo-NTK of Mohamadi et
    al. 2023 is the one fixed projection s = (1, ..., 1).
    """

    kernel: Tensor
    stderr: Tensor
    projections: int
    seed: int
    num_outputs: int
    #: ``per_layer=True``: each layer's sketched kernel (same projections; they sum to ``kernel``).
    layers: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def relative_stderr(self) -> float:
        """||stderr||_F / ||kernel||_F: the estimate's typical relative error (NaN when m = 1)."""
        num = torch.linalg.vector_norm(self.stderr.double())
        den = torch.linalg.vector_norm(self.kernel.double())
        return float(num / den) if float(den) > 0 else math.nan


def rademacher_projections(
    projections: int,
    num_outputs: int,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[None, str, torch.device] = None,
) -> Tensor:
    """The sign matrix S (projections, num_outputs) that :func:`sketched_ntk` draws for ``seed``.

    Entries are independent, +1 or -1 with probability 1/2 each, drawn on the CPU from a
    ``torch.Generator`` seeded with ``seed`` (the same S on every device; the global RNG is
    not used), then moved to ``device`` and cast to ``dtype`` (+-1 is exact in every dtype).
    """
    owner = "rademacher_projections"
    m = positive_int(projections, "projections", owner)
    c = positive_int(num_outputs, "num_outputs", owner)
    seed = integer(seed, "seed", owner, minimum=0, maximum=_MAX_SEED)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{owner}: dtype must be a floating torch.dtype (e.g. torch.float64), got {dtype!r}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    bits = torch.randint(0, 2, (m, c), generator=gen, dtype=torch.int8)
    return (2 * bits - 1).to(device=device, dtype=dtype)


class _Projected(nn.Module):
    """``model`` with its outputs flattened to (B, C) and projected: x -> f(x) S^T, (B, m).

    The model is the only child, so its parameters are this module's parameters (the same
    objects, names prefixed by ``model.``): the engine's tying, selection and hooks see them
    as they are. S is a plain attribute, not a buffer: it is no state of the model, and the
    engine must not differentiate or cast it (it is cast here, once per dtype and device).
    """

    def __init__(self, model: nn.Module, signs: Tensor):
        super().__init__()
        self.model = model
        self.signs = signs
        self._cast: Dict[Tuple[torch.dtype, torch.device], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        out = out.reshape(out.shape[0], -1)  # (B,) -> (B, 1); (B, T, V) -> (B, T*V)
        key = (out.dtype, out.device)
        if key not in self._cast:
            self._cast[key] = self.signs.to(device=out.device, dtype=out.dtype)
        return out @ self._cast[key].T


@contextlib.contextmanager
def _as_sketch() -> Iterator[None]:
    """Errors of the engine's shared checks name ``empirical_ntk``; the user called
    ``sketched_ntk``. Re-raise those (plain TypeError/ValueError/RuntimeError only, same
    traceback) under the caller's name; any other error passes through untouched."""
    try:
        yield
    except (TypeError, ValueError, RuntimeError) as exc:
        msg = str(exc)
        if type(exc) in (TypeError, ValueError, RuntimeError) and msg.startswith("empirical_ntk"):
            raise type(exc)(OWNER + msg[len("empirical_ntk"):]).with_traceback(exc.__traceback__) from exc.__cause__
        raise


def _num_outputs(model: nn.Module, x: Tensor) -> int:
    """C: outputs per example, from one forward pass on one example (no grad, RNG forked)."""
    with torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad():
        out = model(x[:1])
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{OWNER}: the model must return one tensor of outputs (N, C), (N,) or (N, ...), got "
            f"{type(out).__name__}; wrap the model in a module that returns the outputs"
        )
    if out.dim() == 0 or out.shape[0] != 1 or out.numel() == 0:
        raise ValueError(
            f"{OWNER}: the model must return one row of outputs per example, (N, C), (N,) or (N, ...) (batch "
            f"first; flattened to (N, C)), but for one example it returned shape {tuple(out.shape)}"
        )
    return out.numel()


def sketched_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Optional[Tensor] = None,
    *,
    projections: int = 64,
    seed: int = 0,
    params: ParamsArg = None,
    method: str = "auto",
    dtype: Optional[torch.dtype] = None,
    max_memory: Union[None, int, str] = None,
    per_layer: bool = False,
) -> SketchedNTK:
    """Unbiased estimate of the trace eNTK from ``projections`` random output projections.

    With Theta(x, x') = J(x) J(x')^T the C x C eNTK block and m = ``projections`` Rademacher
    sign vectors s_r in {-1, +1}^C (rows of S, see :func:`rademacher_projections`)::

        K_r(x, x') = <grad(s_r . f)(x), grad(s_r . f)(x')> / C = s_r^T Theta(x, x') s_r / C
        kernel     = (1/m) sum_r K_r                       (N1, N2)
        stderr     = std_r(K_r, ddof=1) / sqrt(m)          (N1, N2)

    Since E[s s^T] = I, E[K_r] = tr Theta / C: each K_r, and so ``kernel``, is an unbiased
    estimate of ``empirical_ntk(..., kind="trace")`` (Hutchinson 1989; Rademacher signs
    give the smallest variance of the i.i.d. choices). The variance of one K_r is
    (2 / C^2) sum_{a != b} Sym_ab^2 with Sym the symmetric part of Theta(x, x'): only the
    off-diagonal output couplings contribute (a last Linear layer adds none), and the error
    falls as 1/sqrt(m). Cost: m backward passes per batch instead of C (the ``diagonal``
    kernel of the projected model), so it pays when m << C; when m >= C the exact
    ``empirical_ntk(kind="trace")`` is cheaper and has no error. The pseudo-NTK of
    Mohamadi et al. 2023 (``kind="pseudo"``) is the single fixed projection s = 1: cheaper,
    but not an unbiased estimate of the trace kernel.

    Args:
        model: maps a batch (N, ...) to outputs (N, C), (N,) (C = 1) or (N, d1, d2, ...),
            flattened here to C = d1 * d2 * ... (e.g. a language model's (N, T, V) logits:
            C = T * V). Modes and side effects as in
            :func:`~lightning_ntk.ntk.empirical_ntk` (call ``model.eval()`` first).
        x1, x2: examples, batch first; ``x2=None`` means x2 = x1 and the result is exactly
            symmetric.
        projections: m >= 1. The standard error needs m >= 2 (NaN for m = 1).
        seed: seeds the ``torch.Generator`` that draws S (the global RNG is neither used nor
            changed); the same seed gives the same S, on any device.
        params, method, dtype, max_memory: as in :func:`~lightning_ntk.ntk.empirical_ntk`
            (parameter names as in ``model.named_parameters()``). ``max_memory`` covers the
            (N1, N2, m) per-projection kernels the engine returns, its working memory, and
            the two (N1, N2) results.
        per_layer: also return each layer's sketched kernel (``layers``, keyed as
            :func:`~lightning_ntk.ntk.empirical_ntk`'s ``per_layer``), from the same pass.

    Returns:
        :class:`SketchedNTK` (``kernel``, ``stderr``, ``projections``, ``seed``,
        ``num_outputs``, ``relative_stderr``).

    Raises:
        NTKMemoryError: before computing, when the per-projection kernels (N1, N2, m) cannot
            be computed within ``max_memory``.
    """
    m = positive_int(projections, "projections", OWNER, hint="the number of random output projections, e.g. 64")
    seed = integer(seed, "seed", OWNER, minimum=0, maximum=_MAX_SEED)
    one_of(method, "method", METHODS, OWNER)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{OWNER}: model must be a torch.nn.Module, got {type(model).__name__}")
    with _as_sketch():
        check_autograd()
        # refuse batch-statistics BatchNorm before the forward pass below could move its running
        # statistics; the engine's own check would repeat the dropout warning: muted there
        _check_modes(model)
        # parameters chosen on the user's model, by the user's names; the engine gets the objects
        selected = select_parameters(model, params)
        device = selected[0][1].device
        dtype = resolve_dtype(dtype, selected)
        budget = resolve_max_memory(max_memory, device)
        first = prepare_input(x1, "x1", device, selected[0][1].dtype)
        n1 = first.shape[0]
        n2 = n1 if x2 is None or x2 is x1 else prepare_input(x2, "x2", device, dtype).shape[0]
        C = _num_outputs(model, first)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # the mean and the standard error: two (N1, N2) tensors beside the engine's budget
    results = 2 * n1 * n2 * itemsize
    engine_bytes = budget - results
    signs = rademacher_projections(m, C, seed, dtype=dtype)
    wrapped = _Projected(model, signs)
    per_projection: Optional[Tensor] = None
    layers: Dict[str, Tensor] = {}
    for names, as_layers in _engine_calls(selected, per_layer):
        # what earlier calls left in memory counts against the budget of the next
        held = 0 if per_projection is None else (per_projection.numel() + len(layers) * n1 * n2) * itemsize
        try:
            with _as_sketch(), _mute_dropout_warning():
                out = empirical_ntk(
                    wrapped, x1, x2, kind="diagonal", params=[p for n, p in selected if n in names], method=method,
                    dtype=dtype, max_memory=max(engine_bytes - held, 1), per_layer=as_layers,
                )
        except NTKMemoryError:
            need = n1 * n2 * m * itemsize * (len(_layer_names(selected)) if per_layer else 1) + results
            raise NTKMemoryError(
                f"{OWNER}: {m} projections of the ({n1}, {n2}) kernel in {dtype} need more than "
                f"max_memory={format_bytes(budget)} (at least {format_bytes(need)}: the (N1, N2, m) per-projection "
                f"kernels{' of each layer (per_layer=True)' if per_layer else ''} and the two (N1, N2) results, plus "
                "working memory). Use fewer projections (the standard error is proportional to 1/sqrt(m)), a smaller "
                "probe (fewer examples), or raise max_memory (bytes or a string such as '8GB')."
            ) from None
        if isinstance(out, dict):
            parts = {_user_layer(key, names): k for key, k in out.items()}
        else:
            parts = {layer_name(names[0]): out} if per_layer else {"": out}
        for key, k in parts.items():
            if per_layer:
                layers[key] = k.mean(dim=-1).div_(C)
            per_projection = k if per_projection is None else per_projection.add_(k)
    assert per_projection is not None
    if per_layer:  # in the order of empirical_ntk(per_layer=True): the model's parameter order
        layers = {key: layers[key] for key in _layer_names(selected)}
    kernel, stderr = _mean_and_stderr(per_projection, m)
    kernel.div_(C)
    stderr.div_(C)
    if x2 is None or x2 is x1:
        # the engine's (N, N, m) output is exactly symmetric; copy the upper triangle so the
        # reductions over m cannot break that (they may split differently per entry on many threads)
        kernel, stderr = _symmetrize(kernel), _symmetrize(stderr)
        layers = {key: _symmetrize(k) for key, k in layers.items()}
    return SketchedNTK(kernel=kernel, stderr=stderr, projections=m, seed=seed, num_outputs=C, layers=layers)


def _layer_names(selected: Sequence[Tuple[str, nn.Parameter]]) -> List[str]:
    """The layers of empirical_ntk(model, per_layer=True): owning modules in parameter order."""
    return list(dict.fromkeys(layer_name(n) for n, _ in selected))


def _engine_calls(selected: Sequence[Tuple[str, nn.Parameter]], per_layer: bool) -> List[Tuple[List[str], bool]]:
    """(parameter names, per_layer) of each engine call on the wrapper.

    One call, except for ``per_layer`` with several parameters registered on the model's root
    (e.g. ``pos`` and ``cls_token``): each is its own layer of the model, but in the wrapper they
    all belong to one module (``model``) and the engine would merge them. Those get one call
    each (m more backward passes per such parameter), the others one call together.
    """
    names = [n for n, _ in selected]
    root = [n for n in names if "." not in n]
    if not per_layer or len(root) <= 1:
        return [(names, per_layer)]
    rest = [n for n in names if "." in n]
    return ([(rest, True)] if rest else []) + [([n], False) for n in root]


def _user_layer(wrapped_layer: str, names: Sequence[str]) -> str:
    """A layer of the wrapper (``model.encoder.fc``, or ``model`` for parameters registered on the
    model's root) as empirical_ntk names it on the model (``encoder.fc``, or the parameter's name)."""
    if wrapped_layer.startswith("model."):
        return wrapped_layer[len("model."):]
    root = [n for n in names if "." not in n]
    assert wrapped_layer == "model" and len(root) == 1, (wrapped_layer, root)  # see _engine_calls
    return root[0]


def _mean_and_stderr(per_projection: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """Mean over the last axis and std (ddof=1) / sqrt(m); NaN standard error for m = 1."""
    if m == 1:
        kernel = per_projection[..., 0].clone()
        return kernel, torch.full_like(kernel, math.nan)
    std, mean = torch.std_mean(per_projection, dim=-1, correction=1)
    return mean, std.div_(math.sqrt(m))


def _symmetrize(k: Tensor) -> Tensor:
    """The upper triangle mirrored below the diagonal (exact: the upper entries are kept)."""
    return torch.triu(k) + torch.triu(k, 1).T


def _check_modes(model: nn.Module) -> None:
    """The engine's mode checks, with its warnings (active dropout) re-issued under our name
    and pointing at the caller of :func:`sketched_ntk`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_modes(model)
    for w in caught:
        msg = str(w.message)
        if msg.startswith("empirical_ntk"):
            msg = OWNER + msg[len("empirical_ntk"):]
        warnings.warn(msg, w.category, stacklevel=3)  # _check_modes <- sketched_ntk <- caller


@contextlib.contextmanager
def _mute_dropout_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"empirical_ntk: dropout module", category=RuntimeWarning)
        yield
