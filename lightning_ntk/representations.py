"""Probes of frozen representations: few-shot episodes and a linear probe.

* :func:`extract_features` reads the features a network feeds its classifier: by default
  the input of the last ``nn.Linear`` module that runs in the forward pass (the
  penultimate layer of the usual ``features -> Linear`` classifier), or the output of a
  named module.
* :func:`few_shot_accuracy` samples n-way k-shot episodes from a labelled feature set and
  classifies the queries with a nearest-centroid rule (Euclidean, as in prototypical
  networks, Snell et al. 2017; or cosine) or a logistic regression fitted on the support
  set (on L2-normalised features, Tian et al. 2020, "Rethinking few-shot image
  classification: a good embedding is all you need?"). It reports the mean accuracy
  over episodes and the half-width of its 95% interval, 1.96 * std / sqrt(episodes)
  (sample standard deviation, ddof = 1).
* :func:`linear_probe_accuracy`: logistic regression on standardised features.

scikit-learn (an optional dependency) is imported only by the logistic probes.
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ._args import function, integer, one_of, positive_int
from ._hygiene import module_device
from .task import tokens_at

__all__ = ["extract_features", "FewShotResult", "few_shot_accuracy", "linear_probe_accuracy"]


def extract_features(model: nn.Module, x: torch.Tensor, layer: Union[None, str, nn.Module] = None, *,
                     batch_size: int = 256,
                     forward_fn: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
                     positions: Optional[np.ndarray] = None) -> np.ndarray:
    """Features of ``x`` at a layer of ``model``, as a (N, D) float array.

    ``layer=None``: the input of the last ``nn.Linear`` module *called* during the forward
    pass (execution order, not registration order). ``layer`` given (a module name or a
    module object): that module's output (its last call, if it runs several times).
    Features are flattened to (N, D). Runs under ``torch.no_grad()`` in the caller's
    train/eval mode, which is left unchanged. ``forward_fn(model, xb)`` runs the forward
    pass when the model is called another way (default ``model(xb)``). ``positions``
    (N, P), for sequences: the features (B, T, ...) at the chosen positions (-1: none), one
    row per (sequence, position) pair (:func:`lightning_ntk.task.tokens_at`).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of inputs, got {type(x).__name__}")
    positive_int(int(batch_size), "batch_size", "extract_features")
    function(forward_fn, "forward_fn", "extract_features", signature="(model, x) -> outputs")
    named = dict(model.named_modules())
    if layer is None:
        targets = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not targets:
            raise ValueError("the model has no nn.Linear module, so the penultimate layer is "
                             "undefined; pass layer= (a module name or module) whose output to read")
    elif isinstance(layer, str):
        if layer not in named:
            raise ValueError(f"layer {layer!r} is not a module name of the model; valid names "
                             f"include {[n for n in named if n][:10]}")
        targets = [named[layer]]
    elif isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"layer {layer.__class__.__name__} is not a submodule of the model")
        targets = [layer]
    else:
        raise TypeError(f"layer must be None, a module name or an nn.Module, got {type(layer).__name__}")

    device = module_device(model, x.device)
    out: List[np.ndarray] = []
    for start in range(0, x.shape[0], int(batch_size)):
        xb = x[start:start + int(batch_size)].to(device)
        seen: List[torch.Tensor] = []
        handles = []
        try:
            for m in targets:
                if layer is None:
                    handles.append(m.register_forward_pre_hook(
                        lambda mod, inputs, seen=seen: seen.append(inputs[0].detach())))
                else:
                    handles.append(m.register_forward_hook(
                        lambda mod, inputs, output, seen=seen: seen.append(output.detach())))
            with torch.no_grad():
                model(xb) if forward_fn is None else forward_fn(model, xb)
        finally:
            for h in handles:
                h.remove()
        if not seen:
            raise ValueError("the selected layer did not run during the forward pass")
        f = seen[-1]
        if f.shape[0] != xb.shape[0]:
            raise ValueError(f"features have shape {tuple(f.shape)}, whose first axis is not the "
                             f"batch ({xb.shape[0]}); choose another layer=")
        if positions is not None:
            f = tokens_at(f, positions[start:start + xb.shape[0]])
        out.append(f.reshape(f.shape[0], -1).float().cpu().numpy())
    if not out:
        raise ValueError("x holds no examples")
    return np.concatenate(out, axis=0)


class FewShotResult(NamedTuple):
    mean: float  # mean accuracy over episodes
    ci95: float  # half-width of the 95% interval: 1.96 * std(ddof=1) / sqrt(episodes); NaN for 1 episode
    accuracies: np.ndarray  # accuracy of each episode


def _as_array(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def few_shot_accuracy(features: Any, labels: Any, n_way: int = 5, k_shot: int = 1, n_query: int = 15,
                      episodes: int = 600, classifier: str = "centroid_euclidean",
                      seed: int = 0) -> FewShotResult:
    """Mean accuracy over n-way k-shot episodes drawn from ``features``/``labels``.

    Each episode draws ``n_way`` distinct classes (among those with at least
    ``k_shot + n_query`` examples), then ``k_shot`` support and ``n_query`` query examples
    per class without replacement (``numpy.random.default_rng(seed)``). Classifiers:

    * ``"centroid_euclidean"``: nearest class mean of the support set (squared Euclidean);
    * ``"centroid_cosine"``: the same on L2-normalised features, scored by cosine
      similarity to the normalised class means;
    * ``"logistic"``: scikit-learn ``LogisticRegression(max_iter=1000)`` fitted on the
      L2-normalised support features.

    Ties between classes go to the class drawn first in the episode.
    """
    f = _as_array(features, "features").astype(np.float64)
    y = _as_array(labels, "labels").reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features must be (N, D) with one label per row; got {f.shape} and {y.shape[0]} labels")
    one_of(classifier, "classifier", ("centroid_euclidean", "centroid_cosine", "logistic"), "few_shot_accuracy")
    n_way = integer(int(n_way), "n_way", "few_shot_accuracy", minimum=2)
    k_shot = positive_int(int(k_shot), "k_shot", "few_shot_accuracy")
    n_query = positive_int(int(n_query), "n_query", "few_shot_accuracy")
    episodes = positive_int(int(episodes), "episodes", "few_shot_accuracy")
    classes, yi = np.unique(y, return_inverse=True)
    members = [np.flatnonzero(yi == c) for c in range(classes.shape[0])]
    eligible = np.array([c for c, m in enumerate(members) if m.shape[0] >= k_shot + n_query])
    if eligible.shape[0] < n_way:
        raise ValueError(f"only {eligible.shape[0]} classes have at least k_shot + n_query = "
                         f"{k_shot + n_query} examples; n_way = {n_way} needs that many")
    if classifier == "logistic":
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError as err:  # pragma: no cover
            raise ImportError("classifier='logistic' needs scikit-learn: pip install scikit-learn") from err
    if classifier != "centroid_euclidean":
        f = _l2_normalize(f)
    rng = np.random.default_rng(seed)
    acc = np.empty(episodes)
    for e in range(episodes):
        chosen = rng.choice(eligible, size=n_way, replace=False)
        support, query = [], []
        for c in chosen:
            pick = rng.choice(members[c], size=k_shot + n_query, replace=False)
            support.append(pick[:k_shot])
            query.append(pick[k_shot:])
        s_idx = np.concatenate(support)
        q_idx = np.concatenate(query)
        s_y = np.repeat(np.arange(n_way), k_shot)
        q_y = np.repeat(np.arange(n_way), n_query)
        if classifier == "logistic":
            clf = LogisticRegression(max_iter=1000)
            clf.fit(f[s_idx], s_y)
            pred = clf.predict(f[q_idx])
        else:
            centroids = f[s_idx].reshape(n_way, k_shot, -1).mean(axis=1)
            if classifier == "centroid_euclidean":
                d = ((f[q_idx][:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
                pred = np.argmin(d, axis=1)
            else:
                pred = np.argmax(f[q_idx] @ _l2_normalize(centroids).T, axis=1)
        acc[e] = np.mean(pred == q_y)
    ci = 1.96 * acc.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else float("nan")
    return FewShotResult(mean=float(acc.mean()), ci95=float(ci), accuracies=acc)


def linear_probe_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                          *, C: float = 1.0, max_iter: int = 1000) -> float:
    """Test accuracy of a logistic-regression probe on frozen features.

    Features are standardised with the training set's mean and standard deviation
    (``StandardScaler``), then ``LogisticRegression(C=C, max_iter=max_iter)`` is fitted.
    """
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as err:  # pragma: no cover
        raise ImportError("linear_probe_accuracy needs scikit-learn: pip install scikit-learn") from err
    xtr = _as_array(train_features, "train_features").astype(np.float64)
    xte = _as_array(test_features, "test_features").astype(np.float64)
    ytr = _as_array(train_labels, "train_labels").reshape(-1)
    yte = _as_array(test_labels, "test_labels").reshape(-1)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got {xtr.shape} and {xte.shape}")
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise ValueError("need one label per feature row")
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(xtr), ytr)
    return float(np.mean(clf.predict(scaler.transform(xte)) == yte))
