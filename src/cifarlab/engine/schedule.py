"""Optimizer and OneCycle schedule, built from params.

`onecycle_lr` is the schedule as a pure function of the step, used for plots and tests;
`build_scheduler` builds torch's OneCycleLR with the same numbers, stepped once per batch. The two
are checked against each other in the tests, so the plotted schedule is the one that trains.

Conventions: steps are 0-based batch indices over the whole run; step `s` is the LR used for the
(s+1)-th batch. The peak is at the last batch of epoch `max_at_epoch` (1-based), i.e. step
`max_at_epoch * steps_per_epoch - 1`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cifarlab.config.params import OptimParams, TrainParams
from cifarlab.engine.muon import build_muon


@dataclass(frozen=True)
class OneCycle:
    max_lr: float
    total_steps: int
    peak_step: int            # 0-based step at which the LR equals max_lr
    div_factor: float         # start LR = max_lr / div_factor
    final_div_factor: float   # end LR = start LR / final_div_factor
    anneal_strategy: str = "linear"
    three_phase: bool = False

    @property
    def start_lr(self) -> float:
        return self.max_lr / self.div_factor

    @property
    def end_lr(self) -> float:
        return self.start_lr / self.final_div_factor

    @property
    def pct_start(self) -> float:
        """torch's pct_start that puts the peak at `peak_step` (torch peaks at pct*total - 1)."""
        return (self.peak_step + 1) / self.total_steps


def onecycle_for(train: TrainParams, steps_per_epoch: int, max_lr: float) -> OneCycle:
    return OneCycle(max_lr=max_lr, total_steps=train.epochs * steps_per_epoch,
                    peak_step=train.max_at_epoch * steps_per_epoch - 1,
                    div_factor=train.div_factor, final_div_factor=train.final_div_factor,
                    anneal_strategy=train.anneal_strategy, three_phase=train.three_phase)


def _anneal(strategy: str, start: float, end: float, pct: float) -> float:
    if strategy == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def onecycle_lr(cycle: OneCycle, step: int) -> float:
    """The LR at 0-based `step`, exactly as torch.optim.lr_scheduler.OneCycleLR computes it."""
    if not 0 <= step < cycle.total_steps:
        raise ValueError(f"step {step} outside 0..{cycle.total_steps - 1}")
    peak = float(cycle.pct_start * cycle.total_steps) - 1
    last = cycle.total_steps - 1
    if cycle.three_phase:
        phases = [(peak, cycle.start_lr, cycle.max_lr), (2 * peak, cycle.max_lr, cycle.start_lr),
                  (last, cycle.start_lr, cycle.end_lr)]
    else:
        phases = [(peak, cycle.start_lr, cycle.max_lr), (last, cycle.max_lr, cycle.end_lr)]
    begin = 0.0
    for i, (end, lr_from, lr_to) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - begin) / (end - begin) if end > begin else 1.0
            return _anneal(cycle.anneal_strategy, lr_from, lr_to, pct)
        begin = end
    raise AssertionError("unreachable")


NORMS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def param_groups(model: torch.nn.Module, params: OptimParams, lr: float) -> list[dict]:
    """One group for the weights; with `optim.bias_lr_scale` > 1 a second for the normalisation
    layers' parameters (the shifts, where the scales are frozen) at `bias_lr_scale` x the LR and weight
    decay / `bias_lr_scale` (so their decay per step is unchanged), as airbench94 trains BatchNorm biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if params.bias_lr_scale == 1:
        return [{"params": trainable, "lr": lr, "weight_decay": params.weight_decay}]
    norm = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    return [{"params": [p for p in trainable if id(p) not in norm], "lr": lr, "weight_decay": params.weight_decay},
            {"params": [p for p in trainable if id(p) in norm], "lr": lr * params.bias_lr_scale,
             "weight_decay": params.weight_decay / params.bias_lr_scale}]


def build_optimizer(model: torch.nn.Module, params: OptimParams, lr: float) -> torch.optim.Optimizer:
    """The optimizer of `optim.*`; the first param group is the weights', whose LR the logs show (for
    muon its one group, the conv filters' Muon LR: `cifarlab.engine.muon`)."""
    if params.name == "muon":
        return build_muon(model, params, lr)
    groups = param_groups(model, params, lr)
    if params.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=params.momentum, weight_decay=params.weight_decay,
                               nesterov=params.nesterov and params.momentum > 0)
    optimizer_class = torch.optim.AdamW if params.name == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=lr, betas=(params.momentum, 0.999), weight_decay=params.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cycle: OneCycle, cycle_momentum: bool):
    """torch OneCycleLR for `cycle`; call `.step()` after every optimizer step (every batch)."""
    scales = [group["lr"] / optimizer.param_groups[0]["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[cycle.max_lr * scale for scale in scales], total_steps=cycle.total_steps, pct_start=cycle.pct_start,
        anneal_strategy=cycle.anneal_strategy, div_factor=cycle.div_factor,
        final_div_factor=cycle.final_div_factor, three_phase=cycle.three_phase,
        cycle_momentum=cycle_momentum)
