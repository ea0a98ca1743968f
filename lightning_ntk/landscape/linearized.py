"""The linearised network: a first-order Taylor model of a network around weights θ₀,

    f_lin(θ, x) = f(θ₀, x) + J(θ₀, x) (θ − θ₀),       J = ∂f/∂θ at θ₀,

trainable in θ with any optimiser (Lee et al. 2019, "Wide neural networks of any depth
evolve as linear models under gradient descent"; Fort et al. 2020 train it from θ(t) to see
when a network leaves its kernel regime). The product J (θ − θ₀) is one forward-mode
Jacobian-vector product (``torch.func.jvp``): no Jacobian is formed, a forward pass costs
about two of the network's, and gradients with respect to θ flow back through it
(Jᵀ times the output gradient).

:class:`Linearized` wraps a module; :func:`linearize` swaps the network inside a larger
module (a LightningModule) for its linearisation, so the same ``training_step``,
``configure_optimizers`` and Trainer train it.

Modes. BatchNorm is always evaluated with the running statistics it had at θ₀ (eval
mode, statistics frozen): in train mode it would normalise each batch by its own
statistics, which makes f a function of the whole batch and of θ through them, not the
per-example model being linearised. Dropout follows the wrapper's train/eval flag: in
train mode one random mask is drawn per forward and applied to f(θ₀, x) and to the JVP
alike, so each step trains the linearisation of the masked network (linear in θ for every
mask); in eval mode dropout is off and f_lin is deterministic.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

from .._modules import BATCH_NORMS


class _Frozen(nn.Module):
    """Buffers holding θ₀ and the buffers at θ₀ (in the wrapper's state_dict, so a checkpoint
    of a linearised training resumes the same linear model)."""

    def __init__(self, params: List[torch.Tensor], buffers: List[torch.Tensor]):
        super().__init__()
        for i, p in enumerate(params):
            self.register_buffer(f"p{i}", p.detach().clone())
        for i, b in enumerate(buffers):
            self.register_buffer(f"b{i}", b.detach().clone())

    def tensors(self, prefix: str, n: int) -> List[torch.Tensor]:
        return [getattr(self, f"{prefix}{i}") for i in range(n)]


@contextlib.contextmanager
def _batchnorm_eval(module: nn.Module) -> Iterator[None]:
    layers = [(m, m.training) for m in module.modules() if isinstance(m, BATCH_NORMS)]
    for m, _ in layers:
        m.training = False
    try:
        yield
    finally:
        for m, mode in layers:
            m.training = mode


class Linearized(nn.Module):
    """``module`` linearised around its current weights θ₀ (see the module docstring).

    Its parameters are ``module``'s own (θ, starting at θ₀): an optimiser built from
    ``Linearized(net).parameters()`` trains the linear model, and ``self.module`` then holds
    θ. θ₀ and the buffers at θ₀ are frozen copies (``self.theta0``, in the state_dict).
    Parameters with ``requires_grad=False`` are constants of the linear model. Outputs may
    be a tensor or any nesting of tuples, lists and dicts of tensors (each linearised).

    Args:
        module: the network f(θ, x); called as ``module(*args, **kwargs)``.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"Linearized: module must be a torch.nn.Module, got {type(module).__name__}")
        if isinstance(module, Linearized):
            raise TypeError("Linearized: module is already linearised")
        self.module = module
        named = dict(module.named_parameters())  # tied parameters once
        self._names: List[str] = [n for n, p in named.items() if p.requires_grad]
        if not self._names:
            raise ValueError("Linearized: the module has no trainable parameters (requires_grad=True) to linearise in")
        self._buffer_names: List[str] = [n for n, _ in module.named_buffers()]
        self.theta0 = _Frozen([named[n] for n in self._names], [b for _, b in module.named_buffers()])

    def theta0_dict(self) -> Dict[str, torch.Tensor]:
        """θ₀ by parameter name (the frozen copies)."""
        return dict(zip(self._names, self.theta0.tensors("p", len(self._names))))

    def displacement(self) -> Dict[str, torch.Tensor]:
        """θ − θ₀ by parameter name."""
        named = dict(self.module.named_parameters())
        return {n: named[n] - t0 for n, t0 in self.theta0_dict().items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        named = dict(self.module.named_parameters())
        theta0 = tuple(self.theta0.tensors("p", len(self._names)))
        tangents = tuple(named[n] - t0 for n, t0 in zip(self._names, theta0))
        fixed: Dict[str, torch.Tensor] = {n: p.detach() for n, p in named.items() if n not in set(self._names)}
        fixed.update(zip(self._buffer_names, self.theta0.tensors("b", len(self._buffer_names))))
        names = self._names

        def f(*primals: torch.Tensor) -> Any:
            return torch.func.functional_call(self.module, {**fixed, **dict(zip(names, primals))}, args, kwargs)

        with _batchnorm_eval(self.module):
            out0, dout = torch.func.jvp(f, theta0, tangents)
        return _add_outputs(out0, dout)


def _add_outputs(out0: Any, dout: Any) -> Any:
    """``out0 + dout`` leaf by leaf through tuples (named ones too), lists and dicts (the
    output nestings :class:`Linearized` documents; torch's pytree helpers are private)."""
    if isinstance(out0, torch.Tensor):
        return out0 + dout
    if isinstance(out0, dict):
        added = {key: _add_outputs(value, dout[key]) for key, value in out0.items()}
        return added if type(out0) is dict else type(out0)(added)
    if isinstance(out0, tuple) and hasattr(out0, "_fields"):
        return type(out0)(*(_add_outputs(a, b) for a, b in zip(out0, dout)))
    if isinstance(out0, (tuple, list)):
        return type(out0)(_add_outputs(a, b) for a, b in zip(out0, dout))
    raise TypeError(f"Linearized: the module returned a {type(out0).__name__} among its outputs; outputs must be "
                    "tensors or tuples, lists and dicts of them (wrap the module to return those)")


def _network_attribute(module: nn.Module) -> str:
    """The one direct child holding every trainable parameter of ``module``."""
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    holders = [(name, child) for name, child in module.named_children()
               if any(p.requires_grad for p in child.parameters())]
    inside = {id(p) for _, child in holders for p in child.parameters() if p.requires_grad}
    if len(holders) == 1 and inside == trainable:
        return holders[0][0]
    found = ", ".join(f"{name!r}" for name, _ in holders) or "none"
    outside = "" if inside == trainable else "; some trainable parameters are registered on the module itself"
    raise ValueError(f"linearize: cannot tell which child of {type(module).__name__} is the network (children with "
                     f"trainable parameters: {found}{outside}); pass attribute='<name of the network's attribute>'")


def linearize(module: nn.Module, attribute: Optional[str] = None, *, inplace: bool = False) -> nn.Module:
    """``module`` (a LightningModule or any wrapper) with its network replaced by
    :class:`Linearized` around the network's current weights θ(t).

    The network is ``getattr(module, attribute)``, or, with ``attribute=None``, the one
    direct child holding every trainable parameter (refused when that is ambiguous). The
    wrapper's ``forward``, ``training_step`` and ``configure_optimizers`` then use the
    linear model unchanged, so the same Trainer trains it (the optimiser must be built
    after the swap: a new ``Trainer.fit`` does). With ``inplace=False`` (default) a deep
    copy is changed and returned, and ``module`` keeps training as before (a Lightning
    module's Trainer reference is not copied).

    Returns:
        the changed module (``module`` itself when ``inplace``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"linearize: module must be a torch.nn.Module, got {type(module).__name__}")
    name = _network_attribute(module) if attribute is None else attribute
    network = getattr(module, name, None)
    if not isinstance(network, nn.Module):
        raise ValueError(f"linearize: {type(module).__name__}.{name} is not a torch.nn.Module "
                         f"({type(network).__name__}); pass attribute= naming the network")
    target = module if inplace else copy.deepcopy(module)
    setattr(target, name, Linearized(getattr(target, name)))
    return target

