import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_ntk.probe import (
    BatchLayoutError,
    Probe,
    ProbeSet,
    batch_to_xy,
    dataset_labels,
    draw_probe,
    stratified_indices,
)


def test_stratified_proportions_hand_computed():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    # 7 of 100: quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1, one left for the largest fraction (class 0).
    idx = stratified_indices(labels, 7, seed=1)
    assert np.bincount(labels[idx]).tolist() == [4, 2, 1]
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)


def test_seeded_and_distinct_seeds_differ():
    labels = np.arange(1000) % 10
    a = stratified_indices(labels, 100, seed=3)
    b = stratified_indices(labels, 100, seed=3)
    c = stratified_indices(labels, 100, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_draw_probe_keeps_dataset_indices():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    y = torch.arange(20) % 4
    probe = draw_probe(TensorDataset(x, y), 8, seed=0)
    assert torch.equal(probe.x, x[probe.index]) and torch.equal(probe.y, y[probe.index])
    assert np.bincount(probe.y.numpy()).tolist() == [2, 2, 2, 2]


def test_subset_labels_follow_the_indirection():
    base = TensorDataset(torch.zeros(10, 1), torch.arange(10))
    sub = Subset(base, [9, 2, 4])
    assert dataset_labels(sub).tolist() == [9, 2, 4]


def test_regression_targets_fall_back_to_uniform():
    ds = TensorDataset(torch.randn(30, 2), torch.randn(30))
    probe = draw_probe(ds, 5, seed=0)
    assert len(probe) == 5 and probe.y.dtype == torch.float32


def test_dict_items_and_custom_formats():
    class DictData(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"image": torch.full((3,), float(i)), "label": i % 3, "meta": "x"}

    probe = draw_probe(DictData(), 6, seed=0)
    assert probe.x.shape == (6, 3) and torch.equal(probe.x[:, 0].long(), torch.as_tensor(probe.index))
    probe = draw_probe(DictData(), 6, seed=0, batch_format=("image", "label"))
    assert np.bincount(probe.y.numpy()).tolist() == [2, 2, 2]
    probe = draw_probe(DictData(), 6, seed=0, batch_format=lambda b: (b["image"] * 2, b["label"]))
    assert torch.equal(probe.x[:, 0], 2 * torch.as_tensor(probe.index, dtype=torch.float32))


@pytest.mark.parametrize("batch, fmt, message", [
    ({"a": 1, "b": 2}, None, r"keys \['a', 'b'\]"),
    ((torch.zeros(2),), None, "has no targets"),
    ("text", None, "unknown batch layout"),
    ({"a": 1}, ("a", "b"), "does not match the batch"),
    ((1, 2), "xy", "batch_format must be"),
    ((1, 2), lambda b: b[0], "must return a pair"),
])
def test_unknown_layouts_are_named(batch, fmt, message):
    with pytest.raises(BatchLayoutError, match=message):
        batch_to_xy(batch, fmt)


def test_probe_bigger_than_dataset():
    ds = TensorDataset(torch.zeros(5, 1), torch.arange(5))
    with pytest.raises(ValueError, match="asks for 6 examples but the dataset dataset has only 5"):
        draw_probe(ds, 6)
    assert len(draw_probe(ds, None)) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=0), "size must be"), (dict(source="test"), "source must be"), (dict(seed="a"), "seed must be"),
    (dict(name="a/b"), "name must be"), (dict(batch_format=3), "batch_format must be"),
])
def test_probe_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Probe(**kwargs)


def test_probe_set_from_tensors():
    p = ProbeSet.from_tensors(torch.zeros(4, 2), torch.tensor([0, 1, 1, 2]))
    assert p.index.tolist() == [0, 1, 2, 3] and p.num_classes == 3
    with pytest.raises(ValueError, match="x has 4 rows, y 3"):
        ProbeSet("p", torch.zeros(4, 2), torch.zeros(3), np.arange(4))
