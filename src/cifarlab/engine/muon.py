"""`optim.name: muon`: torch's own torch.optim.Muon on the conv filters, Nesterov SGD on the rest, as
the airbench94_muon record splits them (K. Jordan, github.com/KellerJordan/cifar10-airbench).

- Muon takes every trainable 4-D parameter (the conv filters; a frozen whitening conv is not
  trainable, so it is in no group). torch's Muon accepts 2-D parameters only, so it steps a matrix
  view of each filter, [out channels, the other dims in memory order], sharing the filter's storage
  (a view, never a copy, so its step is the filter's), and sees the filter's gradient as the same
  matrix. The order of the columns does not matter: Newton-Schulz orthogonalisation commutes with
  permuting them, so a channels_last filter gets the same update as a contiguous one.
- With `optim.muon_renormalise` each filter tensor is rescaled to norm sqrt(out channels) before each
  Muon step (the record's order), in place of weight decay (the filters get none): with a
  normalisation layer after each conv the function does not depend on the filters' scale, and the
  rescaling keeps Muon's fixed-size steps the same size relative to the filters all run (a model
  without such layers changes its function by it: set the key false there).
- SGD takes the rest: the 1-D parameters (normalisation shifts and scales, conv and linear biases,
  the whitening bias) at `bias_lr_scale` x the SGD side's LR with weight decay / `bias_lr_scale`
  (decay per step unchanged), and every other parameter (the head) at the SGD side's LR,
  `muon_sgd_lr_scale` x the Muon LR.

The optimizer has one param group holding every trainable parameter, whose "lr" is the Muon LR: OneCycle
(`schedule.build_scheduler`), the range test (torch-lr-finder sets and sweeps every group's LR) and the
logs see that one LR, and each step hands the two inner optimizers their LRs at the fixed ratios, so
the range test sweeps the whole recipe. The grad scaler unscales and checks every parameter's gradient
through that group. `state_dict` holds both inner optimizers' states (the momentum buffers), so a
resumed run goes on exactly.

torch.optim.Muon's momentum is torch's (buffer = m buffer + (1 - m) grad) where the record's is
(m buffer + grad): the two differ by the factor 1 - m, which the orthogonalisation divides out. Its
`adjust_lr_fn` is left at its default, Keller Jordan's sqrt(max(1, out / in)), which is 1 for any
filter with no more output channels than inputs x kernel area (every conv of fast_net): the record
adjusts nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from cifarlab.config.params import OptimParams
from cifarlab.errors import CifarlabError

TORCH_MUON = "2.9"   # the first torch with torch.optim.Muon


def _columns_in_memory_order(filters: torch.Tensor) -> list[int]:
    """The non-output dims of `filters`, outermost in memory first: permuted so, the tensor is one matrix."""
    return sorted(range(1, filters.dim()), key=lambda dim: -filters.stride(dim))


def _matrix(tensor: torch.Tensor, order: list[int]) -> torch.Tensor:
    return tensor.permute(0, *order).reshape(tensor.shape[0], -1)


class MuonSGD(torch.optim.Optimizer):
    """torch.optim.Muon on the conv filters and torch.optim.SGD on the rest, driven by one LR (the
    Muon LR, this optimizer's one param group); built by `build_muon`."""

    def __init__(self, filters: list[torch.Tensor], biases: list[torch.Tensor], others: list[torch.Tensor],
                 lr: float, params: OptimParams):
        super().__init__([{"params": [*filters, *biases, *others], "lr": lr}], {"lr": lr})
        self.renormalise = params.muon_renormalise
        self.sgd_lr_scale = params.muon_sgd_lr_scale
        self.filters = filters
        self._orders = [_columns_in_memory_order(p) for p in filters]
        self._matrices = [_matrix(p.detach(), order) for p, order in zip(filters, self._orders)]
        for p, matrix in zip(filters, self._matrices):
            if matrix.data_ptr() != p.data_ptr():
                raise CifarlabError(f"optim.name is muon but a conv filter of shape {tuple(p.shape)} is not dense in "
                                    f"memory (strides {p.stride()}); allowed: contiguous or channels_last filters")
        self.muon = torch.optim.Muon(self._matrices, lr=lr, weight_decay=0.0, momentum=params.muon_momentum,
                                     nesterov=params.nesterov, ns_steps=params.muon_ns_steps)
        sgd_lr = lr * self.sgd_lr_scale
        groups = [{"params": biases, "lr": sgd_lr * params.bias_lr_scale, "lr_scale": params.bias_lr_scale,
                   "weight_decay": params.weight_decay / params.bias_lr_scale},
                  {"params": others, "lr": sgd_lr, "lr_scale": 1.0, "weight_decay": params.weight_decay}]
        groups = [group for group in groups if group["params"]]
        self.sgd: Optional[torch.optim.SGD] = None
        if groups:
            self.sgd = torch.optim.SGD(groups, lr=sgd_lr, momentum=params.momentum,
                                       nesterov=params.nesterov and params.momentum > 0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lr = self.param_groups[0]["lr"]
        for p, matrix, order in zip(self.filters, self._matrices, self._orders):
            if matrix.data_ptr() != p.data_ptr():     # the filter's storage was replaced (`param.data = ...`)
                matrix.data = _matrix(p.detach(), order)
            if p.grad is None:        # e.g. a filter a DDP run found unused
                matrix.grad = None
                continue
            if self.renormalise:
                p.mul_(math.sqrt(len(p)) / p.norm())
            matrix.grad = _matrix(p.grad, order)
        for group in self.muon.param_groups:
            group["lr"] = lr
        self.muon.step()
        for matrix in self._matrices:
            matrix.grad = None
        if self.sgd is not None:
            for group in self.sgd.param_groups:
                group["lr"] = lr * self.sgd_lr_scale * group["lr_scale"]
            self.sgd.step()
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["muon"] = self.muon.state_dict()
        state["sgd"] = self.sgd.state_dict() if self.sgd is not None else None
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        muon, sgd = state.pop("muon"), state.pop("sgd")
        super().load_state_dict(state)
        self.muon.load_state_dict(muon)
        if self.sgd is not None:
            self.sgd.load_state_dict(sgd)


def _model_name(model: torch.nn.Module) -> str:
    inner = getattr(model, "module", model)         # a DDP wrapper's module
    return getattr(inner, "arch", type(inner).__name__)


def build_muon(model: torch.nn.Module, params: OptimParams, lr: float) -> MuonSGD:
    """The muon optimizer of `optim.*` over `model`'s trainable parameters, at Muon LR `lr`; one line
    for a torch without torch.optim.Muon or a model with no trainable conv filter."""
    if not hasattr(torch.optim, "Muon"):
        raise CifarlabError(f"optim.name is muon but torch {torch.__version__} has no torch.optim.Muon; allowed: "
                            f"torch >= {TORCH_MUON} (pip install -U torch), or optim.name adam, adamw or sgd")
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.dim() == 4]
    if not filters:
        raise CifarlabError(f"optim.name is muon but model {_model_name(model)} has no trainable conv filters for "
                            f"Muon to orthogonalise (frozen ones are not trained); allowed: a convolutional model, "
                            f"or optim.name adam, adamw or sgd")
    biases = [p for p in trainable if p.dim() == 1]
    others = [p for p in trainable if p.dim() not in (1, 4)]
    return MuonSGD(filters, biases, others, lr, params)
