"""Grad-CAM heat maps (Selvaraju et al., 2017) for test images, at the layer the model registry names.

Grad-CAM weights each channel of the layer's activations by the mean gradient of the class's logit
over it, sums, keeps the positive part and upsamples to the image. That is a forward hook and one
backward pass, written here in torch: the `grad-cam` package computes the same maps (to
float32 rounding) but imports torchvision, scipy and torch's compiler stack, seconds
of every evaluate stage before any work.

The heat maps are computed on the device the model is on (the evaluate stage's: the training device),
in fp32 whatever precision the measurement used: autocast is switched off here, and on CUDA TF32 too,
so the maps are the fp32 ones whatever the device (reduced precision would change the gradients
Grad-CAM weights the activations with; a few 32x32 images cost little in fp32). Models take
uint8-range images (normalisation is their first layer), so the images go in unnormalised.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.engine.classifier import Classifier
from cifarlab.models.registry import model_spec

PRECISION = "fp32"   # what Grad-CAM computes in, on whatever device (recorded in metrics/evaluate_run.json)


def cam_model(model: Classifier) -> Classifier:
    """A copy of `model` on its own device, fp32, contiguous, eval mode, with no in-place ReLU (an
    in-place op after the hooked layer would overwrite the activation whose gradient Grad-CAM reads)."""
    copied = copy.deepcopy(model).to(dtype=torch.float32).to(memory_format=torch.contiguous_format)
    for module in copied.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return copied.eval()


@contextlib.contextmanager
def full_fp32(device: torch.device) -> Iterator[None]:
    """No autocast on `device`, and on CUDA no TF32 in convolutions or matrix products: true fp32."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def cam_layer_name(model: Classifier) -> str:
    return model_spec(model.arch).cam_layer


def grad_cam(model: Classifier, images: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Grad-CAM of `classes[i]` for `images[i]` (uint8 HWC [N, 32, 32, 3]) at `model.cam_layer()`,
    computed in fp32 on the device `model` is on.

    Returns float32 [N, 32, 32] heat maps, each scaled to [0, 1] (1 = the region that raised that
    class's logit most). `model` is not modified.
    """
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} target classes")
    if len(images) == 0:
        return np.zeros((0,) + images.shape[1:3], dtype=np.float32)
    net = cam_model(model)
    device = next(net.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(device)  # uint8 range
    captured = []
    hook = net.cam_layer().register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with full_fp32(device):
            logits = net(batch)
            activations = captured[-1]
            chosen = logits.gather(1, torch.as_tensor(list(classes), device=device).long()[:, None]).sum()
            gradients, = torch.autograd.grad(chosen, activations)
    finally:
        hook.remove()
    with torch.no_grad():
        weights = gradients.mean(dim=(2, 3), keepdim=True)            # one weight per channel and image
        cam = _unit_range((weights * activations).sum(dim=1, keepdim=True).relu())
        cam = F.interpolate(cam, size=batch.shape[2:], mode="bilinear", align_corners=False)
        return _unit_range(cam)[:, 0].float().cpu().numpy()        # bilinear: still >= 0, rescaled to end at 1


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each map ([N, 1, H, W]) shifted to start at 0 and scaled to end at 1 (an all-equal map stays 0)."""
    low = maps.amin(dim=(2, 3), keepdim=True)
    shifted = maps - low
    return shifted / (shifted.amax(dim=(2, 3), keepdim=True) + 1e-7)
