"""Grad-CAM heat maps (the `grad-cam` package) for test images, at the layer the model registry names.

The heat maps are computed on the device the model is on (the evaluate stage's: the training device),
in fp32 whatever precision the measurement used: autocast is switched off here, and on CUDA TF32 too,
so the maps are the fp32 ones whatever the device. Reduced precision cannot be used anyway:
pytorch-grad-cam (1.5) turns the hooked activations and gradients into numpy arrays, and numpy has
no bfloat16 (under bf16 autocast it raises TypeError: Got unsupported ScalarType BFloat16), while fp16
would change the gradients Grad-CAM weights the activations with. A few 32x32 images cost little
in fp32. Models take uint8-range images (normalisation is their first layer), so the images go in
unnormalised.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import numpy as np
import torch
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
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if len(images) == 0:
        return np.zeros((0,) + images.shape[1:3], dtype=np.float32)
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} target classes")
    net = cam_model(model)
    device = next(net.parameters()).device
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()   # uint8 range, NCHW
    targets = [ClassifierOutputTarget(int(c)) for c in classes]
    with full_fp32(device), GradCAM(model=net, target_layers=[net.cam_layer()]) as cam:
        heat = cam(input_tensor=batch.to(device), targets=targets)
    return np.asarray(heat, dtype=np.float32)
