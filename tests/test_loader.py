"""The training loader: pixel conversion, augmentation, nested data reduction, per-epoch shuffling and
per-rank shards that add up to what one process sees."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from galaxygen.data import CacheWriter
from galaxygen.data.loader import BatchLoader, augment, reduce_indices, to_device, to_float


def stamps(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 images (n, S, S, 3), each one filled with its own index so batches can be traced back."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return images


def traced(batch: torch.Tensor) -> list[int]:
    return [round(v) for v in (batch[:, 0, 0, 0] * 255).tolist()]


# --- pixels ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_to_float_maps_uint8_hwc_to_unit_chw_in_the_asked_layout(layout):
    images = stamps(3)
    x = to_float(images, layout)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=layout)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), images / 255.0, rtol=0, atol=1e-7)


# --- augmentation ---------------------------------------------------------------------------------------------


def disc(size: int = 32, radius: float = 8.0) -> torch.Tensor:
    """A centred soft disc, red-dominated: (1, 3, S, S)."""
    axis = torch.arange(size) - (size - 1) / 2
    r = torch.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2)
    light = torch.sigmoid(radius - r)
    return torch.stack([light, 0.5 * light, 0.2 * light])[None]


def test_augmentation_keeps_colours_and_flux_and_differs_per_image():
    batch = disc().repeat(16, 1, 1, 1)
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape
    # colours: the channel ratios of every pixel are unchanged (one resampling for all three channels)
    lit = out[:, 0] > 0.05
    np.testing.assert_allclose((out[:, 1][lit] / out[:, 0][lit]).numpy(), 0.5, rtol=1e-5)
    np.testing.assert_allclose((out[:, 2][lit] / out[:, 0][lit]).numpy(), 0.2, rtol=1e-5)
    # flux: a rotation plus a shift of at most 6% keeps the whole disc in the frame
    flux_in, flux_out = batch.sum((1, 2, 3)), out.sum((1, 2, 3))
    torch.testing.assert_close(flux_out, flux_in, rtol=0.02, atol=0)
    # each image gets its own transform: the centroids move by different amounts
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    cx = (out[:, 0] * xx).sum((1, 2)) / out[:, 0].sum((1, 2))
    assert cx.std() > 0.2 and (cx - 15.5).abs().max() <= 0.06 * 32 + 0.5


def shape_moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image (B, S, S): orientation of the major axis in degrees [0, 180) and a handedness sign.

    The handedness is the sign of the product of the third moments along the major axis and along that
    axis turned by +90 degrees: rotations keep it, a mirror flips it.
    """
    size = images.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    w = images / images.sum((1, 2), keepdim=True)
    dx = xx - (w * xx).sum((1, 2), keepdim=True)
    dy = yy - (w * yy).sum((1, 2), keepdim=True)
    cxx, cyy, cxy = (w * dx * dx).sum((1, 2)), (w * dy * dy).sum((1, 2)), (w * dx * dy).sum((1, 2))
    theta = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    along, across = dx * c + dy * s, -dx * s + dy * c
    handedness = torch.sign((w * along**3).sum((1, 2)) * (w * across**3).sum((1, 2)))
    return torch.rad2deg(theta) % 180, handedness


def test_augmentation_rotates_by_arbitrary_angles_and_flips_half_the_time():
    """An L comes out at many orientations (not only multiples of 90 degrees), about half of them mirrored."""
    ell = torch.zeros(1, 3, 33, 33)
    ell[..., 6:10, 5:28] = 1.0  # long arm
    ell[..., 6:20, 5:9] = 1.0  # short arm
    angle_in, hand_in = shape_moments(ell[:, 0])
    out = augment(ell.repeat(64, 1, 1, 1), torch.Generator().manual_seed(1))[:, 0]
    angles, hands = shape_moments(out)
    off_axis = ((angles % 90) > 10) & ((angles % 90) < 80)
    assert off_axis.sum() > 32, angles
    mirrored = int((hands != hand_in).sum())
    assert 16 < mirrored < 48, hands


def test_augmentation_is_reproducible_from_the_generator():
    batch = torch.rand(4, 3, 16, 16)
    a = augment(batch, torch.Generator().manual_seed(5))
    b = augment(batch, torch.Generator().manual_seed(5))
    c = augment(batch, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- data reduction -------------------------------------------------------------------------------------------


def test_reduction_is_nested_sized_and_independent_of_order():
    ids = np.array([f"gal-{i}" for i in range(1000)])
    split = np.arange(0, 1000, 2)
    sets = {f: set(reduce_indices(split, ids, f)) for f in (1.0, 0.5, 0.2, 0.05)}
    assert [len(sets[f]) for f in (1.0, 0.5, 0.2, 0.05)] == [500, 250, 100, 25]
    assert sets[0.05] < sets[0.2] < sets[0.5] < sets[1.0] == set(split)
    assert set(reduce_indices(split, ids, 1.0, count=100)) == sets[0.2]  # a count picks the same galaxies
    assert set(reduce_indices(split[::-1], ids, 0.2)) == sets[0.2]
    assert len(reduce_indices(split, ids, 1e-9)) == 1  # never empty


# --- batches, epochs and shards -------------------------------------------------------------------------------


def test_batches_cover_the_split_once_per_epoch_and_reshuffle_each_epoch():
    images = stamps(100)
    indices = np.arange(10, 90)
    loader = BatchLoader(images, indices, 16, seed=3)
    assert len(loader) == 5
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = [i for batch in loader for i in traced(batch)]
        assert len(seen) == 80 and sorted(seen) == list(range(10, 90))
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    again = BatchLoader(images, indices, 16, seed=3)
    assert [i for batch in again for i in traced(batch)] == epochs[0]  # the same seed and epoch, the same order


def test_last_partial_batch_is_dropped_for_training_and_kept_for_evaluation():
    images = stamps(50)
    assert [len(b) for b in BatchLoader(images, np.arange(50), 16)] == [16, 16, 16]
    assert [len(b) for b in BatchLoader(images, np.arange(50), 16, shuffle=False, drop_last=False)] == [16, 16, 16, 2]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchLoader(images, np.arange(10), 8, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_add_up_to_the_single_process_batches(world_size):
    images = stamps(120)
    per_rank = 4
    single = BatchLoader(images, np.arange(120), per_rank * world_size, seed=7)
    ranks = [BatchLoader(images, np.arange(120), per_rank, seed=7, rank=r, world_size=world_size)
             for r in range(world_size)]
    assert all(len(r) == len(single) == 120 // (per_rank * world_size) for r in ranks)
    for whole, *parts in zip(single, *ranks):
        assert all(len(p) == per_rank for p in parts)
        shards = [set(traced(p)) for p in parts]
        assert set().union(*shards) == set(traced(whole))
        assert sum(map(len, shards)) == len(whole)  # disjoint


def test_batches_are_augmented_only_when_asked_and_come_in_the_asked_layout():
    images = stamps(64, size=32)
    plain = BatchLoader(images, np.arange(64), 8, shuffle=False, memory_format=torch.channels_last)
    augmented = BatchLoader(images, np.arange(64), 8, shuffle=False, augment=True, memory_format=torch.channels_last)
    for p, a in zip(plain, augmented):
        assert p.is_contiguous(memory_format=torch.channels_last) and a.is_contiguous(memory_format=torch.channels_last)
        assert 0 <= float(a.min()) and float(a.max()) <= 1
        assert not torch.allclose(p, a)
    first = next(iter(plain))
    np.testing.assert_allclose(first.permute(0, 2, 3, 1).numpy(), images[:8] / 255.0, atol=1e-7)
    assert math.isclose(float(first.mean()), images[:8].mean() / 255.0, rel_tol=1e-5)


def test_batches_travel_to_the_device_as_uint8_and_become_float_there(monkeypatch):
    from galaxygen.data import loader as loader_module

    moved = []

    def spy(images, device):
        pixels = to_device(images, device)
        moved.append((pixels.dtype, pixels.device, tuple(pixels.shape)))
        return pixels

    monkeypatch.setattr(loader_module, "to_device", spy)
    images = stamps(32)
    batches = list(BatchLoader(images, np.arange(32), 8, shuffle=False, augment=True))
    assert moved == [(torch.uint8, torch.device("cpu"), (8, 16, 16, 3))] * 4
    assert all(b.dtype == torch.float32 and b.shape == (8, 3, 16, 16) for b in batches)
    # on the CPU the pixels are not copied on their way (no pinning without CUDA)
    shared = np.ascontiguousarray(images[:4])
    assert to_device(shared, torch.device("cpu")).data_ptr() == shared.ctypes.data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batches_equal_the_cpu_batches():
    images = stamps(32)
    for augmented in (False, True):
        cpu, gpu = (list(BatchLoader(images, np.arange(32), 8, augment=augmented, device=d,
                                     memory_format=torch.channels_last)) for d in ("cpu", "cuda"))
        for c, g in zip(cpu, gpu):
            assert g.is_cuda and g.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(g.cpu(), c, atol=1e-5, rtol=0)


# --- opening a cache ------------------------------------------------------------------------------------------


def test_cache_images_are_a_read_only_memory_map_read_ahead_when_they_fit(blob_cache, monkeypatch):
    from galaxygen.data import cache as cache_module

    read = []
    monkeypatch.setattr(cache_module, "read_ahead", read.append)
    fits = cache_module.Cache.open(blob_cache)
    assert isinstance(fits.images, np.memmap) and not fits.images.flags.writeable
    assert read == [blob_cache / cache_module.IMAGES]
    monkeypatch.setattr(cache_module, "IN_MEMORY_LIMIT_BYTES", fits.images.nbytes - 1)
    too_big = cache_module.Cache.open(blob_cache)
    assert isinstance(too_big.images, np.memmap) and len(read) == 1
    assert len(cache_module.Cache.open(blob_cache, in_memory=False).images) == len(fits) and len(read) == 1
    np.testing.assert_array_equal(too_big.images, fits.images)


READER = """
import json, sys, time
from pathlib import Path
import numpy as np
import pandas as pd
from galaxygen.data import Cache
from galaxygen.data.loader import BatchLoader


def memory():
    fields = dict(line.split()[:2] for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    kib = {k.rstrip(":"): int(v) for k, v in fields.items()}
    return {"uss": kib["Private_Clean"] + kib["Private_Dirty"], "anon": kib["Anonymous"], "shared": kib["Shared_Clean"]}


path, me, other = sys.argv[1:]


def checksum(images):
    return sum(int(x.mul(255).round().long().sum())
               for x in BatchLoader(images, np.arange(len(images)), 32, shuffle=False, drop_last=False))


pd.read_parquet(Path(path) / "catalog.parquet")  # the libraries' first use, before the baseline
checksum(np.zeros((64, 64, 64, 3), np.uint8))
before = memory()
cache = Cache.open(path)  # held while the memory is measured
total = checksum(cache.images)
Path(me).touch()
deadline = time.monotonic() + 120
while not Path(other).exists():  # both hold the mapping while their memory is measured
    if time.monotonic() > deadline:
        sys.exit("the other reader did not finish")
    time.sleep(0.05)
after = memory()
print(json.dumps({"total": total, **{k: (after[k] - before[k]) * 1024 for k in before}}))
"""


def test_processes_share_one_copy_of_a_cache_in_memory(tmp_path):
    """Two processes (ranks on a node) read every image of the same cache: the images cost neither of them
    private memory, they share one copy (the page cache of the mapped file)."""
    n, size = 2048, 64  # 24 MiB of pixels
    rng = np.random.default_rng(0)
    writer = CacheWriter(tmp_path / "big", n, size)
    writer.images[:] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    ids = [f"g{i}" for i in range(n)]
    cache = writer.finish(pd.DataFrame({"id": ids, "source": "noise", "split": "train"}), {"source": "noise"})
    nbytes = n * size * size * 3
    expected = int(np.load(cache / "images.npy", mmap_mode="r").sum(dtype=np.int64))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
           # large blocks straight from and back to the kernel: freed batches do not linger in the heap as noise
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    flags = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(cache), str(flags[i]), str(flags[1 - i])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        grown = json.loads(out.splitlines()[-1])
        assert grown["total"] == expected  # it read every image
        assert grown["anon"] < nbytes / 4 and grown["uss"] < nbytes / 4, (grown, nbytes)
        assert grown["shared"] > 0.9 * nbytes, (grown, nbytes)  # the pixels it read are pages both map
