"""NTK-vector products (Novak et al. 2022, section 3.3; the torch.func tutorial's method 2).

Column (m, b) of the kernel is ``J(x1) [J(x_m)^T e_b]``: a vector-Jacobian product on one
example gives a parameter-space vector, and one Jacobian-vector product (forward mode) on
the row examples maps it back to outputs. No Jacobian is stored and nothing of size
N^2 C^2 P is contracted, so the cost is about N1 N2 C forward passes: the method of choice
when C is large relative to the parameter count per forward FLOP. Vectors are processed in
chunks and rows in blocks, both sized to the memory budget.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from ._model import FunctionalModel


def ntvp_plan(
    n1: int, n2: int, K: int, numel: int, itemsize: int, act_per_example: int, budget: int
) -> Optional[Tuple[int, int]]:
    """(vectors per chunk, rows per block) fitting ``budget``, or None."""
    rows = n1
    while True:
        for vecs in _halvings(n2 * K):
            # tangents (and their vjp graph) + forward-mode activations of vecs x rows examples
            need = 3 * vecs * numel * itemsize + vecs * (rows + 1) * act_per_example
            if need <= budget:
                return vecs, rows
        if rows == 1:
            return None
        rows = (rows + 1) // 2


def _halvings(n: int) -> List[int]:
    out = []
    b = max(n, 1)
    while True:
        out.append(b)
        if b == 1:
            return out
        b = (b + 1) // 2


def ntvp_kernel(
    fm: FunctionalModel,
    names: Sequence[str],
    x1: Tensor,
    x2: Optional[Tensor],
    kind: str,
    C: int,
    out: Tensor,
    vecs: int,
    rows: int,
) -> None:
    """Write the kernel of parameters ``names`` into the zero tensor ``out`` (output layout)."""
    symmetric = x2 is None
    xs2 = x1 if symmetric else x2
    n2 = xs2.shape[0]
    K = 1 if kind == "pseudo" else C
    device = x1.device
    primals = {n: fm.leaves[n].detach() for n in names}

    def column_vectors(xs: Tensor, cot: Tensor) -> Dict[str, Tensor]:
        def one(x: Tensor, e: Tensor) -> Dict[str, Tensor]:
            _, pullback = vjp(lambda p: fm.single(x, p), primals)
            return pullback(e)[0]

        return vmap(one)(xs, cot)

    # kernel columns: (example m, output k) pairs
    ms = torch.arange(n2, device=device).repeat_interleave(K)
    ks = torch.arange(K, device=device).repeat(n2)
    for start in range(0, n2 * K, vecs):
        m_idx, k_idx = ms[start : start + vecs], ks[start : start + vecs]
        T = m_idx.shape[0]
        if kind == "pseudo":
            cot = torch.ones(T, C, dtype=fm.dtype, device=device)
        else:
            cot = torch.zeros(T, C, dtype=fm.dtype, device=device)
            cot[torch.arange(T, device=device), k_idx] = 1.0
        tangents = column_vectors(xs2[m_idx], cot)
        # the last column example of this chunk, from the indices' layout (no device sync)
        row_end = (start + T - 1) // K + 1 if symmetric else x1.shape[0]
        for a in range(0, row_end, rows):
            b = min(a + rows, row_end)
            xr = x1[a:b]

            def push(t: Dict[str, Tensor], xr: Tensor = xr) -> Tensor:
                return jvp(lambda p: fm(xr, p), (primals,), (t,))[1]

            prod = vmap(push)(tangents)  # (T, b - a, C): column (m, k) restricted to rows a:b
            _scatter(out[a:b], prod, kind, m_idx, k_idx)
        del tangents
    if symmetric:
        _mirror(out, kind)


def _scatter(view: Tensor, prod: Tensor, kind: str, m_idx: Tensor, k_idx: Tensor) -> None:
    T = prod.shape[0]
    t = torch.arange(T, device=prod.device)
    if kind == "full":
        view[:, m_idx, :, k_idx] = prod  # advanced axes first: (T, rows, C)
    elif kind == "diagonal":
        view[:, m_idx, k_idx] = prod[t, :, k_idx].T  # adjacent advanced axes stay in place: (rows, T)
    elif kind == "trace":
        view.index_add_(1, m_idx, prod[t, :, k_idx].T)
    else:  # pseudo: J(x1) J(x_m)^T 1 summed over outputs
        view.index_add_(1, m_idx, prod.sum(-1).T)


def _mirror(out: Tensor, kind: str, block: int = 256) -> None:
    """Keep entries n <= m (all computed), mirror them below the diagonal, block by block."""
    n = out.shape[0]
    perm = (1, 0, 3, 2) if kind == "full" else ((1, 0, 2) if kind == "diagonal" else (1, 0))
    for a in range(0, n, block):
        b = min(a + block, n)
        if a > 0:
            out[a:b, :a] = out[:a, a:b].permute(*perm)
        blk = out[a:b, a:b]
        r = torch.arange(b - a, device=out.device)
        upper = r.view(-1, 1) <= r.view(1, -1)
        shape = (b - a, b - a) + (1,) * (out.dim() - 2)
        sym = torch.where(upper.view(shape), blk, blk.permute(*perm))
        if kind == "full":
            d = blk[r, r]  # (b - a, C, C): each example's own block, made symmetric
            sym[r, r] = (d + d.transpose(1, 2)) * 0.5
        out[a:b, a:b] = sym
