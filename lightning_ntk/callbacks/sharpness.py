"""SharpnessMonitor: Hessian top eigenvalues of the training loss over training (Cohen et al. 2021).

Per snapshot, on a fixed sharpness set (default: the first 1024 training examples; Cohen
et al. used the first 5000), with BatchNorm on batch statistics as in training (Cohen et
al.'s HVPs are taken in train mode; ``mode="eval"`` for running statistics) and dropout
off: the top-k Hessian eigenvalues of the mean loss
by Lanczos with true Ritz residuals (warm-started from the previous snapshot's
eigenvectors), the number of HVPs used, the gradient norm, the loss, and the current
learning rate with the edge-of-stability threshold of the optimiser (2/η for gradient
descent, (2 + 2β)/η for heavy-ball momentum β, (2 + 2β)/((1 + 2β)η) for Nesterov; NaN
for adaptive optimisers, where no simple threshold applies). Optionally: the Hessian trace
(Hutch++ with a standard error), the ρ-sharpness of SAM, the SLQ spectral density, and for
Adam the preconditioned sharpness (Cohen et al. 2022).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import curvature
from .._hygiene import measurement_mode, module_device
from .._losses import LossFn
from .._modules import BATCH_NORMS
from ..probe import Probe, ProbeSet
from ..sizing import CostModel, LighterWork
from ..store import Field
from ._base import Monitor
from ._sizing import probe_head, timing_sizes
from ._step_loss import StepLossError, TrainingStepLoss, check_step_loss, silenced_logging, step_loss_of

#: Lanczos residual tolerance by default, and the looser one sizing may take at the floor.
DEFAULT_TOL, LIGHTER_TOL = 1e-3, 1e-2

#: ``sharpness_set="auto"``: the first this many training examples, fewer when the budget needs.
DEFAULT_SHARPNESS_SET = 1024


class SharpnessMonitor(Monitor):
    """Loss-landscape sharpness snapshots (group ``/sharpness``).

    Args:
        sharpness_set: examples the loss is averaged over: ``"auto"`` (default: the first
            1024 training examples, fewer when the budget needs, see
            :mod:`lightning_ntk.sizing`), an int n (the first n training examples; ``None``:
            the whole training set), a :class:`~lightning_ntk.probe.Probe`, a ProbeSet or a
            pair ``(x, y)``.
        k: top eigenvalues (default 2). tol: Lanczos residual tolerance (relative); default
            (None) 1e-3, or 1e-2 when sizing to the budget needs it at the smallest set (an
            eigenvalue then lies within 1% of its Ritz value, typically within ~1e-4 for a
            separated one: residual²/gap; the residuals are stored either way).
        max_hvp: cap on Hessian-vector products per snapshot (default: Lanczos' own).
        trace: also estimate the Hessian trace (Hutch++ with ``trace_queries`` HVPs).
        sam_rho: also record SAM's ρ-sharpness for this radius (None: off).
        density: also record the SLQ spectral density (``density_steps`` Lanczos nodes).
        preconditioned: for Adam/AdamW also record the top eigenvalue of P^-1/2 H P^-1/2.
        loss_fn: ``loss_fn(outputs, targets)``, per-example losses or their mean. Default:
            the loss the module trains, its own ``training_step(batch, 0)`` on each batch
            of the set, in the layout of the user's batches (logging silenced; automatic
            optimisation only): λ₁ is then the
            Hessian of exactly what is optimised (``F.mse_loss``, label smoothing, auxiliary
            terms), as Cohen et al. compare it with 2/η. Pass Cohen et al.'s squared loss
            ``lightning_ntk.squared_loss`` (½‖f − y‖²) or a cross-entropy to measure another.
        dtype: computation dtype (e.g. ``torch.float64``).
        mode: ``"train"`` (default, Cohen et al. 2021, who take Hessian-vector products in
            training mode): BatchNorm layers normalise with the statistics of each chunk of
            ``batch_size`` examples of the set (pass your training batch size to match the
            training step), their running statistics untouched; dropout off. ``"eval"``:
            BatchNorm on its running statistics. The two agree for networks without
            BatchNorm. See :class:`lightning_ntk.curvature.LossSet`.
        **kwargs: see :class:`~lightning_ntk.callbacks.Monitor`.
    """

    quantity = "sharpness"
    smaller_rows = "a smaller k= (or density_steps=)"
    state = {"_eigenvectors": "value"}
    default_probe_size = 1024

    def __init__(self, path: str, *, sharpness_set: Union[str, int, None, Probe, ProbeSet, Tuple[Any, Any]] = "auto",
                 k: int = 2, tol: Optional[float] = None, max_hvp: Optional[int] = None, trace: bool = False,
                 trace_queries: int = 60, sam_rho: Optional[float] = None, density: bool = False,
                 density_steps: int = 60, preconditioned: bool = False, loss_fn: Optional[LossFn] = None,
                 dtype: Optional[torch.dtype] = None, mode: str = "train", **kwargs: Any):
        if "probe" in kwargs:
            raise TypeError("SharpnessMonitor: pass the examples as sharpness_set=, not probe=")
        self._default_set = isinstance(sharpness_set, str) and sharpness_set == "auto"
        if isinstance(sharpness_set, str) and not self._default_set:
            raise ValueError(f"SharpnessMonitor: sharpness_set must be 'auto', a number of examples, None, a Probe, "
                             f"a ProbeSet or (x, y); got the string {sharpness_set!r}")
        sharpness_set = DEFAULT_SHARPNESS_SET if self._default_set else sharpness_set
        if sharpness_set is None or (isinstance(sharpness_set, int) and not isinstance(sharpness_set, bool)):
            if sharpness_set is not None and sharpness_set < 1:
                raise ValueError(f"SharpnessMonitor: sharpness_set must be a positive number of examples, got "
                                 f"{sharpness_set!r}")
            probe: Any = Probe(size=sharpness_set, first=True, name="sharpness")
        else:
            probe = sharpness_set
        super().__init__(path, probe=probe, **kwargs)
        self._probe.argument = "sharpness_set"
        for name, value, low in (("k", k, 1), ("trace_queries", trace_queries, 3), ("density_steps", density_steps, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SharpnessMonitor: {name} must be an integer >= {low}, got {value!r}")
        self._tol_given = tol is not None
        tol = DEFAULT_TOL if tol is None else tol
        if not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"SharpnessMonitor: tol must be in (0, 1), got {tol!r}")
        if max_hvp is not None and (isinstance(max_hvp, bool) or not isinstance(max_hvp, int) or max_hvp < 2 * k):
            raise ValueError(f"SharpnessMonitor: max_hvp must be None or an integer >= 2k = {2 * k}, got {max_hvp!r}")
        if sam_rho is not None and not (isinstance(sam_rho, (int, float)) and sam_rho > 0 and math.isfinite(sam_rho)):
            raise ValueError(f"SharpnessMonitor: sam_rho must be None or a positive radius, got {sam_rho!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("SharpnessMonitor: loss_fn must be callable (outputs, targets) -> per-example losses")
        if mode not in ("train", "eval"):
            raise ValueError(f"SharpnessMonitor: mode must be 'train' (Cohen et al.: BatchNorm on batch statistics) "
                             f"or 'eval' (running statistics), got {mode!r}")
        if dtype is not None and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"SharpnessMonitor: dtype must be None, torch.float32 or torch.float64, got {dtype!r}")
        self.k, self.tol, self.max_hvp = k, float(tol), max_hvp
        self.trace, self.trace_queries = bool(trace), trace_queries
        self.sam_rho = None if sam_rho is None else float(sam_rho)
        self.density, self.density_steps = bool(density), density_steps
        self.preconditioned = bool(preconditioned)
        self.loss_fn = loss_fn
        self.dtype = dtype
        self.mode = mode
        self._eigenvectors: Optional[torch.Tensor] = None
        self._timing: Optional[Tuple[Any, nn.Module, int, int]] = None  # cost_model's run, for lighter_work
        self._eos_description = ""
        self._k_eff = k

    # ------------------------------------------------------------------ sizing
    size_floor = 64
    size_name = "sharpness set"
    size_argument = "sharpness_set="
    per_fit = ("tol",)  # sizing may loosen it for one fit
    runtime = Monitor.runtime + ("_timing",)  # the fit's trainer and module: never pickled

    def default_size(self) -> bool:
        return self._default_set

    def cost_model(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet) -> Optional[CostModel]:
        """Hessian-vector products by the set's size, times how many a snapshot takes: a
        snapshot on the set's first 16 examples (Lanczos from scratch, as the first snapshot
        is) gives the count (more than on larger sets: 49 vs 40 and 34 vs 26 HVPs for 16 vs
        64 examples on the digits CNNs) and the time of one product there; one capped at k
        products on 32 examples gives the time per example. Optional trace, density, SAM and
        preconditioned estimates add their products."""
        head = self._probe.on(pl_module)
        sizes = timing_sizes(len(head), 16)
        if sizes is None:
            return None
        extra = (self.trace_queries if self.trace else 0) + (self.density_steps if self.density else 0) + \
            (2 if self.sam_rho is not None else 0)  # SAM: an ascent gradient and the loss there
        seconds, products = [], []
        for n, cap in zip(sizes, (self.max_hvp, self._k_eff)):
            started = self.clock()
            n_hvp = self._products_from_scratch(trainer, pl_module, n, max_hvp=cap)
            seconds.append(self.clock() - started)
            # + the gradient graph, + the loss and gradient, + the optional estimates' products
            products.append(n_hvp + 2 + extra)
        self._timing = (trainer, pl_module, products[0], extra)
        # Adam's preconditioned sharpness is NaN before the first step: its Lanczos comes later
        scale = products[0] + (products[0] - 2 - extra if self.preconditioned else 0)
        per_product = CostModel.from_timings(sizes, [t / p for t, p in zip(seconds, products)])
        return CostModel(scale * per_product.fixed, scale * per_product.per_example, 0.0)

    def lighter_work(self, cost: CostModel) -> List[LighterWork]:
        """A looser Lanczos tolerance (1e-2), when ``tol`` was left to the monitor: its HVP
        count from one more Lanczos run from scratch on the set's first 16 examples (paid
        only when the floor does not fit), the cost scaled by the counts."""
        timing = getattr(self, "_timing", None)
        if self._tol_given or timing is None or LIGHTER_TOL <= self.tol:
            return []
        trainer, pl_module, products, extra = timing
        n = timing_sizes(len(self._probe.on(pl_module)), 16)[0]
        with measurement_mode(pl_module):
            lighter = self._products_from_scratch(trainer, pl_module, n, tol=LIGHTER_TOL) + 2 + extra
        scale = lighter / products
        return [LighterWork({"tol": LIGHTER_TOL}, CostModel(cost.fixed * scale, cost.per_example * scale,
                                                             cost.per_pair * scale))]

    def _products_from_scratch(self, trainer: Any, pl_module: nn.Module, n: int, **settings: Any) -> int:
        """Lanczos HVPs of a snapshot on the set's first ``n`` examples, from scratch (no warm
        start, as the first snapshot), with ``settings`` (``tol``, ``max_hvp``) for this
        call only."""
        saved = {name: getattr(self, name) for name in (*settings, "_eigenvectors")}
        try:
            for name, value in dict(settings, _eigenvectors=None).items():
                setattr(self, name, value)
            row, _ = self.measure(trainer, pl_module, probe_head(self._probe.on(pl_module), n))
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
        return int(row["n_hvp"])

    def config_extra(self) -> Dict[str, Any]:
        default = "the module's training_step loss"
        return dict(super().config_extra(), model_mode=self.mode, loss_fn=default if self.loss_fn is None else
                    getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__))

    def fields(self, probe: Optional[ProbeSet], pl_module: nn.Module) -> List[Field]:
        if self.loss_fn is None:  # refused at train start, not at the first snapshot
            if self.forward_fn is not None:
                raise StepLossError(f"{type(self).__name__}: forward_fn= gives the model's outputs, but without "
                                    "loss_fn= the loss measured is the module's training_step, which calls the model "
                                    "its own way; pass loss_fn=(outputs, targets) -> loss with forward_fn=")
            check_step_loss(pl_module, type(self).__name__)
        elif probe is not None:  # the user's loss gets the predictions of a dict or .logits output
            self.sample_outputs(pl_module, probe.x[:1].to(module_device(pl_module)))
        if self.mode == "train" and probe is not None and any(isinstance(m, BATCH_NORMS) for m in pl_module.modules()):
            share = self._dist.shard(len(probe))
            if share.stop - share.start < 2 or self.batch_size < 2:
                raise ValueError(
                    f"{type(self).__name__}: mode='train' normalises the BatchNorm layers with each chunk's batch "
                    f"statistics, and a chunk here holds {min(share.stop - share.start, self.batch_size)} example "
                    "(this process's share of the sharpness set, at most batch_size): batch statistics of one example "
                    "are undefined. Pass a sharpness_set= of at least 2 examples per process and batch_size >= 2, "
                    "or mode='eval' (running statistics)")
        n_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        self._k_eff = min(self.k, n_params)
        k = self._k_eff
        fields = [Field("lr"), Field("eos_threshold"), Field("loss"), Field("grad_norm"),
                  Field("eigvals", (k,), dims=("eigen",)), Field("residuals", (k,), dims=("eigen",)),
                  Field("n_hvp", (), "int64"), Field("converged", (), "bool")]
        if self.trace:
            fields += [Field("trace"), Field("trace_stderr")]
        if self.sam_rho is not None:
            fields.append(Field("sam_sharpness"))
        if self.density:
            fields += [Field("density_nodes", (self.density_steps,), dims=("node",)),
                       Field("density_weights", (self.density_steps,), dims=("node",))]
        if self.preconditioned:
            fields.append(Field("preconditioned_sharpness"))
        return fields

    def coords(self, probe: Optional[ProbeSet]) -> Dict[str, Any]:
        return {"eigen": np.arange(1, self._k_eff + 1)}

    def table_specs(self, probe, pl_module):
        specs = super().table_specs(probe, pl_module)
        specs[0].attrs.update({"eos_rule": "2/lr (GD); (2+2b)/lr (heavy ball); (2+2b)/((1+2b)lr) (Nesterov); "
                                            "NaN for adaptive optimisers. Cohen et al.'s edge of stability is for "
                                            "full-batch GD: with mini-batches the threshold is a bound, not a plateau",
                               "n_examples": len(probe) if probe is not None else 0})
        return specs

    def measure(self, trainer: Any, pl_module: nn.Module, probe: Optional[ProbeSet]) -> Tuple[Dict[str, Any], Dict[str, float]]:
        assert probe is not None
        # training_step's self.log calls are silenced (no value reaches the user's metrics);
        # attention runs its math kernel (measurement_mode): the fused kernels have no double backward.
        with silenced_logging(pl_module):
            if self._dist.active:
                # Under DDP each rank takes a share of the set; losses, gradients and HVPs are
                # summed across ranks (curvature.data_parallel), so every rank gets the same answer.
                with curvature.data_parallel(self._dist.all_reduce_sum):
                    return self._measure(trainer, pl_module, probe, probe.x.shape[0])
            return self._measure(trainer, pl_module, probe, probe.x.shape[0])

    def _measure(self, trainer: Any, pl_module: nn.Module, probe: ProbeSet, n: int) -> Tuple[Dict[str, Any], Dict[str, float]]:
        model = self.measured_model(pl_module)
        rows = self._dist.shard(n)
        # Chunks of at most batch_size, as equal as possible (no chunk of one example, whose
        # batch statistics in train mode would be undefined).
        cuts = np.linspace(rows.start, rows.stop, -(-(rows.stop - rows.start) // self.batch_size) + 1).round()
        spans = [slice(int(i), int(j)) for i, j in zip(cuts[:-1], cuts[1:])]
        batches = [(probe.x[span], probe.y[span]) for span in spans]
        optimizer = trainer.optimizers[0] if getattr(trainer, "optimizers", None) else None
        eos = curvature.edge_of_stability_threshold(optimizer) if optimizer is not None else \
            curvature.EdgeOfStability(None, "no optimizer")
        lr = _learning_rate(optimizer)
        # One LossSet per snapshot: the set is read, cast and counted once, and every
        # quantity below, the logged loss included, is computed on it (under DDP it sums
        # over ranks: built inside curvature.data_parallel by measure()).
        loss_fn = self.loss_fn
        if loss_fn is None:  # the module's own training loss, batch by batch
            model, loss_fn = TrainingStepLoss(pl_module, type(self).__name__), step_loss_of
            batches = [((probe.user_batch(span),), probe.y[span]) for span in spans]
        loss_set = curvature.LossSet(model, loss_fn, batches, dtype=self.dtype, mode=self.mode)
        result = curvature.hessian_eigs(loss_set, self._k_eff, tol=self.tol, max_hvp=self.max_hvp,
                                        return_eigenvectors=True, init=self._eigenvectors, warn=False)
        self._eigenvectors = result.eigenvectors
        loss, gradient = loss_set.loss_and_gradient()  # one pass gives both
        grad_norm = float(torch.linalg.vector_norm(gradient.double()))
        row: Dict[str, Any] = {
            "lr": lr, "eos_threshold": float("nan") if eos.threshold is None else eos.threshold,
            "loss": loss, "grad_norm": grad_norm,
            "eigvals": result.eigenvalues.double().cpu().numpy(), "residuals": result.residuals.double().cpu().numpy(),
            "n_hvp": result.n_hvp, "converged": bool(result.converged),
        }
        if self.trace:
            tr = curvature.hessian_trace(loss_set, n_queries=self.trace_queries,
                                         generator=int(self.snapshot_step or 0))
            row["trace"], row["trace_stderr"] = tr.trace, tr.stderr
        if self.sam_rho is not None:
            row["sam_sharpness"] = curvature.sam_sharpness(loss_set, self.sam_rho).sharpness
        if self.density:
            dens = curvature.hessian_density(loss_set, n_steps=self.density_steps,
                                             generator=int(self.snapshot_step or 0))
            nodes = dens.nodes[0].double().cpu().numpy()
            weights = dens.weights[0].double().cpu().numpy()
            pad = self.density_steps - nodes.shape[0]  # Lanczos may stop early (invariant subspace)
            row["density_nodes"] = np.pad(nodes, (0, pad), constant_values=np.nan)
            row["density_weights"] = np.pad(weights, (0, pad), constant_values=0.0)
        if self.preconditioned:
            value = float("nan")  # not Adam, or no optimizer step yet (no second-moment estimate)
            inner = getattr(optimizer, "optimizer", optimizer)
            if type(inner).__name__ in ("Adam", "AdamW") and all(
                    "exp_avg_sq" in inner.state.get(p, {}) for g in inner.param_groups for p in g["params"]):
                value = float(curvature.preconditioned_sharpness(loss_set, optimizer, 1,
                                                                 tol=self.tol).eigenvalues[0])
            row["preconditioned_sharpness"] = value
        scalars = {"sharpness": float(row["eigvals"][0]), "grad_norm": grad_norm, "loss": loss}
        if eos.threshold is not None:
            scalars["eos_threshold"] = eos.threshold
            scalars["sharpness_over_eos"] = float(row["eigvals"][0]) / eos.threshold
        if self.trace:
            scalars["trace"] = row["trace"]
        if self.sam_rho is not None:
            scalars["sam_sharpness"] = row["sam_sharpness"]
        return row, scalars


def _learning_rate(optimizer: Any) -> float:
    groups = getattr(getattr(optimizer, "optimizer", optimizer), "param_groups", None)
    if not groups:
        return float("nan")
    rates = {float(g.get("lr", float("nan"))) for g in groups}
    return rates.pop() if len(rates) == 1 else float("nan")
