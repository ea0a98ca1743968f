"""Per-layer cost model: which contraction each factored layer uses, and the FLOP floor.

After Novak, Sohl-Dickstein & Schoenholz 2022 ("Fast finite width neural tangent kernel",
section 3 and appendix: compute and memory of Jacobian contraction, NTK-vector products and
structured derivatives, contraction orders chosen from the layer's shapes). For a weight
whose per-example Jacobian is ``J[n, k] = sum_s g[n, k, s] (x) x[n, s]`` (Linear on S
positions, Conv on S output locations with im2col patches, Embedding with one-hot rows),
with fan-in D, fan-out O, K output directions, N1 x N2 examples and ``pairs`` example pairs
(N(N+1)/2 when x2 is x1: only blocks on and above the diagonal are contracted), the
multiply-adds of the three contraction orders are

* ``per_example``  examples * K S D O        (batched GEMMs: J of every example)
                   + pairs * w D O           (their Gram; w = K^2 full, K trace/diagonal, 1 pseudo)
* ``patch``        pairs * S T (D + v O + w) (X X'^T first, then G G'^T, multiplied entrywise;
                                              v = K^2 full, K otherwise; for output
                                              directions in c chunks, X X'^T c times)
* ``patch_h``      pairs * (S T D + K S T O + K^2 S O)   (full kind only: X X'^T contracted
                                              with one side's output gradients first, then
                                              with the other's: K times fewer products than
                                              ``patch`` when S T is large)

and each layer takes the cheapest. One position (S = 1, a Linear on (N, D) inputs) makes
``patch`` the Hadamard product (X X^T) o (G G^T). Embedding tables have D = V rows and
``<onehot, onehot'>`` for X X'^T, which costs nothing.

The same formulas, plus the forward pass and the K backward passes that give the output
gradients, are the *FLOP floor* of the shapes at hand: what the cheapest order of every
layer costs at the machine's GEMM rate (``flop_floor``). It is a floor of this family of
exact algorithms, not of every conceivable one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    from ._plan import Plan, SlotSpec

#: cost multiplier of each contraction order relative to per-example gradients (the patch
#: orders add entrywise products, permuted copies and batched small GEMMs). Conservative:
#: ``benchmarks/ntk.py --choices`` measured the patch orders at 0.7-1.0 of their modelled
#: time relative to per_example (CPU, one thread), and the model's choice was the fastest
#: measured order (or within 1 %) for every layer timed there
EFFICIENCY = {"per_example": 1.0, "patch": 1.3, "patch_h": 1.5, "vec": 1.0}


def kind_width(kind: str, K: int) -> int:
    """How many output pairs a kernel entry carries: K^2 (full), K (trace, diagonal), 1 (pseudo)."""
    return K * K if kind == "full" else (1 if kind == "pseudo" else K)


def example_pairs(n1: int, n2: int, symmetric: bool) -> float:
    """Example pairs contracted: N(N+1)/2 with x2 = x1 (upper triangle and diagonal), else N1 N2."""
    return n1 * (n1 + 1) / 2 if symmetric else float(n1 * n2)


@dataclass(frozen=True)
class Split:
    """Multiply-adds of one contraction order, split by what they scale with:
    ``per_direction`` per example and output direction (forming per-example Jacobians),
    ``per_pair`` per example pair and direction chunk (done once per chunk, e.g. X X'^T),
    ``per_pair_direction`` per example pair and output direction (kinds trace and diagonal,
    whose directions can be processed in chunks; 0 for full kernels, whose cost is all in
    ``per_pair``)."""

    per_direction: float = 0.0
    per_pair: float = 0.0
    per_pair_direction: float = 0.0

    def total(self, K: int, n1: int, n2: int, symmetric: bool, chunks: int = 1) -> float:
        examples = n1 + (0 if symmetric else n2)
        pairs = example_pairs(n1, n2, symmetric)
        return examples * K * self.per_direction + pairs * (chunks * self.per_pair + K * self.per_pair_direction)


def _split(kind: str, K: int, per_direction: float, fixed: float, full: float, per_k: float) -> Split:
    """``full``: per pair for the full kind; ``per_k``: per pair and direction otherwise."""
    if kind == "full":
        return Split(per_direction, fixed + full, 0.0)
    return Split(per_direction, fixed, per_k)


def outer_splits(S: int, D: int, O: int, K: int, kind: str) -> Dict[str, Split]:
    """The contraction orders of a factored Linear/Conv weight feature (module docstring)."""
    out = {
        "per_example": _split(kind, K, S * D * O, 0.0, K * K * D * O, D * O),
        "patch": _split(kind, K, 0.0, S * S * D, S * S * (K * K * O + K * K), S * S * (O + 1)),
    }
    if kind == "full" and K > 1 and S > 1:
        out["patch_h"] = Split(0.0, S * S * D + K * S * S * O + K * K * S * O, 0.0)
    return out


def embed_splits(S: int, V: int, d: int, K: int, kind: str) -> Dict[str, Split]:
    """The same for an Embedding table (V rows of width d, S looked-up positions)."""
    out = {
        "per_example": _split(kind, K, S * d + V * d, 0.0, K * K * V * d, V * d),
        "patch": _split(kind, K, 0.0, S * S, S * S * (K * K * d + K * K), S * S * (d + 1)),
    }
    if kind == "full" and K > 1 and S > 1:
        out["patch_h"] = Split(0.0, S * S + K * S * S * d + K * K * S * d, 0.0)
    return out


def slot_splits(spec: "SlotSpec", kind: str, K: int) -> Dict[str, Split]:
    """Every way to contract one slot (a single ``vec`` option for plain per-example vectors
    such as biases and norm parameters)."""
    if spec.family == "outer":
        return outer_splits(spec.S, spec.D, spec.O, K, kind)
    if spec.family == "embed":
        return embed_splits(spec.S, spec.D, spec.O, K, kind)
    return {"vec": _split(kind, K, 0.0, 0.0, K * K * spec.O, spec.O)}


def outer_options(S: int, D: int, O: int, K: int, kind: str, n1: int, n2: int, symmetric: bool) -> Dict[str, float]:
    """Multiply-adds of every order for a Linear/Conv weight over all example pairs."""
    return {m: sp.total(K, n1, n2, symmetric) for m, sp in outer_splits(S, D, O, K, kind).items()}


def slot_options(spec: "SlotSpec", kind: str, K: int, n1: int, n2: int, symmetric: bool) -> Dict[str, float]:
    """Multiply-adds of every contraction order of one slot over all example pairs."""
    return {m: sp.total(K, n1, n2, symmetric) for m, sp in slot_splits(spec, kind, K).items()}


def choose_modes(
    plan: "Plan", kind: str, K: int, n1: int, n2: int, symmetric: bool, force: Optional[Dict[str, str]] = None
) -> None:
    """Give every slot of the plan its cheapest contraction order (``spec.mode``).

    ``force`` maps parameter names (or ``"*"``: every slot) to a mode (``per_example``,
    ``patch``, ``patch_h``; ignored where a slot lacks it), for tests and for
    ``benchmarks/ntk.py --choices``, which times each order to check the model.
    """
    force = force or {}
    for spec in plan.structured:
        opts = slot_options(spec, kind, K, n1, n2, symmetric)
        wanted = force.get(spec.name, force.get("*"))
        if wanted is not None and wanted in opts:
            spec.mode = wanted
            continue
        spec.mode = min(opts, key=lambda m: opts[m] * EFFICIENCY[m])


def slot_cost(spec: "SlotSpec", kind: str, K: int, n1: int, n2: int, symmetric: bool) -> float:
    """Efficiency-weighted multiply-adds of the slot's chosen mode (its cheapest if unset)."""
    opts = slot_options(spec, kind, K, n1, n2, symmetric)
    if spec.mode in opts:
        return opts[spec.mode] * EFFICIENCY[spec.mode]
    return min(c * EFFICIENCY[m] for m, c in opts.items())


def flop_floor(plan: "Plan", kind: str, n1: int, n2: Optional[int] = None, K: Optional[int] = None) -> Dict[str, float]:
    """FLOPs (2 per multiply-add) of the cheapest exact structured computation.

    Forward pass of every example, one backward pass per output direction through the
    layers whose input needs a gradient (``K`` directions: C, or 1 for ``pseudo``), and for
    every slot the cheapest contraction order above (no efficiency factors). Only meaningful
    when every parameter is covered by a rule (``plan.fallback`` empty). ``K`` overrides
    the number of directions (e.g. m projections of a sketch, whose diagonal kernel is
    taken on the model's outputs times S^T).
    Returns ``{"forward", "backward", "contraction", "total"}``.
    """
    symmetric = n2 is None
    n2_ = n1 if n2 is None else n2
    if K is None:
        K = 1 if kind == "pseudo" else plan.C
    examples = n1 + (0 if symmetric else n2_)
    forward = examples * plan.macs_per_example
    backward = examples * K * plan.bwd_macs_per_example
    contraction = 0.0
    for spec in plan.structured:
        contraction += min(slot_options(spec, kind, K, n1, n2_, symmetric).values())
    out = {"forward": 2 * forward, "backward": 2 * backward, "contraction": 2 * contraction}
    out["total"] = sum(out.values())
    return out
