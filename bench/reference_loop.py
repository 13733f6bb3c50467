"""The seed notebooks' training loop, the reference bench/throughput.py times the pipeline against.

What the seeds wrote, with the same network class and augmentation amounts as the pipeline: a
torch Dataset applying an albumentations Compose (Normalize, pad + random crop, flip, cutout,
ToTensorV2) per image, a DataLoader with num_workers=0, fp32, NCHW, Adam, OneCycleLR stepped per
batch, `loss.item()` and a tqdm description every batch. The loop knows nothing of timing:
throughput.py's `ReferencePath` feeds it timed batches. Imported by throughput.py, after that
script has put this checkout's src/ first on sys.path.
"""

from __future__ import annotations

from typing import Iterable

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from tqdm import tqdm

from cifarlab.config.params import IMAGE_SIDE, Params
from cifarlab.data.storage import CIFAR_MEAN, CIFAR_STD, Dataset
from cifarlab.models.registry import create_model


class AlbumentationsDataset(torch.utils.data.Dataset):
    """As the seeds subclass torchvision's CIFAR10: uint8 HWC arrays, a Compose per image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: A.Compose):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.transform(image=self.images[index])["image"]
        return image, int(self.labels[index])


def seed_style_transform(params: Params) -> A.Compose:
    """The seeds' Compose with the same augmentation amounts the pipeline uses."""
    aug = params.augment
    size = IMAGE_SIDE + 2 * aug.pad
    side = (aug.cutout_size, aug.cutout_size)
    return A.Compose([
        A.Normalize(mean=CIFAR_MEAN, std=CIFAR_STD),
        A.PadIfNeeded(size, size, border_mode=cv2.BORDER_REFLECT_101),
        A.RandomCrop(IMAGE_SIDE, IMAGE_SIDE),
        A.HorizontalFlip(p=aug.hflip),
        A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=side, hole_width_range=side,
                        fill=0, p=aug.cutout_p),          # 0 = the mean colour after Normalize
        ToTensorV2(),
    ])


class SeedStyleLoop:
    """The seeds' train loop over one epoch's DataLoader: `iterator` yields its batches, and
    `train(batches)` continues the loop over the ones given."""

    def __init__(self, params: Params, device: torch.device, dataset: Dataset, total_batches: int):
        torch.manual_seed(params.train.seed)
        train_set = AlbumentationsDataset(dataset.train.images, dataset.train.labels, seed_style_transform(params))
        loader = torch.utils.data.DataLoader(train_set, batch_size=params.train.batch_size, shuffle=True,
                                             num_workers=0)
        self.device = device
        self.model = create_model(params.model.name, num_classes=len(dataset.classes),
                                  dropout=params.model.dropout).to(device)
        max_lr = float(params.train.max_lr)   # resolved by the caller (throughput.py's bench_max_lr)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=max_lr / params.train.div_factor,
                                          weight_decay=params.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=max_lr, epochs=params.train.epochs, steps_per_epoch=len(loader),
            pct_start=params.train.max_at_epoch / params.train.epochs, div_factor=params.train.div_factor,
            final_div_factor=params.train.final_div_factor, three_phase=False, anneal_strategy="linear")
        self.criterion = torch.nn.CrossEntropyLoss()
        self.train_losses: list[float] = []
        self.correct = self.processed = self.batch_idx = 0
        self.iterator = iter(loader)
        self.pbar = tqdm(total=total_batches, leave=False)   # the seeds' `pbar = tqdm(train_loader)`

    def train(self, batches: Iterable) -> int:
        """One stretch of the seeds' loop over `batches`; the images it trained on."""
        model, optimizer, pbar = self.model, self.optimizer, self.pbar
        model.train()
        images = 0
        for data, target in batches:
            data, target = data.to(self.device), target.to(self.device)
            optimizer.zero_grad()
            y_pred = model(data)
            loss = self.criterion(y_pred, target)
            self.train_losses.append(loss.item())
            loss.backward()
            optimizer.step()
            self.scheduler.step()
            pred = y_pred.argmax(dim=1, keepdim=True)
            self.correct += pred.eq(target.view_as(pred)).sum().item()
            self.processed += len(data)
            images += len(data)
            pbar.update(1)
            pbar.set_description(f"Loss={loss.item()} Batch_id={self.batch_idx} "
                                 f"Accuracy={100 * self.correct / self.processed:0.2f}")
            self.batch_idx += 1
        return images

    def close(self) -> None:
        self.pbar.close()
