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
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import nn

from .. import _args
from .._hygiene import measurement_mode, module_device
from ..codes import (
    RELU_MODULE_TYPES,
    ActivationCodes,
    activation_codes,
    cluster_accuracy,
    code_change,
    kmeans_clusters,
    knn_accuracy,
    logistic_accuracy,
    redundancy_ratio,
)
from ..probe import Probe, ProbeSet, _trainer_dataloader, stratified_indices
from ..schedule import LogSpacedSteps, Schedule
from ..sizing import CostModel, LighterWork
from ..store import Field
from ..task import Task, TaskError, detect_task
from ._base import Monitor, TableSpec
from ._declared import HeldoutLike, ProbeSlot, as_heldout, draw_probes, map_style_length
from ._sizing import linear_cost, timing_sizes
from ._tokens import TokenPairs, positions_per_sequence

_log = logging.getLogger("lightning_ntk")

#: Default size of each probe (training and held-out): at most this many examples.
DEFAULT_PROBE_SIZE = 512

#: k-means restarts by default (He et al.'s scikit-learn version) and the fewer sizing may take.
DEFAULT_KMEANS_N_INIT, LIGHTER_KMEANS_N_INIT = 10, (3, 1)
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
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TaskError(f"{owner}: {what} need(s) integer class labels, but probe {probe.name!r} has real-valued "
                        f"targets ({y.dtype}, shape {tuple(y.shape)}: regression?); pass a probe= or batch_format= "
                        "giving integer labels" + _NO_CLASSES_HINT.get(owner, ""))
    if y.ndim != 1:
        raise TaskError(f"{owner}: {what} need(s) one integer class label per example, but probe {probe.name!r} has "
                        f"targets of shape {tuple(y.shape)}; per-token targets (B, T) are read per token when the model's "
                        "outputs are per token (B, T, V) (pass forward_fn= returning them), otherwise pass a "
                        "batch_format= returning (x, labels of shape (B,))" + _NO_CLASSES_HINT.get(owner, ""))
    return y.detach().cpu().numpy()


_NO_CLASSES_HINT = {"ActivationCodeMonitor": "; without classes pass measures=('redundancy', 'code_change')"}


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
        token_positions: sequence tasks (per-token outputs (B, T, V) and targets (B, T)):
            each chosen (sequence, position) pair is one example labelled with its target
            token (for a causal LM the next token); positions per sequence, default about
            512 pairs per probe (:func:`lightning_ntk.task.token_positions`).
        classifier_threads: BLAS/OpenMP threads for the scikit-learn measures (None: as
            configured). One by default: the problems are small, and on a busy machine
            more threads were measured to slow a 512-example logistic fit from 0.2 s to 13 s.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    default_probe_size = DEFAULT_PROBE_SIZE
    runtime = ("_split", "_sequence", "_pairs")
    smaller_rows = "a smaller probe= (or heldout=)"

    def __init__(self, path: str, *, heldout: HeldoutLike = "auto", seed: int = 0, token_positions: Optional[int] = None,
                 classifier_threads: Optional[int] = 1, **kwargs: Any):
        self._default_probe = kwargs.get("probe") is None
        super().__init__(path, **kwargs)
        owner = type(self).__name__
        self.heldout = heldout
        self._heldout = ProbeSlot("heldout", as_heldout(owner, heldout), auto_size=DEFAULT_PROBE_SIZE)
        self.seed = _args.integer(seed, "seed", owner, minimum=0)
        self.token_positions = _args.positive_int(token_positions, "token_positions", owner, optional=True)
        self.classifier_threads = _args.positive_int(classifier_threads, "classifier_threads", owner, optional=True)

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._split: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self._sequence: Optional[Task] = None  # per-token outputs and targets: measured per (sequence, position)
        self._pairs: Dict[str, TokenPairs] = {}

    def _token_view(self, pl_module: nn.Module, probe: ProbeSet) -> None:
        """At train start: with per-token outputs (B, T, V) and integer targets (B, T), the
        probes' examples are their (sequence, position) pairs labelled with the target token."""
        self._sequence, self._pairs = None, {}
        y = probe.y
        if y.ndim != 2 or y.dtype.is_floating_point or y.dtype == torch.bool:
            return
        rows = min(len(probe), 32)
        x = probe.x[:rows].to(module_device(pl_module))
        try:
            task = detect_task(self.sample_outputs(pl_module, x), y[:rows].to(x.device), owner=type(self).__name__,
                               inputs=x)
        except TaskError:
            return  # not per-token predictions: class_labels says what is needed
        if task.kind != "sequence":
            return
        per = positions_per_sequence(len(probe), self.token_positions, total=DEFAULT_PROBE_SIZE)
        self._sequence = task
        self._pairs = {"probe": TokenPairs.choose(probe, task, per)}
        if self.heldout_set is not None:
            self._pairs["heldout"] = TokenPairs.choose(self.heldout_set, task, per)

    def labels(self, role: str, what: str) -> np.ndarray:
        """Class labels of the training (``"probe"``) or held-out probe's examples: per pair
        (the target token) for sequence tasks."""
        if self._sequence is not None:
            return self._pairs[role].target
        probe = self.probe_set if role == "probe" else self.heldout_set
        assert probe is not None
        return class_labels(probe, type(self).__name__, what)

    def positions(self, role: str) -> Optional[np.ndarray]:
        """Chosen positions of a sequence probe's pairs (None: not a sequence task)."""
        return None if self._sequence is None else self._pairs[role].positions

    def examples(self, role: str) -> int:
        probe = self.probe_set if role == "probe" else self.heldout_set
        assert probe is not None
        return len(probe) if self._sequence is None else len(self._pairs[role].row)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._default_probe:
            n = map_style_length(_trainer_dataloader(trainer, "train"))
            if n is not None:  # else the base's draw reports the unusable dataset
                self.probe = self._probe.setting = Probe(size=min(DEFAULT_PROBE_SIZE, n), source="train")
        self._split = None
        super().on_train_start(trainer, pl_module)

    # ------------------------------------------------------------------ sizing
    size_floor = 128

    def default_size(self) -> bool:
        return self._default_probe

    def _resume_sizes(self) -> None:
        super()._resume_sizes()
        loaded = (self._loaded_state or {}).get("heldout_index")
        if loaded is not None and self.default_size() and self._heldout is not None and self._heldout.setting == "auto":
            self._heldout.auto_size = len(loaded)

    def resize_probes(self, trainer: Any, pl_module: nn.Module, size: int) -> None:
        """Both probes at ``size`` (the held-out one when it is the automatic one)."""
        if self._heldout is not None and self._heldout.setting == "auto":
            self._heldout.auto_size = size
        self._probe.setting = Probe(size=size, source="train")
        self._split = None
        draw_probes(self._probes, trainer, type(self).__name__, None)
        with measurement_mode(pl_module, grad=False):
            self._specs = self.table_specs(self.probe_set, pl_module)

    def _forward_cost(self, pl_module: nn.Module, probe: ProbeSet, forward: Any) -> Optional[CostModel]:
        """The forward passes with capture, timed on 16 and 32 examples, for both probes: the
        automatic held-out probe is sized with the training probe (twice the cost per
        example), a given one adds its fixed cost. The classifiers' time (small next to the
        forward passes on large models) is not predicted."""
        cost = linear_cost(forward, self._probe.on(pl_module), small=16, clock=self.clock)
        return None if cost is None else self._with_heldout(cost, cost)

    def _with_heldout(self, cost: CostModel, forward: CostModel) -> CostModel:
        """``cost`` plus the held-out probe's forward passes (``forward`` per training-probe
        size): the automatic one is sized with the training probe, a given one is fixed."""
        if self.heldout_set is None:
            return cost
        if self._heldout is not None and self._heldout.setting == "auto":
            return CostModel(cost.fixed + forward.fixed, cost.per_example + forward.per_example, cost.per_pair)
        return CostModel(cost.fixed + forward.per_example * len(self.heldout_set), cost.per_example, cost.per_pair)

    def _fixed_split(self, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if self._split is None:
            self._split = fixed_split(labels, self.seed)
        return self._split

    @property
    def evaluation(self) -> str:
        """``"heldout"`` (fit on the training probe, score on the held-out one) or ``"split"``."""
        return "heldout" if self.heldout_set is not None else "split"

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        coords = super().coords(probe)
        if self.heldout_set is not None:
            coords["heldout_example"] = self.heldout_set.index
        return coords

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        specs = super().table_specs(probe, pl_module)
        for spec in specs:
            spec.attrs.update(heldout_probe=self.heldout_set.name if self.heldout_set is not None else "",
                              evaluation=self.evaluation)
            if self._sequence is not None:
                spec.attrs.update(sequence_task=self._sequence.to_config(), **self._pairs["probe"].attrs())
        return specs

    def config_extra(self) -> Dict[str, Any]:
        setting = self._heldout.setting
        return dict(super().config_extra(), evaluation=self.evaluation,
                    heldout_setting=setting if isinstance(setting, str) or setting is None else type(setting).__name__)


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
            ``capture="functional"`` for ``F.relu`` inside ``forward``, chosen automatically
            when the model has no ReLU-family module).
        measures: any of ``"redundancy"``, ``"knn"``, ``"logistic"``, ``"kmeans"``,
            ``"code_change"``. Default: all; for targets that are not class labels (regression,
            multi-label) the label-free ones, ``("redundancy", "code_change")`` (a log line
            says so). ``"logistic"`` and ``"kmeans"`` need scikit-learn.
        k: neighbours of the k-NN classifier (He et al.: 9).
        kmeans_n_init: k-means restarts; default (None) 10, as in He et al.'s scikit-learn
            version, fewer (3, 1) when the budget needs them (:mod:`lightning_ntk.sizing`).
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
    smaller_rows = "a smaller probe= (or heldout=), store_codes=False"
    # the previous codes (code_change); defaults settled per fit; restarts sizing may lower
    per_fit = ("_previous", "measures", "capture", "kmeans_n_init")

    def __init__(self, path: str, *, heldout: HeldoutLike = "auto", modules: Any = None, capture: str = "modules",
                 module_types: Tuple[Type[nn.Module], ...] = RELU_MODULE_TYPES,
                 measures: Optional[Sequence[str]] = None, k: int = 9, kmeans_n_init: Optional[int] = None,
                 store_codes: bool = False, seed: int = 0, classifier_threads: Optional[int] = 1, **kwargs: Any):
        super().__init__(path, heldout=heldout, seed=seed, classifier_threads=classifier_threads, **kwargs)
        owner = type(self).__name__
        if capture not in ("modules", "functional"):
            raise ValueError(f"{owner}: capture must be 'modules' or 'functional', got {capture!r}")
        if capture == "functional" and modules is not None:
            raise ValueError(f"{owner}: modules= selects hooked modules and only applies to capture='modules'")
        self._measures_given = measures is not None
        measures = _CODE_MEASURES if measures is None else measures
        if isinstance(measures, str) or not all(isinstance(m, str) for m in measures):
            raise TypeError(f"{owner}: measures must be a sequence of names from {_CODE_MEASURES}, got {measures!r}")
        unknown = [m for m in measures if m not in _CODE_MEASURES]
        if unknown or not measures:
            raise ValueError(f"{owner}: measures must be a non-empty selection of {_CODE_MEASURES}; "
                             f"unknown: {unknown}")
        self.measures = tuple(m for m in _CODE_MEASURES if m in measures)
        self.k = _args.positive_int(k, "k", owner)
        self._kmeans_given = kmeans_n_init is not None
        self.kmeans_n_init = DEFAULT_KMEANS_N_INIT if kmeans_n_init is None else \
            _args.positive_int(kmeans_n_init, "kmeans_n_init", owner)
        self._timed: Optional[Tuple[CostModel, CostModel, Optional[CostModel]]] = None  # (snapshot, forward, restart)
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

    def cost_model(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet) -> Optional[CostModel]:
        """The capture forward passes (both probes) and, for class labels, the classifiers:
        timed on the probe's first 32 and 64 examples (fit on one half, scored on the other;
        k-means with one restart, its time counted ``kmeans_n_init`` times)."""
        if not self._classifies or self._sequence is not None:
            return self._forward_cost(pl_module, probe, lambda sub: self._codes(pl_module, sub.x))
        labels, forward_seconds = self.labels("probe", "the classifiers"), []
        kmeans_seconds: List[float] = []  # one restart per timed snapshot

        def snapshot(sub: ProbeSet) -> None:
            started = self.clock()
            codes, y = self._codes(pl_module, sub.x), labels[:len(sub)]
            forward_seconds.append(self.clock() - started)
            half = len(sub) // 2
            self._classify(codes[:half], y[:half], codes[half:], y[half:], codes, y, timing=kmeans_seconds)

        total = linear_cost(snapshot, self._probe.on(pl_module), small=32, clock=self.clock)
        if total is None:
            return None
        # the held-out probe's forward passes on top of the timed snapshot (classifiers included)
        sizes = timing_sizes(len(probe), 32)
        forward = CostModel.from_timings(sizes, forward_seconds)
        restart = CostModel.from_timings(sizes, kmeans_seconds) if len(kmeans_seconds) == 2 else None
        self._timed = (total, forward, restart)
        return self._cost_with(self.kmeans_n_init)

    def _cost_with(self, n_init: int) -> CostModel:
        """The timed snapshot (one k-means restart) with ``n_init`` restarts, plus the
        held-out probe's forward passes (the classifiers are timed in the snapshot)."""
        total, forward, restart = self._timed
        if restart is not None:
            total = CostModel(total.fixed + (n_init - 1) * restart.fixed,
                              total.per_example + (n_init - 1) * restart.per_example, total.per_pair)
        return self._with_heldout(total, forward)

    def lighter_work(self, cost: CostModel) -> List[LighterWork]:
        """Fewer k-means restarts (3, then 1), when ``kmeans_n_init`` was left to the monitor."""
        if self._kmeans_given or self._timed is None or self._timed[2] is None:
            return []
        return [LighterWork({"kmeans_n_init": n}, self._cost_with(n)) for n in LIGHTER_KMEANS_N_INIT
                if n < self.kmeans_n_init]

    def _classify(self, fit: Any, y_fit: np.ndarray, evaluate: Any, y_eval: np.ndarray, train: Any,
                  y_train: np.ndarray, timing: Optional[List[float]] = None) -> Dict[str, float]:
        """The classifiers' scores: k-NN and logistic regression fitted on ``fit``, scored on
        ``evaluate``; k-means on the training codes. ``timing``: on a few examples for the
        cost model (k clipped to them; no logistic fit on a single class; one k-means
        restart, its seconds appended to the list)."""
        row: Dict[str, float] = {}
        with limited_threads(self.classifier_threads):
            if "knn" in self.measures:
                k = min(self.k, len(y_fit)) if timing is not None else self.k
                row["knn_accuracy"] = knn_accuracy(fit, y_fit, evaluate, y_eval, k=k)
            if "logistic" in self.measures and not (timing is not None and len(np.unique(y_fit)) < 2):
                row["logistic_accuracy"] = logistic_accuracy(fit, y_fit, evaluate, y_eval, seed=self.seed)
            if "kmeans" in self.measures:
                started = self.clock()
                ids = kmeans_clusters(train, int(np.unique(y_train).shape[0]), seed=self.seed,
                                      n_init=1 if timing is not None else self.kmeans_n_init)
                if timing is not None:
                    timing.append(self.clock() - started)
                row["kmeans_accuracy_hungarian"] = cluster_accuracy(ids, y_train, mapping="hungarian")
                row["kmeans_accuracy_greedy"] = cluster_accuracy(ids, y_train, mapping="greedy")
        return row

    def _codes(self, pl_module: nn.Module, x: torch.Tensor, role: str = "probe") -> ActivationCodes:
        positions = self.positions(role)
        return activation_codes(pl_module, x, self.modules, capture=self.capture, module_types=self.module_types,
                                batch_size=self.batch_size, forward_fn=self.forward_fn,
                                positions=None if positions is None else positions[:x.shape[0]])

    def _check_probes(self, probe: ProbeSet) -> None:
        if not self._classifies:
            return
        owner = type(self).__name__
        if not self._measures_given and self._sequence is None:
            try:
                class_labels(probe, owner, "the classifiers")
            except TaskError as reason:  # no classes: the label-free measures, said once
                self.measures = ("redundancy", "code_change")
                _log.info("%s: measuring %s only: %s", owner, self.measures, reason)
                return
        what = "measures " + str([m for m in self.measures if m in ("knn", "logistic", "kmeans")])
        labels = self.labels("probe", what)
        if self.heldout_set is not None:
            self.labels("heldout", what)
            n_fit = len(labels)
        else:
            n_fit = len(labels) - len(labels) // 2
        if "knn" in self.measures and n_fit < self.k:
            raise ValueError(f"{owner}: k-NN with k={self.k} needs at least {self.k} codes to fit on; the "
                             f"{'training probe' if self.heldout_set is not None else 'fit half of the training probe'}"
                             f" has {n_fit}. Pass a larger probe= or a smaller k=")
        if "kmeans" in self.measures and np.unique(labels).shape[0] > len(labels):
            raise ValueError(f"{owner}: k-means needs at least as many codes as labels")

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        assert probe is not None
        self._token_view(pl_module, probe)
        self._check_probes(probe)
        if self.capture == "modules" and self.modules is None and not any(
                isinstance(m, self.module_types) for m in pl_module.modules()):
            # ReLU applied functionally (e.g. nn.TransformerEncoderLayer's feed-forward)
            self.capture = "functional"
            _log.info("%s: the model has no ReLU-family module; capturing its ReLU-family function calls "
                      "(capture='functional')", type(self).__name__)
        sample = self._codes(pl_module, probe.x[:1])
        self._n_bytes = int(sample.packed.shape[1])
        self._segments = list(sample.segments)
        held = self.heldout_set is not None
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
            unit = "example" if self._sequence is None else "token"
            fields.append(Field("codes_train", (self.examples("probe"), self._n_bytes), "uint8",
                                dims=(f"probe_{unit}", "code_byte")))
            if held:
                fields.append(Field("codes_heldout", (self.examples("heldout"), self._n_bytes), "uint8",
                                    dims=(f"heldout_{unit}", "code_byte")))
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
        heldout = self._heldout.on(pl_module)
        codes = {"train": self._codes(pl_module, probe.x)}
        if heldout is not None:
            codes["heldout"] = self._codes(pl_module, heldout.x, "heldout")
        row: Dict[str, Any] = {"n_units": codes["train"].n_units}
        if "redundancy" in self.measures:
            for which, c in codes.items():
                row[f"redundancy_ratio_{which}"] = redundancy_ratio(c)
        if self._classifies:
            y_train = self.labels("probe", "the classifiers")
            if heldout is not None:
                fit, y_fit = codes["train"], y_train
                evaluate, y_eval = codes["heldout"], self.labels("heldout", "the classifiers")
            else:
                fit_pos, eval_pos = self._fixed_split(y_train)
                fit, y_fit = codes["train"][fit_pos], y_train[fit_pos]
                evaluate, y_eval = codes["train"][eval_pos], y_train[eval_pos]
            row.update(self._classify(fit, y_fit, evaluate, y_eval, codes["train"], y_train))
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
