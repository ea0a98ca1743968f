"""Sequence tasks end to end: a tiny causal transformer LM with Hugging Face conventions
(dict batches, labels equal to input_ids and shifted by the loss, -100 padding, outputs
with ``.logits``) under every monitor, each checked against an independent computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_ntk as ln
from lightning_ntk import callbacks

from .models import LM_VOCAB, TinyLM, TokenData, make_lm_module, namespace, trainer

L = namespace("lightning.pytorch")


def fit(monitors, net=None, epochs=1, lr=0.1, pad=0, seed=0, val=True):
    torch.manual_seed(seed)
    module = make_lm_module(L, net, lr=lr)
    tr = trainer(L, monitors, max_epochs=epochs)
    val_loader = DataLoader(TokenData(24, seed=1, pad=pad), batch_size=8) if val else None
    tr.fit(module, DataLoader(TokenData(48, pad=pad), batch_size=8, shuffle=True), val_loader)
    return module


def every_monitor(path, **extra):
    common = dict(path=path, budget=False, on_error="raise", **extra)
    return [callbacks.NTKMonitor(**common), callbacks.ProbeMetricsMonitor(**common),
            callbacks.SharpnessMonitor(**common), callbacks.ActivationCodeMonitor(**common),
            callbacks.RepresentationMonitor(few_shot=((3, 1),), n_query=3, episodes=5, **common),
            callbacks.ForgettingMonitor(**common)]


@pytest.mark.parametrize("hf_output", [False, True])
def test_every_monitor_records_an_lm_with_only_path(run_path, hf_output):
    fit(every_monitor(run_path), TinyLM(hf_output=hf_output), pad=2)
    with ln.open_run(run_path) as run:
        assert run.errors() == []
        for group in ("ntk", "probe_metrics", "sharpness", "codes", "representations", "forgetting/events"):
            table = run[group]
            assert len(table) >= 1, group
        assert np.all(np.isfinite(run["ntk"]["eigvals"][:]))
        assert np.all(np.isfinite(run["probe_metrics"]["loss"][:]))
        assert np.all(np.isfinite(run["sharpness"]["eigvals"][:]))
        assert np.all(np.isfinite(run["codes"]["redundancy_ratio_train"][:]))
        assert np.all(np.isfinite(run["representations"]["linear_probe_accuracy"][:]))
        assert run["ntk"].attrs["sequence_task"]["shift"] == 1  # labels equal input_ids: causal LM


def test_monitors_leave_the_lm_training_unchanged(run_path):
    reference = fit([])
    monitored = fit(every_monitor(run_path))
    for (name, a), (_, b) in zip(reference.named_parameters(), monitored.named_parameters()):
        assert torch.equal(a, b), name


def token_gradients(net, ids, position, dtype=torch.float64):
    """Brute force: the gradient of every logit at ``position`` (float64, an autograd loop)."""
    net = net.to(dtype).eval()
    params = [p for p in net.parameters()]
    logits = net(ids.unsqueeze(0))[0, position]
    rows = []
    for c in range(logits.shape[0]):
        grads = torch.autograd.grad(logits[c], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_ntk_between_token_pairs_equals_the_autograd_reference(run_path):
    monitor = callbacks.NTKMonitor(run_path, budget=False, on_error="raise", dtype=torch.float64,
                                   probe=ln.Probe(size=6), token_positions=2, schedule=[0])
    module = fit([monitor], lr=0.0)  # lr 0: the final weights are the measured ones
    with ln.open_run(run_path) as run:
        kernel = run["ntk"]["kernel"][-1]
        sequences = np.asarray(run["ntk"].attrs["token_sequence"])
        positions = np.asarray(run["ntk"].attrs["token_position"])
    data = TokenData(48)
    import copy

    net = copy.deepcopy(module.net)
    jac = [token_gradients(net, data.ids[s], t) for s, t in zip(sequences, positions)]
    reference = np.array([[float((a * b).sum()) / LM_VOCAB for b in jac] for a in jac])
    assert kernel.shape == reference.shape == (12, 12)
    np.testing.assert_allclose(kernel, reference, rtol=2e-6, atol=1e-6 * np.abs(reference).max())
    labels = data.ids[sequences, positions + 1].numpy()  # the next token: the causal shift
    targets = monitor._view(monitor.probe_set).y.numpy()
    np.testing.assert_array_equal(targets, labels)


def test_probe_loss_is_the_token_mean_the_lm_trains(run_path):
    monitor = callbacks.ProbeMetricsMonitor(run_path, budget=False, on_error="raise", probe=ln.Probe(size=12),
                                            schedule=[0])
    module = fit([monitor], lr=0.0, pad=2)
    with ln.open_run(run_path) as run:
        table = run["probe_metrics"]
        loss, accuracy = float(table["loss"][-1]), float(table["accuracy"][-1])
        example_loss = table["example_loss"][-1]
    probe = monitor.probe_set
    with torch.no_grad():
        logits = module.net.eval()(probe.x)
    shifted, targets = logits[:, :-1], probe.y[:, 1:]
    expected = nn.functional.cross_entropy(shifted.reshape(-1, LM_VOCAB), targets.reshape(-1), ignore_index=-100)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    kept = targets != -100
    assert accuracy == pytest.approx(float((shifted.argmax(-1) == targets)[kept].double().mean()), rel=1e-12)
    per_sequence = [float(nn.functional.cross_entropy(shifted[i][kept[i]], targets[i][kept[i]])) for i in range(12)]
    np.testing.assert_allclose(example_loss, per_sequence, rtol=1e-5)


def test_token_forgetting_reads_each_tracked_token_at_each_presentation(run_path):
    # lr = 0: the model never changes, so each presentation's correctness is the fixed
    # model's argmax at the tracked position, computed here independently
    monitor = callbacks.ForgettingMonitor(run_path, budget=False, on_error="raise", token_positions=3)
    module = fit([monitor], lr=0.0, epochs=2)
    data = TokenData(48)
    with torch.no_grad():
        predicted = module.net.eval()(data.ids).argmax(-1)[:, :-1]
    with ln.open_run(run_path) as run:
        events = run["forgetting/events"]
        index, correct = events["index"][:], events["correct"][:]
        assert run["forgetting/examples"].attrs["token_positions"] == 3
    assert len(index) == 2 * 48 * 3  # two epochs, every sequence, three tokens each
    sequence, slot = index // 3, index % 3
    positions = ln.task.token_positions(data.labels, ln.Task("sequence", LM_VOCAB, -100, 1), 3,
                                        keys=np.arange(48))
    for s, k, c in zip(sequence, slot, correct):
        t = positions[s, k]
        assert bool(c) == bool(predicted[s, t] == data.ids[s, t + 1])


def test_codes_and_features_are_read_per_token(run_path):
    codes = callbacks.ActivationCodeMonitor(run_path, budget=False, on_error="raise", probe=ln.Probe(size=8),
                                            heldout=None, token_positions=3, store_codes=True, schedule=[0])
    fit([codes], lr=0.0, val=False)
    pairs = codes._pairs["probe"]
    assert len(pairs.target) == 24
    probe = codes.probe_set
    np.testing.assert_array_equal(pairs.target, probe.y.numpy()[pairs.row, pairs.position + 1])
    with ln.open_run(run_path) as run:
        stored = run["codes"]["codes_train"][-1]
    # independent: the feed-forward ReLU's input at each chosen token, from a hook on the
    # same (untrained: lr 0) network
    seen = []
    lm = fit([], lr=0.0, val=False)
    handle = lm.net.block.linear1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            lm.eval()(probe.x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
        handle.remove()
    bits = (seen[0][pairs.row, pairs.position] > 0).numpy()
    np.testing.assert_array_equal(np.unpackbits(stored, axis=1, count=bits.shape[1]), bits)


def test_task_sequence_overrides_the_causal_shift(run_path):
    monitor = callbacks.ProbeMetricsMonitor(run_path, budget=False, on_error="raise", task="sequence",
                                            probe=ln.Probe(size=6), schedule=[0])
    module = fit([monitor], lr=0.0, val=False)
    with ln.open_run(run_path) as run:
        loss = float(run["probe_metrics"]["loss"][-1])
        assert run["probe_metrics"].attrs["task"]["shift"] == 0
    probe = monitor.probe_set
    with torch.no_grad():
        logits = module.net.eval()(probe.x)
    aligned = nn.functional.cross_entropy(logits.reshape(-1, LM_VOCAB), probe.y.reshape(-1))
    assert loss == pytest.approx(float(aligned), rel=1e-5)


def test_sharpness_runs_training_step_on_dict_batches_with_their_mask(run_path):
    """The default loss is training_step on batches of the user's layout: the padding mask
    reaches it (the loss changes if it is dropped), and λ₁ equals a dense float64 Hessian."""
    monitor = callbacks.SharpnessMonitor(run_path, budget=False, on_error="raise", sharpness_set=8, k=1,
                                         dtype=torch.float64, tol=1e-10, schedule=[0])
    module = fit([monitor], lr=0.0, pad=2, val=False)
    with ln.open_run(run_path) as run:
        top = float(run["sharpness"]["eigvals"][-1][0])
    data = TokenData(48, pad=2)
    batch = {"input_ids": data.ids[:8], "labels": data.labels[:8], "attention_mask": data.mask[:8]}
    net = module.net.double().eval()
    names = [n for n, _ in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def loss_of(theta):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = theta[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        pad = batch["attention_mask"] == 0
        logits = torch.func.functional_call(net, params, (batch["input_ids"], batch["attention_mask"]))
        assert pad.any()
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, LM_VOCAB), batch["labels"][:, 1:].reshape(-1),
                                           ignore_index=-100)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            hessian = torch.autograd.functional.hessian(loss_of, flat)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert top == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-6)


def test_a_row_over_the_size_cap_leaves_the_logits_out(run_path):
    monitor = callbacks.ProbeMetricsMonitor(run_path, budget=False, on_error="raise", probe=ln.Probe(size=12),
                                            max_row_mb=0.001, schedule=[0])
    fit([monitor], lr=0.0, val=False)
    with ln.open_run(run_path) as run:
        table = run["probe_metrics"]
        assert "logits" not in table.fields
        assert list(table.attrs["dropped_fields"]) == ["logits"]
        assert table.attrs["max_row_mb"] == 0.001
        assert np.isfinite(table["loss"][-1])


def test_required_fields_over_the_cap_are_refused_with_the_fix(run_path):
    monitor = callbacks.NTKMonitor(run_path, budget=False, probe=ln.Probe(size=12), max_row_mb=0.0001, schedule=[0])
    with pytest.warns(RuntimeWarning, match=r"NTKMonitor: one row of /ntk takes .* MB, over max_row_mb=0.0001 .*"
                                            r"pass a smaller probe= \(or k=\) or a larger max_row_mb="):
        fit([monitor], lr=0.0, val=False)
    with ln.open_run(run_path) as run:
        assert "max_row_mb" in str(run.errors())


def test_positions_that_the_input_dtype_cannot_hold_are_refused():
    """Each pair carries its position in the input's dtype: bfloat16 rounds 257 to 256 and
    uint8 wraps 257 to 1, which would read the wrong token's logits."""
    from lightning_ntk.callbacks._tokens import TokenPairs, positioned_inputs

    pairs = TokenPairs(np.array([[257]]), np.array([0]), np.array([0]), np.array([257]), np.array([3]))
    for x in (torch.zeros(1, 300, dtype=torch.uint8), torch.zeros(1, 300, 4, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="cannot be carried exactly.*sequence_kernel='pooled'"):
            positioned_inputs(x, pairs)
    exact = positioned_inputs(torch.zeros(1, 300, dtype=torch.int64), pairs)
    assert exact.shape == (1, 301) and int(exact[0, -1]) == 257


class TinyEncoderClassifier(nn.Module):
    """A bidirectional transformer encoder, mean-pooled, classifying token sequences."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(LM_VOCAB, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(8, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.emb(ids)).mean(dim=1))


class ClassifiedTokens(torch.utils.data.Dataset):
    """TokenData's sequences labelled by their first token mod 3, as dict items."""

    def __init__(self, n: int = 48, seed: int = 0) -> None:
        self.ids = TokenData(n, seed=seed).ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 0] % 3}


def test_every_monitor_records_a_transformer_encoder_classifier_with_only_path(run_path):
    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyEncoderClassifier()

        def forward(self, ids):
            return self.net(ids)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch["input_ids"]), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    monitors = every_monitor(run_path)
    trainer(L, monitors, max_epochs=1).fit(Classifier(), DataLoader(ClassifiedTokens(), batch_size=8, shuffle=True),
                                           DataLoader(ClassifiedTokens(24, seed=1), batch_size=8))
    with ln.open_run(run_path) as run:
        assert run.errors() == []
        for group in ("ntk", "probe_metrics", "sharpness", "codes", "representations", "forgetting/events"):
            assert len(run[group]) >= 1, group
        assert run["ntk"].attrs["kind"] == "trace" and "sequence_task" not in run["ntk"].attrs  # per sequence
        assert np.all(np.isfinite(run["sharpness"]["eigvals"][:]))
        assert np.all(np.isfinite(run["codes"]["knn_accuracy"][:]))
