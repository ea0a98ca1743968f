"""Per-example Jacobian factors and their pairwise contractions, one function per kind.

A *feature* holds, for a block of B examples and K output directions, what is needed to
take inner products of the per-example Jacobians of one parameter (group):

- ``Vec``: the per-example Jacobian itself, ``data[b, k, :]`` (B, K, D).
- ``Outer``: ``J[b, k] = sum_s g[b, k, s, :] (x) x[b, s, :]`` (weights of Linear/Conv layers;
  ``s`` runs over positions, patches and the calls of a reused module), kept factored.
- ``Embed``: ``J[b, k] = sum_s onehot(idx[b, s]) (x) g[b, k, s, :]`` (embedding tables).

Two examples' kernel block then follows from the factors (Novak et al. 2022, "Fast finite
width neural tangent kernel", structured derivatives): for ``Outer``

    <J[n, a], J[m, b]> = sum_{s, t} <x[n, s], x[m, t]> <g[n, a, s], g[m, b, t]>,

which for one position (a Linear layer on (N, D) inputs) is the Hadamard product
(X X^T) o (G G^T) and needs no per-example gradient at all.

Accumulator layouts (``acc``): full (B1, K, B2, K); trace and pseudo (B1, B2) summed over k
(the caller divides by C); diagonal (K, B1, B2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ._cost import kind_width


@dataclass
class Vec:
    data: Tensor  # (B, K, D)

    @property
    def batch(self) -> int:
        return self.data.shape[0]

    def nbytes_per_example(self) -> int:
        return self.data[0].numel() * self.data.element_size()


@dataclass
class Outer:
    g: Tensor  # (B, K, S, O), possibly a strided view
    x: Tensor  # (B, S, D), possibly a strided view
    order: str = "patch"  # contraction order of two Outer features (see _cost.py)

    @property
    def batch(self) -> int:
        return self.g.shape[0]


@dataclass
class Embed:
    g: Tensor  # (B, K, S, d); rows of padding positions are zero
    idx: Tensor  # (B, S) long
    num_embeddings: int
    order: str = "patch"

    @property
    def batch(self) -> int:
        return self.g.shape[0]


Feature = Union[Vec, Outer, Embed]


def cat(features: Sequence[Feature]) -> Feature:
    """Concatenate the features of several example blocks along the batch axis."""
    first = features[0]
    if len(features) == 1:
        return first
    if isinstance(first, Vec):
        return Vec(torch.cat([f.data for f in features], 0))  # type: ignore[union-attr]
    if isinstance(first, Outer):
        return Outer(torch.cat([f.g for f in features], 0), torch.cat([f.x for f in features], 0), first.order)  # type: ignore[union-attr]
    return Embed(
        torch.cat([f.g for f in features], 0), torch.cat([f.idx for f in features], 0), first.num_embeddings, first.order  # type: ignore[union-attr]
    )


def take(f: Feature, start: int, stop: int) -> Feature:
    """Examples ``start:stop`` of a feature (a view)."""
    if isinstance(f, Vec):
        return Vec(f.data[start:stop])
    if isinstance(f, Outer):
        return Outer(f.g[start:stop], f.x[start:stop], f.order)
    return Embed(f.g[start:stop], f.idx[start:stop], f.num_embeddings, f.order)


def concat_positions(features: Sequence[Feature]) -> Feature:
    """Several uses of one parameter in the same layout: the Jacobian is the sum over uses,
    which for factored features is one feature whose position axis lists every use."""
    first = features[0]
    if len(features) == 1:
        return first
    if isinstance(first, Outer):
        return Outer(torch.cat([f.g for f in features], 2), torch.cat([f.x for f in features], 1))  # type: ignore[union-attr]
    if isinstance(first, Embed):
        return Embed(torch.cat([f.g for f in features], 2), torch.cat([f.idx for f in features], 1), first.num_embeddings)  # type: ignore[union-attr]
    total = first.data.clone()  # type: ignore[union-attr]
    for f in features[1:]:
        total.add_(f.data)  # type: ignore[union-attr]
    return Vec(total)


def materialize(f: Feature) -> Vec:
    """The per-example Jacobian in the parameter's own layout (out x in, or table x dim)."""
    if isinstance(f, Vec):
        return f
    if isinstance(f, Outer):
        B, K, S, O = f.g.shape
        D = f.x.shape[2]
        gt = f.g.transpose(2, 3).reshape(B, K * O, S)  # free when g is a view of (B, K, O, S)
        return Vec(torch.bmm(gt, f.x).view(B, K, O * D))
    B, K, S, d = f.g.shape
    out = f.g.new_zeros(B, K, f.num_embeddings, d)
    index = f.idx.view(B, 1, S, 1).expand(B, K, S, d)
    out.scatter_add_(2, index, f.g)
    return Vec(out.view(B, K, f.num_embeddings * d))


# ----------------------------------------------------------------------------------------
# contractions: acc += <J1[n, a], J2[m, b]> in the accumulator layout of ``kind``
# ----------------------------------------------------------------------------------------


def contract(f1: Feature, f2: Feature, kind: str, acc: Tensor) -> None:
    if isinstance(f1, Vec):
        _contract_vec(f1.data, f2.data, kind, acc)  # type: ignore[union-attr]
    elif isinstance(f1, Outer):
        x1, x2 = f1.x, f2.x  # type: ignore[union-attr]
        if x1.shape[1] == 1 and x2.shape[1] == 1:
            xx = x1[:, 0] @ x2[:, 0].T
            _contract_patch_single(f1.g, f2.g, xx, kind, acc)
        else:
            B1, S, D = x1.shape
            B2, T, _ = x2.shape
            xx = (x1.reshape(B1 * S, D) @ x2.reshape(B2 * T, D).T).view(B1, S, B2, T)
            _contract_positions(f1.g, f2.g, xx, kind, f1.order, acc)
    else:
        idx1, idx2 = f1.idx, f2.idx  # type: ignore[union-attr]
        B1, S = idx1.shape
        B2, T = idx2.shape
        xx = (idx1.reshape(B1 * S, 1) == idx2.reshape(1, B2 * T)).to(acc.dtype).view(B1, S, B2, T)
        _contract_positions(f1.g, f2.g, xx, kind, f1.order, acc)


def _contract_positions(g1: Tensor, g2: Tensor, xx: Tensor, kind: str, order: str, acc: Tensor) -> None:
    if order == "patch_h" and kind == "full":
        _contract_patch_h(g1, g2, xx, acc)
    else:
        _contract_patch(g1, g2, xx, kind, acc)


def _contract_vec(v1: Tensor, v2: Tensor, kind: str, acc: Tensor) -> None:
    B1, K, D = v1.shape
    B2 = v2.shape[0]
    if kind == "full":
        acc.view(B1 * K, B2 * K).addmm_(v1.reshape(B1 * K, D), v2.reshape(B2 * K, D).T)
    elif kind == "diagonal":
        acc.baddbmm_(v1.transpose(0, 1), v2.permute(1, 2, 0))
    else:  # trace, pseudo: sum over k and features in one product
        acc.addmm_(v1.reshape(B1, K * D), v2.reshape(B2, K * D).T)


def _contract_patch_single(g1: Tensor, g2: Tensor, xx: Tensor, kind: str, acc: Tensor) -> None:
    """One position per example: (X X^T) o (G G^T)."""
    B1, K, _, O = g1.shape
    B2 = g2.shape[0]
    if kind == "full":
        gg = (g1.reshape(B1 * K, O) @ g2.reshape(B2 * K, O).T).view(B1, K, B2, K)
        acc.addcmul_(gg, xx.view(B1, 1, B2, 1))
    elif kind == "diagonal":
        gg = torch.bmm(g1[:, :, 0].transpose(0, 1), g2[:, :, 0].permute(1, 2, 0))
        acc.addcmul_(gg, xx.unsqueeze(0))
    else:
        gg = g1.reshape(B1, K * O) @ g2.reshape(B2, K * O).T
        acc.addcmul_(gg, xx)


def _contract_patch(g1: Tensor, g2: Tensor, xx: Tensor, kind: str, acc: Tensor) -> None:
    """Several positions: sum_{s,t} xx[n,s,m,t] <g1[n,a,s], g2[m,b,t]>."""
    B1, K, S, O = g1.shape
    B2, _, T, _ = g2.shape
    if kind == "full":
        gg = (g1.reshape(B1 * K * S, O) @ g2.reshape(B2 * K * T, O).T).view(B1, K, S, B2, K, T)
        gg.mul_(xx.view(B1, 1, S, B2, 1, T))
        acc.add_(gg.sum((2, 5)))
    elif kind == "diagonal":
        a = g1.permute(1, 0, 2, 3).reshape(K, B1 * S, O)
        b = g2.permute(1, 3, 0, 2).reshape(K, O, B2 * T)
        gg = torch.bmm(a, b).view(K, B1, S, B2, T)
        gg.mul_(xx.unsqueeze(0))
        acc.add_(gg.sum((2, 4)))
    else:  # sum over k inside the product
        a = g1.permute(0, 2, 1, 3).reshape(B1 * S, K * O)
        b = g2.permute(0, 2, 1, 3).reshape(B2 * T, K * O)
        gg = (a @ b.T).view(B1, S, B2, T)
        gg.mul_(xx)
        acc.add_(gg.sum((1, 3)))


def _contract_patch_h(g1: Tensor, g2: Tensor, xx: Tensor, acc: Tensor) -> None:
    """Full kind, several positions, in the order that multiplies X X'^T into one side first:

        H[m, n, s, b, o] = sum_t xx[n, s, m, t] g2[m, b, t, o]      (batched over m)
        Theta[n, a, m, b] = sum_{s, o} g1[n, a, s, o] H[m, n, s, b, o]   (batched over n)

    K S T O + K^2 S O multiply-adds per pair instead of K^2 S T O; column examples in
    chunks so that H stays near ``PATCH_H_CHUNK`` elements.
    """
    B1, K, S, O = g1.shape
    B2, _, T, _ = g2.shape
    a = g1.transpose(2, 3).reshape(B1, K, O * S)  # free when g1 is a view of (B, K, O, S)
    b = g2.permute(0, 2, 1, 3).reshape(B2, T, K * O)
    chunk = max(PATCH_H_CHUNK // max(B1 * S * K * O, 1), 1)
    for m0 in range(0, B2, chunk):
        m1 = min(m0 + chunk, B2)
        c = m1 - m0
        xc = xx[:, :, m0:m1].permute(2, 0, 1, 3).reshape(c, B1 * S, T)
        h = torch.bmm(xc, b[m0:m1])  # (c, B1 S, K O)
        h = h.view(c, B1, S, K, O).permute(1, 4, 2, 0, 3).reshape(B1, O * S, c * K)
        acc[:, :, m0:m1, :] += torch.bmm(a, h).view(B1, K, c, K)


# ----------------------------------------------------------------------------------------
# memory of the contractions (their multiply-adds: ``_cost.py``)
# ----------------------------------------------------------------------------------------

#: elements of the intermediate of one ``patch_h`` chunk (the loop over column examples
#: keeps it near this size; at least one column example per chunk)
PATCH_H_CHUNK = 1 << 23


def patch_temp_elements(S: int, T: int, K: int, O: int, kind: str, order: str, b1: int, b2: int) -> int:
    """Elements of the temporaries of one patch contraction of b1 x b2 examples."""
    xx = b1 * b2 * S * T
    if order == "patch_h" and kind == "full":
        chunk = max(PATCH_H_CHUNK // max(b1 * S * K * O, 1), 1)
        h = 2 * min(chunk, b2) * b1 * S * K * O  # the product and its permuted copy
        return xx + h + b2 * T * K * O + b1 * S * K * O
    width = K * K if kind == "full" else (K if kind == "diagonal" else 1)
    return xx * (width + 1)


def acc_elements(kind: str, K: int, b1: int, b2: int) -> int:
    return b1 * b2 * kind_width(kind, K)


def new_acc(kind: str, K: int, b1: int, b2: int, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    shape: List[int]
    if kind == "full":
        shape = [b1, K, b2, K]
    elif kind == "diagonal":
        shape = [K, b1, b2]
    else:
        shape = [b1, b2]
    return torch.zeros(shape, dtype=dtype or like.dtype, device=like.device)
