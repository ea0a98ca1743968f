"""Sequence tasks measured per token: (sequence, position) pairs as examples.

A monitor that measures examples (eNTK rows, activation codes, features for probes) sees a
sequence task's probe as its (sequence, position) pairs on a deterministic subset of the
positions (:func:`lightning_ntk.task.token_positions`), each labelled with the token it
predicts. For the eNTK, where the engine differentiates a model of one input tensor, each
pair is the sequence with its position appended along the time axis
(:func:`positioned_inputs`) and :class:`TokenOutputs` reads the logits at that position:
one row of the kernel per pair, exactly Θ((s, t), (s', t')) = J_t(s) J_t'(s')ᵀ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..probe import ProbeSet
from ..task import Task, token_positions, token_targets

#: Default number of (sequence, position) pairs a monitor measures on a sequence probe.
DEFAULT_TOKEN_PAIRS = 256


def positions_per_sequence(n_sequences: int, setting: Optional[int], total: int = DEFAULT_TOKEN_PAIRS) -> int:
    """``setting``, or enough positions per sequence for about ``total`` pairs (at least one)."""
    return int(setting) if setting is not None else max(1, -(-total // max(n_sequences, 1)))


@dataclass
class TokenPairs:
    """The chosen pairs of a sequence probe: ``positions`` (N, P) into the aligned time axis
    (-1: none), and per pair its sequence's row, dataset index, position and target token."""

    positions: np.ndarray
    row: np.ndarray
    index: np.ndarray
    position: np.ndarray
    target: np.ndarray

    @classmethod
    def choose(cls, probe: ProbeSet, task: Task, per_sequence: int) -> "TokenPairs":
        positions = token_positions(probe.y, task, per_sequence, keys=probe.index)
        rows, cols = np.nonzero(positions >= 0)
        if rows.size == 0:
            raise ValueError(f"probe {probe.name!r} has no token whose target is not ignore_index={task.ignore_index}")
        return cls(positions, rows, probe.index[rows], positions[rows, cols], token_targets(probe.y, task, positions))

    def attrs(self) -> Dict[str, Any]:
        """Table attributes naming each pair (rows of per-pair arrays)."""
        return {"token_pairs": "each row is a (sequence, position) pair: token_sequence (dataset index), "
                               "token_position (position of the logits; the target is the token at position + shift)",
                "token_sequence": self.index.tolist(), "token_position": self.position.tolist()}


def positioned_inputs(x: torch.Tensor, pairs: TokenPairs) -> torch.Tensor:
    """Each pair's sequence with its position appended along the time axis (axis 1)."""
    if x.ndim < 2:
        raise ValueError(f"sequence inputs need a time axis (N, T, ...), got shape {tuple(x.shape)}")
    rows = torch.as_tensor(pairs.row, device=x.device)
    xs = x[rows]
    position = torch.as_tensor(pairs.position, device=x.device)
    extra = position.to(x.dtype)
    if not torch.equal(extra.to(position.dtype), position):  # bfloat16 inputs, uint8 byte ids, ...
        raise ValueError(f"positions up to {int(position.max())} cannot be carried exactly in inputs of dtype "
                         f"{x.dtype}; pass sequence_kernel='pooled', or inputs of a wider dtype")
    extra = extra.reshape(-1, *([1] * (x.ndim - 1))).expand(xs.shape[0], 1, *xs.shape[2:])
    return torch.cat([xs, extra], dim=1)


class TokenOutputs(nn.Module):
    """``model`` read at one position per row: the input's last time step holds the position
    (:func:`positioned_inputs`), the rest is the sequence; the output is the logits (B, V) at
    that position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        position = x[:, -1].reshape(b, -1)[:, 0].long()
        out = self.model(x[:, :-1])
        if out.ndim != 3 or out.shape[0] != b:
            raise ValueError(f"per-token outputs (B, T, V) expected, got shape {tuple(out.shape)}")
        index = position.reshape(b, 1, 1).expand(b, 1, out.shape[2])
        return out.gather(1, index).squeeze(1)


def token_probe(probe: ProbeSet, pairs: TokenPairs) -> ProbeSet:
    """The pairs as a probe for the eNTK: positioned inputs, target tokens, sequence indices."""
    return ProbeSet(probe.name, positioned_inputs(probe.x, pairs), torch.as_tensor(pairs.target), pairs.index,
                    probe.source, dict(probe.meta, token_positions=pairs.position))
