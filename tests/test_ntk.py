"""The empirical NTK engine against a float64 brute force (autograd loop over examples and
outputs), on every kind and method, plus tiling, memory errors and side effects."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ntk.ntk import (
    NTKMemoryError,
    _empirical,
    empirical_ntk,
    empirical_ntk_reference,
    estimate_ntk_memory,
    parse_memory,
)
from lightning_ntk.ntk._cost import flop_floor, outer_options, slot_options
from lightning_ntk.ntk._empirical import _Setup
from lightning_ntk.ntk._tiling import Tiling

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*batching rule.*:UserWarning",  # torch.func on CPU attention: slower, still exact
    "ignore:.*torch.jit.script.*:DeprecationWarning",  # torch internals
)

KINDS = ["full", "trace", "diagonal", "pseudo"]
METHODS = ["structured", "jacobian", "ntvp"]
TOL = 1e-5  # relative, float32 against the float64 reference


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------


class CNN(nn.Module):
    """Padding (zeros and reflect), pooling, stride, groups, dilation."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.c3 = nn.Conv2d(6, 5, 2, dilation=2, bias=False)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.c2(x)), 1)
        x = self.c3(F.pad(x, (1, 1, 1, 1)))
        return self.fc(x.flatten(1))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)  # modifies the BatchNorm outputs in place

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + x)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = Block(4)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.gn(self.block(x)).mean((2, 3)))


class Transformer(nn.Module):
    """Embedding (padding_idx), a positional Parameter, LayerNorm, attention by Linear layers
    on (N, S, d) tensors, an MLP, RMSNorm, mean pooling."""

    def __init__(self, vocab=11, d=8, seq=5, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, idx):
        h = self.emb(idx) + self.pos
        a = self.ln1(h)
        q, k, v = self.q(a), self.k(a), self.v(a)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        h = h + self.o(att @ v)
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.head(self.norm(h).mean(1))


class MHA(nn.Module):
    """nn.MultiheadAttention uses its out_proj weight functionally: the generic path."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.att(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class TiedEmbedding(nn.Module):
    """One Parameter in two modules: the embedding table is the output layer's weight."""

    def __init__(self, vocab=7, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mix(self.emb(idx))).mean(1))


class TiedLinear(nn.Module):
    """A Linear called twice (reuse) and a second Linear sharing its weight."""

    def __init__(self, d=5):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.a(torch.tanh(self.a(x))))
        return self.head(torch.sin(self.b(h)))


class FunctionalTie(nn.Module):
    """The embedding table also used through F.linear, outside its module."""

    def __init__(self, vocab=6, d=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)

    def forward(self, idx):
        return F.linear(self.ln(self.emb(idx).mean(1)), self.emb.weight)


class TwoHeads(nn.Module):
    """Logits from two branches: each logit depends on some layers only (None gradients)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.a = nn.Linear(12, 2)
        self.b = nn.Linear(12, 1)

    def forward(self, x):
        h = torch.tanh(self.conv(x.view(-1, 2, 6))).flatten(1)
        return torch.cat([self.a(h), self.b(torch.sin(h))], 1)


class SeqFirst(nn.Module):
    """A Linear applied to a (S, N, d) tensor: the batch is not its first axis."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x (N, S, 3)
        h = torch.tanh(self.lin(x.transpose(0, 1)))  # (S, N, 4)
        return self.head(h.sum(0))


class Conv13(nn.Module):
    """Conv1d (circular 'same' padding, dilation), Conv3d (stride), BatchNorm1d, (N,) output."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding="same", padding_mode="circular", dilation=2)
        self.c3 = nn.Conv3d(1, 2, 2, stride=(1, 2, 1))
        self.bn = nn.BatchNorm1d(3)
        self.fc = nn.Linear(5, 1)

    def forward(self, x):
        n = x.shape[0]
        a = self.bn(torch.relu(self.c1(x[:, :12].reshape(n, 2, 6)))).mean(-1)
        b = torch.relu(self.c3(x[:, 12:].reshape(n, 1, 2, 4, 3))).mean((2, 3, 4))
        return self.fc(torch.cat([a, b], 1)).squeeze(1)


class Widening(nn.Module):
    """Widening convolutions with downsampling (stride 2, a grouped and a dilated conv),
    eval-mode BatchNorm, a residual block with a 1x1 projection shortcut, and one conv
    called twice (its weight tied across the two calls)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.short = nn.Conv2d(4, 8, 1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.wide = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.down(x)))
        h = self.mid(torch.tanh(self.mid(h)))  # the same conv twice
        h = torch.relu(h + self.bn2(self.short(x)))
        return self.head(torch.relu(self.wide(h)).mean((2, 3)))


def mlp(widths=(6, 9, 7, 4)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh() if i % 2 == 0 else nn.ReLU())
    return nn.Sequential(*layers)


def randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def frozen_mlp():
    net = mlp()
    net[0].weight.requires_grad_(False)
    net[2].requires_grad_(False)
    return net


def build(name):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(), torch.randn(5, 6), torch.randn(3, 6)
    if name == "cnn":
        return CNN(), torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)
    if name == "resnet_bn":
        return randomize_bn(ResNet()), torch.randn(4, 3, 6, 6), torch.randn(2, 3, 6, 6)
    if name == "transformer":
        return Transformer(), torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (3, 5))
    if name == "tied_embedding":
        return TiedEmbedding(), torch.randint(0, 7, (4, 3)), torch.randint(0, 7, (3, 3))
    if name == "tied_linear":
        return TiedLinear(), torch.randn(4, 5), torch.randn(2, 5)
    if name == "functional_tie":
        return FunctionalTie(), torch.randint(0, 6, (4, 3)), torch.randint(0, 6, (2, 3))
    if name == "frozen":
        return frozen_mlp(), torch.randn(4, 6), torch.randn(3, 6)
    if name == "conv13":
        return randomize_bn(Conv13()), torch.randn(4, 36), torch.randn(3, 36)
    if name == "two_heads":
        return TwoHeads(), torch.randn(4, 12), torch.randn(3, 12)
    if name == "seq_first":
        return SeqFirst(), torch.randn(3, 4, 3), torch.randn(2, 4, 3)
    if name == "mha":
        return MHA(), torch.randn(3, 4, 4), torch.randn(2, 4, 4)
    if name == "widening":
        return randomize_bn(Widening()), torch.randn(5, 3, 8, 8), torch.randn(3, 3, 8, 8)
    raise KeyError(name)


MODELS = [
    "mlp",
    "cnn",
    "widening",
    "resnet_bn",
    "transformer",
    "tied_embedding",
    "tied_linear",
    "functional_tie",
    "frozen",
    "conv13",
    "seq_first",
    "two_heads",
    "mha",
]

_cache: dict = {}


def model_and_reference(name, kind, cross):
    """(model, x1, x2 or None, reference kernel), the reference computed once per case."""
    if name not in _cache:
        _cache[name] = build(name)
    model, x1, x2 = _cache[name]
    key = (name, kind, cross)
    if key not in _cache:
        _cache[key] = empirical_ntk_reference(model, x1, x2 if cross else None, kind=kind)
    return model, x1, (x2 if cross else None), _cache[key]


def rel_err(k, ref):
    return float((k.double() - ref).abs().max() / ref.abs().max())


# ----------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cross", [False, True], ids=["x1=x2", "x1!=x2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_structured_matches_reference(name, kind, cross):
    model, x1, x2, ref = model_and_reference(name, kind, cross)
    k = empirical_ntk(model, x1, x2, kind=kind, method="structured")
    assert k.dtype == torch.float32 and k.shape == ref.shape
    assert rel_err(k, ref) < TOL


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "auto"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet_bn", "transformer", "tied_embedding", "functional_tie"])
def test_other_methods_match_reference(name, kind, method):
    cross = kind in ("trace", "pseudo")  # both settings covered across kinds
    model, x1, x2, ref = model_and_reference(name, kind, cross)
    k = empirical_ntk(model, x1, x2, kind=kind, method=method)
    assert rel_err(k, ref) < TOL


def test_ntvp_refuses_clearly_without_forward_ad():
    model, x1, _ = build("mha")  # scaled_dot_product_attention has no forward-mode AD on CPU
    with pytest.raises(RuntimeError, match="forward-mode AD.*method='structured'"):
        empirical_ntk(model, x1, kind="trace", method="ntvp")


def test_mha_jacobian_matches_reference():
    model, x1, x2, ref = model_and_reference("mha", "full", True)
    assert rel_err(empirical_ntk(model, x1, x2, method="jacobian"), ref) < TOL


def test_float64_dtype():
    model, x1, x2, ref = model_and_reference("transformer", "full", True)
    k = empirical_ntk(model, x1, x2, dtype=torch.float64)
    assert k.dtype == torch.float64
    assert rel_err(k, ref) < 1e-12


def test_kinds_are_consistent_with_the_full_kernel():
    model, x1, _ = build("cnn")
    full = empirical_ntk(model, x1, kind="full", dtype=torch.float64)
    diag = torch.diagonal(full, dim1=2, dim2=3)
    torch.testing.assert_close(empirical_ntk(model, x1, kind="diagonal", dtype=torch.float64), diag)
    torch.testing.assert_close(empirical_ntk(model, x1, kind="trace", dtype=torch.float64), diag.mean(-1))
    C = full.shape[-1]
    torch.testing.assert_close(empirical_ntk(model, x1, kind="pseudo", dtype=torch.float64), full.sum((2, 3)) / C)


# ----------------------------------------------------------------------------------------
# contraction orders, tilings and the per-layer cost model
# ----------------------------------------------------------------------------------------

ORDERS = ["per_example", "patch", "patch_h"]


@pytest.mark.parametrize("cross", [False, True], ids=["x1=x2", "x1!=x2"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", ["cnn", "widening", "conv13", "transformer", "tied_embedding", "tied_linear"])
def test_every_contraction_order_matches_reference(name, order, kind, cross, monkeypatch):
    """Each layer forced into one order (patch_h exists for full kernels with several
    positions only; other slots keep the model's choice)."""
    model, x1, x2, ref = model_and_reference(name, kind, cross)
    monkeypatch.setattr(_empirical, "_FORCE_MODES", {"*": order})
    with torch.enable_grad():
        setup = _Setup(model, x1, x2, kind, None, "structured", False, None, None)
    offered = any(order in slot_options(s, kind, setup.K, 2, 2, True) for s in setup.plan.structured)
    assert offered == (order != "patch_h" or (kind == "full" and setup.K > 1))
    if offered:
        assert order in {s.mode for s in setup.plan.structured}
    assert rel_err(setup.run(), ref) < TOL


def _with_tiling(model, x1, x2, kind, tiling, per_layer=False):
    with torch.enable_grad():
        setup = _Setup(model, x1, x2, kind, None, "structured", per_layer, torch.float64, None)
        (step,) = setup.steps
        setup.steps = [(step[0], step[1], tiling)]
        return setup.run()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cross", [False, True], ids=["x1=x2", "x1!=x2"])
def test_tilings_match_reference(kind, cross):
    """Pass blocks, output-direction chunks, contraction blocks and streaming, in
    combinations that do not divide the sizes evenly; symmetric results stay exact mirrors."""
    torch.manual_seed(0)
    model = randomize_bn(Widening())
    x1, x2 = torch.randn(7, 3, 8, 8), (torch.randn(5, 3, 8, 8) if cross else None)
    ref = empirical_ntk_reference(model, x1, x2, kind=kind)
    K = 1 if kind == "pseudo" else 3
    for block, keep, kd, sub in [(7, True, K, 3), (3, True, 2 if K > 1 else 1, 2), (3, False, 1, 1), (2, False, K, 2)]:
        if kind == "full" and kd != K:
            continue
        k = _with_tiling(model, x1, x2, kind, Tiling(block, keep, kd, sub, 0))
        assert rel_err(k, ref) < 1e-10, (block, keep, kd, sub)
        if not cross:
            perm = (1, 0, 3, 2) if kind == "full" else ((1, 0, 2) if kind == "diagonal" else (1, 0))
            assert torch.equal(k, k.permute(*perm))


def test_per_layer_with_direction_chunks():
    model, x1, _ = build("widening")
    parts = _with_tiling(model, x1, None, "diagonal", Tiling(2, True, 2, 1, 0), per_layer=True)
    for layer in ("stem", "mid", "short"):
        ref = empirical_ntk_reference(model, x1, kind="diagonal", params=[n for n, _ in model.named_parameters() if n.startswith(layer + ".")])
        assert rel_err(parts[layer], ref) < 1e-10


def test_budget_chooses_direction_chunks_before_streaming():
    """A trace kernel whose features for all K directions do not fit is computed in
    chunks of directions, every example's features kept (no recomputed backward passes)."""
    torch.manual_seed(0)
    model = randomize_bn(Widening())
    x = torch.randn(48, 3, 8, 8)
    with torch.enable_grad():
        src = _Setup(model, x, None, "trace", None, "structured", False, None, None).steps[0][1]
    K = 3
    # all examples' features for one direction, plus room for the passes of 8 examples;
    # too small to keep all examples' features for all K directions
    budget = 48 * 48 * 4 + 48 * src.feature_bytes(1) + 8 * src.activation_bytes(1) + 4 * src.temp_bytes(8, 8, 1)
    assert budget < 48 * 48 * 4 + 48 * src.feature_bytes(K) + src.activation_bytes(K)
    with torch.enable_grad():
        setup = _Setup(model, x, None, "trace", None, "structured", False, None, budget)
    (_, _, tiling), = setup.steps
    assert tiling.keep and tiling.kd < K
    assert setup.working_bytes + 48 * 48 * 4 <= budget
    ref = empirical_ntk_reference(model, x, kind="trace")
    assert rel_err(empirical_ntk(model, x, kind="trace", max_memory=budget), ref) < TOL


def test_cost_model_picks_the_cheaper_order():
    """Closed forms of the three orders (Novak et al. 2022) for one layer."""
    S, D, O, K, N = 64, 72, 16, 10, 32
    pairs = N * (N + 1) / 2
    opts = outer_options(S, D, O, K, "full", N, N, True)
    assert opts["per_example"] == N * K * S * D * O + pairs * K * K * D * O
    assert opts["patch"] == pairs * S * S * (D + K * K * O + K * K)
    assert opts["patch_h"] == pairs * (S * S * D + K * S * S * O + K * K * S * O)
    trace = outer_options(S, D, O, K, "trace", N, 20, False)
    assert trace["per_example"] == (N + 20) * K * S * D * O + N * 20 * K * D * O
    assert trace["patch"] == N * 20 * S * S * (D + K * O + K) and "patch_h" not in trace
    # large images: per-example gradients; a few positions, full kernel: patch_h; a Linear
    # on (N, D) inputs: the Hadamard product (X X^T) o (G G^T)
    assert min(outer_options(1024, 27, 32, 10, "full", 64, 64, True).items(), key=lambda kv: kv[1])[0] == "per_example"
    assert min(outer_options(16, 2304, 512, 10, "full", 64, 64, True).items(), key=lambda kv: kv[1])[0] == "patch_h"
    assert min(outer_options(1, 512, 512, 10, "full", 64, 64, True).items(), key=lambda kv: kv[1])[0] == "patch"


def test_flop_floor_of_an_mlp():
    """Forward, K backward passes (not through the first layer's input) and the Hadamard
    products of every layer, written out by hand for MLP 6-9-7-4, N = 5, x2 = x1."""
    model, x1, _ = build("mlp")
    with torch.enable_grad():
        plan = _Setup(model, x1, None, "trace", None, "structured", False, None, None).plan
    N, K, pairs = 5, 4, 15
    fwd = N * (6 * 9 + 9 * 7 + 7 * 4)
    bwd = N * K * (9 * 7 + 7 * 4)
    # weights: pairs * (D + K O + K) (S = 1); biases: pairs * K * O
    contraction = pairs * ((6 + K * 9 + K) + (9 + K * 7 + K) + (7 + K * 4 + K)) + pairs * K * (9 + 7 + 4)
    floor = flop_floor(plan, "trace", N)
    assert floor["forward"] == 2 * fwd and floor["backward"] == 2 * bwd
    assert floor["contraction"] == 2 * contraction
    assert floor["total"] == 2 * (fwd + bwd + contraction)


# ----------------------------------------------------------------------------------------
# which parameters
# ----------------------------------------------------------------------------------------


def test_plan_uses_rules_where_they_are_exact():
    def plan(name):
        model, x1, _ = build(name)
        with torch.enable_grad():
            return _Setup(model, x1, None, "full", None, "structured", False, None, None).plan

    assert plan("mlp").fallback == []
    assert plan("resnet_bn").fallback == []
    assert plan("transformer").fallback == ["pos"]
    assert plan("functional_tie").fallback == ["emb.weight"]
    assert plan("seq_first").fallback == ["lin.weight", "lin.bias"]
    assert set(plan("mha").fallback) == {"att.in_proj_weight", "att.in_proj_bias", "att.out_proj.weight", "att.out_proj.bias"}
    tied = plan("tied_embedding")
    assert [s.combine for s in tied.structured if s.name == "emb.weight"] == ["materialize"]
    assert [s.name for s in tied.structured].count("emb.weight") == 1  # one parameter object, counted once


def test_tied_parameter_counts_once_with_summed_uses():
    """Theta of a tied weight is J J^T of the total derivative (J_a + J_b)(J_a + J_b)^T."""
    model, x1, _ = build("tied_linear")
    tied = empirical_ntk(model, x1, params=["a.weight"], dtype=torch.float64)
    assert rel_err(tied, empirical_ntk_reference(model, x1, params=[model.b.weight])) < 1e-12  # an alias
    # per-module accounting (the untied model: J_a J_a^T + J_b J_b^T) misses the cross terms
    untied = copy.deepcopy(model)
    untied.b.weight = nn.Parameter(model.a.weight.detach().clone())
    per_module = empirical_ntk_reference(untied, x1, params=[untied.a.weight, untied.b.weight])
    assert rel_err(per_module, tied) > 1e-2
    # both names of the one object: still counted once
    assert torch.equal(empirical_ntk(model, x1, params=["a.weight", "b.weight"], dtype=torch.float64), tied)


def test_params_subset_by_object_and_name():
    model, x1, x2, _ = model_and_reference("cnn", "trace", True)
    chosen = [model.c2.weight, "fc.bias"]
    k = empirical_ntk(model, x1, x2, kind="trace", params=chosen)
    ref = empirical_ntk_reference(model, x1, x2, kind="trace", params=[model.c2.weight, model.fc.bias])
    assert rel_err(k, ref) < TOL


def test_frozen_parameters_are_excluded():
    model, x1, _ = build("frozen")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 3
    k = empirical_ntk(model, x1, dtype=torch.float64)
    torch.testing.assert_close(k, empirical_ntk_reference(model, x1, params=trainable))
    # a frozen parameter can still be asked for explicitly
    k0 = empirical_ntk(model, x1, params=[model[0].weight], kind="trace", dtype=torch.float64)
    torch.testing.assert_close(k0, empirical_ntk_reference(model, x1, params=[model[0].weight], kind="trace"))


def test_user_hooks_that_change_outputs_are_respected():
    model, x1, _ = build("mlp")
    handle = model[2].register_forward_hook(lambda m, args, out: torch.sin(3 * out))
    try:
        for method in METHODS:
            k = empirical_ntk(model, x1, kind="diagonal", method=method, dtype=torch.float64)
            assert rel_err(k, empirical_ntk_reference(model, x1, kind="diagonal")) < 1e-10
    finally:
        handle.remove()


def test_per_layer_sums_to_total_and_each_layer_is_exact():
    model, x1, x2, _ = model_and_reference("transformer", "full", True)
    parts = empirical_ntk(model, x1, x2, per_layer=True, dtype=torch.float64)
    total = empirical_ntk(model, x1, x2, dtype=torch.float64)
    assert list(parts)[:3] == ["pos", "emb", "ln1"]  # model order; root parameters are their own layer
    torch.testing.assert_close(sum(parts.values()), total)
    for layer in ("pos", "emb", "q", "norm"):
        names = [n for n, _ in model.named_parameters() if n == layer or n.startswith(layer + ".")]
        ref = empirical_ntk_reference(model, x1, x2, params=names)
        assert rel_err(parts[layer], ref) < 1e-10


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["diagonal", "pseudo"])
def test_per_layer_every_method(method, kind):
    model, x1, _ = build("resnet_bn")
    parts = empirical_ntk(model, x1, kind=kind, method=method, per_layer=True, dtype=torch.float64)
    total = empirical_ntk_reference(model, x1, kind=kind)
    assert rel_err(sum(parts.values()), total) < 1e-10
    assert set(parts) == {"stem", "bn", "block.conv1", "block.bn1", "block.conv2", "block.bn2", "gn", "head"}


# ----------------------------------------------------------------------------------------
# structure of the result
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_symmetric_and_psd(method):
    model, x1, _ = build("resnet_bn")
    full = empirical_ntk(model, x1, method=method)
    N, _, C, _ = full.shape
    assert torch.equal(full, full.permute(1, 0, 3, 2))  # exactly symmetric
    mat = full.permute(0, 2, 1, 3).reshape(N * C, N * C).double()
    eig = torch.linalg.eigvalsh(mat)
    assert eig.min() > -1e-5 * eig.max()
    for kind in ("trace", "pseudo"):
        k = empirical_ntk(model, x1, kind=kind, method=method)
        assert torch.equal(k, k.T)
        e = torch.linalg.eigvalsh(k.double())
        assert e.min() > -1e-5 * e.max()


def test_output_shapes():
    model, x1, x2 = build("mlp")
    assert empirical_ntk(model, x1, x2, kind="full").shape == (5, 3, 4, 4)
    assert empirical_ntk(model, x1, x2, kind="diagonal").shape == (5, 3, 4)
    assert empirical_ntk(model, x1, x2, kind="trace").shape == (5, 3)
    assert empirical_ntk(model, x1, kind="pseudo").shape == (5, 5)
    scalar, xs, _ = build("conv13")  # (N,) output: C = 1
    assert empirical_ntk(scalar, xs, kind="full").shape == (4, 4, 1, 1)


# ----------------------------------------------------------------------------------------
# memory: tiling and refusal
# ----------------------------------------------------------------------------------------


def test_too_large_request_raises_before_computing():
    model = mlp((6, 16, 10))
    x = torch.randn(2000, 6)  # full kernel: 2000^2 * 10^2 * 4 bytes = 1.49 GiB
    with pytest.raises(NTKMemoryError) as info:
        empirical_ntk(model, x, kind="full", max_memory="100MB")
    msg = str(info.value)
    assert "1.49 GiB" in msg and "(2000, 2000, 10, 10)" in msg
    assert "kind='trace'" in msg and "smaller probe" in msg and "max_memory" in msg
    assert isinstance(info.value, MemoryError)
    est = estimate_ntk_memory(model, x, kind="full", max_memory="100MB")
    assert not est.fits and est.output_bytes == 2000 * 2000 * 100 * 4


@pytest.mark.parametrize("method", METHODS)
def test_small_budget_tiles_and_matches_untiled(method):
    torch.manual_seed(0)
    model = mlp((8, 32, 32, 5))
    x1, x2 = torch.randn(60, 8), torch.randn(23, 8)
    for xb in (None, x2):
        untiled = empirical_ntk(model, x1, xb, method=method)
        out_bytes = untiled.numel() * 4
        budget = out_bytes + (2_000_000 if method == "ntvp" else 400_000)
        with torch.enable_grad():
            setup = _Setup(model, x1, xb, "full", None, method, False, None, budget)
        if method == "ntvp":
            _, _, vecs, rows = setup.steps[0]
            assert vecs < (xb if xb is not None else x1).shape[0] * 5 or rows < 60
        else:
            blocks = [step[2].block for step in setup.steps]
            assert len(setup.steps) > 1 or min(blocks) < 60  # parameter chunks or example blocks
        assert setup.working_bytes + out_bytes <= budget
        tiled = empirical_ntk(model, x1, xb, method=method, max_memory=budget)
        torch.testing.assert_close(tiled, untiled, rtol=1e-5, atol=1e-6 * float(untiled.abs().max()))


def test_streaming_features_match():
    """Features too large to keep for all examples: recomputed per column block."""
    torch.manual_seed(0)
    model = CNN()
    x = torch.randn(8, 3, 8, 8)
    untiled = empirical_ntk(model, x, kind="trace", method="structured")
    with torch.enable_grad():
        src = _Setup(model, x, None, "trace", None, "structured", False, None, None).steps[0][1]
    # room for the features (one output direction) of 4 examples (of 8) and one example's activations
    feats, acts = src.feature_bytes(1), src.activation_bytes(1)
    budget = untiled.numel() * 4 + 4 * feats + acts + 2 * src.temp_bytes(2, 2, 1)
    with torch.enable_grad():
        setup = _Setup(model, x, None, "trace", None, "structured", False, None, budget)
    (_, _, tiling), = setup.steps
    assert not tiling.keep and tiling.block < 8  # streaming
    tiled = empirical_ntk(model, x, kind="trace", method="structured", max_memory=budget)
    torch.testing.assert_close(tiled, untiled, rtol=1e-5, atol=1e-6 * float(untiled.abs().max()))


def test_parse_memory():
    assert parse_memory(1234) == 1234
    assert parse_memory("2GB") == 2 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5 GiB") == 3 * 2**29
    assert parse_memory("64kb") == 64_000
    for bad in ("two GB", "5 parsecs", "-1GB", ""):
        with pytest.raises(ValueError, match="max_memory"):
            parse_memory(bad)
    with pytest.raises(TypeError, match="max_memory"):
        parse_memory(2.5)  # type: ignore[arg-type]


def test_estimate_matches_output_size():
    model, x1, x2 = build("cnn")
    est = estimate_ntk_memory(model, x1, x2, kind="diagonal", per_layer=True, max_memory="1GB")
    assert est.output_bytes == 4 * 3 * 3 * 4 * 4  # N1 N2 C x 4 layers x float32
    assert est.fits and est.shape == (4, 3, 3) and est.max_memory == 10**9
    assert est.minimum_bytes <= est.output_bytes + est.working_bytes


# ----------------------------------------------------------------------------------------
# hygiene and errors
# ----------------------------------------------------------------------------------------


def test_no_side_effects():
    model, x1, _ = build("resnet_bn")
    model.head.weight.grad = torch.ones_like(model.head.weight)
    model.block.train(False)
    model.gn.train(True)  # GroupNorm does not care; its flag must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    for method in METHODS:
        empirical_ntk(model, x1, kind="trace", method=method)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert model.stem.weight.grad is None
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


def test_embedding_max_norm_does_not_renormalise_the_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4, max_norm=0.5)  # renormalises rows in place in forward
            self.head = nn.Linear(4, 3)

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    torch.manual_seed(0)
    model, x = Net(), torch.randint(0, 9, (4, 3))
    table = model.emb.weight.detach().clone()
    k = empirical_ntk(model, x, kind="trace")
    assert torch.equal(model.emb.weight.detach(), table)
    assert rel_err(k, empirical_ntk_reference(model, x, kind="trace")) < TOL


def test_dropout_in_training_mode_warns_and_keeps_rng():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="dropout"):
        empirical_ntk(model, x, kind="trace", method="structured")
    assert torch.equal(torch.get_rng_state(), rng)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empirical_ntk(model, x, kind="trace")


def test_batchnorm_with_batch_statistics_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"BatchNorm module '1' is in training mode.*model\.eval\(\)"):
        empirical_ntk(model, torch.randn(3, 4))
    model.eval()
    model[1].running_mean = None
    model[1].running_var = None
    model[1].track_running_stats = False
    with pytest.raises(ValueError, match="track_running_stats=False"):
        empirical_ntk(model, torch.randn(3, 4))


def test_examples_coupled_through_the_batch_are_refused():
    class Centre(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            return h - h.mean(0)  # every output depends on the whole batch

    with pytest.raises(ValueError, match="changes with the other examples"):
        empirical_ntk(Centre(), torch.randn(5, 4))


def test_inference_mode_is_refused():
    model, x1, _ = build("mlp")
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            empirical_ntk(model, x1)
    # inference tensors as inputs are fine outside inference mode
    with torch.inference_mode():
        xi = x1.clone()
    torch.testing.assert_close(empirical_ntk(model, xi, kind="trace"), empirical_ntk(model, x1, kind="trace"))


def test_bad_arguments():
    model, x1, x2 = build("mlp")
    with pytest.raises(ValueError, match="kind must be one of"):
        empirical_ntk(model, x1, kind="ful")
    with pytest.raises(ValueError, match="method must be one of"):
        empirical_ntk(model, x1, method="fast")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        empirical_ntk(model, x1, params=["0.weights"])
    with pytest.raises(ValueError, match="same shape"):
        empirical_ntk(model, x1, torch.randn(2, 7))
    with pytest.raises(TypeError, match="dtype"):
        empirical_ntk(model, x1, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\)"):
        empirical_ntk(nn.Sequential(nn.Linear(6, 4), nn.Unflatten(1, (2, 2))), x1)
    with pytest.raises(TypeError, match="one tensor of logits"):

        class Pair(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(6, 2)

            def forward(self, x):
                return self.lin(x), x

        empirical_ntk(Pair(), x1)
