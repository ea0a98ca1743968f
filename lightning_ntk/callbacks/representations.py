"""RepresentationMonitor: few-shot and linear probes on the frozen features of a layer.

At each snapshot the features of the training and the held-out probe are read at the
penultimate layer (the input of the last ``nn.Linear`` that runs) or at ``layer=``
(:func:`lightning_ntk.representations.extract_features`), then probed:

* few-shot n-way k-shot episodes (:func:`~lightning_ntk.representations.few_shot_accuracy`)
  with nearest-centroid (Euclidean, as in prototypical networks, Snell et al. 2017; cosine)
  and logistic-regression classifiers (on L2-normalised features, Tian et al. 2020): mean
  accuracy and the half-width of its 95% interval over episodes;
* a linear probe (:func:`~lightning_ntk.representations.linear_probe_accuracy`): logistic
  regression on standardised features, fitted on the training probe, scored on the held-out one.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from .. import _args
from ..probe import ProbeSet
from ..representations import extract_features, few_shot_accuracy, linear_probe_accuracy
from ..schedule import LogSpacedSteps, Schedule
from ..sizing import CostModel, LighterWork, timed
from ..store import Field
from ._base import TableSpec
from ._sizing import probe_head
from .codes import HeldoutLike, HeldoutProbeMonitor, limited_threads, require_sklearn

#: Few-shot episodes per setting and snapshot by default, the lighter counts sizing may
#: take (a 95% interval of about ±0.04 at 25 episodes for episode accuracies of std 0.1),
#: and the episodes timed for the cost model.
DEFAULT_EPISODES, LIGHTER_EPISODES, TIMED_EPISODES = 100, (50, 25), 10

_CLASSIFIERS = {"centroid_euclidean": "euclidean", "centroid_cosine": "cosine", "logistic": "logistic"}


def few_shot_field(n_way: int, k_shot: int, classifier: str) -> str:
    """Field name of a few-shot mean accuracy, e.g. ``few_shot_5way_1shot_euclidean``."""
    return f"few_shot_{n_way}way_{k_shot}shot_{_CLASSIFIERS[classifier]}"


class RepresentationMonitor(HeldoutProbeMonitor):
    """Few-shot and linear-probe accuracy of a layer's features, over training.

    Per snapshot, into the table ``/representations`` (see docs/format.md):

    * ``n_features``: feature dimension D;
    * for each ``(n_way, k_shot)`` of ``few_shot`` and each classifier:
      ``few_shot_<n>way_<k>shot_<euclidean|cosine|logistic>`` (mean accuracy over
      ``episodes`` episodes of ``n_query`` queries per class) and the same name with
      ``_ci95`` (1.96 · std / √episodes);
    * ``linear_probe_accuracy``: logistic regression fitted on the training probe's
      features, scored on the held-out probe's.

    Few-shot episodes are drawn from the held-out probe when there is one (examples the
    network was not trained on), else from the training probe; the probe used is named in
    the table attribute ``few_shot_probe``. The episodes depend only on ``seed`` and the
    probe's labels, so every snapshot sees the same episodes. Without a held-out probe the
    linear probe is fitted on one half of the training probe and scored on the other (the
    fixed, seeded, stratified split of :func:`~lightning_ntk.callbacks.codes.fixed_split`).

    Args:
        heldout, seed, classifier_threads: see
            :class:`~lightning_ntk.callbacks.codes.HeldoutProbeMonitor`.
        layer: None (the input of the last ``nn.Linear`` called: the penultimate layer), or
            a module name / module whose output to read.
        few_shot: ``(n_way, k_shot)`` settings; default 5-way 1-shot and 5-way 5-shot.
            Empty: no few-shot probes.
        n_query: queries per class in each episode.
        episodes: episodes per setting and snapshot; default (None) 100, fewer (50, 25)
            when the budget needs them (:mod:`lightning_ntk.sizing`).
        classifiers: any of ``"centroid_euclidean"``, ``"centroid_cosine"``, ``"logistic"``.
        linear_probe: also fit the linear probe.
        schedule: default ``LogSpacedSteps(per_decade=4)``, as for
            :class:`~lightning_ntk.callbacks.ActivationCodeMonitor`.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "representations"

    def __init__(self, path: str, *, heldout: HeldoutLike = "auto", layer: Union[None, str, nn.Module] = None,
                 few_shot: Sequence[Tuple[int, int]] = ((5, 1), (5, 5)), n_query: int = 15, episodes: Optional[int] = None,
                 classifiers: Sequence[str] = tuple(_CLASSIFIERS), linear_probe: bool = True, seed: int = 0,
                 classifier_threads: Optional[int] = 1, **kwargs: Any):
        super().__init__(path, heldout=heldout, seed=seed, classifier_threads=classifier_threads, **kwargs)
        owner = type(self).__name__
        if layer is not None and not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"{owner}: layer must be None (penultimate layer), a module name or an nn.Module; "
                            f"got {type(layer).__name__}")
        settings = []
        for setting in few_shot:
            if not (isinstance(setting, (tuple, list)) and len(setting) == 2):
                raise ValueError(f"{owner}: few_shot must hold (n_way, k_shot) pairs, got {setting!r}")
            settings.append((_args.integer(setting[0], "few_shot n_way", owner, minimum=2),
                             _args.positive_int(setting[1], "few_shot k_shot", owner)))
        if len(set(settings)) != len(settings):
            raise ValueError(f"{owner}: few_shot lists a setting twice: {settings}")
        if isinstance(classifiers, str) or not all(isinstance(c, str) for c in classifiers):
            raise TypeError(f"{owner}: classifiers must be a sequence of names from {tuple(_CLASSIFIERS)}")
        unknown = [c for c in classifiers if c not in _CLASSIFIERS]
        if unknown or (settings and not classifiers):
            raise ValueError(f"{owner}: classifiers must be a non-empty selection of {tuple(_CLASSIFIERS)}; "
                             f"unknown: {unknown}")
        if not settings and not linear_probe:
            raise ValueError(f"{owner}: nothing to measure: few_shot is empty and linear_probe is False")
        self.layer = layer
        self.few_shot = settings
        self.n_query = _args.positive_int(n_query, "n_query", owner)
        self._episodes_given = episodes is not None
        self.episodes = DEFAULT_EPISODES if episodes is None else _args.integer(episodes, "episodes", owner, minimum=2)
        self._per_episode = 0.0  # seconds of one episode of every setting and classifier (cost model)
        self.classifiers = tuple(c for c in _CLASSIFIERS if c in classifiers) if settings else ()
        self.linear_probe = bool(linear_probe)
        needs = (["few-shot classifier 'logistic'"] if "logistic" in self.classifiers else []) + \
            (["linear_probe"] if self.linear_probe else [])
        if needs:
            require_sklearn(owner, " and ".join(needs),
                            "or pass classifiers=('centroid_euclidean', 'centroid_cosine'), linear_probe=False")

    def default_schedule(self) -> Schedule:
        return LogSpacedSteps(per_decade=4)

    size_floor = 256  # few-shot episodes need k_shot + n_query examples of n_way classes
    per_fit = ("episodes",)  # sizing may take fewer for one fit

    def cost_model(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet) -> Optional[CostModel]:
        """The feature forward passes (both probes), timed on 16 and 32 examples, plus the
        probes' classifiers timed on synthetic features of the layer's width: the few-shot
        episodes (a fixed cost per episode: each draws n_way x (k_shot + n_query) examples;
        timed on 10 episodes) and the linear probe's logistic regression on 64 and 128
        examples (per example)."""
        forward = self._forward_cost(pl_module, probe, lambda sub: self._features(pl_module, sub))
        if forward is None:
            return None
        width = self._features(pl_module, probe_head(self._probe.on(pl_module), 1)).shape[1]
        rng = np.random.default_rng(self.seed)

        def synthetic(n: int, classes: int) -> Tuple[np.ndarray, np.ndarray]:
            return rng.standard_normal((n, width)).astype(np.float32), np.arange(n) % classes

        per_episode = 0.0
        with limited_threads(self.classifier_threads):
            for n_way, k_shot in self.few_shot:
                features, labels = synthetic(n_way * (k_shot + self.n_query), n_way)
                for classifier in self.classifiers:
                    per_episode += timed(functools.partial(few_shot_accuracy, features, labels, n_way=n_way,
                                                           k_shot=k_shot, n_query=self.n_query, episodes=TIMED_EPISODES,
                                                           classifier=classifier, seed=self.seed),
                                         self.clock, repeats=1) / TIMED_EPISODES
            probe_cost = None
            if self.linear_probe:
                def fit(n: int) -> None:
                    x, y = synthetic(n, 10)
                    linear_probe_accuracy(x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:])

                probe_cost = CostModel.from_timings((64, 128), [timed(lambda n=n: fit(n), self.clock, repeats=1)
                                                                for n in (64, 128)])
        self._per_episode = per_episode
        per_example = forward.per_example + (probe_cost.per_example if probe_cost else 0.0)
        return CostModel(forward.fixed + per_episode * self.episodes + (probe_cost.fixed if probe_cost else 0.0),
                         per_example, 0.0)

    def lighter_work(self, cost: CostModel) -> List[LighterWork]:
        """Fewer few-shot episodes (50, then 25), when ``episodes`` was left to the monitor."""
        if self._episodes_given or not self.few_shot:
            return []
        return [LighterWork({"episodes": e}, CostModel(cost.fixed - self._per_episode * (self.episodes - e),
                                                       cost.per_example, cost.per_pair))
                for e in LIGHTER_EPISODES if e < self.episodes]

    def _features(self, pl_module: nn.Module, probe: ProbeSet, role: str = "probe") -> np.ndarray:
        return extract_features(pl_module, probe.x, self.layer, batch_size=self.batch_size,
                                forward_fn=self.forward_fn, positions=self.positions(role))

    def _few_shot_probe(self, probe: ProbeSet) -> ProbeSet:
        return self.heldout_set if self.heldout_set is not None else probe

    def _check_probes(self, probe: ProbeSet) -> None:
        owner = type(self).__name__
        labels = self.labels("probe", "few-shot episodes and the linear probe")
        if self.heldout_set is not None:
            self.labels("heldout", "few-shot episodes and the linear probe")
        target = self._few_shot_probe(probe)
        role = "heldout" if self.heldout_set is not None else "probe"
        _, counts = np.unique(self.labels(role, "few-shot episodes"), return_counts=True)
        for n_way, k_shot in self.few_shot:
            eligible = int(np.sum(counts >= k_shot + self.n_query))
            if eligible < n_way:
                raise ValueError(
                    f"{owner}: the {n_way}-way {k_shot}-shot setting with n_query={self.n_query} needs {n_way} classes "
                    f"with at least {k_shot + self.n_query} examples each in probe {target.name!r}; it has {eligible} "
                    f"(class sizes {sorted(counts.tolist(), reverse=True)}). Pass a larger {role}=, or a few_shot= with "
                    "fewer ways (n_way) or shots (k_shot), or a smaller n_query="
                )
        if self.linear_probe and self.heldout_set is None and len(np.unique(labels)) < 2:
            raise ValueError(f"{owner}: the linear probe needs at least two classes in probe {probe.name!r}, which "
                             "has one; pass a probe= holding two or more, or linear_probe=False")

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        assert probe is not None
        self._token_view(pl_module, probe)
        self._check_probes(probe)
        fields = [Field("n_features", (), "int64")]
        for n_way, k_shot in self.few_shot:
            for classifier in self.classifiers:
                name = few_shot_field(n_way, k_shot, classifier)
                fields += [Field(name), Field(f"{name}_ci95")]
        if self.linear_probe:
            fields.append(Field("linear_probe_accuracy"))
        return fields

    def table_specs(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[TableSpec]:
        specs = super().table_specs(probe, pl_module)
        assert probe is not None
        for spec in specs:
            spec.attrs.update(
                layer="penultimate (input of the last nn.Linear called)" if self.layer is None else
                (self.layer if isinstance(self.layer, str) else type(self.layer).__name__),
                few_shot_probe=self._few_shot_probe(probe).name, n_query=self.n_query, episodes=self.episodes,
                episode_seed=self.seed)
        return specs

    def measure(self, trainer: Any, pl_module: nn.Module,
                probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        assert probe is not None
        heldout = self._heldout.on(pl_module)
        train_features = self._features(pl_module, probe)
        y_train = self.labels("probe", "the probes")
        heldout_features = self._features(pl_module, heldout, "heldout") if heldout is not None else None
        row: Dict[str, Any] = {"n_features": train_features.shape[1]}
        scalars: Dict[str, float] = {}
        with limited_threads(self.classifier_threads):
            if heldout is not None:
                shot_features, shot_labels = heldout_features, self.labels("heldout", "the probes")
            else:
                shot_features, shot_labels = train_features, y_train
            for n_way, k_shot in self.few_shot:
                for classifier in self.classifiers:
                    result = few_shot_accuracy(shot_features, shot_labels, n_way=n_way, k_shot=k_shot,
                                               n_query=self.n_query, episodes=self.episodes, classifier=classifier,
                                               seed=self.seed)
                    name = few_shot_field(n_way, k_shot, classifier)
                    row[name], row[f"{name}_ci95"] = result.mean, result.ci95
                    scalars[name] = result.mean
            if self.linear_probe:
                if heldout is not None:
                    accuracy = linear_probe_accuracy(train_features, y_train, heldout_features,
                                                     self.labels("heldout", "the probes"))
                else:
                    fit, evaluate = self._fixed_split(y_train)
                    accuracy = linear_probe_accuracy(train_features[fit], y_train[fit], train_features[evaluate],
                                                     y_train[evaluate])
                row["linear_probe_accuracy"] = scalars["linear_probe_accuracy"] = accuracy
        return row, scalars
