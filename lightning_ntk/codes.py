"""Activation codes of ReLU networks and what simple classifiers read from them.

He, Lei, Ji & Tao, "Neural networks behave as hash encoders: an empirical study"
(arXiv:2101.05490): the input space of a ReLU-like network is partitioned into linear
regions, one per activation pattern. The *code* of an input x is the pattern

    code(x) = concat over ReLU-like units u, in forward order, of 1[pre_u(x) > 0]

and the encoding properties are measured by

* redundancy ratio = (N - #unique codes) / N (their "determinism": near 0 when almost
  every linear region holds at most one example);
* categorization accuracy of k-NN (k = 9, Hamming distance), logistic regression and
  K-Means (clusters mapped to labels) on the binary codes.

Plus the change of codes between two snapshots: the fraction of examples whose code
changed and the mean normalised Hamming distance (the ReLU-pattern distance of Fort et
al. 2020, "Deep learning versus kernel learning").

Capture. ``capture="modules"`` (default) registers a forward *pre*-hook on every
ReLU-family module (``nn.ReLU``, ``nn.LeakyReLU``, ``nn.PReLU``, ``nn.RReLU`` by default;
configurable) and reads the module's input before it runs, so ``inplace=True`` is safe.
A functional call inside ``forward`` (``F.relu(x)``, ``torch.relu(x)``, ``x.relu()``) is
invisible to module hooks; ``capture="functional"`` records every call of the ReLU-family
functions during the forward pass through a ``torch.overrides.TorchFunctionMode``, which
sees module activations (they call the same functions) and functional calls alike.
Neither can see a ReLU written another way (``x.clamp(min=0)``, ``torch.where(x > 0, ...)``,
``torch.maximum``), nor anything inside a TorchScript or compiled graph. In ``"modules"``
mode with ``modules=None`` the first batch also counts the functional ReLU calls and warns
when some were not captured.

scikit-learn (an optional dependency) is imported only by the classifiers.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Type

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._args import function, integer, one_of, positive_int
from ._hygiene import module_device
from .task import tokens_at

__all__ = [
    "RELU_MODULE_TYPES",
    "ActivationCodes",
    "activation_codes",
    "redundancy_ratio",
    "hamming_distances",
    "knn_accuracy",
    "logistic_accuracy",
    "kmeans_clusters",
    "kmeans_accuracy",
    "cluster_accuracy",
    "CodeChange",
    "code_change",
]

#: Module types captured by default: activations whose only kink is at 0. ``nn.ReLU6`` and
#: ``nn.Hardtanh`` have a second kink, which one bit per unit does not record; pass them in
#: ``module_types`` to get 1[pre > 0] for them anyway.
RELU_MODULE_TYPES: Tuple[Type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU)

# functions recorded by capture="functional" (their first argument is the pre-activation)
_RELU_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
    F.leaky_relu, F.leaky_relu_, F.prelu, torch.prelu, F.rrelu, F.rrelu_, torch.rrelu,
    torch.rrelu_,
)


# --------------------------------------------------------------------------------------
# Container
# --------------------------------------------------------------------------------------
@dataclass
class ActivationCodes:
    """Packed activation codes of N examples.

    Attributes:
        packed: (N, ceil(n_units / 8)) uint8, ``np.packbits(bits, axis=1)`` (big-endian
            bit order, zero padding at the end of each row).
        n_units: number of bits per code.
        hashes: (N,) uint64, the first 8 bytes of BLAKE2b of each packed row: equal codes
            give equal hashes (unequal codes collide with probability ~2^-64).
        segments: (name, n_units) of each captured activation call, in forward order;
            a repeated call of one module gets a ``#k`` suffix. For a CNN, a segment's
            bits are the pre-activation tensor (C, H, W) flattened in C order.
    """

    packed: np.ndarray
    n_units: int
    hashes: np.ndarray
    segments: List[Tuple[str, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    def bits(self) -> np.ndarray:
        """Unpacked codes, (N, n_units) bool."""
        return np.unpackbits(self.packed, axis=1, count=self.n_units).astype(bool)

    def __getitem__(self, item: Any) -> "ActivationCodes":
        """Rows selected by an index, slice or boolean mask."""
        sel = np.arange(len(self))[item]
        sel = np.atleast_1d(sel)
        return ActivationCodes(self.packed[sel], self.n_units, self.hashes[sel], list(self.segments))

    @classmethod
    def from_bits(cls, bits: Any, segments: Optional[List[Tuple[str, int]]] = None) -> "ActivationCodes":
        """Build codes from a (N, n_units) 0/1 array."""
        b = np.asarray(bits)
        if b.ndim != 2:
            raise ValueError(f"bits must be 2-D (examples, units), got shape {b.shape}")
        if b.size and not np.all((b == 0) | (b == 1)):
            raise ValueError("bits must hold only 0/1 (or booleans)")
        packed = np.packbits(b.astype(bool), axis=1)
        return cls(packed, int(b.shape[1]), _row_hashes(packed),
                   segments if segments is not None else [("bits", int(b.shape[1]))])


def _row_hashes(packed: np.ndarray) -> np.ndarray:
    packed = np.ascontiguousarray(packed)
    out = np.empty(packed.shape[0], dtype=np.uint64)
    for i in range(packed.shape[0]):
        out[i] = int.from_bytes(hashlib.blake2b(packed[i].tobytes(), digest_size=8).digest(), "little")
    return out


# --------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------
class _FunctionalRecorder(TorchFunctionMode):
    """Records 1[input > 0] of every ReLU-family function call (optionally only counts)."""

    def __init__(self, record: bool, name_stack: Optional[List[str]] = None) -> None:
        super().__init__()
        self.record = record
        self.name_stack = name_stack
        self.calls: List[Tuple[str, torch.Tensor]] = []
        self.count = 0

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELU_FUNCTIONS:
            self.count += 1
            if self.record:
                x = args[0] if args else kwargs.get("input")
                where = self.name_stack[-1] if self.name_stack else ""
                label = f"{where}:{getattr(func, '__name__', 'relu')}" if where else getattr(func, "__name__", "relu")
                self.calls.append((label, (x.detach() > 0)))
        return func(*args, **kwargs)


def _resolve_modules(model: nn.Module, modules: Any,
                     module_types: Tuple[Type[nn.Module], ...]) -> List[Tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if modules is None:
        found = [(n, m) for n, m in named if isinstance(m, module_types)]
        if not found:
            raise ValueError(
                "the model has no module of the ReLU family "
                f"({', '.join(t.__name__ for t in module_types)}); if it applies ReLU "
                "functionally (F.relu / torch.relu inside forward) pass capture='functional', "
                "or name the modules with modules=[...] or widen module_types=")
        return found
    if isinstance(modules, (str, nn.Module)) or isinstance(modules, type):
        modules = [modules]
    by_name = dict(named)
    out: List[Tuple[str, nn.Module]] = []
    for m in modules:
        if isinstance(m, str):
            if m not in by_name:
                raise ValueError(f"module name {m!r} not found in the model; valid names include "
                                 f"{[n for n, _ in named if n][:10]}")
            out.append((m, by_name[m]))
        elif isinstance(m, type) and issubclass(m, nn.Module):
            out.extend((n, mod) for n, mod in named if isinstance(mod, m))
        elif isinstance(m, nn.Module):
            names = [n for n, mod in named if mod is m]
            if not names:
                raise ValueError(f"module {m.__class__.__name__} is not a submodule of the model")
            out.append((names[0], m))
        else:
            raise TypeError("modules must hold module names (str), nn.Module objects or module "
                            f"types; got {type(m).__name__}")
    unique: Dict[int, Tuple[str, nn.Module]] = {}
    for name, mod in out:  # a module selected twice (by name and by type) is hooked once
        unique.setdefault(id(mod), (name, mod))
    if not unique:
        raise ValueError("modules selected no module of the model")
    return list(unique.values())


def activation_codes(model: nn.Module, x: torch.Tensor, modules: Any = None, *,
                     capture: str = "modules",
                     module_types: Tuple[Type[nn.Module], ...] = RELU_MODULE_TYPES,
                     batch_size: int = 256,
                     forward_fn: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
                     positions: Optional[np.ndarray] = None) -> ActivationCodes:
    """Activation codes 1[pre-activation > 0] of every example of ``x``.

    Runs ``model`` under ``torch.no_grad()`` in batches, in the mode the caller set
    (call ``model.eval()`` first for deterministic codes with BatchNorm/Dropout), and
    leaves the mode unchanged.

    Args:
        model: the network.
        x: inputs, (N, ...); moved batch by batch to the model's device.
        modules: ``None``: every module that is an instance of ``module_types``; or a list
            of module names, module objects or module types (only with ``capture="modules"``).
        capture: ``"modules"`` (forward pre-hooks on activation modules) or
            ``"functional"`` (every ReLU-family function call during the forward pass).
        module_types: activation types captured when ``modules`` is None.
        batch_size: examples per forward pass.
        forward_fn: ``forward_fn(model, xb)`` runs the forward pass (default ``model(xb)``),
            for models called another way; its output is discarded.
        positions: per-token codes of sequences: (N, P) positions (-1: none, see
            :func:`lightning_ntk.task.token_positions`); every captured activation must be
            per token (B, T, ...), and each chosen (sequence, position) pair is one code
            (its units at that position), in row-major pair order.

    Returns:
        :class:`ActivationCodes` with the bits of every captured call concatenated in
        forward order (spatial positions flattened, channel-major).
    """
    one_of(capture, "capture", ("modules", "functional"), "activation_codes")
    if capture == "functional" and modules is not None:
        raise ValueError("modules= selects hooked modules and only applies to capture='modules'; "
                         "capture='functional' records every ReLU-family call")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of inputs, got {type(x).__name__}")
    positive_int(int(batch_size), "batch_size", "activation_codes")
    function(forward_fn, "forward_fn", "activation_codes", signature="(model, x) -> outputs")
    run = (lambda xb: forward_fn(model, xb)) if forward_fn is not None else model
    device = module_device(model, x.device)
    module_name = {id(m): n for n, m in model.named_modules()}
    targets = _resolve_modules(model, modules, module_types) if capture == "modules" else []

    packed_rows: List[np.ndarray] = []
    segments: Optional[List[Tuple[str, int]]] = None
    n_units = 0
    for start in range(0, x.shape[0], int(batch_size)):
        xb = x[start:start + int(batch_size)].to(device)
        calls, missed = _capture_batch(model, run, xb, capture, targets, module_name,
                                       check_functional=(capture == "modules" and modules is None
                                                         and start == 0))
        if missed:
            warnings.warn(f"{missed} ReLU-family function call(s) ran outside the hooked modules "
                          "(e.g. F.relu inside forward) and are not in the codes; pass "
                          "capture='functional' to record them", RuntimeWarning, stacklevel=2)
        if not calls:
            raise ValueError("no ReLU-family activation ran during the forward pass: activation codes are "
                             "defined for ReLU networks; to code another activation by the sign of its input, "
                             "pass module_types= (e.g. (nn.Tanh,)) or modules=[...] naming its modules")
        b = xb.shape[0]
        flat = []
        seg: List[Tuple[str, int]] = []
        counts: Dict[str, int] = {}
        for name, t in calls:
            if t.ndim == 0 or t.shape[0] != b:
                raise ValueError(f"activation {name!r} input has shape {tuple(t.shape)}, whose first "
                                 f"axis is not the batch ({b}); leave it out with capture='modules' "
                                 "and modules=[...] naming the activations to capture")
            k = counts.get(name, 0)
            counts[name] = k + 1
            if positions is not None:
                if t.ndim < 3:
                    raise ValueError(f"activation {name!r} has shape {tuple(t.shape)}, not per token (B, T, ...): "
                                     "per-token codes need every captured activation per token; pass modules= "
                                     "naming the per-token activations")
                t = tokens_at(t, positions[start:start + b])
            seg.append((name if k == 0 else f"{name}#{k}", int(np.prod(t.shape[1:]))))
            flat.append(t.reshape(t.shape[0], -1).cpu())
        bits = torch.cat(flat, dim=1).numpy()
        if segments is None:
            segments, n_units = seg, bits.shape[1]
        elif seg != segments:
            raise ValueError("the captured activations differ between batches (data-dependent "
                             f"control flow?): {seg[:3]}... vs {segments[:3]}...")
        packed_rows.append(np.packbits(bits, axis=1))
    if segments is None:
        raise ValueError("x holds no examples")
    packed = np.concatenate(packed_rows, axis=0)
    return ActivationCodes(packed=packed, n_units=n_units, hashes=_row_hashes(packed), segments=segments)


def _capture_batch(model: nn.Module, run: Callable[[torch.Tensor], Any], xb: torch.Tensor, capture: str,
                   targets: List[Tuple[str, nn.Module]], module_name: Dict[int, str],
                   check_functional: bool) -> Tuple[List[Tuple[str, torch.Tensor]], int]:
    calls: List[Tuple[str, torch.Tensor]] = []
    handles = []
    try:
        if capture == "modules":
            def make_hook(name: str) -> Callable:
                def hook(mod: nn.Module, inputs: tuple) -> None:
                    calls.append((name, inputs[0].detach() > 0))
                return hook

            for name, mod in targets:
                handles.append(mod.register_forward_pre_hook(make_hook(name or mod.__class__.__name__)))
            with torch.no_grad():
                if check_functional:
                    with _FunctionalRecorder(record=False) as counter:
                        run(xb)
                    return calls, max(counter.count - len(calls), 0)
                run(xb)
            return calls, 0
        stack: List[str] = []

        def push(mod: nn.Module, inputs: tuple) -> None:
            stack.append(module_name.get(id(mod), mod.__class__.__name__) or mod.__class__.__name__)

        def pop(mod: nn.Module, inputs: tuple, output: Any) -> None:
            if stack:
                stack.pop()

        for mod in model.modules():
            handles.append(mod.register_forward_pre_hook(push))
            handles.append(mod.register_forward_hook(pop))
        with torch.no_grad(), _FunctionalRecorder(record=True, name_stack=stack) as rec:
            run(xb)
        return rec.calls, 0
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------
def _packed(codes: Any, n_units: Optional[int] = None) -> Tuple[np.ndarray, int]:
    if isinstance(codes, ActivationCodes):
        return codes.packed, codes.n_units
    a = np.asarray(codes)
    if a.ndim != 2:
        raise ValueError(f"codes must be ActivationCodes or a 2-D array, got shape {a.shape}")
    if a.dtype == np.uint8 and n_units is not None:
        return a, int(n_units)
    if a.size and not np.all((a == 0) | (a == 1)):
        raise ValueError("codes given as an array must be 0/1 bits (N, n_units), or packed uint8 "
                         "with n_units= given")
    return np.packbits(a.astype(bool), axis=1), int(a.shape[1])


def redundancy_ratio(codes: Any) -> float:
    """(N - #unique codes) / N, counting exact code equality (He et al.)."""
    packed, _ = _packed(codes)
    n = packed.shape[0]
    if n == 0:
        raise ValueError("redundancy_ratio needs at least one code")
    rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
    return float((n - np.unique(rows).shape[0]) / n)


if hasattr(np, "bitwise_count"):
    def _popcount(a: np.ndarray) -> np.ndarray:
        return np.bitwise_count(a)
else:  # numpy < 2.0
    _POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(a: np.ndarray) -> np.ndarray:
        return _POPCOUNT_TABLE[a]


def hamming_distances(a: Any, b: Any = None, *, normalized: bool = False,
                      chunk_bytes: int = 1 << 25) -> np.ndarray:
    """Pairwise Hamming distances between codes: (Na, Nb) counts of differing bits.

    d(u, v) = |u| + |v| - 2 <u, v>, with the inner products of 0/1 vectors taken by a
    float32 matrix product over blocks of units (exact: each block has fewer than 2^24
    units) and summed in int64. The unpacked blocks take about ``chunk_bytes`` of memory.
    ``normalized=True`` divides by the number of units.
    """
    pa, na = _packed(a)
    pb, nb = (pa, na) if b is None else _packed(b)
    if na != nb:
        raise ValueError(f"codes have different lengths: {na} and {nb} units")
    out = _hamming_packed(pa, None if b is None else pb, na, int(chunk_bytes))
    return out / na if normalized else out


def _hamming_packed(pa: np.ndarray, pb: Optional[np.ndarray], n_units: int, chunk_bytes: int) -> np.ndarray:
    """Hamming distances of packed codes (pb None: pa against itself)."""
    rows = pa.shape[0] + (0 if pb is None else pb.shape[0])
    block_bytes = max(1, min(chunk_bytes // max(1, 4 * rows), (1 << 24) // 8))  # packed bytes per block
    out = np.zeros((pa.shape[0], pa.shape[0] if pb is None else pb.shape[0]), dtype=np.int64)
    for s in range(0, pa.shape[1], block_bytes):
        n_bits = min(n_units - 8 * s, 8 * block_bytes)
        xa = np.unpackbits(pa[:, s:s + block_bytes], axis=1, count=n_bits).astype(np.float32)
        xb = xa if pb is None else np.unpackbits(pb[:, s:s + block_bytes], axis=1, count=n_bits).astype(np.float32)
        inner = np.rint(xa @ xb.T).astype(np.int64)
        out += xa.sum(axis=1, dtype=np.int64)[:, None] + xb.sum(axis=1, dtype=np.int64)[None, :] - 2 * inner
    return out


def _labels(y: Any, name: str, n: int) -> np.ndarray:
    a = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} labels for {n} codes")
    return a


_KNN_CHUNK_BYTES = 1 << 25


def knn_accuracy(train_codes: Any, y_train: Any, test_codes: Any, y_test: Any, k: int = 9) -> float:
    """Accuracy of the k-nearest-neighbour classifier under Hamming distance (He et al.: k = 9).

    The same predictions as scikit-learn's ``KNeighborsClassifier(n_neighbors=k,
    metric="hamming", algorithm="brute")`` on the 0/1 bits (the algorithm its "auto" picks
    for codes of more than 15 units, and the one a precomputed metric uses), ties included:
    the k nearest training codes are chosen as its brute-force search chooses them,
    ``numpy.argpartition`` of the normalised float64 distances (which of several equidistant
    codes at the k-th distance gets in is decided by that partition, not by position), and a
    tied vote goes to the smallest label. Without scikit-learn's distance computation: the
    Hamming distances come from packed bits by blocks of float32 products (exact), in chunks
    of test rows.
    """
    ptr, units = _packed(train_codes)
    pte, units_test = _packed(test_codes)
    ytr = _labels(y_train, "y_train", ptr.shape[0])
    yte = _labels(y_test, "y_test", pte.shape[0])
    k = integer(int(k), "k", "knn_accuracy", minimum=1, maximum=ptr.shape[0],
                hint="at most the number of training codes")
    if units_test != units:
        raise ValueError(f"train and test codes have different lengths: {units} and {units_test} units")
    classes, ytr_i = np.unique(ytr, return_inverse=True)
    pred = np.empty(pte.shape[0], dtype=np.int64)
    rows = max(1, _KNN_CHUNK_BYTES // max(1, 8 * ptr.shape[0]))  # distances of one chunk of test rows
    for s in range(0, pte.shape[0], rows):
        # scikit-learn's metric="hamming" gives the fraction of differing bits in float64
        d = _hamming_packed(pte[s:s + rows], ptr, units, _KNN_CHUNK_BYTES) / max(units, 1)
        nearest = np.argpartition(d, k - 1, axis=1)[:, :k]  # sklearn's _kneighbors_reduce_func
        votes = np.zeros((d.shape[0], classes.shape[0]), dtype=np.int64)
        np.add.at(votes, (np.repeat(np.arange(d.shape[0]), k), ytr_i[nearest].reshape(-1)), 1)
        pred[s:s + rows] = np.argmax(votes, axis=1)  # first maximum: the smallest label (sklearn's mode)
    return float(np.mean(classes[pred] == yte))


def _bits_float(codes: Any) -> np.ndarray:
    packed, n = _packed(codes)
    return np.unpackbits(packed, axis=1, count=n).astype(np.float32)


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("this measure needs scikit-learn: pip install scikit-learn "
                          "(or lightning-ntk[analysis])") from err


def logistic_accuracy(train_codes: Any, y_train: Any, test_codes: Any, y_test: Any, *,
                      estimator: Any = None, seed: int = 0) -> float:
    """Test accuracy of logistic regression fitted on the training codes (bits as 0/1 features).

    Default estimator: ``LogisticRegression(max_iter=1000)`` (multinomial, L2, C = 1).
    He et al.'s released code used ``OneVsOneClassifier(LogisticRegression(solver="liblinear"))``;
    pass it as ``estimator=`` to reproduce that setting.
    """
    _require_sklearn()
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression

    xtr, xte = _bits_float(train_codes), _bits_float(test_codes)
    ytr = _labels(y_train, "y_train", xtr.shape[0])
    yte = _labels(y_test, "y_test", xte.shape[0])
    est = LogisticRegression(max_iter=1000, random_state=seed) if estimator is None else clone(estimator)
    est.fit(xtr, ytr)
    return float(np.mean(est.predict(xte) == yte))


def cluster_accuracy(cluster_ids: Any, labels: Any, mapping: str = "hungarian") -> float:
    """Accuracy of a clustering once clusters are mapped to labels.

    With the contingency table n[c, l] (examples of cluster c with label l):

    * ``"hungarian"``: the one-to-one map maximising sum n[c, map(c)]
      (``scipy.optimize.linear_sum_assignment``); with more clusters than labels the
      unmatched clusters count as wrong. This is what He et al.'s released code computes.
    * ``"greedy"``: each cluster takes its majority label (several clusters may take the
      same label; also called purity). Ties go to the smallest label.
    * ``"greedy_matching"``: one-to-one, built greedily: repeatedly take the largest
      remaining n[c, l] whose cluster and label are both still free.

    Returns sum_c n[c, map(c)] / N.
    """
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(cluster_ids).reshape(-1)
    y = _labels(labels, "labels", c.shape[0])
    if c.shape[0] == 0:
        raise ValueError("cluster_accuracy needs at least one example")
    _, ci = np.unique(c, return_inverse=True)
    _, yi = np.unique(y, return_inverse=True)
    table = np.zeros((ci.max() + 1, yi.max() + 1), dtype=np.int64)
    np.add.at(table, (ci, yi), 1)
    one_of(mapping, "mapping", ("hungarian", "greedy", "greedy_matching"), "cluster_accuracy")
    if mapping == "hungarian":
        r, l = linear_sum_assignment(-table)
        hit = table[r, l].sum()
    elif mapping == "greedy":
        hit = table.max(axis=1).sum()
    else:  # "greedy_matching"
        flat = np.argsort(-table, axis=None, kind="stable")
        used_c = np.zeros(table.shape[0], bool)
        used_l = np.zeros(table.shape[1], bool)
        hit = 0
        for f in flat:
            i, j = divmod(int(f), table.shape[1])
            if not used_c[i] and not used_l[j]:
                used_c[i] = used_l[j] = True
                hit += table[i, j]
    return float(hit / c.shape[0])


def kmeans_clusters(codes: Any, n_clusters: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster ids (N,) of scikit-learn's ``KMeans(n_clusters, n_init=n_init, random_state=seed)``
    on the codes (bits as 0/1 float32 features).

    Score one clustering under several mappings with :func:`cluster_accuracy`.
    """
    _require_sklearn()
    from sklearn.cluster import KMeans

    x = _bits_float(codes)
    k = integer(int(n_clusters), "n_clusters", "kmeans_clusters", minimum=1, maximum=x.shape[0],
                hint="at most the number of codes")
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)


def kmeans_accuracy(codes: Any, y: Any, *, n_clusters: Optional[int] = None,
                    mapping: str = "hungarian", seed: int = 0, n_init: int = 10) -> float:
    """K-Means on the codes (bits as 0/1 features), scored by :func:`cluster_accuracy`.

    ``n_clusters`` defaults to the number of distinct labels (He et al.); scikit-learn's
    ``KMeans(n_clusters, n_init=n_init, random_state=seed)`` (:func:`kmeans_clusters`).
    """
    labels = _labels(y, "y", _packed(codes)[0].shape[0])
    k = int(np.unique(labels).shape[0]) if n_clusters is None else int(n_clusters)
    ids = kmeans_clusters(codes, k, seed=seed, n_init=n_init)
    return cluster_accuracy(ids, labels, mapping=mapping)


class CodeChange(NamedTuple):
    """Change of the codes of the same examples between two snapshots."""

    fraction_changed: float  # fraction of examples whose code differs in at least one bit
    mean_hamming: float  # mean over examples of (differing bits) / n_units


def code_change(prev: Any, cur: Any) -> CodeChange:
    """Fraction of examples whose code changed, and the mean normalised Hamming distance
    between each example's previous and current code (Fort et al. 2020)."""
    pp, n_prev = _packed(prev)
    pc, n_cur = _packed(cur)
    if pp.shape[0] != pc.shape[0] or n_prev != n_cur:
        raise ValueError("prev and cur must hold codes of the same examples and units: got "
                         f"({pp.shape[0]}, {n_prev}) and ({pc.shape[0]}, {n_cur})")
    if pp.shape[0] == 0:
        raise ValueError("code_change needs at least one example")
    d = _popcount(np.bitwise_xor(pp, pc)).sum(axis=1, dtype=np.int64)
    return CodeChange(fraction_changed=float(np.mean(d > 0)), mean_hamming=float(np.mean(d) / n_prev))
