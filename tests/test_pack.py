"""Tests of `pack`: every source format, auto detection, bad input, errors, idempotence, splits, geometry."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from galaxygen.data import pack as pack_module
from galaxygen.data.cache import Cache
from galaxygen.data.decode import crop_box, decode_file, draft_request
from galaxygen.data.pack import pack
from galaxygen.data.sources import KAGGLE_CLASSES
from galaxygen.splits import split_of

SIZE = 32
GZ2_IDS = ["587722981741363294", "587722981741363323", "587722981741429896", "587722981741559947"]


# fixtures --------------------------------------------------------------------------------------


def disk(width: int = 424, height: int | None = None, radius: float = 50, value: int = 250) -> np.ndarray:
    """A black RGB frame with a bright disk at its centre."""
    height = height or width
    y, x = np.mgrid[:height, :width]
    inside = (x - (width - 1) / 2) ** 2 + (y - (height - 1) / 2) ** 2 <= radius**2
    frame = np.zeros((height, width, 3), np.uint8)
    frame[inside] = value
    return frame


def save(path: Path, frame: np.ndarray, **kwargs) -> Path:
    """Save an array as an image, creating folders; the format follows the extension unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path, **kwargs)
    return path


def png_by_hand(path: Path, width: int, height: int, bits: int, colour: int, compressed: bytes) -> Path:
    """Write a PNG from its header fields and its compressed pixel data (IDAT)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", compressed) + chunk(b"IEND", b""))
    return path


def png16(path: Path, values: np.ndarray) -> Path:
    """Write a 16-bit PNG (greyscale (H, W) or RGB (H, W, 3)) by hand."""
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    return png_by_hand(path, values.shape[1], values.shape[0], 16, 2 if values.ndim == 3 else 0, zlib.compress(raw))


def make_gz2(root: Path, ids: list[str] = GZ2_IDS) -> Path:
    """A GZ2 folder: Hart16 catalog, filename mapping, images for all ids but the last two."""
    catalog = pd.DataFrame({
        "dr7objid": ids,
        "ra": np.arange(len(ids), dtype=float),
        "dec": np.zeros(len(ids)),
        "gz2_class": ["Ei", "Sc+t", "Er", "SBb"][: len(ids)],
        "total_votes": np.arange(len(ids)) + 40,
        "t01_smooth_or_features_a01_smooth_fraction": np.linspace(0, 1, len(ids)),
        "t01_smooth_or_features_a01_smooth_debiased": np.linspace(0, 0.9, len(ids)),
        "t01_smooth_or_features_a01_smooth_count": np.arange(len(ids)),
    })
    root.mkdir(parents=True, exist_ok=True)
    catalog.to_csv(root / "gz2_hart16.csv", index=False)
    mapping = pd.DataFrame({"objid": ids[:-1], "sample": "original", "asset_id": range(10, 10 + len(ids) - 1)})
    mapping.to_csv(root / "gz2_filename_mapping.csv", index=False)
    for asset in mapping["asset_id"].iloc[:-1]:
        save(root / "images_gz2" / "images" / f"{asset}.jpg", disk(radius=30 + asset), quality=92)
    return root


def make_kaggle(root: Path) -> Path:
    """A Kaggle folder: four nested images, three catalog rows for them plus one row without an image."""
    images = root / "images_training_rev1"
    for k, galaxy_id in enumerate([100008, 100023, 100053, 999999]):
        save(images / ("a" if k % 2 else "b/c") / f"{galaxy_id}.jpg", disk(radius=40 + k), quality=92)
    rows = [100008, 100023, 100053, 100090]
    table = pd.DataFrame(np.random.default_rng(0).random((len(rows), len(KAGGLE_CLASSES))), columns=KAGGLE_CLASSES)
    table.insert(0, "GalaxyID", rows)
    table.to_csv(root / "training_solutions_rev1.csv", index=False)
    return root


def make_galaxy10(path: Path, n: int = 5, frame: int = 256, radius: float = 40) -> Path:
    """A Galaxy10 DECaLS-like h5 file with n frames of a centred disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["images"] = np.stack([disk(frame, radius=radius, value=100 + k) for k in range(n)])
        h5["ans"] = np.arange(n, dtype=np.uint8) % 10
        h5["ra"] = np.linspace(10, 20, n)
        h5["redshift"] = np.linspace(0.01, 0.1, n)
    return path


def make_folder(root: Path, n: int = 3, start: int = 0) -> Path:
    """A plain folder of n small images, some nested, jpg and png."""
    for k in range(start, start + n):
        ext = "png" if k % 3 == 0 else "jpg"
        save(root / ("sub" if k % 2 else "") / f"img{k:03d}.{ext}", disk(128, radius=10 + k))
    return root


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def skipped_reasons(out: Path) -> dict[str, str]:
    return {s["file"]: s["reason"] for s in manifest_of(out)["skipped_files"]}


def measured_disk(image: np.ndarray, threshold: int = 60) -> tuple[float, float, float]:
    """Radius (from the bright area) and centre (x, y) of the bright blob in an output image."""
    bright = image.mean(axis=2) > threshold
    y, x = np.nonzero(bright)
    return float(np.sqrt(bright.sum() / np.pi)), float(x.mean()), float(y.mean())


# formats end to end ----------------------------------------------------------------------------


def test_folder_end_to_end(tmp_path):
    src = make_folder(tmp_path / "imgs", n=4)
    (src / "README.txt").write_text("not an image and not an image extension: ignored")
    out = pack(src, tmp_path / "cache", fmt="folder", size=SIZE, workers=1)
    cache = Cache.open(out)
    assert cache.images.shape == (4, SIZE, SIZE, 3)
    assert list(cache.catalog["id"]) == ["img000", "img002", "sub/img001", "sub/img003"]
    assert list(cache.catalog["source"]) == ["img000.png", "img002.jpg", "sub/img001.jpg", "sub/img003.png"]
    assert list(cache.catalog["split"]) == [split_of(i) for i in cache.catalog["id"]]
    manifest = manifest_of(out)
    assert manifest["format"] == "folder"
    assert manifest["counts"]["found"] == 4 and manifest["counts"]["packed"] == 4
    assert manifest["options"]["size"] == SIZE and manifest["options"]["crop"] == 207
    assert len(manifest["content_hash"]) == 64
    assert cache.images.max() > 200


def test_gz2_end_to_end(tmp_path):
    out = pack(make_gz2(tmp_path / "gz2"), tmp_path / "cache", fmt="gz2", size=SIZE, workers=1)
    cache = Cache.open(out)
    cat = cache.catalog
    assert list(cat["id"]) == GZ2_IDS[:2]  # full 18-digit ids, no float rounding
    assert list(cat["source"]) == ["images_gz2/images/10.jpg", "images_gz2/images/11.jpg"]
    assert list(cat["gz2_class"]) == ["Ei", "Sc+t"]
    assert "t01_smooth_or_features_a01_smooth_fraction" in cat and "t01_smooth_or_features_a01_smooth_debiased" in cat
    assert "total_votes" not in cat and "t01_smooth_or_features_a01_smooth_count" not in cat
    reasons = {s["id"]: s["reason"] for s in manifest_of(out)["skipped_files"]}
    assert reasons[GZ2_IDS[2]].startswith("missing: image file images_gz2/images/12.jpg")
    assert reasons[GZ2_IDS[3]].startswith("no mapping")
    counts = manifest_of(out)["counts"]
    assert counts == {**counts, "found": 4, "packed": 2, "skipped": 2}
    assert counts["skipped_by_reason"] == {"missing": 1, "no mapping": 1}
    radii = [measured_disk(img)[0] for img in cache.images]
    assert radii[1] > radii[0]  # row order follows the catalog: asset 11 has the bigger disk


def test_gz2_mapping_prefers_the_asset_of_the_catalog_sample(tmp_path):
    root = make_gz2(tmp_path / "gz2")
    catalog = pd.read_csv(root / "gz2_hart16.csv", dtype={"dr7objid": str}).assign(sample="original")
    catalog.to_csv(root / "gz2_hart16.csv", index=False)
    mapping = pd.read_csv(root / "gz2_filename_mapping.csv", dtype=str)
    other = pd.DataFrame({"objid": [GZ2_IDS[0]], "sample": ["stripe82"], "asset_id": ["99"]})
    pd.concat([other, mapping]).to_csv(root / "gz2_filename_mapping.csv", index=False)
    cat = Cache.open(pack(root, tmp_path / "cache", size=SIZE, workers=1)).catalog
    assert cat.set_index("id").loc[GZ2_IDS[0], "source"] == "images_gz2/images/10.jpg"


def test_kaggle_nested_end_to_end(tmp_path):
    out = pack(make_kaggle(tmp_path / "kaggle"), tmp_path / "cache", fmt="kaggle", size=SIZE, workers=1)
    cat = Cache.open(out).catalog
    assert list(cat["id"]) == ["100008", "100023", "100053", "999999"]
    assert cat.loc[cat["id"] == "100023", "source"].item() == "images_training_rev1/a/100023.jpg"
    assert cat.loc[cat["id"] == "100008", "source"].item() == "images_training_rev1/b/c/100008.jpg"
    assert list(cat.columns[-37:]) == list(KAGGLE_CLASSES)
    assert cat.loc[cat["id"] == "999999", list(KAGGLE_CLASSES)].isna().all(axis=None)
    assert cat.loc[cat["id"] != "999999", list(KAGGLE_CLASSES)].notna().all(axis=None)
    manifest = manifest_of(out)
    assert manifest["counts"]["unlabelled"] == 1 and manifest["counts"]["packed"] == 4
    assert [s["id"] for s in manifest["skipped_files"]] == ["100090"]
    assert manifest["skipped_files"][0]["reason"].startswith("missing")


def test_galaxy10_end_to_end_in_chunks_with_workers(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_module, "H5_CHUNK_BYTES", 2 * 256 * 256 * 3)  # chunks of two frames
    h5_path = make_galaxy10(tmp_path / "Galaxy10_DECals.h5", n=5, radius=40)
    assert [task[1:] for task in pack_module.tasks_for(pack_module.open_source(h5_path))[0]] == [(0, 2), (2, 4), (4, 5)]
    out = pack(h5_path, tmp_path / "cache", fmt="galaxy10", size=64, workers=2)
    cache = Cache.open(out)
    cat = cache.catalog
    assert list(cat["id"]) == [f"g10-{i}" for i in range(5)]
    assert cat["source"].iloc[3] == "Galaxy10_DECals.h5[3]"
    assert list(cat["ans"]) == [0, 1, 2, 3, 4]
    assert cat["class_name"].iloc[0] == "Disturbed"
    assert np.allclose(cat["ra"], np.linspace(10, 20, 5)) and "redshift" in cat
    # the crop scales with the frame: 207/424 of 256 px = 125 px, so a 40 px disk becomes 40 * 64 / 125
    radius, cx, cy = measured_disk(cache.images[0])
    assert radius == pytest.approx(40 * 64 / (207 / 424 * 256), abs=0.6)
    assert (cx, cy) == pytest.approx((31.5, 31.5), abs=0.3)
    assert [int(cache.images[k][32, 32, 0]) for k in range(5)] == [100, 101, 102, 103, 104]  # frame order


@pytest.mark.parametrize("kind", ["gz2", "kaggle", "galaxy10", "galaxy10-folder", "folder"])
def test_auto_detection(tmp_path, kind):
    builders = {
        "gz2": lambda: make_gz2(tmp_path / "src"),
        "kaggle": lambda: make_kaggle(tmp_path / "src"),
        "galaxy10": lambda: make_galaxy10(tmp_path / "g10.h5", n=2),
        "galaxy10-folder": lambda: make_galaxy10(tmp_path / "src" / "Galaxy10_DECals.h5", n=2).parent,
        "folder": lambda: make_folder(tmp_path / "src", n=2),
    }
    out = pack(builders[kind](), tmp_path / "cache", size=SIZE, workers=1)
    assert manifest_of(out)["format"] == kind.split("-")[0]


def test_detection_failure_lists_what_was_looked_for(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError) as err:
        pack(tmp_path / "empty", tmp_path / "cache")
    message = str(err.value)
    for looked_for in ("hart16", "gz2_filename_mapping.csv", "training_solutions_rev1.csv", ".h5", ".jpg", ".png"):
        assert looked_for in message
    assert not (tmp_path / "cache").exists()


# bad input ------------------------------------------------------------------------------------


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """A folder holding one good image and every kind of awkward or broken file."""
    root = tmp_path / "bad"
    save(root / "good.jpg", disk(), quality=92)
    (root / "empty.jpg").write_bytes(b"")
    whole = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "text.jpg").write_text("this is not a JPEG\n" * 20)
    save(root / "png_inside.jpg", disk(), format="PNG")
    save(root / "grey.jpg", disk(value=240)[:, :, 0], quality=92)  # values differ from good.jpg: no duplicate
    Image.fromarray(np.full((424, 424, 3), (255, 0, 0), np.uint8)).convert("CMYK").save(root / "cmyk.jpg")
    png16(root / "grey16.png", np.full((424, 424), 128 * 257, np.uint16))
    rgb16 = np.zeros((424, 424, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 100 * 257, 300
    png16(root / "rgb16.png", rgb16)
    save(root / "tiny.png", disk(40, radius=5))  # crop 19.5 px >= SIZE / 2 = 16: upscaled
    save(root / "minute.png", disk(20, radius=3))  # crop 9.8 px < 16: skipped
    save(root / "small.png", disk(50, radius=10))  # crop 24.4 px: upscaled to 32
    save(root / "wide.jpg", disk(600, 424, radius=50, value=245), quality=92)
    return root


def test_bad_input_is_skipped_or_handled(bad_folder, tmp_path):
    out = pack(bad_folder, tmp_path / "cache", fmt="folder", size=SIZE, workers=1)
    reasons = skipped_reasons(out)
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "text.jpg", "minute.png"}
    assert reasons["empty.jpg"].startswith("empty file")
    assert reasons["truncated.jpg"].startswith("truncated or corrupt")
    assert reasons["text.jpg"].startswith("not an image")
    assert reasons["minute.png"].startswith("too small: 20x20")
    cache = Cache.open(out)
    cat = cache.catalog.set_index("id")
    assert len(cache) == 13 - 4
    counts = manifest_of(out)["counts"]
    assert (counts["found"], counts["packed"], counts["skipped"]) == (13, 9, 4)
    image = {galaxy_id: cache.images[k] for k, galaxy_id in enumerate(cache.catalog["id"])}
    assert "PNG data in a .jpg file" in cat.loc["png_inside", "note"]
    assert np.abs(image["png_inside"].astype(int) - image["good"].astype(int)).mean() < 3
    grey = image["grey"].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all() and grey.max() > 200
    assert image["cmyk"][SIZE // 2, SIZE // 2] == pytest.approx([255, 0, 0], abs=6)
    assert image["grey16"][SIZE // 2, SIZE // 2] == pytest.approx([128, 128, 128], abs=1)  # scaled, not clipped
    assert image["rgb16"][SIZE // 2, SIZE // 2] == pytest.approx([255, 100, 1], abs=1)
    assert "upscaled" in cat.loc["small", "note"] and "upscaled" in cat.loc["tiny", "note"]
    assert "non-square 600x424" in cat.loc["wide", "note"]
    assert cat.loc["wide", "src_width"] == 600 and cat.loc["wide", "src_height"] == 424
    assert np.abs(image["wide"].astype(int) - image["good"].astype(int)).mean() < 3  # centred like the square
    assert cat.loc["good", "note"] == ""


def test_decode_file_reports_missing_file(tmp_path):
    result = decode_file(tmp_path / "nope.jpg", 207 / 424, SIZE)
    assert result.pixels is None and result.reason.startswith("missing")


def test_unexpected_decoder_errors_become_skips(tmp_path, monkeypatch):
    from galaxygen.data import decode

    path = save(tmp_path / "ok.jpg", disk())

    def broken(*args, **kwargs):
        raise IndexError("plugin bug")

    monkeypatch.setattr(decode.Image, "open", broken)
    result = decode_file(path, 207 / 424, SIZE)
    assert result.pixels is None and result.reason == "truncated or corrupt: IndexError: plugin bug"


def test_all_bad_fails_with_reasons_and_leaves_nothing(tmp_path):
    root = tmp_path / "allbad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"")
    (root / "b.jpg").write_text("nope")
    with pytest.raises(ValueError, match="none of the 2 images"):
        pack(root, tmp_path / "cache", workers=1)
    assert not (tmp_path / "cache").exists()
    assert not list(tmp_path.glob(".cache.tmp-*"))


def test_duplicate_ids_in_folder_keep_the_first(tmp_path):
    root = tmp_path / "dups"
    save(root / "a.jpg", disk(128))
    save(root / "a.png", disk(128))
    out = pack(root, tmp_path / "cache", size=SIZE, workers=1)
    assert list(Cache.open(out).catalog["source"]) == ["a.jpg"]
    assert skipped_reasons(out)["a.png"].startswith("duplicate id: a")


# user errors ----------------------------------------------------------------------------------


def test_gz2_missing_mapping_file_names_it(tmp_path):
    root = make_gz2(tmp_path / "gz2")
    (root / "gz2_filename_mapping.csv").unlink()
    with pytest.raises(FileNotFoundError, match="gz2_filename_mapping.csv"):
        pack(root, tmp_path / "cache", fmt="gz2")


def test_gz2_missing_catalog_file(tmp_path):
    root = make_gz2(tmp_path / "gz2")
    (root / "gz2_hart16.csv").unlink()
    with pytest.raises(FileNotFoundError, match="hart16"):
        pack(root, tmp_path / "cache", fmt="gz2")


@pytest.mark.parametrize(("file", "column"), [("gz2_hart16.csv", "dr7objid"),
                                              ("gz2_filename_mapping.csv", "asset_id"),
                                              ("gz2_filename_mapping.csv", "objid")])
def test_gz2_missing_column_names_file_and_column(tmp_path, file, column):
    root = make_gz2(tmp_path / "gz2")
    table = pd.read_csv(root / file)
    table.drop(columns=[column]).to_csv(root / file, index=False)
    with pytest.raises(ValueError) as err:
        pack(root, tmp_path / "cache", workers=1)
    assert str(root / file) in str(err.value) and column in str(err.value)


@pytest.mark.parametrize("column", ["GalaxyID", "Class7.2"])
def test_kaggle_missing_column_names_file_and_column(tmp_path, column):
    root = make_kaggle(tmp_path / "kaggle")
    csv = root / "training_solutions_rev1.csv"
    pd.read_csv(csv).drop(columns=[column]).to_csv(csv, index=False)
    with pytest.raises(ValueError) as err:
        pack(root, tmp_path / "cache", fmt="kaggle")
    assert str(csv) in str(err.value) and column in str(err.value)


def test_kaggle_missing_catalog_file(tmp_path):
    root = make_kaggle(tmp_path / "kaggle")
    (root / "training_solutions_rev1.csv").unlink()
    with pytest.raises(FileNotFoundError, match="training_solutions_rev1.csv"):
        pack(root, tmp_path / "cache", fmt="kaggle")


def test_galaxy10_missing_dataset(tmp_path):
    path = tmp_path / "g10.h5"
    with h5py.File(path, "w") as h5:
        h5["images"] = np.zeros((2, 64, 64, 3), np.uint8)
    with pytest.raises(ValueError) as err:
        pack(path, tmp_path / "cache")
    assert str(path) in str(err.value) and "'ans'" in str(err.value)


def test_other_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack(tmp_path / "nowhere", tmp_path / "cache")
    src = make_folder(tmp_path / "imgs", n=1)
    with pytest.raises(ValueError, match="unknown format 'fits'"):
        pack(src, tmp_path / "cache", fmt="fits")
    with pytest.raises(ValueError, match="--crop"):
        pack(src, tmp_path / "cache", crop=500)
    with pytest.raises(ValueError, match="a gz2 source must be a folder"):
        pack(make_galaxy10(tmp_path / "g.h5", n=1), tmp_path / "cache", fmt="gz2")


def test_out_must_not_destroy_the_source_or_a_foreign_folder(tmp_path):
    src = make_folder(tmp_path / "imgs", n=1)
    for out in (src, tmp_path):
        with pytest.raises(ValueError, match="is the source or contains it"):
            pack(src, out, workers=1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="is not a galaxygen cache"):
        pack(src, foreign, workers=1)
    assert (foreign / "thesis.tex").read_text() == "precious" and len(list(src.iterdir())) == 1
    (tmp_path / "empty").mkdir()
    assert pack(src, tmp_path / "empty", size=SIZE, workers=1) == tmp_path / "empty"  # an empty folder is fine


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    from galaxygen.data.__main__ import main

    root = make_gz2(tmp_path / "gz2")
    pd.read_csv(root / "gz2_hart16.csv").drop(columns=["dr7objid"]).to_csv(root / "gz2_hart16.csv", index=False)
    assert main(["pack", str(root), "--out", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "dr7objid" in err and len(err.splitlines()) == 1


# idempotence and splits -----------------------------------------------------------------------


def test_repacking_gives_the_same_hash_and_skips_when_unchanged(bad_folder, tmp_path):
    out = tmp_path / "cache"
    first = manifest_of(pack(bad_folder, out, size=SIZE, workers=1))
    second = manifest_of(pack(bad_folder, out, size=SIZE, workers=2, force=True))
    assert second["content_hash"] == first["content_hash"]
    assert second["created"] >= first["created"]
    stamp = (out / "images.npy").stat().st_mtime_ns
    third = manifest_of(pack(bad_folder, out, size=SIZE, workers=1))  # up to date: not rewritten
    assert third == second and (out / "images.npy").stat().st_mtime_ns == stamp
    save(bad_folder / "good.jpg", disk(radius=80), quality=92)  # a changed file is noticed
    fourth = manifest_of(pack(bad_folder, out, size=SIZE, workers=1))
    assert fourth["content_hash"] != first["content_hash"]
    other = manifest_of(pack(bad_folder, out, size=SIZE + 8, workers=1))  # so are changed options
    assert other["shape"][1] == SIZE + 8


def test_splits_follow_split_of_and_are_stable_when_images_are_added(tmp_path):
    fractions = (0.4, 0.3, 0.3)
    src = make_folder(tmp_path / "imgs", n=12)
    before = Cache.open(pack(src, tmp_path / "a", size=16, workers=1, fractions=fractions)).catalog
    assert list(before["split"]) == [split_of(i, fractions) for i in before["id"]]
    assert set(before["split"]) == {"train", "val", "test"}
    make_folder(src, n=8, start=12)
    after = Cache.open(pack(src, tmp_path / "b", size=16, workers=1, fractions=fractions)).catalog
    assert len(after) == 20
    merged = before.merge(after, on="id", suffixes=("_before", "_after"))
    assert len(merged) == 12 and (merged["split_before"] == merged["split_after"]).all()
    assert list(after["split"]) == [split_of(i, fractions) for i in after["id"]]


# geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("crop", "ext"), [(207, "jpg"), (207, "png"), (424, "jpg"), (300, "png")])
def test_crop_and_resize_keep_a_centred_disk_at_the_right_scale(tmp_path, crop, ext):
    save(tmp_path / "src" / f"disk.{ext}", disk(424, radius=50), **({"quality": 95} if ext == "jpg" else {}))
    cache = Cache.open(pack(tmp_path / "src", tmp_path / "cache", crop=crop, size=64, workers=1))
    radius, cx, cy = measured_disk(cache.images[0])
    assert radius == pytest.approx(50 * 64 / crop, abs=0.6)
    assert (cx, cy) == pytest.approx((31.5, 31.5), abs=0.3)


def test_reduced_scale_jpeg_decode_matches_full_decode(tmp_path):
    rng = np.random.default_rng(1)
    frame = np.clip(disk(424, radius=70).astype(float) * 0.8 + rng.normal(30, 8, (424, 424, 3)), 0, 255)
    path = save(tmp_path / "g.jpg", frame.astype(np.uint8), quality=90)
    fast = decode_file(path, 207 / 424, 64).pixels.astype(float)
    with Image.open(path) as img:
        full = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS,
                                                     box=crop_box(424, 424, 207 / 424))).astype(float)
    assert np.abs(fast - full).mean() < 2.0


@pytest.mark.parametrize(("width", "height", "size"), [(424, 424, 64), (424, 424, 32), (256, 256, 64),
                                                       (600, 424, 64), (424, 1000, 16), (3000, 3000, 64)])
def test_draft_request_keeps_at_least_size_pixels_in_the_crop(tmp_path, width, height, size):
    path = save(tmp_path / "f.jpg", np.zeros((height, width, 3), np.uint8))
    with Image.open(path) as img:
        img.draft("RGB", draft_request(width, height, 207 / 424, size))
        drafted = img.size
    assert 207 / 424 * min(drafted) >= size
    if width >= 3000:
        assert drafted[0] < width  # large frames are decoded at reduced scale


def test_synthetic_gz2_layout_packs_end_to_end(tmp_path):
    """The GZ2-layout synthetic galaxies go through the real-data path: auto-detected, all packed."""
    from galaxygen.data.cache import Cache
    from galaxygen.data.synth import synthesize

    source = synthesize(tmp_path / "gz2", n=12, seed=1, layout="gz2", workers=1)
    out = pack(source, tmp_path / "cache", workers=1)
    cache = Cache.open(out)
    assert cache.manifest["format"] == "gz2" and len(cache) == 12 and cache.images.shape[1:] == (64, 64, 3)
    assert "gz2_class" in cache.catalog.columns
    centre = cache.images[:, 24:40, 24:40].mean()
    edge = cache.images[:, :8, :8].mean()
    assert centre > 2 * edge, "galaxies are centred in the packed 207 px crop"


# data integrity: duplicates, huge, multi-frame and broken images ----------------------------------


def names_in_other_splits(name: str, count: int) -> list[str]:
    """`count` file stems whose split differs from the split of `name` (so a copy would leak across splits)."""
    found = [f"z{k}" for k in range(200) if split_of(f"z{k}") != split_of(name)]
    return found[:count]


def test_identical_images_under_other_names_are_packed_once_and_listed(tmp_path):
    root = tmp_path / "dups"
    original = save(root / "orig.png", disk(128, radius=30))
    copies = names_in_other_splits("orig", 3)
    (root / f"{copies[0]}.png").write_bytes(original.read_bytes())  # byte-identical
    save(root / "sub" / f"{copies[1]}.png", disk(128, radius=30), compress_level=1)  # other bytes, same pixels
    outside = disk(128, radius=30)
    outside[0, 0] = 255  # differs only outside the central crop: the same packed image
    save(root / "sub" / f"{copies[2]}.png", outside)
    inside = disk(128, radius=30)
    inside[64, 64] = 0  # differs at the centre: another image
    save(root / "other.png", inside)
    jpeg = save(root / "j.jpg", disk(128, radius=20), quality=90)
    (root / "sub" / "j2.jpg").write_bytes(jpeg.read_bytes())
    for workers in (1, 2):
        out = pack(root, tmp_path / f"cache{workers}", size=SIZE, workers=workers)
        cache = Cache.open(out)
        assert list(cache.catalog["id"]) == ["j", "orig", "other"]
        manifest = manifest_of(out)
        assert manifest["duplicates"] == {"j": ["sub/j2"], "orig": [copies[0], f"sub/{copies[1]}", f"sub/{copies[2]}"]}
        reasons = skipped_reasons(out)
        assert reasons[f"{copies[0]}.png"] == "duplicate image: the same pixels as orig (orig.png), packed once"
        assert reasons["sub/j2.jpg"] == "duplicate image: the same pixels as j (j.jpg), packed once"
        assert manifest["counts"]["skipped_by_reason"] == {"duplicate image": 4}
        assert len({image.tobytes() for image in cache.images}) == len(cache), "an image is packed twice"
    assert {split_of(c) for c in copies} - {split_of("orig")}, "without deduplication orig would be in two splits"


def test_galaxy10_duplicate_frames_are_packed_once(tmp_path):
    path = make_galaxy10(tmp_path / "g10.h5", n=4)
    with h5py.File(path, "r+") as h5:
        h5["images"][3] = h5["images"][1]
    out = pack(path, tmp_path / "cache", size=SIZE, workers=1)
    assert list(Cache.open(out).catalog["id"]) == ["g10-0", "g10-1", "g10-2"]
    assert manifest_of(out)["duplicates"] == {"g10-1": ["g10-3"]}


def test_galaxy10_frames_too_large_are_refused_before_reading(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as h5:  # 2 x 6000 x 6000 x 3 declared, nothing written: a small file
        h5.create_dataset("images", shape=(2, 6000, 6000, 3), dtype=np.uint8, chunks=(1, 500, 500, 3))
        h5["ans"] = np.zeros(2, np.uint8)
    with pytest.raises(ValueError, match="none of the 2 images .* too large: 6000x6000 is 36.0 megapixels"):
        pack(path, tmp_path / "cache", workers=1)


def png_header_only(path: Path, width: int, height: int, bits: int = 1) -> Path:
    """A PNG declaring width x height pixels, with an IDAT of zero rows (enough for the header to be read)."""
    return png_by_hand(path, width, height, bits, 0, zlib.compress(b""))


def png_bomb(path: Path, side: int = 13000) -> Path:
    """A real, complete 1-bit black PNG of side x side pixels: about 20 kB on disk, 169 MB decoded at 13,000 px."""
    row = bytes(1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    return png_by_hand(path, side, side, 1, 0, b"".join(z.compress(row) for _ in range(side)) + z.flush())


def test_too_large_images_are_refused_from_the_header(tmp_path):
    import warnings

    from galaxygen.data.decode import MAX_PIXELS

    side = int(MAX_PIXELS**0.5) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not reach the user
        over_ours = decode_file(png_header_only(tmp_path / "a.png", side, side), 207 / 424, SIZE)
        over_pils = decode_file(png_header_only(tmp_path / "b.png", 20000, 20000), 207 / 424, SIZE)
        between = decode_file(png_header_only(tmp_path / "c.png", 13000, 13000), 207 / 424, SIZE)
    assert over_ours.reason.startswith(f"too large: {side}x{side} is ")
    assert "over the limit of 25 megapixels (refused from the header, before decoding)" in over_ours.reason
    assert between.reason.startswith("too large: 13000x13000 is 169.0 megapixels")
    assert over_pils.reason.startswith("too large: ") and "(refused from the header" in over_pils.reason
    at_limit = decode_file(png_header_only(tmp_path / "d.png", side - 1, side - 1), 207 / 424, SIZE)
    assert not at_limit.reason.startswith("too large")  # within the limit: decoding is attempted (and fails)


def test_a_20_kb_png_of_13000_px_is_skipped_in_bounded_memory(tmp_path):
    """Pack the PNG bomb in a fresh process and measure its peak RSS: decoding it would add >= 169 MB."""
    root = tmp_path / "src"
    save(root / "good.png", disk(128))
    bomb = png_bomb(root / "bomb.png")
    assert bomb.stat().st_size < 25_000
    script = f"""
import json, resource
from pathlib import Path
from galaxygen.data.pack import pack
root = Path({str(root)!r})
(root.parent / "warm").mkdir()
(root.parent / "warm" / "w.png").write_bytes((root / "good.png").read_bytes())
pack(root.parent / "warm", root.parent / "cache-warm", size=16, workers=1)  # imports and first-use costs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = pack(root, root.parent / "cache", size=16, workers=1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grew_mb": (after - before) / 1024}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    grew = json.loads(done.stdout.strip().splitlines()[-1])["grew_mb"]
    assert grew < 60, f"peak memory grew by {grew:.0f} MB while skipping the PNG bomb"
    assert skipped_reasons(tmp_path / "cache")["bomb.png"].startswith("too large: 13000x13000")
    assert len(Cache.open(tmp_path / "cache")) == 1


def test_multi_frame_images_use_the_first_frame_and_say_so(tmp_path):
    root = tmp_path / "anim"
    root.mkdir()
    for k, (name, kwargs) in enumerate((("a.gif", {}), ("b.png", {}), ("c.tif", {}), ("d.webp", {"lossless": True}))):
        frames = [Image.fromarray(disk(128, radius=12 + 4 * k, value=v)) for v in (200, 90, 30)]
        frames[0].save(root / name, save_all=True, append_images=frames[1:], **kwargs)
    out = pack(root, tmp_path / "cache", size=SIZE, workers=1)
    cache = Cache.open(out)
    assert len(cache) == 4
    assert cache.images[:, SIZE // 2, SIZE // 2].tolist() == [[200, 200, 200]] * 4  # the first frame's value
    notes = {a["file"]: a["note"] for a in manifest_of(out)["adjusted_files"]}
    assert notes == {"a.gif": "multi-frame: GIF with 3 frames, the first used",
                     "b.png": "multi-frame: PNG with 3 frames, the first used",
                     "c.tif": "multi-frame: TIFF with 3 frames, the first used",
                     "d.webp": "multi-frame: WEBP with 3 frames, the first used"}
    assert list(cache.catalog["note"]) == list(notes.values())


def test_truncated_and_corrupt_images_are_skipped_with_a_reason(tmp_path):
    root = tmp_path / "broken"
    good = save(root / "good.png", disk(128, radius=30) + np.random.default_rng(0).integers(0, 9, (128, 128, 3),
                                                                                             dtype=np.uint8))
    whole = good.read_bytes()
    (root / "cut.png").write_bytes(whole[: len(whole) // 2])
    flipped = bytearray(whole)
    flipped[len(whole) // 2] ^= 0xFF  # a flipped byte inside the compressed pixel data
    (root / "flipped.png").write_bytes(bytes(flipped))
    Image.fromarray(disk(128)).save(root / "g.gif")
    gif = (root / "g.gif").read_bytes()
    (root / "half.gif").write_bytes(gif[: len(gif) // 2])
    (root / "g.gif").unlink()
    out = pack(root, tmp_path / "cache", size=SIZE, workers=1)
    reasons = skipped_reasons(out)
    assert set(reasons) == {"cut.png", "flipped.png", "half.gif"}
    assert all(r.startswith("truncated or corrupt: ") for r in reasons.values()), reasons
    assert list(Cache.open(out).catalog["id"]) == ["good"]


def test_symlink_loops_are_reported_and_the_walk_ends(tmp_path):
    root = tmp_path / "links"
    save(root / "top.png", disk(128, radius=20))
    save(root / "sub" / "inner.png", disk(128, radius=25))
    (root / "sub" / "up").symlink_to("..")  # back to the source folder: a loop
    (root / "sub" / "here").symlink_to(".")  # to its own folder: a loop
    (root / "zlink").symlink_to("sub")  # a second way into sub: walked once
    (root / "a.jpg").symlink_to("b.jpg")
    (root / "b.jpg").symlink_to("a.jpg")  # a.jpg and b.jpg never resolve
    (root / "knot").symlink_to("knot")  # neither, whatever its name
    (root / "gone.png").symlink_to("nowhere.png")
    out = pack(root, tmp_path / "cache", size=SIZE, workers=1)
    assert list(Cache.open(out).catalog["id"]) == ["top", "sub/inner"]
    reasons = skipped_reasons(out)
    assert reasons == {
        "a.jpg": "symlink loop: a.jpg -> b.jpg never resolves",
        "b.jpg": "symlink loop: b.jpg -> a.jpg never resolves",
        "knot": "symlink loop: knot -> knot never resolves",
        "gone.png": "missing: gone.png is a broken symbolic link (to nowhere.png)",
        "sub/here": "symlink loop: sub/here -> . leads back to sub",
        "sub/up": "symlink loop: sub/up -> .. leads back to .",
        "zlink": "already walked: zlink is the folder sub (symbolic link)",
    }
    assert manifest_of(out)["counts"]["skipped_by_reason"] == {"already walked": 1, "missing": 1, "symlink loop": 5}


# killed writers ------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is pid (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == pid and state != "Z":
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_and_kill(argv: list[str], out: Path) -> Path:
    """Run `python -m galaxygen.data ARGV` (2 workers), kill -9 it mid-run; its hidden temporary.

    Its worker processes must end with it (they would go on writing into the temporary)."""
    proc = subprocess.Popen([sys.executable, "-m", "galaxygen.data", *argv, "--workers", "2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (temporaries := list(out.parent.glob(f".{out.name}.tmp-*"))) or len(children_of(proc.pid)) < 2:
            assert proc.poll() is None, f"{argv[0]} ended before it wrote anything"
            assert time.monotonic() < deadline, f"{argv[0]} started no workers and wrote no temporary within 120 s"
            time.sleep(0.05)
        time.sleep(0.5)
        workers = children_of(proc.pid)
        assert proc.poll() is None and len(workers) == 2, f"{argv[0]} finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 2
    while any(running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"the workers of a killed {argv[0]} are still running after 2 s"
        time.sleep(0.05)
    return temporaries[0]


@pytest.mark.parametrize("command", ["pack", "synth", "synth-gz2"])
def test_a_killed_writer_leaves_no_temporary_behind_on_the_next_run(tmp_path, command):
    from galaxygen.data.synth import synthesize

    out, src = tmp_path / "out", tmp_path / "src"
    if command == "pack":  # 150 names of one 2000 px PNG: seconds of decoding
        first = save(src / "f000.png", np.zeros((2000, 2000, 3), np.uint8))
        for k in range(1, 150):
            os.link(first, src / f"f{k:03d}.png")
        argv = ["pack", str(src), "--out", str(out), "--size", "16"]
    else:
        layout = "gz2" if command == "synth-gz2" else "cache"
        argv = ["synth", "--n", "3000", "--out", str(out), "--layout", layout, "--size", "16"]
    stale = run_and_kill(argv, out)
    assert stale.is_dir() and any(stale.iterdir()) and not out.exists()

    sleeper = subprocess.Popen(["sleep", "60"])  # stands for another writer of `out`, still at work
    live = tmp_path / f".out.tmp-{socket.gethostname()}-{sleeper.pid}"
    elsewhere = tmp_path / ".out.tmp-another-host-1"  # a writer on another host of a shared file system
    live.mkdir()
    elsewhere.mkdir()

    def rerun() -> None:
        if command == "pack":
            pack(src, out, size=16, workers=1)
        else:
            synthesize(out, n=3, layout=layout, size=16, workers=1)

    try:
        if command == "pack":
            for path in sorted(src.iterdir())[2:]:
                path.unlink()
        rerun()
        assert not stale.exists() and live.is_dir() and elsewhere.is_dir()
        assert (out / "manifest.json").is_file() or (out / "truth.parquet").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
    rerun()  # for pack: up to date, nothing rewritten, and still the dead writer's temporary goes
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [elsewhere.name]
