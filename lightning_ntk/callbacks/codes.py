"""ActivationCodeMonitor: activation codes of a ReLU network on a training and a held-out probe.

He, Lei, Ji & Tao, "Neural networks behave as hash encoders: an empirical study"
(arXiv:2101.05490): the code of an input is its activation pattern 1[pre-activation > 0]
over every hidden ReLU unit. At each snapshot this monitor computes the codes of a
training probe and of a held-out probe (:func:`lightning_ntk.codes.activation_codes`) and
records the redundancy ratio, how well simple classifiers read the labels from the codes
(k-NN under Hamming distance, logistic regression, k-means) and how much the codes moved
since the previous snapshot (Fort et al. 2020's ReLU-pattern distance).

The held-out machinery (:class:`HeldoutProbeMonitor`) is shared with
:class:`~lightning_ntk.callbacks.representations.RepresentationMonitor`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

import numpy as np
import torch
from torch import nn

from ..codes import (RELU_MODULE_TYPES, ActivationCodes, activation_codes, cluster_accuracy, code_change,
                     kmeans_clusters, knn_accuracy, logistic_accuracy, redundancy_ratio)
from ..probe import Probe, ProbeSet, _trainer_dataloader, stratified_indices
from ..schedule import LogSpacedSteps, Schedule
from ..store import Field
from .._hygiene import module_device
from ._base import Monitor, TableSpec

#: ``heldout=`` accepted values: ``"auto"``, None, a Probe, a ProbeSet or a pair (x, y).
HeldoutLike = Union[str, Probe, ProbeSet, Tuple[torch.Tensor, torch.Tensor], None]

#: Default size of each probe (training and held-out): at most this many examples.
DEFAULT_PROBE_SIZE = 512

_CODE_MEASURES = ("redundancy", "knn", "logistic", "kmeans", "code_change")
_SKLEARN_CODE_MEASURES = ("logistic", "kmeans")


def require_sklearn(owner: str, what: str, hint: str) -> None:
    """Raise a clear ImportError when scikit-learn (optional extra ``analysis``) is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{owner}: {what} need(s) scikit-learn, which is not installed: pip install scikit-learn "
            f"(or pip install 'lightning-ntk[analysis]'); {hint}"
        ) from err


@contextlib.contextmanager
def limited_threads(n: Optional[int]) -> Iterator[None]:
    """Limit BLAS/OpenMP threads (threadpoolctl, shipped with scikit-learn) to ``n`` inside; None: as is."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn depends on threadpoolctl
        yield
        return
    with threadpool_limits(limits=int(n)):
        yield


def class_labels(probe: ProbeSet, owner: str, what: str) -> np.ndarray:
    """The probe's targets as a 1-D integer label array, or a clear error."""
    y = probe.y
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"{owner}: {what} need(s) integer class labels, but probe {probe.name!r} has targets of dtype "
            f"{y.dtype} and shape {tuple(y.shape)}"
        )
    return y.detach().cpu().numpy()


def fixed_split(labels: np.ndarray, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions (fit, evaluate) of a fixed split of one probe, used when there is no held-out probe.

    evaluate = ``stratified_indices(labels, N // 2, seed)`` (half the probe, stratified by
    class, sorted); fit = the other positions, sorted.
    """
    n = labels.shape[0]
    if n < 2:
        raise ValueError(f"a probe of {n} example(s) cannot be split into fit and evaluation halves")
    evaluate = stratified_indices(labels, n // 2, seed)
    fit = np.setdiff1d(np.arange(n), evaluate)
    return fit, evaluate


def _map_style_length(loader: Any) -> Optional[int]:
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        return None
    return len(dataset)


def _describe_modules(modules: Any) -> Any:
    if modules is None:
        return None
    items = modules if isinstance(modules, (list, tuple)) else [modules]
    return [m if isinstance(m, str) else m.__name__ if isinstance(m, type) else type(m).__name__ for m in items]


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class HeldoutProbeMonitor(Monitor):
    """A monitor with two probes: a training probe (``probe=``) and a held-out probe (``heldout=``).

    Defaults: ``Probe(size=512, source="train")`` and, when the Trainer has a validation
    dataloader, ``Probe(size=512, source="val")``; each default takes the whole dataset
    when it has fewer than 512 examples. An explicit ``Probe`` is drawn as given (too large
    a size is an error).

    Args:
        heldout: ``"auto"`` (default: the validation set when there is one, else none),
            None (no held-out probe), a :class:`~lightning_ntk.probe.Probe` (e.g.
            ``Probe(size=1000, source="val")``), a ProbeSet, or a pair of tensors ``(x, y)``
            (stored as ``/probe/heldout``).
        seed: seed of the fixed split of the training probe used when there is no
            held-out probe, and of the measures' own randomness.
        classifier_threads: BLAS/OpenMP threads for the scikit-learn measures (None: as
            configured). One by default: the problems are small, and on a busy machine
            more threads were measured to slow a 512-example logistic fit from 0.2 s to 13 s.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.

    The held-out probe is drawn in ``on_train_start`` *before* the base class's hook runs,
    because the base declares the tables (whose shapes and coordinates depend on it) and
    takes the step-0 snapshot there.
    """

    default_probe_size = DEFAULT_PROBE_SIZE

    def __init__(self, path: str, *, heldout: HeldoutLike = "auto", seed: int = 0,
                 classifier_threads: Optional[int] = 1, **kwargs: Any):
        self._default_probe = kwargs.get("probe") is None
        super().__init__(path, **kwargs)
        owner = type(self).__name__
        self.heldout = self._as_heldout(heldout)
        self.seed = _check_int(owner, "seed", seed, 0)
        if classifier_threads is not None:
            _check_int(owner, "classifier_threads", classifier_threads, 1)
        self.classifier_threads = classifier_threads
        self._heldout_set: Optional[ProbeSet] = None
        self._heldout_on_device: Optional[ProbeSet] = None
        self._split: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._loaded_heldout_index: Optional[List[int]] = None

    def _as_heldout(self, heldout: HeldoutLike) -> Union[str, Probe, ProbeSet, None]:
        if heldout is None or isinstance(heldout, (Probe, ProbeSet)):
            return heldout
        if isinstance(heldout, str):
            if heldout != "auto":
                raise ValueError(f"{type(self).__name__}: heldout must be 'auto', None, a Probe, a ProbeSet or a "
                                 f"pair of tensors (x, y); got the string {heldout!r}")
            return heldout
        if isinstance(heldout, (tuple, list)) and len(heldout) == 2:
            return ProbeSet.from_tensors(heldout[0], heldout[1], name="heldout")
        raise TypeError(f"{type(self).__name__}: heldout must be 'auto', None, a lightning_ntk.Probe, a ProbeSet or "
                        f"a pair of tensors (x, y); got {type(heldout).__name__}")

    @property
    def heldout_set(self) -> Optional[ProbeSet]:
        """The drawn held-out probe (from ``on_train_start``), or None."""
        return self._heldout_set

    # ------------------------------------------------------------ drawing and declaring
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._default_probe:
            n = _map_style_length(_trainer_dataloader(trainer, "train"))
            if n is not None:  # else the base's draw reports the unusable dataset
                self.probe = Probe(size=min(DEFAULT_PROBE_SIZE, n), source="train")
        self._heldout_set = self._draw_heldout(trainer)
        self._heldout_on_device = None
        self._split = None
        loaded = self._loaded_heldout_index if self._loaded_state is not None else None
        drawn = None if self._heldout_set is None else self._heldout_set.index.tolist()
        if self._loaded_state is not None and loaded != drawn:
            raise RuntimeError(
                f"{type(self).__name__}: the held-out probe drawn on resume differs from the checkpoint's (the "
                "validation data or the heldout= setting changed); resume with the same data and settings"
            )
        super().on_train_start(trainer, pl_module)

    def _draw_heldout(self, trainer: Any) -> Optional[ProbeSet]:
        heldout = self.heldout
        if heldout is None:
            return None
        if isinstance(heldout, str):  # "auto"
            try:
                loader = _trainer_dataloader(trainer, "val")
            except ValueError:  # no validation dataloader in this run
                return None
            n = _map_style_length(loader)
            if n is None:
                warnings.warn(f"{type(self).__name__}: the validation dataloader has no map-style dataset to draw a "
                              "held-out probe from; going on without one (pass heldout=(x, y) to give it)",
                              RuntimeWarning, stacklevel=2)
                return None
            if n == 0:
                return None
            heldout = Probe(size=min(DEFAULT_PROBE_SIZE, n), source="val")
        drawn = heldout.draw(trainer) if isinstance(heldout, Probe) else heldout
        if drawn.name == self.probe.name:
            raise ValueError(
                f"{type(self).__name__}: the held-out probe and the training probe are both named {drawn.name!r}; "
                "give the held-out Probe another name= (each is stored as /probe/<name>)"
            )
        return drawn

    def _declare(self, pl_module: nn.Module) -> None:
        if self._heldout_set is not None:
            self._write_probe(self._heldout_set, self.heldout.store_inputs if isinstance(self.heldout, Probe) else None)
        super()._declare(pl_module)

    def _heldout_for(self, pl_module: nn.Module) -> Optional[ProbeSet]:
        if self._heldout_set is None:
            return None
        device = module_device(pl_module)
        if self._heldout_on_device is None or self._heldout_on_device.x.device != device:
            self._heldout_on_device = self._heldout_set.to(device)
        return self._heldout_on_device

    def _fixed_split(self, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if self._split is None:
            self._split = fixed_split(labels, self.seed)
        return self._split

    @property
    def evaluation(self) -> str:
        """``"heldout"`` (fit on the training probe, score on the held-out one) or ``"split"``."""
        return "heldout" if self._heldout_set is not None else "split"

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        coords = super().coords(probe)
        if self._heldout_set is not None:
            coords["heldout_example"] = self._heldout_set.index
        return coords

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        specs = super().table_specs(probe, pl_module)
        for spec in specs:
            spec.attrs.update(heldout_probe=self._heldout_set.name if self._heldout_set is not None else "",
                              evaluation=self.evaluation)
        return specs

    # ------------------------------------------------------------ config and state
    def config(self) -> Dict[str, Any]:
        held = self._heldout_set
        if held is not None:
            heldout: Any = (self.heldout.to_config() if isinstance(self.heldout, Probe) else
                            {"name": held.name, "size": len(held), "source": held.source})
        else:
            heldout = None
        return dict(super().config(), heldout=heldout, heldout_setting=self.heldout if isinstance(self.heldout, str)
                    or self.heldout is None else type(self.heldout).__name__, evaluation=self.evaluation,
                    seed=self.seed, classifier_threads=self.classifier_threads)

    def extra_state(self) -> Dict[str, Any]:
        return {"heldout_index": None if self._heldout_set is None else self._heldout_set.index.tolist()}

    def load_extra_state(self, state: Any) -> None:
        self._loaded_heldout_index = state.get("heldout_index")

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["_heldout_on_device"] = None
        return state


class ActivationCodeMonitor(HeldoutProbeMonitor):
    """Activation codes (He, Lei et al.) of a training and a held-out probe, and what they encode.

    Per snapshot, into the table ``/codes`` (see docs/format.md):

    * ``n_units``: bits per code (hidden ReLU-family units, spatial positions included);
    * ``redundancy_ratio_train`` / ``redundancy_ratio_heldout``: (N − #unique codes) / N;
    * ``knn_accuracy``: k-NN (``k``, default 9, Hamming distance) fitted on the training
      probe's codes, scored on the held-out probe's codes and labels;
    * ``logistic_accuracy``: ``LogisticRegression(max_iter=1000)`` on the bits, same split;
    * ``kmeans_accuracy_hungarian`` / ``kmeans_accuracy_greedy``: one ``KMeans`` (k = number
      of labels, ``kmeans_n_init`` restarts) on the training probe's codes, scored with the
      one-to-one Hungarian matching of clusters to labels (what He et al.'s released code
      computes) and with the greedy majority label per cluster (purity);
    * ``code_change_fraction_<probe>`` / ``code_change_hamming_<probe>``: the fraction of
      examples whose code changed since the previous snapshot, and the mean normalised
      Hamming distance to it (NaN at the first snapshot);
    * ``codes_train`` / ``codes_heldout``: the packed codes, (N, ⌈n_units / 8⌉) uint8
      (``np.packbits``), when ``store_codes=True``.

    Without a held-out probe, k-NN and logistic regression are fitted on one half of the
    training probe and scored on the other (:func:`fixed_split`: a stratified half chosen
    with ``seed``); both halves are training examples, so this measures how well the codes
    separate the classes of the training data, not generalisation. The heldout fields are
    then absent. k-means always runs on the training probe.

    Args:
        heldout: see :class:`HeldoutProbeMonitor`.
        modules, capture, module_types: what to capture, as in
            :func:`lightning_ntk.codes.activation_codes` (ReLU-family modules by default;
            ``capture="functional"`` for ``F.relu`` inside ``forward``).
        measures: any of ``"redundancy"``, ``"knn"``, ``"logistic"``, ``"kmeans"``,
            ``"code_change"`` (default: all). ``"logistic"`` and ``"kmeans"`` need scikit-learn.
        k: neighbours of the k-NN classifier (He et al.: 9).
        kmeans_n_init: k-means restarts (10, as in He et al.'s scikit-learn version).
        store_codes: also store the packed codes of each snapshot.
        schedule: default ``LogSpacedSteps(per_decade=4)`` (steps 0, 1, 2, 3, 6, 10, 18, 32,
            56, 100, ... and the end of training). A snapshot of the demo CNN (3136 units,
            512 + 357 examples, CPU) took about 1 s (0.7-1.6 s on a busy 2-core machine): the
            two forward passes with hooks ~0.45 s, k-means (10 restarts) ~0.3 s, logistic
            ~0.2 s. Log spacing makes the total grow with the logarithm of the training
            length, and resolves the early phase, where codes change fastest.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor` (``probe``, ``batch_size``, ...).
    """

    quantity = "codes"

    def __init__(self, path: str, *, heldout: HeldoutLike = "auto", modules: Any = None, capture: str = "modules",
                 module_types: Tuple[Type[nn.Module], ...] = RELU_MODULE_TYPES,
                 measures: Sequence[str] = _CODE_MEASURES, k: int = 9, kmeans_n_init: int = 10,
                 store_codes: bool = False, seed: int = 0, classifier_threads: Optional[int] = 1, **kwargs: Any):
        super().__init__(path, heldout=heldout, seed=seed, classifier_threads=classifier_threads, **kwargs)
        owner = type(self).__name__
        if capture not in ("modules", "functional"):
            raise ValueError(f"{owner}: capture must be 'modules' or 'functional', got {capture!r}")
        if capture == "functional" and modules is not None:
            raise ValueError(f"{owner}: modules= selects hooked modules and only applies to capture='modules'")
        if isinstance(measures, str) or not all(isinstance(m, str) for m in measures):
            raise TypeError(f"{owner}: measures must be a sequence of names from {_CODE_MEASURES}, got {measures!r}")
        unknown = [m for m in measures if m not in _CODE_MEASURES]
        if unknown or not measures:
            raise ValueError(f"{owner}: measures must be a non-empty selection of {_CODE_MEASURES}; "
                             f"unknown: {unknown}")
        self.measures = tuple(m for m in _CODE_MEASURES if m in measures)
        self.k = _check_int(owner, "k", k, 1)
        self.kmeans_n_init = _check_int(owner, "kmeans_n_init", kmeans_n_init, 1)
        needs = [m for m in self.measures if m in _SKLEARN_CODE_MEASURES]
        if needs:
            kept = tuple(m for m in self.measures if m not in _SKLEARN_CODE_MEASURES) or ("redundancy",)
            require_sklearn(owner, f"measures {needs}", f"or pass measures={kept} to go without")
        self.modules = modules
        self.capture = capture
        self.module_types = tuple(module_types)
        self.store_codes = bool(store_codes)
        self._n_bytes: Optional[int] = None
        self._segments: List[Tuple[str, int]] = []
        self._previous: Dict[str, ActivationCodes] = {}

    def default_schedule(self) -> Schedule:
        return LogSpacedSteps(per_decade=4)

    @property
    def _classifies(self) -> bool:
        return any(m in self.measures for m in ("knn", "logistic", "kmeans"))

    def config(self) -> Dict[str, Any]:
        return dict(super().config(), measures=list(self.measures), k=self.k, kmeans_n_init=self.kmeans_n_init,
                    store_codes=self.store_codes, capture=self.capture,
                    modules=_describe_modules(self.modules),
                    module_types=[t.__name__ for t in self.module_types])

    def _codes(self, pl_module: nn.Module, x: torch.Tensor) -> ActivationCodes:
        return activation_codes(pl_module, x, self.modules, capture=self.capture, module_types=self.module_types,
                                batch_size=self.batch_size, forward_fn=self.forward_fn)

    def _check_probes(self, probe: ProbeSet) -> None:
        if not self._classifies:
            return
        owner = type(self).__name__
        what = "measures " + str([m for m in self.measures if m in ("knn", "logistic", "kmeans")])
        labels = class_labels(probe, owner, what)
        if self._heldout_set is not None:
            class_labels(self._heldout_set, owner, what)
            n_fit = len(probe)
        else:
            n_fit = len(probe) - len(probe) // 2
        if "knn" in self.measures and n_fit < self.k:
            raise ValueError(f"{owner}: k-NN with k={self.k} needs at least {self.k} codes to fit on; the "
                             f"{'training probe' if self._heldout_set is not None else 'fit half of the training probe'}"
                             f" has {n_fit}. Use a larger probe or a smaller k")
        if "kmeans" in self.measures and np.unique(labels).shape[0] > len(probe):
            raise ValueError(f"{owner}: k-means needs at least as many codes as labels")

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        assert probe is not None
        self._check_probes(probe)
        sample = self._codes(pl_module, probe.x[:1])
        self._n_bytes = int(sample.packed.shape[1])
        self._segments = list(sample.segments)
        held = self._heldout_set is not None
        fields = [Field("n_units", (), "int64")]
        if "redundancy" in self.measures:
            fields.append(Field("redundancy_ratio_train"))
            if held:
                fields.append(Field("redundancy_ratio_heldout"))
        if "knn" in self.measures:
            fields.append(Field("knn_accuracy"))
        if "logistic" in self.measures:
            fields.append(Field("logistic_accuracy"))
        if "kmeans" in self.measures:
            fields += [Field("kmeans_accuracy_hungarian"), Field("kmeans_accuracy_greedy")]
        if "code_change" in self.measures:
            for which in ("train", "heldout") if held else ("train",):
                fields += [Field(f"code_change_fraction_{which}"), Field(f"code_change_hamming_{which}")]
        if self.store_codes:
            fields.append(Field("codes_train", (len(probe), self._n_bytes), "uint8",
                                dims=("probe_example", "code_byte")))
            if held:
                fields.append(Field("codes_heldout", (len(self._heldout_set), self._n_bytes), "uint8",
                                    dims=("heldout_example", "code_byte")))
        return fields

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        specs = super().table_specs(probe, pl_module)
        for spec in specs:
            spec.attrs.update(
                knn_k=self.k, kmeans_n_init=self.kmeans_n_init, kmeans_probe="train",
                kmeans_mappings={"hungarian": "one-to-one cluster-to-label matching maximising the hits "
                                              "(scipy linear_sum_assignment; He et al.'s released code)",
                                 "greedy": "each cluster takes its majority label (purity)"},
                segments=[[name, int(n)] for name, n in self._segments],
                code_bit_order="np.packbits, big-endian within a byte, zero padding at the row end")
        return specs

    def measure(self, trainer: Any, pl_module: nn.Module,
                probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        assert probe is not None
        heldout = self._heldout_for(pl_module)
        codes = {"train": self._codes(pl_module, probe.x)}
        if heldout is not None:
            codes["heldout"] = self._codes(pl_module, heldout.x)
        row: Dict[str, Any] = {"n_units": codes["train"].n_units}
        if "redundancy" in self.measures:
            for which, c in codes.items():
                row[f"redundancy_ratio_{which}"] = redundancy_ratio(c)
        if self._classifies:
            owner = type(self).__name__
            y_train = class_labels(probe, owner, "the classifiers")
            if heldout is not None:
                fit, y_fit = codes["train"], y_train
                evaluate, y_eval = codes["heldout"], class_labels(heldout, owner, "the classifiers")
            else:
                fit_pos, eval_pos = self._fixed_split(y_train)
                fit, y_fit = codes["train"][fit_pos], y_train[fit_pos]
                evaluate, y_eval = codes["train"][eval_pos], y_train[eval_pos]
            with limited_threads(self.classifier_threads):
                if "knn" in self.measures:
                    row["knn_accuracy"] = knn_accuracy(fit, y_fit, evaluate, y_eval, k=self.k)
                if "logistic" in self.measures:
                    row["logistic_accuracy"] = logistic_accuracy(fit, y_fit, evaluate, y_eval, seed=self.seed)
                if "kmeans" in self.measures:
                    ids = kmeans_clusters(codes["train"], int(np.unique(y_train).shape[0]), seed=self.seed,
                                          n_init=self.kmeans_n_init)
                    row["kmeans_accuracy_hungarian"] = cluster_accuracy(ids, y_train, mapping="hungarian")
                    row["kmeans_accuracy_greedy"] = cluster_accuracy(ids, y_train, mapping="greedy")
        if "code_change" in self.measures:
            for which, c in codes.items():
                previous = self._previous.get(which)
                if previous is not None and previous.packed.shape == c.packed.shape and previous.n_units == c.n_units:
                    change = code_change(previous, c)
                    row[f"code_change_fraction_{which}"] = change.fraction_changed
                    row[f"code_change_hamming_{which}"] = change.mean_hamming
                else:
                    row[f"code_change_fraction_{which}"] = float("nan")
                    row[f"code_change_hamming_{which}"] = float("nan")
            self._previous = dict(codes)
        if self.store_codes:
            for which, c in codes.items():
                row[f"codes_{which}"] = c.packed
        scalars = {name: float(value) for name, value in row.items()
                   if name != "n_units" and not name.startswith("codes_") and np.isfinite(value)}
        return row, scalars

    def extra_state(self) -> Dict[str, Any]:
        # The previous snapshot's codes, so code_change continues across a resume.
        previous = {which: {"packed": torch.from_numpy(np.ascontiguousarray(c.packed)), "n_units": c.n_units}
                    for which, c in self._previous.items()}
        return dict(super().extra_state(), previous_codes=previous)

    def load_extra_state(self, state: Any) -> None:
        super().load_extra_state(state)
        previous = state.get("previous_codes") or {}
        self._previous = {}
        for which, saved in previous.items():
            packed = saved["packed"]
            packed = np.asarray(packed.cpu().numpy() if hasattr(packed, "cpu") else packed, dtype=np.uint8)
            n_units = int(saved["n_units"])
            self._previous[str(which)] = ActivationCodes.from_bits(np.unpackbits(packed, axis=1, count=n_units))
