"""Tests of lightning_ntk.codes against hand-built networks and direct computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from lightning_ntk.codes import (
    ActivationCodes,
    activation_codes,
    cluster_accuracy,
    code_change,
    hamming_distances,
    kmeans_accuracy,
    knn_accuracy,
    logistic_accuracy,
    redundancy_ratio,
)


def _quadrant_net(inplace=False):
    """Linear(2, 2) = identity -> ReLU -> Linear(2, 1): u = relu(x0) + relu(x1) - 1.5 -> ReLU
    -> Linear(1, 2). Unit 1, 2 fire in the x0 > 0, x1 > 0 half-planes; unit 3 fires where
    relu(x0) + relu(x1) > 1.5."""
    first = nn.Linear(2, 2)
    second = nn.Linear(2, 1)
    head = nn.Linear(1, 2)
    with torch.no_grad():
        first.weight.copy_(torch.eye(2))
        first.bias.zero_()
        second.weight.fill_(1.0)
        second.bias.fill_(-1.5)
    return nn.Sequential(first, nn.ReLU(inplace=inplace), second, nn.ReLU(inplace=inplace), head)


POINTS = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0],
                       [0.2, 0.3], [3.0, -2.0], [-0.5, 2.0], [0.0, 0.0]])
# hand-derived codes: [x0 > 0, x1 > 0, relu(x0) + relu(x1) > 1.5]
EXPECTED = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0],
                     [1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("capture", ["modules", "functional"])
def test_codes_of_hand_built_network(inplace, capture):
    codes = activation_codes(_quadrant_net(inplace), POINTS, capture=capture, batch_size=3)
    np.testing.assert_array_equal(codes.bits(), EXPECTED)
    assert codes.n_units == 3 and codes.packed.shape == (8, 1)
    assert [n for n, _ in codes.segments] == (["1", "3"] if capture == "modules"
                                              else ["1:relu", "3:relu"])
    # equal codes (rows 2 and 7) hash equally, different ones do not
    assert codes.hashes[2] == codes.hashes[7]
    assert len(set(codes.hashes.tolist())) == 7


class _FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 5)
        self.act = nn.LeakyReLU(0.1)
        self.c = nn.Linear(5, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h1 = self.a(x)
        h2 = self.b(F.relu(h1))
        h3 = self.c(self.act(h2))
        return self.out(h3.relu())


def test_functional_capture_sees_functional_relu_and_modules_mode_warns():
    torch.manual_seed(0)
    net = _FunctionalNet()
    x = torch.randn(20, 3)
    with torch.no_grad():
        h1 = net.a(x)
        h2 = net.b(F.relu(h1))
        h3 = net.c(net.act(h2))
    direct = torch.cat([h1 > 0, h2 > 0, h3 > 0], dim=1).numpy()
    codes = activation_codes(net, x, capture="functional", batch_size=7)
    np.testing.assert_array_equal(codes.bits(), direct)
    # functional calls are named after the innermost running module; repeats get #k
    assert codes.segments == [("_FunctionalNet:relu", 4), ("act:leaky_relu", 5),
                              ("_FunctionalNet:relu#1", 6)]
    with pytest.warns(RuntimeWarning, match="capture='functional'"):
        only_module = activation_codes(net, x)
    np.testing.assert_array_equal(only_module.bits(), (h2 > 0).numpy())
    with pytest.raises(ValueError, match="capture='functional'"):
        activation_codes(nn.Sequential(nn.Linear(3, 2)), x)


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4 * 2 * 2, 5)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(self.act3(self.fc(h.flatten(1))))


def test_cnn_codes_flatten_channel_major_and_concatenate_in_forward_order():
    torch.manual_seed(1)
    net = _SmallCNN()
    x = torch.randn(11, 2, 5, 5)
    with torch.no_grad():
        p1 = net.conv1(x)
        p2 = net.conv2(torch.relu(p1))
        p3 = net.fc(torch.relu(p2).flatten(1))
    direct = []
    for i in range(11):  # loop over examples and channel, row, column explicitly
        row = []
        for p in (p1, p2):
            c, h, w = p.shape[1:]
            row += [bool(p[i, ci, hi, wi] > 0) for ci in range(c) for hi in range(h) for wi in range(w)]
        row += [bool(v > 0) for v in p3[i]]
        direct.append(row)
    codes = activation_codes(net, x, batch_size=4)
    np.testing.assert_array_equal(codes.bits(), np.array(direct))
    assert codes.segments == [("act1", 75), ("act2", 16), ("act3", 5)]
    # selecting modules by name, object or type
    only_conv = activation_codes(net, x, modules=["act1", net.act2])
    np.testing.assert_array_equal(only_conv.bits(), np.array(direct)[:, :91])
    by_type = activation_codes(net, x, modules=[nn.ReLU, "act3"])  # act3 selected twice: once
    np.testing.assert_array_equal(by_type.bits(), np.array(direct))


def test_mode_and_gradients_untouched():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    net.train()
    before = net[1].running_mean.clone()
    activation_codes(net, x)
    assert net.training and all(m.training for m in net.modules())
    assert not torch.equal(before, net[1].running_mean)  # train mode: the caller's choice
    net.eval()
    frozen = net[1].running_mean.clone()
    activation_codes(net, x, capture="functional")
    assert not net.training and torch.equal(frozen, net[1].running_mean)
    assert all(p.grad is None for p in net.parameters())
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in net.modules())


def test_redundancy_ratio_on_constructed_duplicates():
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 2, size=(6, 13)).astype(bool)
    distinct[:, 0] = [0, 0, 0, 1, 1, 1]
    distinct[:, 1] = [0, 1, 1, 0, 0, 1]
    distinct[:, 2] = [0, 0, 1, 0, 1, 1]  # rows differ in the first three bits
    bits = np.concatenate([distinct, distinct[[0, 0, 3]]])  # 9 codes, 6 unique
    assert redundancy_ratio(bits) == pytest.approx(3 / 9)
    assert redundancy_ratio(ActivationCodes.from_bits(bits)) == pytest.approx(3 / 9)
    assert redundancy_ratio(distinct) == 0.0
    # codes differing only in the last bit of a non-multiple-of-8 length stay distinct
    a = np.zeros((2, 11), dtype=bool)
    a[1, -1] = True
    assert redundancy_ratio(a) == 0.0


def test_hamming_distances_equal_scipy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(17, 45))
    b = rng.integers(0, 2, size=(9, 45))
    expected = np.rint(cdist(a, b, metric="hamming") * 45).astype(int)
    np.testing.assert_array_equal(hamming_distances(a, b), expected)
    np.testing.assert_array_equal(hamming_distances(a, b, chunk_bytes=1), expected)  # one row per chunk
    np.testing.assert_allclose(hamming_distances(a, b, normalized=True), cdist(a, b, metric="hamming"))
    np.testing.assert_array_equal(hamming_distances(a), np.rint(cdist(a, a, "hamming") * 45).astype(int))


def test_cluster_mappings_on_constructed_confusion():
    # contingency (rows clusters, columns labels): c0: a=5, b=4 ; c1: a=4, b=0
    clusters = np.array([0] * 9 + [1] * 4)
    labels = np.array(["a"] * 5 + ["b"] * 4 + ["a"] * 4)
    # greedy (majority): c0 -> a (5), c1 -> a (4)                      = 9 / 13
    # hungarian (one-to-one, optimal): c0 -> b (4), c1 -> a (4)        = 8 / 13
    # greedy matching: largest cell (c0, a) = 5 first, then (c1, b) = 0 = 5 / 13
    assert cluster_accuracy(clusters, labels, "greedy") == pytest.approx(9 / 13)
    assert cluster_accuracy(clusters, labels, "hungarian") == pytest.approx(8 / 13)
    assert cluster_accuracy(clusters, labels, "greedy_matching") == pytest.approx(5 / 13)
    # cluster ids are arbitrary: a relabelled perfect clustering scores 1 in every mapping
    for m in ("greedy", "hungarian", "greedy_matching"):
        assert cluster_accuracy([7, 7, 3, 3, 9], [0, 0, 1, 1, 2], m) == 1.0
    with pytest.raises(ValueError, match="mapping"):
        cluster_accuracy([0], [0], "best")


def _two_class_codes(n_per_class, n_units, flips, seed):
    rng = np.random.default_rng(seed)
    base = np.zeros((2, n_units), dtype=bool)
    base[1] = True
    y = np.repeat([0, 1], n_per_class)
    bits = base[y].copy()
    for i in range(bits.shape[0]):
        bits[i, rng.choice(n_units, size=flips, replace=False)] ^= True
    return bits, y


def test_classifiers_on_separable_codes():
    train, ytr = _two_class_codes(20, 40, flips=6, seed=2)
    test, yte = _two_class_codes(10, 40, flips=6, seed=3)
    assert knn_accuracy(train, ytr, test, yte, k=9) == 1.0
    assert logistic_accuracy(train, ytr, test, yte) == 1.0
    for mapping in ("hungarian", "greedy"):
        assert kmeans_accuracy(train, ytr, mapping=mapping, seed=0) == 1.0
    # the labels matter: flipped test labels give 0
    assert knn_accuracy(train, ytr, test, 1 - yte, k=9) == 0.0


def test_knn_hand_computed_neighbours_and_ties():
    train = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1], [1, 1, 1]])
    ytr = np.array([0, 0, 1, 1])
    # test 000: distances 0, 1, 2, 3 -> k = 3 votes {0: 2, 1: 1} -> 0
    assert knn_accuracy(train, ytr, np.array([[0, 0, 0]]), [0], k=3) == 1.0
    # test 011: distances 2, 1, 0, 1; k = 3 takes rows 2, 1, 3 -> votes {0: 1, 1: 2} -> 1
    assert knn_accuracy(train, ytr, np.array([[0, 1, 1]]), [1], k=3) == 1.0
    # test 001: distances 1, 0, 1, 2; k = 2 takes row 1 and one of rows 0, 2: votes {0: 2} or
    # {0: 1, 1: 1}, a tie that goes to the smaller label: 0 either way
    assert knn_accuracy(train, ytr, np.array([[0, 0, 1]]), [0], k=2) == 1.0
    with pytest.raises(ValueError, match="k must"):
        knn_accuracy(train, ytr, train, ytr, k=5)


def test_knn_equals_scikit_learn_on_tie_heavy_codes(monkeypatch):
    """He et al.'s k-NN is scikit-learn's KNeighborsClassifier; with few units nearly every
    k-th neighbour is a tie, and the chosen neighbours must be the ones it chooses."""
    pytest.importorskip("sklearn")
    from sklearn.neighbors import KNeighborsClassifier

    import lightning_ntk.codes as codes_module

    rng = np.random.default_rng(4)
    monkeypatch.setattr(codes_module, "_KNN_CHUNK_BYTES", 8 * 200 * 7)  # 7 test rows per chunk
    for units, n_train, n_test, k in ((12, 200, 150, 9), (16, 300, 200, 9), (40, 120, 90, 5), (64, 200, 100, 1)):
        train = (rng.random((n_train, units)) < 0.5).astype(np.uint8)
        test = (rng.random((n_test, units)) < 0.5).astype(np.uint8)
        ytr = rng.integers(0, 4, n_train)
        reference = KNeighborsClassifier(n_neighbors=k, metric="hamming", algorithm="brute")
        pred = reference.fit(train.astype(float), ytr).predict(test.astype(float))
        assert knn_accuracy(train, ytr, test, pred, k=k) == 1.0, units  # the same prediction for every row
        assert knn_accuracy(train, ytr, test, (pred + 1) % 4, k=k) == 0.0


def test_code_change_hand_computed():
    prev = np.array([[0, 0, 0, 0, 0], [1, 1, 0, 0, 1], [1, 0, 1, 0, 1], [0, 0, 0, 0, 1]])
    cur = np.array([[0, 0, 0, 0, 0], [1, 0, 0, 1, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 0]])
    # differing bits per example: 0, 2, 0, 5
    change = code_change(prev, cur)
    assert change.fraction_changed == pytest.approx(2 / 4)
    assert change.mean_hamming == pytest.approx((0 + 2 + 0 + 5) / 4 / 5)
    change2 = code_change(ActivationCodes.from_bits(prev), ActivationCodes.from_bits(cur))
    assert change2 == change
    with pytest.raises(ValueError, match="same examples"):
        code_change(prev, cur[:3])
