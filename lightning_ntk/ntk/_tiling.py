"""Blocks of examples under a memory budget, and writing kernel blocks into the output.

A *source* yields features for a block of examples (:class:`~._structured.StructuredSource`,
:class:`~._jacobian.JacobianSource`). Features of all examples are kept when they fit
(each block's features computed once); otherwise they are streamed (a row block's
features are kept while the column blocks' features are recomputed). With ``x2=None``
only blocks on and above the diagonal are contracted and mirrored, so the result is
exactly symmetric.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Protocol, Tuple

from torch import Tensor

from ._features import Feature, contract, new_acc


class Source(Protocol):
    slots: List[Tuple[int, str]]
    feature_bytes_per_example: int
    activation_bytes_per_example: int

    def temp_bytes(self, b1: int, b2: int) -> int: ...

    def compute(self, xb: Tensor) -> Dict[int, Feature]: ...


def ranges(n: int, block: int) -> List[Tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def preferred_block(n: int, K: int, symmetric: bool, rows: int = 1024) -> int:
    """Blocks of about ``rows`` kernel rows (examples x outputs): large enough for efficient
    products, small enough that a symmetric kernel skips a good part of the lower triangle."""
    if not symmetric:
        return n
    per = max(rows // max(K, 1), 32)
    if n <= per:
        return n
    nblocks = -(-n // per)
    return -(-n // nblocks)


def plan_blocks(
    source: Source, n1: int, n2: int, symmetric: bool, budget: int, n_acc: int, preferred: int
) -> Optional[Tuple[int, bool]]:
    """(block size, keep all features) fitting ``budget`` bytes, or None."""
    feats_all = source.feature_bytes_per_example * (n1 + (0 if symmetric else n2))
    nmax = max(n1, n2)
    candidates = []
    b = max(1, min(preferred, nmax))
    while True:
        candidates.append(b)
        if b == 1:
            break
        b = (b + 1) // 2

    def work(b: int) -> int:
        # activations of one block + temporaries of one block pair (one accumulator per
        # layer, a copy for the symmetric diagonal blocks)
        return b * source.activation_bytes_per_example + source.temp_bytes(b, b) * max(n_acc, 1) * 2

    for b in candidates:
        if feats_all + work(b) <= budget:
            return b, True
    for b in candidates:
        if 2 * b * source.feature_bytes_per_example + work(b) <= budget:
            return b, False
    return None


def write_block(out: Tensor, acc: Tensor, kind: str, r1: Tuple[int, int], r2: Tuple[int, int], symmetric: bool) -> None:
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
    if symmetric and r1 == r2:
        blk = (blk + blk.permute(*mirror)) * 0.5  # exactly symmetric diagonal blocks
        out[a1:b1, a2:b2] += blk
        return
    out[a1:b1, a2:b2] += blk
    if symmetric:
        out[a2:b2, a1:b1] += blk.permute(*mirror)


def run_source(
    source: Source,
    x1: Tensor,
    x2: Optional[Tensor],
    kind: str,
    K: int,
    outs: Dict[str, Tensor],
    block: int,
    keep: bool,
) -> None:
    """Accumulate the source's contribution into ``outs`` (layer -> kernel; a single key
    ``""`` when layers are not separated)."""
    symmetric = x2 is None
    xs2 = x1 if symmetric else x2
    blocks1 = ranges(x1.shape[0], block)
    blocks2 = blocks1 if symmetric else ranges(xs2.shape[0], block)
    per_layer = "" not in outs

    def pair(f1: Dict[int, Feature], f2: Dict[int, Feature], r1, r2) -> None:
        accs: Dict[str, Tensor] = {}
        b1, b2 = r1[1] - r1[0], r2[1] - r2[0]
        for slot, layer in source.slots:
            key = layer if per_layer else ""
            acc = accs.get(key)
            if acc is None:
                acc = accs[key] = new_acc(kind, K, b1, b2, outs[key])
            contract(f1[slot], f2[slot], kind, acc)
        for key, acc in accs.items():
            write_block(outs[key], acc, kind, r1, r2, symmetric)

    if keep:
        f1s = [source.compute(x1[a:b]) for a, b in blocks1]
        f2s = f1s if symmetric else [source.compute(xs2[a:b]) for a, b in blocks2]
        for i, r1 in enumerate(blocks1):
            for j, r2 in enumerate(blocks2):
                if symmetric and j < i:
                    continue
                pair(f1s[i], f2s[j], r1, r2)
        return
    for i, r1 in enumerate(blocks1):
        f1 = source.compute(x1[r1[0] : r1[1]])
        for j, r2 in enumerate(blocks2):
            if symmetric and j < i:
                continue
            f2 = f1 if (symmetric and i == j) else source.compute(xs2[r2[0] : r2[1]])
            pair(f1, f2, r1, r2)
            del f2
