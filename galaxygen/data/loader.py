"""Batches for training: float images in [0, 1] from a cache split, shuffled per epoch, sharded per rank.

A batch travels to the device as uint8; the conversion to float and the augmentation run there. Augmentation
is done on whole batches of tensors (one affine resampling per batch: random flip, arbitrary rotation, small
translation); it never changes colours.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from galaxygen.splits import unit_hash


def reduce_indices(indices: np.ndarray, ids: np.ndarray, fraction: float = 1.0, count: int = 0) -> np.ndarray:
    """Data reduction: keep a fraction (or a count) of a split, chosen by a stable hash of the galaxy ids.

    A smaller reduction is always a subset of a larger one, so data-reduction sweeps are nested.
    """
    keep = len(indices)
    if fraction < 1:
        keep = max(1, int(round(fraction * len(indices))))
    if count:
        keep = min(keep, count)
    if keep >= len(indices):
        return indices
    order = np.argsort([unit_hash(f"reduce:{ids[i]}") for i in indices], kind="stable")
    return np.sort(indices[order[:keep]])


def augment(batch: torch.Tensor, generator: torch.Generator, max_shift: float = 0.06) -> torch.Tensor:
    """Random flip, rotation by any angle and translation (up to max_shift of the size) of each image."""
    b = batch.shape[0]
    angle = torch.rand(b, generator=generator) * (2 * math.pi)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * max_shift)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1
    ).to(batch)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def unit_float(pixels: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [0, 1] on the same device, laid out in `memory_format`.

    The pixels are stored channel-last, so torch.channels_last costs no reordering at all.
    """
    return pixels.permute(0, 3, 1, 2).contiguous(memory_format=memory_format).float().div_(255.0)


def to_float(images: np.ndarray, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 (B, S, S, 3) array -> float32 (B, 3, S, S) tensor in [0, 1] on the CPU (see `unit_float`)."""
    return unit_float(pixel_tensor(images), memory_format)


def pixel_tensor(images: np.ndarray) -> torch.Tensor:
    """A uint8 array as a tensor sharing its memory when it can (a read-only cache slice is copied)."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # a slice of a read-only cache: torch wants a writable buffer
        images = images.copy()
    return torch.from_numpy(images)


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 pixels onto `device`, still uint8 (a quarter of float32's bytes): on a GPU through pinned memory
    with a non-blocking copy, so the copy overlaps the work already queued; on the CPU as they are."""
    pixels = pixel_tensor(images)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)


class BatchLoader:
    """Iterate over one split of a cache in batches of `batch_size` per rank.

    Each epoch draws one permutation (from seed and epoch); global batch i is the slice
    [i*B*W, (i+1)*B*W) of it and rank r takes its r-th part, so W ranks with per-rank batch B see
    exactly the images one process would with batch B*W. Batches are made in the training thread (`load`): the
    decode-free uint8 slice goes to the device, where the conversion and the batched augmentation cost ~4% of a
    `cnn` step on CPU (bench/bench_train.py); a prefetch thread only competed with the training threads for the
    cores (measured: 370 vs 419 images/s on 2 cores).
    """

    def __init__(
        self,
        images: np.ndarray,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        if len(indices) < batch_size * world_size and drop_last:
            raise ValueError(f"the split has {len(indices)} images, fewer than one global batch of {batch_size * world_size}")
        self.images = images
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_step = self.batch_size * self.world_size
        return len(self.indices) // per_step if self.drop_last else math.ceil(len(self.indices) / per_step)

    def batches(self) -> list[np.ndarray]:
        """This rank's index arrays for the current epoch."""
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        per_step = self.batch_size * self.world_size
        out = []
        for i in range(len(self)):
            chunk = order[i * per_step : (i + 1) * per_step]
            part = np.array_split(chunk, self.world_size)[self.rank]
            out.append(np.sort(part))
        return out

    def load(self, idx: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """The images `idx` as a batch on the device: copied there as uint8, then made float and (when this
        loader augments) augmented on the device, in the loader's memory format."""
        batch = unit_float(to_device(self.images[idx], self.device), self.memory_format)
        if self.augment:  # grid_sample returns the default layout
            batch = augment(batch, generator).contiguous(memory_format=self.memory_format)
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % 2**63)
        for idx in self.batches():
            yield self.load(idx, generator)
