"""NTKMonitor: the empirical NTK on a fixed probe over training, and how it moves.

Per snapshot, on the probe (eval mode: BatchNorm uses its running statistics):

* the kernel Θ = J Jᵀ (kind ``trace`` by default, see :func:`lightning_ntk.empirical_ntk`),
  one sweep giving the per-layer contributions too;
* its top-k eigenpairs (float64), eigenvector signs aligned to the previous snapshot;
* trace, Frobenius norm, effective rank (entropy of the normalised spectrum);
* kernel distance to the first snapshot and to the previous one, velocity per epoch
  (Fort et al. 2020) and angular velocity; with ``velocity_dt=Δ``, both at a constant Δt
  from an extra snapshot Δ steps after each scheduled one (comparable across the run);
  kernel-target alignment, plain and centred (Cristianini et al.; Cortes et al. 2012);
* energy of the one-hot targets, the outputs and the residual in the top-1..k eigenvectors
  (Kopitkov & Indelman 2020);
* with a held-out probe: kernel regression accuracy and MSE of the current eNTK
  (Lee et al. 2020; a closed-form proxy for Fort et al.'s trained linearised network).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import _args, spectral
from ..ntk import KINDS, METHODS, empirical_ntk, sketched_ntk
from ..ntk._model import layer_name, select_parameters
from ..probe import Probe, ProbeSet
from ..sizing import CostModel
from ..store import Field
from ..task import TASKS, Task, TaskError, aligned_tokens, detect_task
from ._base import Monitor, chunked_forward, fractional_epoch
from ._declared import ProbeSlot, as_heldout
from ._sizing import linear_cost
from ._tokens import TokenOutputs, TokenPairs, positions_per_sequence, token_probe

#: The kernel is stored by default for these kinds up to this many probe examples.
_STORE_KERNEL_MAX_N = 1024
#: The key of the sketch's standard error beside the kernel (or its layers) of a block.
_STDERR = "\0stderr"
#: Kinds whose kernel is (N, N): one row per example.
_SQUARE_KINDS = ("trace", "pseudo", "sketch")
#: Effective rank from the full spectrum up to this matrix size, else from the top-k.
_FULL_SPECTRUM_MAX_M = 2048
#: Energies logged as scalars (the file holds the whole curve over k = 1..K).
_LOGGED_ENERGY_K = (1, 5, 10, 20)


class NTKMonitor(Monitor):
    """Empirical NTK snapshots on a probe set (group ``/ntk``).

    Args:
        kind: ``"auto"`` (default): ``"trace"``, or ``"sketch"`` when the outputs are more
            than twice ``projections`` (a vocabulary, 1,000 classes: the exact trace costs C
            backward passes per example, the sketch ``projections``); ``"trace"`` ((N, N),
            mean over logits); ``"sketch"`` (its unbiased estimate from random output
            projections, :func:`lightning_ntk.sketched_ntk`, with the per-entry standard
            error stored as ``kernel_stderr`` and ``relative_stderr``); ``"pseudo"``,
            ``"diagonal"`` or ``"full"`` (N, N, C, C). The kind used is the table's
            ``kind`` attribute.
        projections, seed: the sketch's number of sign vectors and their seed; the same
            projections at every snapshot, so distances between snapshots compare kernels
            sketched alike.
        k: number of top eigenpairs kept (float64), default 20.
        store_kernel: keep the kernel of each snapshot in the file. Default: on for
            trace/pseudo up to N = 1024, off otherwise.
        per_layer: record each layer's contribution to the trace (one extra sum, no extra
            backward passes).
        heldout: a held-out probe (a :class:`Probe` with ``source="val"``, a ProbeSet or a
            pair ``(x, y)``) for kernel-regression accuracy; None: no KRR.
        krr_eps: KRR ridge ε in K + ε·tr(K)/n·I (Lee et al. 2020).
        dtype: the kernel's dtype. Default: float64 when a held-out probe is given (kernel
            regression: Lee et al. 2020 compute kernels for regression in float64, since a
            float32 kernel's ~1e-7 relative error is amplified by the solve at small ridges;
            the stored kernel is then float64 too), else the parameters' dtype (float64
            costs about twice the time on CPUs and far more on most GPUs).
        method, max_memory: passed to :func:`lightning_ntk.empirical_ntk`.
        task: what the outputs and targets are (:mod:`lightning_ntk.task`; default: detected
            from the probe at train start). The targets of alignment, energies and KRR are
            one-hot labels for multi-class, the labels or values themselves otherwise.
        sequence_kernel: for per-token outputs (B, T, V): ``"positions"`` (default), the
            kernel between (sequence, position) pairs on a deterministic subset of positions
            (targets: the one-hot target tokens); ``"pooled"``, one row per sequence, the
            logits averaged over its positions (targets: the tokens' frequencies; refused
            when targets are padded with ignore_index).
        token_positions: positions per sequence (default: about 256 pairs in all); the
            pairs are the table's ``token_sequence`` / ``token_position`` attributes.
        velocity_dt: Δ optimizer steps; after every snapshot taken at step s (scheduled,
            epoch end or the first) another is taken at s + Δ, whatever the schedule or
            budget (forced), and its row holds the kernel distance, velocity and angular
            velocity over that constant Δt (``*_constant_dt`` fields, ``velocity_base_step``
            = s; the table attribute ``velocity_dt_steps`` = Δ). ``velocity`` between
            consecutive snapshots is S/Δt with Δt the schedule's spacing, and S is quadratic
            in a small kernel change, so it grows with Δt and is not comparable across a
            log-spaced run; None (default): no extra snapshots.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor` (path, probe — default
            256 stratified training examples — schedule — default log-spaced steps — ...).
    """

    quantity = "ntk"
    state = {"_kernel_init": "array", "_kernel_prev": "array", "_epoch_prev": "value", "_eigvecs_prev": "array",
             "_velocity_bases": "value", "_velocity_kernels": "arrays"}

    def __init__(self, path: str, *, kind: str = "auto", k: int = 20, store_kernel: Optional[bool] = None,
                 projections: int = 32, seed: int = 0,
                 task: Optional[str] = None, sequence_kernel: str = "positions",
                 token_positions: Optional[int] = None,
                 per_layer: bool = True, heldout: Union[Probe, ProbeSet, Tuple[torch.Tensor, torch.Tensor], None] = None,
                 krr_eps: float = 1e-4, method: str = "auto", dtype: Optional[torch.dtype] = None,
                 max_memory: Union[None, int, str] = None, velocity_dt: Optional[int] = None, **kwargs: Any):
        super().__init__(path, **kwargs)
        owner = type(self).__name__
        self.velocity_dt = _args.positive_int(velocity_dt, "velocity_dt", owner, optional=True,
                                              hint="the steps between a snapshot and its constant-Δt partner")
        # Snapshots due Δ steps after one taken: str(step due) -> [its step, its epoch], and its kernel.
        self._velocity_bases: Dict[str, List[float]] = {}
        self._velocity_kernels: Dict[str, np.ndarray] = {}
        self._partner_only = False  # the snapshot being taken is only a partner (it plans none)
        self.kind = _args.one_of(kind, "kind", ("auto", "sketch", *sorted(KINDS)), owner)
        self.projections = _args.integer(projections, "projections", owner, minimum=2)
        self.seed = _args.integer(seed, "seed", owner, minimum=0)
        self._kind = "trace"  # the kind used: kind, or auto's choice (fields)
        self.method = _args.one_of(method, "method", sorted(METHODS), owner)
        self.k = _args.positive_int(k, "k", owner, hint="the number of eigenpairs kept")
        self.krr_eps = _args.number(krr_eps, "krr_eps", owner, minimum=0)
        self.dtype = _args.one_of(dtype, "dtype", (None, torch.float32, torch.float64), owner)
        self.store_kernel = store_kernel
        self.task = None if task is None else _args.one_of(task, "task", TASKS, owner)
        self._task = Task("multiclass", 0)  # detected at train start (fields); per pair for sequences
        self.sequence_kernel = _args.one_of(sequence_kernel, "sequence_kernel", ("positions", "pooled"), owner)
        self.token_positions = _args.positive_int(token_positions, "token_positions", owner, optional=True)
        self._sequence: Optional[Task] = None  # the detected sequence task, when outputs are per token
        self._pairs: Dict[str, TokenPairs] = {}  # probe role -> chosen (sequence, position) pairs
        self.per_layer = bool(per_layer)
        self.heldout = heldout
        self._heldout = ProbeSlot("heldout", as_heldout(owner, heldout))
        self.max_memory = max_memory
        self._layers: List[str] = []
        self._num_outputs = 0
        self._k_eff = 0
        self._store_kernel = False
        self._kernel_init: Optional[np.ndarray] = None
        self._kernel_prev: Optional[np.ndarray] = None
        self._epoch_prev: Optional[float] = None
        self._eigvecs_prev: Optional[np.ndarray] = None

    # ------------------------------------------------------------------ config and schema
    def config_extra(self) -> Dict[str, Any]:
        return dict(super().config_extra(), store_kernel=self._store_kernel, kind_used=self._kind,
                    kernel_dtype=str(self._kernel_dtype() or "the parameters' dtype").replace("torch.", ""),
                    note="kernel computed in eval mode: BatchNorm uses running statistics, dropout is off")

    def _matrix_size(self, n: int) -> int:
        return n if self._kind in _SQUARE_KINDS else n * self._num_outputs

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        assert probe is not None
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        rows = min(len(probe), 32)
        x = probe.x[:rows].to(device)
        out = self.sample_outputs(pl_module, x)
        self._task = detect_task(out, probe.y[:rows].to(device), self.task, owner=type(self).__name__, inputs=x)
        self._sequence, self._pairs = None, {}
        if self._task.kind == "sequence":
            self._sequence = self._task
            self._task = self._sequence_view(probe)
        n = len(self._view(probe))
        self._num_outputs = self._task.num_outputs if self._sequence else int(out.reshape(rows, -1).shape[1])
        self._kind = self.kind if self.kind != "auto" else (
            "sketch" if self._num_outputs > 2 * self.projections else "trace")
        m = self._matrix_size(n)
        self._k_eff = min(self.k, m)
        selected = select_parameters(self._model(pl_module), None)
        seen: List[str] = []
        for name, _ in selected:
            layer = layer_name(name)
            if layer not in seen:
                seen.append(layer)
        self._layers = seen
        if self.store_kernel is None:
            self._store_kernel = self._kind in _SQUARE_KINDS and n <= _STORE_KERNEL_MAX_N
        else:
            self._store_kernel = bool(self.store_kernel)
        k = self._k_eff
        fields = [
            Field("finite", (), "bool", attrs={"description": "the kernel was finite (else NaN-filled row)"}),
            Field("eigvals", (k,), dims=("eigen",)),
            Field("eigvecs", (m, k), "float32", dims=("eigvec_row", "eigen")),
            Field("trace"), Field("frobenius"), Field("effective_rank"),
            Field("distance_to_init"), Field("distance_to_prev"), Field("velocity"),
            Field("angular_velocity", attrs={"description": "arccos(<K_prev, K>_F / (|K_prev|_F |K|_F)) / dt, "
                                                            "radians per epoch, dt from the previous row"}),
            Field("kernel_target_alignment"), Field("kernel_target_alignment_centered"),
            Field("target_energy", (k,), dims=("eigen",)), Field("output_energy", (k,), dims=("eigen",)),
            Field("residual_energy", (k,), dims=("eigen",)),
        ]
        if self.velocity_dt is not None:
            fields += _constant_dt_fields()
        if self.per_layer:
            fields.append(Field("layer_trace", (len(self._layers),), dims=("layer",)))
        if self.heldout_set is not None:
            fields += [Field("krr_accuracy"), Field("krr_mse")]
        if self._store_kernel:
            shape = {"trace": (n, n), "pseudo": (n, n), "diagonal": (n, n, self._num_outputs),
                     "full": (n, n, self._num_outputs, self._num_outputs), "sketch": (n, n)}[self._kind]
            dims = ("probe_i", "probe_j", "output_c", "output_d")[: len(shape)]
            fields.append(Field("kernel", shape, "float64" if self._kernel_dtype() == torch.float64 else "float32",
                                dims=dims))
            if self._kind == "sketch":
                fields.append(Field("kernel_stderr", shape, "float32", dims=dims,
                                    attrs={"description": "per-entry standard error of the sketched kernel"}))
        if self._kind == "sketch":
            fields.append(Field("relative_stderr", attrs={"description": "||kernel_stderr||_F / ||kernel||_F"}))
        return fields

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        coords = {"eigen": np.arange(1, self._k_eff + 1)}
        if self.per_layer:
            coords["layer"] = np.arange(len(self._layers))
        return coords

    def table_specs(self, probe, pl_module):
        specs = super().table_specs(probe, pl_module)
        specs[0].attrs.update({"kind": self._kind, "layers": list(self._layers),
                               "eigvec_rows": "example" if self._kind in _SQUARE_KINDS
                               else "example-major (row n*C + c)"})
        specs[0].optional = ("kernel", "kernel_stderr")
        if self._kind == "sketch":
            specs[0].attrs.update(projections=self.projections, sketch_seed=self.seed)
        if self.velocity_dt is not None:
            specs[0].attrs.update(velocity_dt_steps=self.velocity_dt)
        if probe is not None:  # what the target energy is read against (spectral.energy_baselines)
            targets = _targets(self._view(probe).y, self._task, self._num_outputs)
            specs[0].attrs["target_energy_constant"] = (
                spectral.energy_baselines(targets).constant if np.any(targets) else float("nan"))
        if self._sequence is not None:
            specs[0].attrs.update(sequence_task=self._sequence.to_config(), sequence_kernel=self.sequence_kernel)
            if "probe" in self._pairs:
                specs[0].attrs.update(self._pairs["probe"].attrs())
        return specs

    # ------------------------------------------------------------------ sizing
    def cost_model(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet) -> Optional[CostModel]:
        """Kernel seconds timed on 8 and 16 probe examples (this process's work only): a per
        n + b n² (Jacobians, Gram matrix); a held-out probe of H examples (not resized) adds
        a H + 2 b H n (its cross kernel is not symmetric). Sequence probes are not sized: the
        number of (sequence, position) pairs is set by ``token_positions``."""
        if self._sequence is not None:
            return None
        model, on_device = self._model(pl_module), self._probe.on(pl_module)
        cost = linear_cost(lambda sub: self._block(model, sub.x, None, False), on_device, small=8, pairs=True,
                           clock=self.clock)
        if cost is not None and self.heldout_set is not None:
            h = len(self.heldout_set)
            cost = CostModel(cost.fixed + cost.per_example * h, cost.per_example + 2 * cost.per_pair * h,
                             cost.per_pair)
        return cost

    # ------------------------------------------------------------------ sequence tasks
    def _sequence_view(self, probe: ProbeSet) -> Task:
        """Per-token outputs: choose the pairs (positions) or check the probe for pooling;
        the task the kernel's targets then follow."""
        task = self._sequence
        assert task is not None
        if self.sequence_kernel == "pooled":
            for which in (probe, self.heldout_set):
                if which is not None and task.ignore_index is not None and bool(
                        (which.y[:, task.shift:] == task.ignore_index).any()):
                    raise TaskError(f"{type(self).__name__}: sequence_kernel='pooled' averages the logits over every "
                                    f"position, and probe {which.name!r} has targets equal to ignore_index "
                                    f"({task.ignore_index}: padding); pass sequence_kernel='positions'")
            return Task("regression", task.num_outputs)
        per = positions_per_sequence(len(probe), self.token_positions)
        self._pairs = {"probe": TokenPairs.choose(probe, task, per)}
        if self.heldout_set is not None:
            self._pairs["heldout"] = TokenPairs.choose(self.heldout_set, task, per)
        return Task("multiclass", task.num_outputs)

    def _view(self, probe: ProbeSet, role: str = "probe") -> ProbeSet:
        """The examples the kernel is over: the probe itself, its (sequence, position) pairs,
        or its sequences with pooled targets (the tokens' frequencies)."""
        task = self._sequence
        if task is None:
            return probe
        if self.sequence_kernel == "pooled":
            _, y = aligned_tokens(probe.y.unsqueeze(-1), probe.y, task)
            frequencies = torch.nn.functional.one_hot(y.long(), task.num_outputs).double().mean(dim=1)
            return ProbeSet(probe.name, probe.x, frequencies, probe.index, probe.source, probe.meta)
        return token_probe(probe, self._pairs[role])

    def _model(self, pl_module: nn.Module) -> nn.Module:
        model = self.measured_model(pl_module)
        if self._sequence is None:
            return model
        return PooledTokens(model, self._sequence.shift) if self.sequence_kernel == "pooled" else TokenOutputs(model)

    # ------------------------------------------------------------------ measurement
    def _kernel_dtype(self) -> Optional[torch.dtype]:
        """``dtype``, or float64 when kernel regression runs (a held-out probe: Lee et al. 2020),
        else None (the parameters' dtype)."""
        if self.dtype is not None:
            return self.dtype
        return torch.float64 if self.heldout_set is not None else None

    def _kernel(self, model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor] = None,
                per_layer: bool = False):
        """Θ(x1, x2). Under DDP the rows of x1 are split across ranks, each rank computes
        its block of rows against all of x2, and the blocks are gathered on every rank."""
        if not self._dist.active:
            return self._block(model, x1, x2, per_layer)
        rows = self._dist.shard(x1.shape[0])
        x2_all = x1 if x2 is None else x2
        local = None
        if rows.stop > rows.start:
            local = self._block(model, x1[rows], x2_all, per_layer)
            local = {k: v.cpu() for k, v in local.items()} if isinstance(local, dict) else local.cpu()
        blocks = [b for b in self._dist.gather_object(local) if b is not None]
        device = x1.device
        if isinstance(blocks[0], dict):
            return {name: torch.cat([b[name] for b in blocks]).to(device) for name in blocks[0]}
        return torch.cat(blocks).to(device)

    def _block(self, model: nn.Module, x1: torch.Tensor, x2: Optional[torch.Tensor], per_layer: bool):
        """One block of the kernel (the sketch's standard error on the side, as the kernel's
        ``"stderr"`` entry of a per-layer dict)."""
        if self._kind != "sketch":
            return empirical_ntk(model, x1, x2, kind=self._kind, method=self.method, per_layer=per_layer,
                                 dtype=self._kernel_dtype(), max_memory=self.max_memory)
        sketch = sketched_ntk(model, x1, x2, projections=self.projections, seed=self.seed, method=self.method,
                              dtype=self._kernel_dtype(), max_memory=self.max_memory, per_layer=per_layer)
        return {**(sketch.layers if per_layer else {"kernel": sketch.kernel}), _STDERR: sketch.stderr}

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        assert probe is not None
        model, probe = self._model(pl_module), self._view(probe)
        result = self._kernel(model, probe.x, per_layer=self.per_layer)
        stderr = result.pop(_STDERR) if isinstance(result, dict) and _STDERR in result else None
        if self.per_layer:
            kernel_t = sum(result.values())
            layer_trace = np.array([_trace(result[name]) if name in result else 0.0 for name in self._layers])
        else:
            kernel_t = result["kernel"] if isinstance(result, dict) else result
            layer_trace = None
        kernel = kernel_t.detach().double().cpu().numpy()
        step = int(self.snapshot_step if self.snapshot_step is not None else trainer.global_step)
        base = self._velocity_bases.pop(str(step), None)
        base_kernel = self._velocity_kernels.pop(str(step), None)
        if not np.all(np.isfinite(kernel)):
            return self._nonfinite_row(kernel), {"finite": 0.0}
        with torch.no_grad():
            outputs = chunked_forward(model, probe.x, self.batch_size)
            outputs = outputs.reshape(len(probe), -1).double().cpu().numpy()
        targets = _targets(probe.y, self._task, self._num_outputs)

        eig = spectral.top_eigenpairs(kernel, self._k_eff)
        eigvecs = eig.eigvecs if self._eigvecs_prev is None else spectral.align_signs(eig.eigvecs, self._eigvecs_prev)
        matrix = spectral.kernel_matrix(kernel)
        if matrix.shape[0] <= _FULL_SPECTRUM_MAX_M:
            effective_rank = spectral.effective_rank(np.linalg.eigvalsh(0.5 * (matrix + matrix.T)))
        else:
            effective_rank = spectral.effective_rank(eig.eigvals)
        epoch = float(self.snapshot_epoch if self.snapshot_epoch is not None else trainer.current_epoch)
        if self._kernel_init is None:
            self._kernel_init = kernel.astype(np.float32)
        dist_init = spectral.kernel_distance(self._kernel_init, kernel)
        if self._kernel_prev is not None:
            dist_prev = spectral.kernel_distance(self._kernel_prev, kernel)
            dt = epoch - self._epoch_prev if self._epoch_prev is not None else float("nan")
            velocity = dist_prev / dt if dt > 0 else float("nan")
            angular_velocity = spectral.kernel_angle(self._kernel_prev, kernel) / dt if dt > 0 else float("nan")
        else:
            dist_prev = velocity = angular_velocity = float("nan")
        vec_targets, vec_outputs = _energy_vectors(self._kind, targets, outputs)
        row: Dict[str, Any] = {
            "finite": True, "eigvals": eig.eigvals, "eigvecs": eigvecs.astype(np.float32),
            "trace": spectral.kernel_trace(kernel), "frobenius": spectral.kernel_frobenius_norm(kernel),
            "effective_rank": effective_rank, "distance_to_init": dist_init, "distance_to_prev": dist_prev,
            "velocity": velocity, "angular_velocity": angular_velocity,
            "kernel_target_alignment": spectral.kernel_target_alignment(kernel, targets),
            "kernel_target_alignment_centered": spectral.kernel_target_alignment(kernel, targets, centered=True),
            "target_energy": _energy(eigvecs, vec_targets), "output_energy": _energy(eigvecs, vec_outputs),
            "residual_energy": _energy(eigvecs, vec_outputs - vec_targets),
        }
        if layer_trace is not None:
            row["layer_trace"] = layer_trace
        if self.velocity_dt is not None:
            row.update(_constant_dt_row(base, base_kernel, kernel, epoch))
            if not self._partner_only:
                self._plan_partner(step, epoch, kernel)
        if self.heldout_set is not None:
            held = self._view(self.heldout_set, "heldout").to(probe.x.device)
            cross = self._kernel(model, held.x, probe.x)
            cross = (cross["kernel"] if isinstance(cross, dict) else cross).detach().double().cpu().numpy()
            row["krr_accuracy"], row["krr_mse"] = _krr_scores(kernel, targets, cross, held.y, self._task,
                                                              self._num_outputs, self.krr_eps)
        if stderr is not None:
            stderr_np = stderr.detach().double().cpu().numpy()
            norm = float(np.linalg.norm(kernel))
            row["relative_stderr"] = float(np.linalg.norm(stderr_np) / norm) if norm > 0 else float("nan")
            if self._store_kernel:
                row["kernel_stderr"] = stderr_np.astype(np.float32)
        if self._store_kernel:
            row["kernel"] = kernel if self._kernel_dtype() == torch.float64 else kernel.astype(np.float32)
        self._kernel_prev = kernel.astype(np.float32)
        self._epoch_prev = epoch
        self._eigvecs_prev = eigvecs
        scalars = {key: float(row[key]) for key in ("trace", "effective_rank", "distance_to_init",
                                                     "kernel_target_alignment", "kernel_target_alignment_centered")}
        scalars["eigval_1"] = float(eig.eigvals[0])
        for key in ("velocity", "angular_velocity", "velocity_constant_dt", "angular_velocity_constant_dt"):
            if key in row and math.isfinite(row[key]):
                scalars[key] = float(row[key])
        for k in _LOGGED_ENERGY_K:
            if k <= self._k_eff:
                scalars[f"target_energy_top{k}"] = float(row["target_energy"][k - 1])
                scalars[f"output_energy_top{k}"] = float(row["output_energy"][k - 1])
        if "krr_accuracy" in row:
            scalars["krr_accuracy"] = float(row["krr_accuracy"])
        if "relative_stderr" in row:
            scalars["relative_stderr"] = float(row["relative_stderr"])
        return row, scalars

    def _nonfinite_row(self, kernel: np.ndarray) -> Dict[str, Any]:
        """A NaN/Inf kernel (diverged training) is recorded as such, flagged, not crashed on."""
        row: Dict[str, Any] = {}
        assert self.table is not None or not self._writer
        for spec in self._specs[0].fields:
            if spec.name in ("step", "epoch", "wall_time"):
                continue
            row[spec.name] = np.full(spec.shape, np.nan if np.dtype(spec.dtype).kind == "f" else spec.fill_value)
        row["finite"] = False
        if self._store_kernel:
            row["kernel"] = kernel.astype(np.float32)
        return row

    # ------------------------------------------------------------------ constant-Δt velocity
    def _plan_partner(self, step: int, epoch: float, kernel: np.ndarray) -> None:
        """Plan the snapshot Δ steps after this one (its kernel kept until then)."""
        due = step + int(self.velocity_dt)
        self._velocity_bases[str(due)] = [step, epoch]
        self._velocity_kernels[str(due)] = kernel.astype(np.float64 if self._kernel_dtype() == torch.float64
                                                         else np.float32)
        self.next_due = min(self.next_due, due)
        if self._session is not None:
            self._session.due_by(due)

    def _batch_end(self, trainer: Any, pl_module: nn.Module, batch_idx: int) -> None:
        """The schedule's snapshot, then a planned partner snapshot if this step is due one."""
        super()._batch_end(trainer, pl_module, batch_idx)
        if self.velocity_dt is None or not self._velocity_bases:
            return
        step = int(trainer.global_step)
        if str(step) in self._velocity_bases and step != self._last_step and not self.disabled:
            self._partner_only = True
            try:  # forced: the snapshot Δ before it was taken, and the pair is the measurement
                self._snapshot(trainer, pl_module, epoch=fractional_epoch(trainer, batch_idx), forced=True)
            finally:
                self._partner_only = False
        for due in [d for d in self._velocity_bases if int(d) <= step]:  # taken, or passed (a failed snapshot)
            self._velocity_bases.pop(due)
            self._velocity_kernels.pop(due, None)
        if self._velocity_bases:
            self.next_due = min(self.next_due, min(int(d) for d in self._velocity_bases))


def _constant_dt_fields() -> List[Field]:
    return [
        Field("velocity_base_step", (), "int64",
              attrs={"description": "step s of the snapshot this row is velocity_dt_steps after (-1: none)"}),
        Field("constant_dt_epochs", attrs={"description": "dt of the *_constant_dt fields in epochs (the epoch "
                                                          "difference of velocity_dt_steps steps)"}),
        Field("distance_constant_dt", attrs={"description": "S(K_s, K_{s+dt}) over the constant dt (Fort et al.)"}),
        Field("velocity_constant_dt", attrs={"description": "S(K_s, K_{s+dt}) / dt per epoch at the constant dt; "
                                                            "quadratic in the kernel's speed"}),
        Field("angular_velocity_constant_dt",
              attrs={"description": "arccos(<K_s, K_{s+dt}>_F / (|K_s|_F |K_{s+dt}|_F)) / dt, radians per epoch at "
                                    "the constant dt; linear in the kernel's speed"}),
    ]


def _constant_dt_row(base: Optional[List[float]], base_kernel: Optional[np.ndarray], kernel: np.ndarray,
                     epoch: float) -> Dict[str, Any]:
    """The constant-Δt fields of a row that is Δ steps after snapshot ``base`` ([step, epoch])."""
    nan = float("nan")
    if base is None or base_kernel is None:
        return {"velocity_base_step": -1, "constant_dt_epochs": nan, "distance_constant_dt": nan,
                "velocity_constant_dt": nan, "angular_velocity_constant_dt": nan}
    dt = epoch - float(base[1])
    distance = spectral.kernel_distance(base_kernel, kernel)
    angle = spectral.kernel_angle(base_kernel, kernel)
    return {"velocity_base_step": int(base[0]), "constant_dt_epochs": dt, "distance_constant_dt": distance,
            "velocity_constant_dt": distance / dt if dt > 0 else nan,
            "angular_velocity_constant_dt": angle / dt if dt > 0 else nan}


def _trace(kernel: torch.Tensor) -> float:
    """Trace of one layer's kernel (NaN for a non-finite kernel; the row is then flagged)."""
    values = kernel.detach()
    if not bool(torch.isfinite(values).all()):
        return float("nan")
    return spectral.kernel_trace(values)


def _krr_scores(kernel: np.ndarray, targets: np.ndarray, cross: np.ndarray, held_y: torch.Tensor, task: Task,
                num_outputs: int, eps: float) -> Tuple[float, float]:
    """(accuracy, mse) of kernel regression on the held-out probe: multi-class, argmax against
    the label; binary and multi-label, the prediction thresholded at 0.5 against the 0/1
    labels (per entry); regression, NaN accuracy. mse over every target entry."""
    if task.kind == "multiclass":
        scores = spectral.kernel_regression_scores(kernel, targets, cross, held_y.cpu().numpy(), eps=eps)
        return scores.accuracy, scores.mse
    predictions = spectral.kernel_regression(kernel, targets, cross, eps=eps).reshape(cross.shape[0], -1)
    truth = _targets(held_y, task, num_outputs)
    mse = float(np.mean((predictions - truth) ** 2))
    accuracy = float(np.mean((predictions > 0.5) == (truth > 0.5))) if task.kind != "regression" else float("nan")
    return accuracy, mse


def _targets(y: torch.Tensor, task: Task, num_outputs: int) -> np.ndarray:
    """The targets as vectors beside the outputs (N, C): one-hot class labels (multi-class),
    the labels or values themselves (binary with one logit, multi-label, regression)."""
    y = y.detach().cpu()
    if task.kind == "multiclass":
        return np.eye(num_outputs)[y.long().numpy()]
    return y.reshape(y.shape[0], -1).double().numpy()


def _energy_vectors(kind: str, targets: np.ndarray, outputs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Targets and outputs as the vectors the eigenvectors live with: (N, C) columns, or vec for NC rows."""
    if kind in _SQUARE_KINDS:
        return targets, outputs
    return targets.reshape(-1), outputs.reshape(-1)


def _energy(eigvecs: np.ndarray, phi: np.ndarray) -> np.ndarray:
    if not np.any(phi):
        return np.full(eigvecs.shape[1], np.nan)
    return spectral.eigen_energy(eigvecs, phi)


class PooledTokens(nn.Module):
    """Per-token logits averaged over the positions that predict a target: (B, V)."""

    def __init__(self, model: nn.Module, shift: int):
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return (out[:, :-self.shift] if self.shift else out).mean(dim=1)
