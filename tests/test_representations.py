"""Tests of lightning_ntk.representations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from lightning_ntk.representations import extract_features, few_shot_accuracy, linear_probe_accuracy


class _OutOfOrderNet(nn.Module):
    """The classifier is registered first but runs last: registration order != call order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Linear(4, 6)
        self.proj = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.body(torch.relu(self.proj(x)))))


def test_penultimate_features_equal_manual_forward():
    # float64: batches of 4 and the manual forward over all 13 rows take different matrix
    # kernels, whose float32 results differ by a few ulps (seen: 2.6e-6 relative with MKL)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    x = torch.randn(13, 5, dtype=torch.float64)
    with torch.no_grad():
        manual = net[3](net[2](net[1](net[0](x))))
    np.testing.assert_allclose(extract_features(net, x, batch_size=4), manual.numpy(), rtol=1e-6)

    odd = _OutOfOrderNet().double()
    with torch.no_grad():
        manual = torch.tanh(odd.body(torch.relu(odd.proj(x))))
    np.testing.assert_allclose(extract_features(odd, x), manual.numpy(), rtol=1e-6)


def test_named_layer_output_and_flattening():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    x = torch.randn(6, 1, 5, 5)
    with torch.no_grad():
        conv_out = net[1](net[0](x))
    np.testing.assert_allclose(extract_features(net, x, layer="1"), conv_out.reshape(6, -1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(extract_features(net, x, layer=net[1]), conv_out.reshape(6, -1).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="not a module name"):
        extract_features(net, x, layer="nope")
    with pytest.raises(ValueError, match="no nn.Linear"):
        extract_features(nn.Sequential(nn.Conv2d(1, 1, 3)), x)


def test_mode_untouched_and_no_gradients():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(10, 3)
    net.eval()
    a = extract_features(net, x)
    b = extract_features(net, x)
    np.testing.assert_array_equal(a, b)  # eval mode kept: dropout off, running stats used
    assert not net.training
    net.train()
    extract_features(net, x)
    assert net.training
    assert all(p.grad is None for p in net.parameters())


def _clusters(n_classes, per_class, dim, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 10.0
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + spread * rng.normal(size=(y.shape[0], dim))
    return x, y


@pytest.mark.parametrize("classifier", ["centroid_euclidean", "centroid_cosine", "logistic"])
def test_few_shot_separable_clusters_are_perfect(classifier):
    x, y = _clusters(8, 25, 16, spread=0.1, seed=0)
    res = few_shot_accuracy(x, y, n_way=5, k_shot=1, n_query=10,
                            episodes=40 if classifier == "logistic" else 200,
                            classifier=classifier, seed=0)
    assert res.mean == 1.0 and res.ci95 == 0.0
    assert np.all(res.accuracies == 1.0)


def test_few_shot_labels_independent_of_features_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 16))  # no structure: labels carry no information
    y = rng.permutation(np.repeat(np.arange(10), 60))
    n_way, n_query, episodes = 5, 15, 400
    res = few_shot_accuracy(x, y, n_way=n_way, k_shot=5, n_query=n_query, episodes=episodes, seed=3)
    chance = 1.0 / n_way
    # Each query is right with probability 1/n_way. Queries of one episode share their
    # centroids, so bound an episode's accuracy variance by the fully correlated case,
    # p (1 - p); the mean over episodes then has standard deviation at most
    # sqrt(p (1 - p) / episodes) = 0.02, and 4 of those is the tolerance. (A leak of query
    # examples into the support set scores far above it.)
    tol = 4 * math.sqrt(chance * (1 - chance) / episodes)
    assert abs(res.mean - chance) < tol
    # the interval reported is 1.96 * sample std / sqrt(episodes)
    assert res.ci95 == pytest.approx(1.96 * np.std(res.accuracies, ddof=1) / math.sqrt(episodes))


def test_cosine_centroids_ignore_feature_norms_euclidean_do_not():
    x, y = _clusters(6, 20, 8, spread=3.0, seed=4)
    scale = np.random.default_rng(5).uniform(0.1, 10.0, size=(x.shape[0], 1))
    kwargs = dict(n_way=4, k_shot=2, n_query=5, episodes=100, seed=7)
    cos = few_shot_accuracy(x, y, classifier="centroid_cosine", **kwargs)
    cos_scaled = few_shot_accuracy(x * scale, y, classifier="centroid_cosine", **kwargs)
    np.testing.assert_array_equal(cos.accuracies, cos_scaled.accuracies)
    euc = few_shot_accuracy(x, y, classifier="centroid_euclidean", **kwargs)
    euc_scaled = few_shot_accuracy(x * scale, y, classifier="centroid_euclidean", **kwargs)
    assert not np.array_equal(euc.accuracies, euc_scaled.accuracies)


def test_few_shot_input_errors():
    x, y = _clusters(3, 4, 2, spread=0.1, seed=0)
    with pytest.raises(ValueError, match="classes have at least"):
        few_shot_accuracy(x, y, n_way=3, k_shot=2, n_query=5)
    with pytest.raises(ValueError, match="classifier"):
        few_shot_accuracy(x, y, n_way=2, k_shot=1, n_query=1, classifier="svm")


def test_linear_probe_separable_and_chance():
    x, y = _clusters(4, 30, 10, spread=0.5, seed=6)
    xt, yt = _clusters(4, 10, 10, spread=0.5, seed=6)  # same centres (same seed), new draws
    assert linear_probe_accuracy(x, y, xt, yt) == 1.0
    # a probe cannot read labels that are not in the features
    rng = np.random.default_rng(8)
    noise_train, noise_test = rng.normal(size=(400, 10)), rng.normal(size=(2000, 10))
    acc = linear_probe_accuracy(noise_train, rng.integers(0, 2, 400), noise_test, rng.integers(0, 2, 2000))
    assert abs(acc - 0.5) < 5 * math.sqrt(0.25 / 2000)
