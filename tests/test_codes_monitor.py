"""ActivationCodeMonitor and RepresentationMonitor, with both Lightning namespaces.

References are computed here on an independent path: the tiny network's pre-activations
by hand (``F.linear`` with the weights recorded at each snapshot), then the array
functions of ``lightning_ntk.codes`` / ``lightning_ntk.representations`` on them.
"""
import copy
import sys

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_ntk.callbacks import ActivationCodeMonitor, RepresentationMonitor
from lightning_ntk.codes import kmeans_accuracy, knn_accuracy, logistic_accuracy
from lightning_ntk.probe import Probe, stratified_indices
from lightning_ntk.representations import few_shot_accuracy, linear_probe_accuracy
from lightning_ntk.schedule import EveryNEpochs, EveryNSteps
from lightning_ntk.store import open_run

from .models import blob_data, loader, tiny_net, trainer


@pytest.fixture
def one_blas_thread():
    """The monitors run scikit-learn with one BLAS/OpenMP thread; so do the references here
    (on a busy 2-core machine more threads made each small fit ~20x slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _module(L, net, lr=0.1, validation=False):
    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    if not validation:
        return Classifier()

    class WithValidation(Classifier):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

    return WithValidation()


def _recorder(L):
    """A callback keeping a copy of the weights at train start and at every epoch end."""

    class Recorder(L.Callback):
        def __init__(self):
            self.states = []

        def on_train_start(self, trainer, pl_module):
            self.states.append(copy.deepcopy(pl_module.net.state_dict()))

        def on_train_epoch_end(self, trainer, pl_module):
            self.states.append(copy.deepcopy(pl_module.net.state_dict()))

    return Recorder()


def _split_data(n=150, n_train=90, seed=0):
    x, y = blob_data(n=n, seed=seed).tensors
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _bits(state, x):
    """Codes of tiny_net (Linear -> ReLU -> Linear): 1[W1 x + b1 > 0], by hand."""
    return (F.linear(x, state["0.weight"], state["0.bias"]) > 0).numpy()


def _penultimate(state, x):
    return torch.relu(F.linear(x, state["0.weight"], state["0.bias"])).numpy()


def _fit(L, callbacks_, train, *, net_kwargs=None, lr=0.1, epochs=2, val=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = _module(L, tiny_net(**(net_kwargs or dict(hidden=5))), lr=lr, validation=val is not None)
    t = trainer(L, callbacks_, max_epochs=epochs, **kwargs)
    t.fit(module, loader(TensorDataset(*train)), None if val is None else loader(TensorDataset(*val), shuffle=False))
    return module, t


@pytest.mark.usefixtures("one_blas_thread")
def test_codes_equal_a_direct_computation_at_every_snapshot(L, run_path):
    (xtr, ytr), (xho, yho) = _split_data()
    monitor = ActivationCodeMonitor(run_path, probe=(xtr, ytr), heldout=(xho, yho), schedule=EveryNEpochs(1),
                                    store_codes=True, kmeans_n_init=2, on_error="raise")
    recorder = _recorder(L)
    _, t = _fit(L, [monitor, recorder], (xtr, ytr))
    with open_run(run_path) as run:
        view = run["codes"]
        assert list(view["step"]) == [0, 6, 12] and len(recorder.states) == 3
        assert view.attrs["evaluation"] == "heldout" and view.attrs["heldout_probe"] == "heldout"
        np.testing.assert_array_equal(run.probe("heldout")["index"], np.arange(60))
        np.testing.assert_array_equal(view["n_units"], [5, 5, 5])
        previous = None
        for row, state in enumerate(recorder.states):
            bits = {"train": _bits(state, xtr), "heldout": _bits(state, xho)}
            for which, b in bits.items():
                np.testing.assert_array_equal(view[f"codes_{which}"][row], np.packbits(b, axis=1))
                unique = np.unique(b, axis=0).shape[0]
                assert view[f"redundancy_ratio_{which}"][row] == (len(b) - unique) / len(b)
                if previous is None:
                    assert np.isnan(view[f"code_change_fraction_{which}"][row])
                else:
                    differ = previous[which] != b
                    assert view[f"code_change_fraction_{which}"][row] == np.mean(differ.any(axis=1))
                    np.testing.assert_allclose(view[f"code_change_hamming_{which}"][row],
                                               differ.sum(axis=1).mean() / 5, rtol=1e-12)
            assert view["knn_accuracy"][row] == knn_accuracy(bits["train"], ytr, bits["heldout"], yho, k=9)
            assert view["logistic_accuracy"][row] == logistic_accuracy(bits["train"], ytr, bits["heldout"], yho)
            for mapping in ("hungarian", "greedy"):
                assert view[f"kmeans_accuracy_{mapping}"][row] == kmeans_accuracy(bits["train"], ytr, mapping=mapping,
                                                                                  n_init=2, seed=0)
            previous = bits
        # 5 ReLU units on 90 examples: at most 32 codes, so some regions hold several examples.
        assert view["redundancy_ratio_train"][-1] > 0.5
        assert view["code_change_fraction_train"][-1] > 0
        assert float(t.callback_metrics["codes/knn_accuracy"]) == pytest.approx(view["knn_accuracy"][-1])
        assert "codes/n_units" not in t.callback_metrics


@pytest.mark.usefixtures("one_blas_thread")
def test_code_change_is_zero_at_fixed_weights_and_split_without_heldout(L, run_path):
    (xtr, ytr), _ = _split_data()
    monitor = ActivationCodeMonitor(run_path, probe=(xtr, ytr), heldout=None, schedule=EveryNSteps(2),
                                    measures=("redundancy", "knn", "code_change"), on_error="raise")
    recorder = _recorder(L)
    _fit(L, [monitor, recorder], (xtr, ytr), lr=0.0)
    with open_run(run_path) as run:
        view = run["codes"]
        assert len(view) == 7 and view.attrs["evaluation"] == "split"
        assert not any("heldout" in f or "logistic" in f or "kmeans" in f for f in view.fields)
        assert np.isnan(view["code_change_fraction_train"][0])
        np.testing.assert_array_equal(view["code_change_fraction_train"][1:], 0.0)
        np.testing.assert_array_equal(view["code_change_hamming_train"][1:], 0.0)
        # The documented fixed split: a stratified half (seed 0) is scored, the rest fitted.
        bits = _bits(recorder.states[-1], xtr)
        evaluate = stratified_indices(ytr.numpy(), 45, seed=0)
        fit = np.setdiff1d(np.arange(90), evaluate)
        expected = knn_accuracy(bits[fit], ytr[fit], bits[evaluate], ytr[evaluate], k=9)
        np.testing.assert_array_equal(view["knn_accuracy"], expected)


@pytest.mark.usefixtures("one_blas_thread")
def test_representations_equal_a_direct_computation(L, run_path):
    (xtr, ytr), (xho, yho) = _split_data()
    settings = dict(few_shot=((3, 1), (3, 2)), n_query=5, episodes=20)
    penultimate = RepresentationMonitor(run_path, probe=(xtr, ytr), heldout=(xho, yho), schedule=EveryNEpochs(1),
                                        on_error="raise", **settings)
    named = RepresentationMonitor(run_path, name="hidden", layer="net.0", probe=(xtr, ytr), heldout=(xho, yho),
                                  schedule=EveryNEpochs(1), on_error="raise", few_shot=(), classifiers=())
    recorder = _recorder(L)
    _, t = _fit(L, [penultimate, named, recorder], (xtr, ytr), net_kwargs=dict(hidden=16))
    with open_run(run_path) as run:
        view, hidden = run["representations"], run["representations_hidden"]
        assert view.attrs["few_shot_probe"] == "heldout" and len(view) == len(recorder.states) == 3
        np.testing.assert_array_equal(view["n_features"], 16)
        for row, state in enumerate(recorder.states):  # the same episodes at every snapshot (seed 0)
            f_tr, f_ho = _penultimate(state, xtr), _penultimate(state, xho)
            for n_way, k_shot in settings["few_shot"]:
                for classifier, short in (("centroid_euclidean", "euclidean"), ("centroid_cosine", "cosine"),
                                          ("logistic", "logistic")):
                    result = few_shot_accuracy(f_ho, yho, n_way=n_way, k_shot=k_shot, n_query=5, episodes=20,
                                               classifier=classifier, seed=0)
                    name = f"few_shot_{n_way}way_{k_shot}shot_{short}"
                    np.testing.assert_allclose(view[name][row], result.mean, rtol=1e-12)
                    np.testing.assert_allclose(view[f"{name}_ci95"][row], result.ci95, rtol=1e-12)
            assert view["linear_probe_accuracy"][row] == linear_probe_accuracy(f_tr, ytr, f_ho, yho)
            pre_tr = F.linear(xtr, state["0.weight"], state["0.bias"]).numpy()
            pre_ho = F.linear(xho, state["0.weight"], state["0.bias"]).numpy()
            assert hidden["linear_probe_accuracy"][row] == linear_probe_accuracy(pre_tr, ytr, pre_ho, yho)
        assert float(t.callback_metrics["representations/few_shot_3way_2shot_cosine"]) == pytest.approx(
            view["few_shot_3way_2shot_cosine"][-1])


def test_monitors_default_to_the_validation_set(L, tmp_path):
    """heldout='auto' uses the validation set (that the monitors leave the training
    trajectory unchanged: tests/test_monitor_contract.py)."""
    (xtr, ytr), (xho, yho) = _split_data(n=144, n_train=96)
    net_kwargs = dict(hidden=8, dropout=0.3, batchnorm=True)
    path = str(tmp_path / "run.h5")
    monitors = [ActivationCodeMonitor(path, schedule=3, kmeans_n_init=1, on_error="raise"),
                RepresentationMonitor(path, schedule=3, few_shot=((3, 1),), n_query=5, episodes=5, on_error="raise")]
    _fit(L, monitors, (xtr, ytr), net_kwargs=net_kwargs, val=(xho, yho))
    with open_run(path) as run:
        for group in ("codes", "representations"):
            assert run[group].attrs["probe"] == "train_96" and run[group].attrs["heldout_probe"] == "val_48"
            assert list(run[group]["step"]) == [0, 3, 6, 9, 12]
        np.testing.assert_array_equal(run.probe("val_48")["index"], np.arange(48))
        assert run["codes"]["n_units"][0] == 8


def test_unsatisfiable_few_shot_setting_is_refused_at_train_start(L, run_path):
    (xtr, ytr), (xho, yho) = _split_data()
    monitor = RepresentationMonitor(run_path, probe=(xtr, ytr), heldout=(xho, yho), on_error="raise")
    with pytest.raises(ValueError, match="5-way 1-shot.*needs 5 classes"):
        _fit(L, [monitor], (xtr, ytr))


def test_missing_scikit_learn_is_reported(monkeypatch, run_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(ImportError, match=r"scikit-learn.*measures=\('redundancy', 'knn', 'code_change'\)"):
        ActivationCodeMonitor(run_path)
    with pytest.raises(ImportError, match="scikit-learn"):
        RepresentationMonitor(run_path)
    ActivationCodeMonitor(run_path, measures=("redundancy", "knn", "code_change"))
    RepresentationMonitor(run_path, classifiers=("centroid_euclidean", "centroid_cosine"), linear_probe=False)


@pytest.mark.parametrize("cls, kwargs, message", [
    (ActivationCodeMonitor, dict(measures=("redundancy", "hash")), "measures must be"),
    (ActivationCodeMonitor, dict(measures="knn"), "measures must be a sequence"),
    (ActivationCodeMonitor, dict(k=0), "k must be"),
    (ActivationCodeMonitor, dict(capture="hooks"), "capture must be"),
    (ActivationCodeMonitor, dict(capture="functional", modules=["net.1"]), "only applies to capture='modules'"),
    (ActivationCodeMonitor, dict(heldout="val"), "heldout must be 'auto'"),
    (ActivationCodeMonitor, dict(heldout=3), "heldout must be"),
    (ActivationCodeMonitor, dict(classifier_threads=0), "classifier_threads must be"),
    (RepresentationMonitor, dict(few_shot=((1, 1),)), "n_way must be"),
    (RepresentationMonitor, dict(few_shot=(5,)), r"\(n_way, k_shot\) pairs"),
    (RepresentationMonitor, dict(classifiers=("svm",)), "classifiers must be"),
    (RepresentationMonitor, dict(few_shot=(), linear_probe=False), "nothing to measure"),
    (RepresentationMonitor, dict(episodes=1), "episodes must be"),
    (RepresentationMonitor, dict(layer=3), "layer must be"),
])
def test_bad_arguments_are_named(cls, kwargs, message, run_path):
    with pytest.raises((TypeError, ValueError), match=message):
        cls(run_path, **kwargs)


def test_heldout_probe_needs_its_own_name(L, run_path):
    (xtr, ytr), (xho, yho) = _split_data()
    monitor = ActivationCodeMonitor(run_path, probe=Probe(size=30, name="same"),
                                    heldout=Probe(size=30, name="same"), on_error="raise")
    with pytest.raises(ValueError, match="another name="):
        _fit(L, [monitor], (xtr, ytr))
