"""Tiling under a memory budget: example blocks, output-direction chunks, contraction blocks.

A *source* yields features for a block of examples and a range of output directions
(:class:`~._structured.StructuredSource`, :class:`~._jacobian.JacobianSource`). Three sizes
are chosen to fit the budget (:func:`plan_tiling`):

* ``block``: examples per forward/backward pass. Features of all examples are kept when
  they fit (each block's features computed once); otherwise they are streamed (a row
  block's features are kept while the column blocks' features are recomputed).
* ``directions``: for the kinds that sum or separate output directions (trace, diagonal)
  the K directions can be processed in chunks, each with its own passes, so that the
  features of all examples fit for one chunk at a time (one extra forward pass per chunk
  instead of streaming's recomputed backward passes). Full kernels couple every pair of
  directions and take all K at once.
* ``sub``: examples per contraction block. With ``x2=None`` only contraction blocks on and
  above the diagonal are computed and mirrored (so the result is exactly symmetric and
  about half the Gram work is skipped even when all features come from one pass), and the
  temporaries of patch contractions stay bounded.

Among the tilings that fit, the one of least modelled cost is taken (:func:`tiling_cost`:
the multiply-adds of the source's passes and contractions, with a per-pass overhead and
a lower GEMM rate for small contraction blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Tuple

from torch import Tensor

from ._features import Feature, contract, new_acc, take


@dataclass(frozen=True)
class WorkModel:
    """Multiply-adds of a source, for choosing among tilings that fit: ``forward`` per
    example and pass; ``per_direction`` per example and output direction (backward pass,
    per-example Jacobians); ``per_pair`` per example pair and direction chunk;
    ``per_pair_direction`` per example pair and direction."""

    forward: float
    per_direction: float
    per_pair: float
    per_pair_direction: float
    slots: int = 1  # contraction calls per block pair


class Source(Protocol):
    slots: List[Tuple[int, str]]

    def work(self) -> WorkModel: ...

    def feature_bytes(self, kd: int) -> int: ...

    def activation_bytes(self, kd: int) -> int: ...

    def temp_bytes(self, b1: int, b2: int, kd: int) -> int: ...

    def compute(self, xb: Tensor, dirs: Tuple[int, int]) -> Dict[int, Feature]: ...


@dataclass(frozen=True)
class Tiling:
    block: int  # examples per forward/backward pass
    keep: bool  # features of all examples kept (else streamed)
    kd: int  # output directions per chunk
    sub: int  # examples per contraction block
    working_bytes: int  # what this tiling needs besides the output


def ranges(n: int, block: int) -> List[Tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def halvings(n: int) -> List[int]:
    """n, ceil(n/2), ceil(n/4), ..., 1."""
    out = []
    b = max(n, 1)
    while True:
        out.append(b)
        if b == 1:
            return out
        b = (b + 1) // 2


#: examples per forward/backward pass at most (larger batches gain nothing on the passes)
MAX_BLOCK = 256
#: a pass over b examples costs about as much as one over b + PASS_OVERHEAD examples
#: (per-call overhead, small products); a contraction block with r kernel rows runs at
#: about 1 / (1 + ROW_OVERHEAD / r) of the GEMM rate
PASS_OVERHEAD = 8
ROW_OVERHEAD = 32
#: fixed cost of one contraction call (one slot, one block pair) in multiply-adds: Python and
#: dispatch overhead, which decides for small models
CALL_OVERHEAD = 1e6


def _chunk_sizes(K: int) -> List[int]:
    """Directions per chunk for 1, 2, 3, ... chunks (distinct sizes, largest first)."""
    sizes: List[int] = []
    for c in range(1, K + 1):
        kd = -(-K // c)
        if kd not in sizes:
            sizes.append(kd)
    return sizes


def tiling_cost(
    w: WorkModel, kind: str, K: int, n1: int, n2: int, symmetric: bool, block: int, keep: bool, kd: int, sub: int
) -> float:
    """Modelled multiply-adds of a tiling (passes repeated per direction chunk and, when
    streaming, per column block; contraction blocks below the diagonal skipped)."""
    chunks = -(-K // kd)
    examples = n1 + (0 if symmetric else n2)
    nb1 = -(-n1 // block)
    if keep:
        computed = examples
    elif symmetric:
        computed = n1 + block * nb1 * (nb1 - 1) / 2  # each row block, then the column blocks right of it
    else:
        computed = n1 + nb1 * n2
    passes = computed * (chunks * w.forward + K * w.per_direction) * (1 + PASS_OVERHEAD / block)
    # fixed cost of each forward and backward call (hooks, autograd dispatch)
    passes += chunks * (computed / block) * (1 + kd) * 5 * CALL_OVERHEAD
    if symmetric:
        ns = -(-n1 // sub)  # contraction blocks along one side
        pairs = n1 * n1 * (ns + 1) / (2 * ns)
    else:
        pairs = float(n1 * n2)
    rows = sub * (kd if kind == "full" else 1)
    contraction = pairs * (chunks * w.per_pair + K * w.per_pair_direction) * (1 + ROW_OVERHEAD / rows)
    calls = chunks * w.slots * pairs / (sub * sub)
    return passes + contraction + calls * CALL_OVERHEAD


def plan_tiling(
    source: Source, kind: str, K: int, n1: int, n2: int, symmetric: bool, budget: int, n_acc: int
) -> Optional[Tiling]:
    """The tiling of least modelled cost (:func:`tiling_cost`) that fits ``budget`` bytes,
    or None if nothing fits."""
    nmax = max(n1, n2)
    examples = n1 + (0 if symmetric else n2)
    kds = _chunk_sizes(K) if kind in ("trace", "diagonal") else [K]
    w = source.work()

    def work(b: int, s: int, kd: int) -> int:
        # activations of one pass block + the temporaries of one contraction block pair
        # (one accumulator per layer; a copy for the symmetric diagonal blocks)
        return b * source.activation_bytes(kd) + 2 * source.temp_bytes(s, s, kd) * max(n_acc, 1)

    best: Optional[Tuple[float, Tiling]] = None
    for keep in (True, False):
        for kd in kds:
            feat = source.feature_bytes(kd)
            for b in halvings(min(nmax, MAX_BLOCK)):
                held = feat * examples if keep else 2 * b * feat
                for s in halvings(b):
                    need = held + work(b, s, kd)
                    if need > budget:
                        continue
                    cost = tiling_cost(w, kind, K, n1, n2, symmetric, b, keep, kd, s)
                    if best is None or cost < best[0]:
                        best = (cost, Tiling(b, keep, kd, s, need))
    return None if best is None else best[1]


def minimum_bytes(source: Source, kind: str, K: int) -> int:
    """Working memory of the smallest tiling (streaming, one example, one direction)."""
    kd = 1 if kind in ("trace", "diagonal") else K
    return 2 * source.feature_bytes(kd) + source.activation_bytes(kd) + 2 * source.temp_bytes(1, 1, kd)


def write_block(
    out: Tensor, acc: Tensor, kind: str, r1: Tuple[int, int], r2: Tuple[int, int], symmetric: bool, dirs: Tuple[int, int]
) -> None:
    """out[r1, r2] += acc (accumulator layout -> output layout), mirrored when symmetric."""
    if kind == "full":
        blk = acc.permute(0, 2, 1, 3)
        mirror = (1, 0, 3, 2)
    elif kind == "diagonal":
        blk = acc.permute(1, 2, 0)
        mirror = (1, 0, 2)
    else:
        blk = acc
        mirror = (1, 0)
    (a1, b1), (a2, b2) = r1, r2
    if kind == "diagonal":
        target = out[a1:b1, a2:b2, dirs[0] : dirs[1]]
        other = out[a2:b2, a1:b1, dirs[0] : dirs[1]]
    else:
        target = out[a1:b1, a2:b2]
        other = out[a2:b2, a1:b1]
    if symmetric and r1 == r2:
        target += (blk + blk.permute(*mirror)) * 0.5  # exactly symmetric diagonal blocks
        return
    target += blk
    if symmetric:
        other += blk.permute(*mirror)


def run_source(
    source: Source,
    x1: Tensor,
    x2: Optional[Tensor],
    kind: str,
    K: int,
    outs: Dict[str, Tensor],
    tiling: Tiling,
) -> None:
    """Accumulate the source's contribution into ``outs`` (layer -> kernel; a single key
    ``""`` when layers are not separated)."""
    symmetric = x2 is None
    xs2 = x1 if symmetric else x2
    blocks1 = ranges(x1.shape[0], tiling.block)
    blocks2 = blocks1 if symmetric else ranges(xs2.shape[0], tiling.block)
    per_layer = "" not in outs
    sub = tiling.sub

    def pair(f1: Dict[int, Feature], f2: Dict[int, Feature], r1, r2, dirs, diagonal_block: bool) -> None:
        """Contract two pass blocks' features, in contraction blocks of ``sub`` examples."""
        subs1 = ranges(r1[1] - r1[0], sub)
        subs2 = ranges(r2[1] - r2[0], sub)
        for p, (a1, e1) in enumerate(subs1):
            for q, (a2, e2) in enumerate(subs2):
                if diagonal_block and q < p:
                    continue
                accs: Dict[str, Tensor] = {}
                for slot, layer in source.slots:
                    key = layer if per_layer else ""
                    acc = accs.get(key)
                    if acc is None:
                        acc = accs[key] = new_acc(kind, dirs[1] - dirs[0], e1 - a1, e2 - a2, outs[key])
                    contract(take(f1[slot], a1, e1), take(f2[slot], a2, e2), kind, acc)
                g1 = (r1[0] + a1, r1[0] + e1)
                g2 = (r2[0] + a2, r2[0] + e2)
                for key, acc in accs.items():
                    write_block(outs[key], acc, kind, g1, g2, symmetric, dirs)

    for dirs in ranges(K, tiling.kd):
        if tiling.keep:
            f1s = [source.compute(x1[a:b], dirs) for a, b in blocks1]
            f2s = f1s if symmetric else [source.compute(xs2[a:b], dirs) for a, b in blocks2]
            for i, r1 in enumerate(blocks1):
                for j, r2 in enumerate(blocks2):
                    if symmetric and j < i:
                        continue
                    pair(f1s[i], f2s[j], r1, r2, dirs, symmetric and i == j)
            del f1s, f2s
            continue
        for i, r1 in enumerate(blocks1):
            f1 = source.compute(x1[r1[0] : r1[1]], dirs)
            for j, r2 in enumerate(blocks2):
                if symmetric and j < i:
                    continue
                f2 = f1 if (symmetric and i == j) else source.compute(xs2[r2[0] : r2[1]], dirs)
                pair(f1, f2, r1, r2, dirs, symmetric and i == j)
                del f2
