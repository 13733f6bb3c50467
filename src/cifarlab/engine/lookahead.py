"""Lookahead with an exponential moving average of the weights (`optim.lookahead`).

As airbench94 trains (Jordan 2024, section 3.5, after hlb-CIFAR10; Zhang et al. 2019 for
Lookahead): every `EVERY` optimizer steps the slow copy of the model's floating-point state
(weights and BatchNorm statistics) moves toward the trained ("fast") one,

    slow <- decay * slow + (1 - decay) * fast,   decay = BASE**EVERY * (step / total_steps)**3,

and the fast weights are reset to the slow ones. Early in training the decay is about 0 (plain
training); towards the end it approaches BASE**EVERY and averages out the noise of the last steps.
After the last step the model takes the slow weights.
"""

from __future__ import annotations

import torch
from torch import nn

EVERY = 5
BASE = 0.95


class Lookahead:
    def __init__(self, model: nn.Module, total_steps: int):
        self.total_steps = total_steps
        # The model's floating-point state, once: state_dict's tensors share storage with the
        # parameters and buffers (load_state_dict copies into them), so writing them writes the model.
        self.fast = {name: value for name, value in model.state_dict().items() if value.is_floating_point()}
        self.slow = {name: value.detach().clone() for name, value in self.fast.items()}

    def decay(self, step: int) -> float:
        return BASE ** EVERY * (step / self.total_steps) ** 3

    @torch.no_grad()
    def _sync(self, decay: float) -> None:
        for name, fast in self.fast.items():
            slow = self.slow[name]
            slow.lerp_(fast, 1 - decay)
            fast.copy_(slow)

    def after_step(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based, counted over the whole run)."""
        if step % EVERY == 0 and step < self.total_steps:
            self._sync(self.decay(step))

    def finish(self) -> None:
        """After the last step: the model takes the slow weights."""
        self._sync(1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.cpu() for name, value in self.slow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.slow[name].copy_(value)
