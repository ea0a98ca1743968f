"""Spawning (Frankle et al. 2020; Fort et al. 2020): parent states, children, their measurements.

The key check: a child that replays the parent's own data order and RNG from a saved state
reproduces the weights of an ordinary run without any monitor, bit for bit (CPU, dropout,
momentum, a step LR schedule, validation with a shuffling loader, states mid-epoch and at
epoch ends).
"""
import copy
import os
import signal
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from lightning_ntk.callbacks import ParentStateMonitor, SpawnData, SpawnError, spawn_children, train_child
from lightning_ntk.children import compare_children
from lightning_ntk.landscape_records import CHILDREN, LINEARIZED, PAIRS, SLICES
from lightning_ntk.parent_states import PARENT_KEY, read_parent_states, state_files
from lightning_ntk.store import RunStore, StoreError, check_run, open_run

from .models import blob_data, namespace, tiny_net, trainer

N, BATCH = 96, 16  # 6 batches per epoch
L_MAIN = namespace("lightning.pytorch")
TOTAL = 20


class Indexed(Dataset):
    """Blobs whose items carry their index: (x, y, i)."""

    def __init__(self, n=N):
        self.x, self.y = blob_data(n=n).tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def make_module(L, seen=None, net=None):
    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net if net is not None else tiny_net(dropout=0.3)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y, i = batch
            if seen is not None:
                seen.append(i.tolist())
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, 0.5),
                                                       "interval": "step"}}

    return Module()


def loaders(shuffle=True):
    return DataLoader(Indexed(), batch_size=BATCH, shuffle=shuffle), DataLoader(Indexed(), batch_size=BATCH,
                                                                                shuffle=True)


TRAINER = dict(limit_val_batches=2, check_val_every_n_epoch=1, num_sanity_val_steps=0)


def fit(L, callbacks, max_steps, seed=0, seen=None):
    torch.manual_seed(seed)
    module = make_module(L, seen)
    train, val = loaders()
    t = trainer(L, callbacks, max_epochs=-1, max_steps=max_steps, **TRAINER)
    t.fit(module, train, val)
    return {k: v.clone() for k, v in module.state_dict().items()}


def same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def parent_runs(tmp_path_factory):
    """Per namespace: a parent trained with ParentStateMonitor and reference runs without
    it (to 20 steps and to 9 steps)."""
    out = {}
    for name in ("lightning.pytorch", "pytorch_lightning"):
        L = namespace(name)
        run = str(tmp_path_factory.mktemp("parent") / "run.h5")
        monitor = ParentStateMonitor(run, schedule=[0, 1, 4, 6, 9, 13], on_error="raise")
        parent = fit(L, [monitor], TOTAL)
        out[name] = {"L": L, "run": run, "parent": parent, "reference": fit(L, [], TOTAL),
                     "reference_9": fit(L, [], 9)}
    return out


@pytest.fixture(params=["lightning.pytorch", "pytorch_lightning"])
def parent_run(request, parent_runs):
    return parent_runs[request.param]


def test_monitor_leaves_the_training_unchanged(parent_run):
    assert same(parent_run["parent"], parent_run["reference"])


def test_states_hold_the_parent_at_their_step(parent_run):
    states = {s.step: s for s in read_parent_states(parent_run["run"])}
    assert sorted(states) == [0, 1, 4, 6, 9, 13, TOTAL]  # the final step too
    # 6 batches per epoch: after step s the next batch is s mod 6 of its epoch.
    assert {s: st.next_batch for s, st in states.items()} == {0: 0, 1: 1, 4: 4, 6: 0, 9: 3, 13: 1, TOTAL: 2}
    assert states[9].checkpoint()["global_step"] == 9
    weights = states[9].checkpoint()["state_dict"]
    assert same(weights, parent_run["reference_9"])
    assert [s for s, st in states.items() if not st.can_replay] == [TOTAL]
    assert "final" in states[TOTAL].replayable
    with open_run(parent_run["run"]) as run:
        rows = run["parents"]
        np.testing.assert_array_equal(rows["step"], [0, 1, 4, 6, 9, 13, TOTAL])
        np.testing.assert_array_equal(rows["next_batch"], [0, 1, 4, 0, 3, 1, 2])
        assert rows["replayable"].tolist() == [True] * 6 + [False]
        assert all(b == os.path.getsize(states[s].path) for s, b in zip(rows["step"], rows["bytes"]))
    assert check_run(parent_run["run"]).ok


@pytest.mark.parametrize("step", [0, 1, 4, 6, 13])
def test_replay_child_reproduces_the_parent_bit_for_bit(parent_run, step):
    """Mid-epoch (1, 4, 13), at an epoch end (6) and before the first step (0)."""
    L = parent_run["L"]
    (state,) = read_parent_states(parent_run["run"], [step])
    train, val = loaders()
    child = train_child(state, make_module(L), SpawnData(train_dataloaders=train, val_dataloaders=val), until=TOTAL,
                        seed=None, trainer_kwargs=dict(TRAINER, accelerator="cpu", deterministic=True))
    assert same(child.state_dict(), parent_run["reference"])


def test_replay_child_to_an_earlier_step(parent_run):
    L = parent_run["L"]
    (state,) = read_parent_states(parent_run["run"], [4])
    train, val = loaders()
    child = train_child(state, make_module(L), SpawnData(train_dataloaders=train, val_dataloaders=val), until=9,
                        seed=None, trainer_kwargs=dict(TRAINER, accelerator="cpu"))
    assert same(child.state_dict(), parent_run["reference_9"])


def test_children_differ_only_in_data_order(parent_runs):
    run = parent_runs["lightning.pytorch"]
    L = run["L"]
    (state,) = read_parent_states(run["run"], [4])
    start = state.checkpoint()

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.momentum = [s["momentum_buffer"].clone() for s in trainer.optimizers[0].state_dict()["state"].values()]
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    children = {}
    for name, seed in (("a", 1), ("b", 2), ("a_again", 1)):
        seen, at_start = [], AtStart()
        train, val = loaders()
        module = train_child(state, make_module(L, seen), SpawnData(train_dataloaders=train, val_dataloaders=val),
                             until=16, seed=seed, trainer_kwargs=dict(TRAINER, callbacks=[at_start]))
        children[name] = (module.state_dict(), seen, at_start)
    for _, seen, at_start in children.values():
        # Each starts as the parent was at step 4: weights, momentum buffers, LR schedule.
        assert same(at_start.weights, start["state_dict"])
        expected = [s["momentum_buffer"] for s in start["optimizer_states"][0]["state"].values()]
        assert all(torch.equal(a, b) for a, b in zip(at_start.momentum, expected))
        assert at_start.lr == pytest.approx(0.1)  # StepLR(5, 0.5): halved after step 5, not yet at 4
        # The rest of the parent's epoch (batches 4, 5), then whole epochs: each a permutation.
        assert len(seen) == 12 and all(len(b) == BATCH for b in seen)
        epoch = sorted(i for b in seen[2:8] for i in b)
        assert epoch == list(range(N))
    (wa, seen_a, _), (wb, seen_b, _), (wa2, seen_a2, _) = children["a"], children["b"], children["a_again"]
    assert seen_a != seen_b and not same(wa, wb)
    assert seen_a == seen_a2 and same(wa, wa2)  # a child is its seed


def test_spawned_rows_land_in_the_file(tmp_path):
    L = namespace("lightning.pytorch")
    run = str(tmp_path / "run.h5")
    fit(L, [ParentStateMonitor(run, schedule=[0, 6], on_error="raise")], 12)
    train, val = loaders()
    kwargs = dict(train_dataloaders=train, val_dataloaders=val, trainer_kwargs=TRAINER, children=3, until=12,
                  probe=24, points=5, progress=False)
    result = spawn_children(run, make_module(L), spawn_steps=[6], linearized=True, slices=[-1.0, 0.0, 0.5, 1.0],
                            **kwargs)
    assert result.eval_set == "validation" and len(result.probe) == 24
    with open_run(run) as f:
        pairs, kids, lin = f[PAIRS], f[CHILDREN], f[LINEARIZED]
        assert len(pairs) == 3 and len(kids) == 3 and len(lin) == 1
        c = result.spawns[0].comparison
        np.testing.assert_array_equal(pairs["error_barrier"], c.error_barrier)
        np.testing.assert_array_equal(pairs["kernel_distance"], c.kernel_distance)
        np.testing.assert_array_equal(pairs["path_error"], c.path_error)
        assert pairs["path_error"].shape == (3, 5) and pairs["child_a"].tolist() == [0, 0, 1]
        np.testing.assert_array_equal(kids["seed"], result.spawns[0].seeds)
        assert lin["step"].tolist() == [6] and np.isfinite(lin["linear_loss"]).all()
        assert pairs.attrs["settings"]["eval_set"] == "validation"
        assert f.history[-1]["event"] == "landscape"
        cut = f[SLICES]
        np.testing.assert_array_equal(cut.group["coordinate"][()], [-1.0, 0.0, 0.5, 1.0])
        np.testing.assert_array_equal(cut["loss"][0], result.spawns[0].slice.loss)
        # The slice's centre is the parent state itself: its loss there, computed by hand.
        (state,) = read_parent_states(run, [6])
        net = make_module(L)
        net.load_state_dict(state.checkpoint()["state_dict"])
        net.eval()
        xs, ys = zip(*[(x, y) for x, y, _ in val])
        with torch.no_grad():
            loss = nn.functional.cross_entropy(net(torch.cat(xs)), torch.cat(ys))
        assert cut["loss"][0, 1] == pytest.approx(float(loss), rel=1e-5)
    # A second call adds rows of step 0 before those of step 6; measuring step 6 again replaces its rows.
    spawn_children(run, make_module(L), spawn_steps=[0, 6], **kwargs)
    with open_run(run) as f:
        assert f[PAIRS]["spawn_step"].tolist() == [0, 0, 0, 6, 6, 6]
        assert f[CHILDREN]["spawn_step"].tolist() == [0, 0, 0, 6, 6, 6]
        assert f[LINEARIZED]["step"].tolist() == [6]  # not measured again: kept
        assert f["parents"]["step"].tolist() == [0, 6, 12]  # the training's tables stay
    assert check_run(run).ok
    with pytest.raises(StoreError, match="replace=True"):
        spawn_children(run, make_module(L), spawn_steps=[6], **dict(kwargs, points=3))
    spawn_children(run, make_module(L), spawn_steps=[6], replace=True, **dict(kwargs, points=3))
    with open_run(run) as f:
        assert f[PAIRS]["spawn_step"].tolist() == [6, 6, 6] and f[PAIRS]["path_error"].shape == (3, 3)


def _hand_error(net, state, x, y):
    net.load_state_dict(state)
    with torch.no_grad():
        return float((net(x).argmax(1) != y).double().mean())


def test_compare_children_against_hand_computations():
    torch.manual_seed(0)
    x, y = blob_data(n=40).tensors
    net = tiny_net()
    parent = {k: v.clone() for k, v in net.state_dict().items()}
    children = [{k: v + 0.3 * torch.randn_like(v) for k, v in parent.items()} for _ in range(3)]
    c = compare_children(net, children, parent, (x, y), x[:10], points=5)
    # Barrier: errors at hand-interpolated weights; max minus the mean of the ends.
    for p, (i, j) in enumerate(c.pairs):
        errors = [_hand_error(net, {k: (1 - a) * children[i][k] + a * children[j][k] for k in parent}, x, y)
                  for a in np.linspace(0, 1, 5)]
        np.testing.assert_allclose(c.path_error[p], errors, atol=1e-12)
        assert c.error_barrier[p] == pytest.approx(max(errors) - (errors[0] + errors[-1]) / 2)
        flat = torch.cat([(children[i][k].double() - children[j][k].double()).flatten() for k in parent])
        assert c.weight_distance[p] == pytest.approx(float(flat.norm()), rel=1e-12)
        net.load_state_dict(children[i])
        pi = net(x[:10]).argmax(1)
        net.load_state_dict(children[j])
        pj = net(x[:10]).argmax(1)
        assert c.disagreement[p] == pytest.approx(float((pi != pj).double().mean()))
    # Kernel distance of trace eNTKs built from float64 Jacobians by hand.
    net64 = copy.deepcopy(net).double()

    def kernel(state):
        params = {k: v.double() for k, v in state.items()}
        jac = torch.func.jacrev(lambda p: torch.func.functional_call(net64, p, (x[:10].double(),)))(params)
        J = torch.cat([j.reshape(10, 3, -1) for j in jac.values()], dim=2)
        return torch.einsum("acp,bcp->ab", J, J).detach().numpy() / 3

    K = [kernel(s) for s in children]
    Kp = kernel(parent)

    def S(a, b):
        return 1 - np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))

    for p, (i, j) in enumerate(c.pairs):
        assert c.kernel_distance[p] == pytest.approx(S(K[i], K[j]), rel=1e-4, abs=1e-7)
    np.testing.assert_allclose(c.kernel_distance_to_parent, [S(k, Kp) for k in K], rtol=1e-4, atol=1e-7)
    # Identical children: every pairwise measurement is exactly 0.
    twin = compare_children(net, [parent, parent], parent, (x, y), x[:10], points=3)
    assert twin.error_barrier[0] == 0 and twin.loss_barrier[0] == 0 and twin.weight_distance[0] == 0
    assert twin.disagreement[0] == 0 and twin.kernel_distance[0] == 0


def test_a_crash_while_writing_a_state_leaves_only_complete_states(tmp_path):
    """The process dies (SIGKILL) after writing the third state's bytes, before the rename."""
    run = str(tmp_path / "run.h5")
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            import lightning_ntk.parent_states as ps

            calls = []
            real = os

            def replace(src, dst):
                calls.append(dst)
                if len(calls) == 3:
                    real.kill(real.getpid(), signal.SIGKILL)
                return real.replace(src, dst)

            ps.os = types.SimpleNamespace(**{n: getattr(real, n) for n in dir(real) if not n.startswith("__")})
            ps.os.replace = replace
            fit(namespace("lightning.pytorch"), [ParentStateMonitor(run, schedule=[0, 2, 4, 6], on_error="raise")], 10)
        except BaseException:  # pragma: no cover - reported by the exit code
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    folder = run + ".parents"
    assert sorted(state_files(folder)) == [0, 2]
    assert any(name.endswith(".tmp") for name in os.listdir(folder))  # the interrupted write, never a state
    for state in read_parent_states(run):
        assert state.checkpoint()[PARENT_KEY]["step"] == state.step
    assert same(read_parent_states(run, [2])[0].checkpoint()["state_dict"],
                fit(namespace("lightning.pytorch"), [], 2))
    assert check_run(run).ok
    with open_run(run) as f:  # a row never names a state that is not there
        assert set(f["parents"]["step"].tolist()) <= {0, 2}


def no_dropout():
    net = tiny_net(dropout=0.3)
    net[2] = nn.Identity()  # same layout (state_dict keys), no random draws
    return net


class FixedOrder(Sampler):
    def __init__(self, n):
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()

    def __iter__(self):
        return iter(self.order)

    def __len__(self):
        return len(self.order)


class StatefulShuffle(Sampler):
    """A shuffling sampler with a state of its own (state_dict), as stateful samplers have."""

    def __init__(self, n):
        self.n, self.epochs = n, 0

    def __iter__(self):
        self.epochs += 1
        return iter(torch.randperm(self.n).tolist())

    def __len__(self):
        return self.n

    def state_dict(self):
        return {"epochs": self.epochs}


def test_what_cannot_be_replayed_is_recorded(tmp_path):
    L = namespace("lightning.pytorch")
    for name, train in (("stateful", DataLoader(Indexed(), batch_size=BATCH, sampler=StatefulShuffle(N))),
                        ("generator", DataLoader(Indexed(), batch_size=BATCH, shuffle=True,
                                                 generator=torch.Generator().manual_seed(3)))):
        run = str(tmp_path / f"{name}.h5")
        torch.manual_seed(0)
        t = trainer(L, [ParentStateMonitor(run, schedule=[2], on_error="raise")], max_epochs=-1, max_steps=4)
        t.fit(make_module(L), train)
        (state,) = read_parent_states(run, [2])
        assert not state.can_replay
        assert ("state of its own" if name == "stateful" else "generator of its own") in state.replayable
        with pytest.raises(SpawnError, match="cannot be replayed"):
            train_child(state, make_module(L), SpawnData(train_dataloaders=train), until=4, seed=None)
        with open_run(run) as f:
            assert f["parents"]["replayable"].tolist() == [False, False, False]


class Stream(IterableDataset):
    def __iter__(self):
        return iter(Indexed())


def test_refusals(tmp_path):
    L = namespace("lightning.pytorch")
    run = str(tmp_path / "run.h5")
    fit(L, [ParentStateMonitor(run, schedule=[3], on_error="raise")], 8)
    states = read_parent_states(run)
    assert [s.step for s in states] == [0, 3, 8]
    state, final = states[1], states[-1]
    data = SpawnData(train_dataloaders=loaders()[0])
    with pytest.raises(SpawnError, match="cannot be replayed: the final state"):
        train_child(final, make_module(L), data, until=12, seed=None)
    with pytest.raises(SpawnError, match="must train past it"):
        train_child(state, make_module(L), data, until=3, seed=1)
    with pytest.raises(SpawnError, match="does not shuffle"):
        train_child(state, make_module(L), SpawnData(train_dataloaders=loaders(shuffle=False)[0]), until=5, seed=1)
    with pytest.raises(SpawnError, match="IterableDataset"):
        train_child(state, make_module(L), SpawnData(train_dataloaders=DataLoader(Stream(), batch_size=BATCH)),
                    until=5, seed=1)
    with pytest.raises(SpawnError, match="devices=1"):
        train_child(state, make_module(L), data, until=5, seed=1, trainer_kwargs={"devices": 2})
    with pytest.raises(ValueError, match="exactly one of steps= .* and until="):
        spawn_children(run, make_module(L), train_dataloaders=loaders()[0], steps=2, until=5)
    with pytest.raises(ValueError, match="children must be an integer >= 2"):
        spawn_children(run, make_module(L), train_dataloaders=loaders()[0], children=1, steps=2)
    with pytest.raises(ValueError, match=r"no parent state at step\(s\) \[5\]"):
        spawn_children(run, make_module(L), train_dataloaders=loaders()[0], steps=2, spawn_steps=[5])
    fixed = DataLoader(Indexed(), batch_size=BATCH, sampler=FixedOrder(N))
    with pytest.raises(SpawnError, match="identical weights although their seeds differ"):  # no dropout either
        spawn_children(run, make_module(L, net=no_dropout()), train_dataloaders=fixed, steps=2, spawn_steps=[3], progress=False,
                       write=False)
    # The run file still open for writing in this process (a training that has not ended).
    store = RunStore.acquire(run, owner="still-training", resume=True)
    try:
        with pytest.raises(StoreError, match="still open for writing in this process"):
            spawn_children(run, make_module(L), train_dataloaders=loaders()[0], steps=2, spawn_steps=[3],
                           progress=False)
    finally:
        store.release("still-training")
    # A new run onto a folder of another run's states.
    other = str(tmp_path / "other.h5")
    os.makedirs(other + ".parents")
    os.rename(state.path, os.path.join(other + ".parents", os.path.basename(state.path)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        fit(L, [ParentStateMonitor(other, on_error="raise")], 2)
    fit(L, [ParentStateMonitor(other, schedule=[1], on_error="raise", overwrite=True)], 2)
    assert sorted(state_files(other + ".parents")) == [0, 1, 2]  # the other run's step 3 is gone


def test_cli_spawn(tmp_path, capsys):
    from lightning_ntk.cli import main

    L = namespace("lightning.pytorch")
    run = str(tmp_path / "run.h5")
    fit(L, [ParentStateMonitor(run, schedule=[2], on_error="raise")], 6)
    factory = tmp_path / "factory.py"
    factory.write_text(
        "from tests.test_spawn import loaders, make_module\n"
        "from tests.models import namespace\n"
        "def build():\n"
        "    train, val = loaders()\n"
        "    return {'module': make_module(namespace('lightning.pytorch')), 'train_dataloaders': train,\n"
        "            'val_dataloaders': val, 'trainer_kwargs': {'limit_val_batches': 2, 'num_sanity_val_steps': 0}}\n")
    code = main(["spawn", run, "--until", "6", "--at", "2", "--factory", f"{factory}:build", "--probe", "16",
                 "--points", "3"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "child 1/2" in out.err and "child 2/2" in out.err
    assert out.out.splitlines()[1].split()[0] == "2"
    with open_run(run) as f:
        assert f[PAIRS]["spawn_step"].tolist() == [2]
    # Without a factory the parent state must name importable classes and a datamodule.
    assert main(["spawn", run, "--until", "6", "--at", "2"]) == 2
    assert "dataloaders passed to Trainer.fit" in capsys.readouterr().err


class ImportableModule(L_MAIN.LightningModule):
    """A module and datamodule the CLI can rebuild from a parent state (save_hyperparameters)."""

    def __init__(self, lr: float = 0.1, hidden: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = tiny_net(hidden=hidden)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ImportableData(L_MAIN.LightningDataModule):
    def __init__(self, batch_size: int = BATCH):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return DataLoader(Indexed(), batch_size=self.hparams.batch_size, shuffle=True)


def test_cli_spawn_rebuilds_the_parents_classes(tmp_path, capsys):
    from lightning_ntk.cli import main

    run = str(tmp_path / "run.h5")
    torch.manual_seed(0)
    t = trainer(L_MAIN, [ParentStateMonitor(run, schedule=[3], on_error="raise")], max_epochs=-1, max_steps=8,
                gradient_clip_val=1.0)
    t.fit(ImportableModule(lr=0.05, hidden=8), datamodule=ImportableData(batch_size=24))
    (state,) = read_parent_states(run, [3])
    assert state.info["module"] == "tests.test_spawn:ImportableModule"
    assert state.info["trainer"]["gradient_clip_val"] == 1.0
    assert main(["spawn", run, "--steps", "4", "--at", "3", "--probe", "16", "--points", "3", "--quiet"]) == 0
    with open_run(run) as f:
        assert f[PAIRS]["trained_to"].tolist() == [7] and f[PAIRS].attrs["settings"]["eval_set"] == "train"
    main(["spawn", run, "--steps", "4", "--at", "3", "--probe", "16", "--points", "3", "--factory", "nowhere:x"])
    assert "No module named 'nowhere'" in capsys.readouterr().err


def test_linearised_network_of_a_linear_network_is_the_network(tmp_path):
    """A linear model is its own linearisation: trained from the same state with the same
    seed, optimiser state and budget, the linearised network ends where the real one does."""
    L = namespace("lightning.pytorch")
    run = str(tmp_path / "run.h5")
    linear = lambda: nn.Sequential(nn.Linear(6, 3))  # noqa: E731
    torch.manual_seed(0)
    module = make_module(L, net=linear())
    t = trainer(L, [ParentStateMonitor(run, schedule=[4], on_error="raise")], max_epochs=-1, max_steps=10, **TRAINER)
    train, val = loaders()
    t.fit(module, train, val)
    result = spawn_children(run, make_module(L, net=linear()), train_dataloaders=train, val_dataloaders=val,
                            trainer_kwargs=TRAINER, until=10, spawn_steps=[4], linearized=True, probe=16, points=3,
                            progress=False, write=False)
    lin = result.spawns[0].linearized
    assert lin.real_loss != lin.parent_loss  # it trained
    assert lin.linear_loss == pytest.approx(lin.real_loss, rel=1e-5)
    assert lin.linear_error == lin.real_error


def test_report_draws_the_landscape_tables(tmp_path):
    from lightning_ntk.analysis import plot_spawn_barrier, plot_spawn_kernel_distance, write_report

    L = namespace("lightning.pytorch")
    run = str(tmp_path / "run.h5")
    fit(L, [ParentStateMonitor(run, schedule=[0, 3], on_error="raise")], 8)
    train, val = loaders()
    spawn_children(run, make_module(L), train_dataloaders=train, val_dataloaders=val, trainer_kwargs=TRAINER,
                   children=3, until=8, spawn_steps=[0, 3], linearized=True, slices=[-0.5, 0.0, 0.5], probe=16,
                   points=3, progress=False)
    with open_run(run) as f:
        pairs = f[PAIRS]
        steps, barriers = pairs["spawn_step"], pairs["error_barrier"]
        ax = plot_spawn_barrier(f)
        (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "run:error_barrier"]
        np.testing.assert_array_equal(line.get_xdata(), [0, 3])
        np.testing.assert_allclose(line.get_ydata(), [barriers[steps == s].mean() for s in (0, 3)])
        ax = plot_spawn_kernel_distance(f)
        gids = {ln.get_gid() for ln in ax.get_lines()}
        assert {"run:kernel_distance", "run:kernel_distance_to_parent"} <= gids
    page = open(write_report(run, tmp_path / "report", progress=False, strict=True)).read()
    for anchor in ("spawn-barrier", "spawn-kernel", "spawn-paths", "linearized", "slices"):
        assert f'id="{anchor}"' in page


def test_a_failed_landscape_write_leaves_the_run_file_as_it_was(tmp_path, monkeypatch):
    from lightning_ntk.landscape_records import LandscapeRows, linearized_fields, write_landscape
    from lightning_ntk.store import Field
    from lightning_ntk.store._writer import Table

    path = str(tmp_path / "run.h5")
    store = RunStore.acquire(path, owner="m")
    table = store.declare_table("ntk", [Field("step", (), "int64"), Field("trace")])
    store.start_swmr()
    table.append(step=0, trace=1.0)
    store.release("m")
    with open(path, "rb") as handle:
        before = handle.read()
    rows = LandscapeRows(LINEARIZED, linearized_fields(), {
        "step": [0], "epoch": [0.0], "trained_to": [5], "seed": [0], "linear_error": [0.1], "linear_loss": [0.2],
        "real_error": [0.1], "real_loss": [0.2], "parent_error": [0.9], "parent_loss": [2.3]},
        key="step", row_dim="step", settings={"eval_set": "validation", "task": "multiclass"})

    def full_disk(self, columns):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Table, "extend", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_landscape(path, [rows])
    with open(path, "rb") as handle:
        assert handle.read() == before
    assert not os.path.exists(path + ".writing") and not os.path.exists(path + ".lock")
    assert not RunStore.is_open(path)
    monkeypatch.undo()
    write_landscape(path, [rows])  # the file is free again
    with open_run(path) as run:
        assert run[LINEARIZED]["linear_error"].tolist() == [0.1]
