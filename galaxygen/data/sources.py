"""Image sources for `pack`: detect the layout, read catalogs, list one entry per candidate image.

Formats (see each reader for the exact files):

- gz2: Galaxy Zoo 2. A Hart16 catalog (`gz2_hart16.csv`, or one `*hart16*.csv[.gz]`), joined on
  `dr7objid` with `gz2_filename_mapping.csv` (objid, asset_id[, sample]); images at
  `images_gz2/images/<asset_id>.jpg`. id = dr7objid. Labels: ra, dec, gz2_class and every
  `*_fraction` / `*_debiased` vote column. Catalog rows without a mapping or image are skipped.
- kaggle: Galaxy Zoo Challenge. `images_training_rev1/**/<GalaxyID>.jpg` (any depth) and
  `training_solutions_rev1.csv` (GalaxyID + Class1.1 ... Class11.6). id = GalaxyID. Images
  without a catalog row are packed with NaN labels and counted as "unlabelled"; catalog rows
  without an image are skipped.
- galaxy10: Galaxy10 DECaLS `.h5` (images (N, H, W, 3) uint8, ans; optional ra, dec, redshift,
  pxscale). id = "g10-<index>". Labels: ans, class_name (DECaLS names, 256 px frames only),
  and the optional columns.
- folder: any folder of images (jpg, jpeg, png, tif, tiff, bmp, gif, webp), recursively,
  hidden files and folders ignored. id = relative path without extension (POSIX slashes).

Folders are walked following symbolic links, each real folder once (see `walk_images`): a link
that leads back to a folder on its own path, or that cannot be resolved because it points to
itself, is listed as a skipped entry ("symlink loop"), never walked forever.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from galaxygen.data.decode import EXTENSION_FORMATS, too_large

log = logging.getLogger(__name__)

FORMATS = ("gz2", "kaggle", "galaxy10", "folder")
IMAGE_EXTENSIONS = frozenset(EXTENSION_FORMATS)
H5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
GZ2_CATALOG = "gz2_hart16.csv"
GZ2_MAPPING = "gz2_filename_mapping.csv"
GZ2_IMAGES = Path("images_gz2") / "images"
KAGGLE_CATALOG = "training_solutions_rev1.csv"
KAGGLE_IMAGES = "images_training_rev1"
KAGGLE_CLASSES = tuple(
    f"Class{q}.{a}" for q, n in enumerate((3, 2, 2, 2, 4, 2, 3, 7, 3, 3, 6), start=1) for a in range(1, n + 1)
)
GALAXY10_CLASSES = (
    "Disturbed", "Merging", "Round Smooth", "In-between Round Smooth", "Cigar Shaped Smooth",
    "Barred Spiral", "Unbarred Tight Spiral", "Unbarred Loose Spiral", "Edge-on without Bulge",
    "Edge-on with Bulge",
)
GALAXY10_OPTIONAL = ("ra", "dec", "redshift", "pxscale")
LOOKED_FOR = (
    f"gz2: *hart16*.csv, {GZ2_MAPPING} or images_gz2/; "
    f"kaggle: {KAGGLE_CATALOG} or {KAGGLE_IMAGES}/; "
    "galaxy10: a .h5 file; "
    f"folder: image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
)


@dataclass
class Source:
    """A resolved source: one entry per candidate image, labels aligned with the entries."""

    format: str
    path: Path
    ids: list[str]
    files: list[str]
    labels: pd.DataFrame
    skip: list[str]
    inputs: list[Path] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_h5(self) -> bool:
        return self.format == "galaxy10"


def open_source(source: str | os.PathLike, fmt: str = "auto") -> Source:
    """Detect (fmt='auto') or check the format of a source and read its entries."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source {path} does not exist")
    path = path.resolve()
    if fmt == "auto":
        fmt = detect(path)
        log.info("%s: detected format %s", path, fmt)
    readers = {"gz2": read_gz2, "kaggle": read_kaggle, "galaxy10": read_galaxy10, "folder": read_folder}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    return readers[fmt](path)


def detect(path: Path) -> str:
    """The format of a source from the files present; ValueError listing what was looked for."""
    if path.is_file():
        if path.suffix.lower() in H5_EXTENSIONS:
            return "galaxy10"
        raise ValueError(f"cannot detect the format of file {path}: a file source must be a Galaxy10 .h5 "
                         f"(looked for {LOOKED_FOR})")
    if hart16_candidates(path) or (path / GZ2_MAPPING).exists() or (path / "images_gz2").is_dir():
        return "gz2"
    if (path / KAGGLE_CATALOG).exists() or (path / KAGGLE_IMAGES).is_dir():
        return "kaggle"
    if h5_files(path):
        return "galaxy10"
    if any(not reason for _, reason in walk_images(path)):
        return "folder"
    raise ValueError(f"cannot detect the format of {path}: found none of {LOOKED_FOR}")


def require_dir(path: Path, fmt: str) -> None:
    """Fail unless a folder source is a folder."""
    if not path.is_dir():
        raise ValueError(f"a {fmt} source must be a folder, got file {path}")


def require_columns(path: Path, wanted: tuple[str, ...] | list[str]) -> list[str]:
    """The header of a CSV file; ValueError naming the file and any missing column."""
    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable CSV file: {err}") from err
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(missing)} (it has: {', '.join(header[:12])}"
                         f"{', ...' if len(header) > 12 else ''})")
    return header


def require_file(path: Path, what: str) -> Path:
    """Fail with a clear message when a required file is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    return path


def duplicate_reasons(ids: list[str], files: list[str], skip: list[str]) -> list[str]:
    """Mark later entries whose id was already used by an earlier entry."""
    first: dict[str, str] = {}
    for k, galaxy_id in enumerate(ids):
        if skip[k]:
            continue
        if galaxy_id in first:
            skip[k] = f"duplicate id: {galaxy_id} (already packed from {first[galaxy_id]})"
        else:
            first[galaxy_id] = files[k]
    return skip


# gz2 -------------------------------------------------------------------------------------------


def hart16_candidates(path: Path) -> list[Path]:
    """Files in a folder that look like the Hart16 catalog."""
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and "hart16" in p.name.lower()
                  and p.name.lower().endswith((".csv", ".csv.gz")))


def find_hart16(path: Path) -> Path:
    """The Hart16 catalog of a GZ2 folder: gz2_hart16.csv, else the single *hart16*.csv."""
    if (path / GZ2_CATALOG).is_file():
        return path / GZ2_CATALOG
    found = hart16_candidates(path)
    if not found:
        raise FileNotFoundError(f"Hart16 catalog {path / GZ2_CATALOG} is missing "
                                f"(looked for *hart16*.csv in {path})")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{path} holds several Hart16 catalogs ({names}): keep one")
    return found[0]


def gz2_label_columns(header: list[str]) -> list[str]:
    """The Hart16 columns kept as labels: ra, dec, gz2_class and the vote fractions."""
    keep = [c for c in ("ra", "dec", "gz2_class") if c in header]
    return keep + [c for c in header if c.endswith(("_fraction", "_debiased"))]


def gz2_mapping(mapping_path: Path, catalog: pd.DataFrame) -> pd.DataFrame:
    """One mapping row per dr7objid: the one whose sample matches the catalog, else the first."""
    header = require_columns(mapping_path, ("objid", "asset_id"))
    cols = ["objid", "asset_id"] + (["sample"] if "sample" in header else [])
    mapping = pd.read_csv(mapping_path, usecols=cols, dtype=str).dropna(subset=["objid", "asset_id"])
    mapping["objid"] = mapping["objid"].str.strip()
    mapping["asset_id"] = mapping["asset_id"].str.strip()
    mapping["_order"] = np.arange(len(mapping))
    if "sample" in mapping.columns and "sample" in catalog.columns:
        samples = catalog.drop_duplicates("dr7objid").set_index("dr7objid")["sample"]
        mapping["_match"] = mapping["objid"].map(samples) == mapping["sample"]
        mapping = mapping.sort_values(["_match", "_order"], ascending=[False, True])
    if mapping["objid"].duplicated().any():
        log.info("%s: %d objids have several assets; using one each", mapping_path.name,
                 int(mapping["objid"].duplicated().sum()))
    return mapping.drop_duplicates("objid").set_index("objid")


def read_gz2(path: Path) -> Source:
    """Galaxy Zoo 2: Hart16 catalog joined with the filename mapping; images under images_gz2/images."""
    require_dir(path, "gz2")
    catalog_path = find_hart16(path)
    mapping_path = require_file(path / GZ2_MAPPING, "GZ2 filename mapping")
    header = require_columns(catalog_path, ("dr7objid",))
    labels = gz2_label_columns(header)
    if not labels:
        log.warning("%s has no gz2_class or vote fraction columns: packing without labels", catalog_path)
    extra_cols = ["sample"] if "sample" in header else []
    usecols = list(dict.fromkeys(["dr7objid", *labels, *extra_cols]))
    catalog = pd.read_csv(catalog_path, usecols=usecols, dtype={"dr7objid": str, "gz2_class": str})
    catalog["dr7objid"] = catalog["dr7objid"].fillna("").str.strip()
    mapping = gz2_mapping(mapping_path, catalog)
    assets = catalog["dr7objid"].map(mapping["asset_id"])
    ids = catalog["dr7objid"].tolist()
    files, skip = [], []
    for galaxy_id, asset in zip(ids, assets):
        if not galaxy_id:
            files.append("")
            skip.append(f"no id: empty dr7objid in {catalog_path.name}")
        elif isinstance(asset, str):
            files.append((GZ2_IMAGES / f"{asset}.jpg").as_posix())
            skip.append("")
        else:
            files.append("")
            skip.append(f"no mapping: dr7objid {galaxy_id} is not in {GZ2_MAPPING}")
    skip = duplicate_reasons(ids, files, skip)
    return Source("gz2", path, ids, files, catalog[labels].reset_index(drop=True), skip,
                  inputs=[catalog_path, mapping_path])


# kaggle ----------------------------------------------------------------------------------------


def id_order(galaxy_id: str) -> tuple[int, int | str]:
    """Sort key: numeric ids numerically, then the others by text."""
    return (0, int(galaxy_id)) if galaxy_id.isdigit() else (1, galaxy_id)


def read_kaggle(path: Path) -> Source:
    """Kaggle Galaxy Zoo Challenge: images_training_rev1/**/<GalaxyID>.jpg + training_solutions_rev1.csv."""
    require_dir(path, "kaggle")
    catalog_path = require_file(path / KAGGLE_CATALOG, "Kaggle catalog")
    images_dir = path / KAGGLE_IMAGES
    if not images_dir.is_dir():
        raise FileNotFoundError(f"Kaggle image folder {images_dir} is missing")
    require_columns(catalog_path, ("GalaxyID", *KAGGLE_CLASSES))
    catalog = pd.read_csv(catalog_path, usecols=["GalaxyID", *KAGGLE_CLASSES], dtype={"GalaxyID": str})
    catalog["GalaxyID"] = catalog["GalaxyID"].fillna("").str.strip()
    if catalog["GalaxyID"].duplicated().any():
        log.warning("%s: %d duplicated GalaxyID rows, keeping the first of each", catalog_path.name,
                    int(catalog["GalaxyID"].duplicated().sum()))
    catalog = catalog.drop_duplicates("GalaxyID").set_index("GalaxyID")
    found = sorted(((p.stem if not reason else p.relative_to(path).as_posix(), p.relative_to(path).as_posix(), reason)
                    for p, reason in walk_images(images_dir, (".jpg", ".jpeg"))),
                   key=lambda e: (id_order(e[0]), e[1]))
    ids = [galaxy_id for galaxy_id, _, _ in found]
    files = [rel for _, rel, _ in found]
    skip = [reason for _, _, reason in found]
    orphans = sorted(set(catalog.index) - set(ids) - {""}, key=id_order)
    ids += orphans
    files += [f"{KAGGLE_IMAGES}/{galaxy_id}.jpg" for galaxy_id in orphans]
    skip += [f"missing: no image for GalaxyID {galaxy_id} under {KAGGLE_IMAGES}/" for galaxy_id in orphans]
    skip = duplicate_reasons(ids, files, skip)
    labels = catalog.reindex(ids).reset_index(drop=True)
    return Source("kaggle", path, ids, files, labels, skip, inputs=[catalog_path])


# galaxy10 --------------------------------------------------------------------------------------


def h5_files(path: Path) -> list[Path]:
    """HDF5 files directly inside a folder."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in H5_EXTENSIONS)


def galaxy10_file(path: Path) -> Path:
    """The Galaxy10 .h5 file: the path itself, or the single .h5 file in a folder."""
    if path.is_file():
        return path
    found = h5_files(path)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"a galaxy10 source must be a .h5 file or a folder with exactly one; "
                                f"{path} has {what}")
    return found[0]


def read_galaxy10(path: Path) -> Source:
    """Galaxy10 DECaLS .h5: datasets images (N, H, W, 3) uint8 and ans, optional ra/dec/redshift/pxscale."""
    import h5py

    h5_path = galaxy10_file(path)
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as err:
        raise ValueError(f"{h5_path} is not a readable HDF5 file: {err}") from err
    with h5:
        for name in ("images", "ans"):
            if name not in h5:
                raise ValueError(f"{h5_path} lacks dataset {name!r} (it has: {', '.join(h5.keys())})")
        images = h5["images"]
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{h5_path}: dataset 'images' must be uint8 (N, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
        n, height, width = images.shape[:3]
        labels = pd.DataFrame({"ans": read_column(h5, "ans", n, h5_path)})
        for name in GALAXY10_OPTIONAL:
            if name in h5:
                labels[name] = read_column(h5, name, n, h5_path)
    if (height, width) == (256, 256):
        labels.insert(1, "class_name", labels["ans"].map(dict(enumerate(GALAXY10_CLASSES))))
    ids = [f"g10-{i}" for i in range(n)]
    files = [f"{h5_path.name}[{i}]" for i in range(n)]
    return Source("galaxy10", h5_path, ids, files, labels, [too_large(width, height)] * n, inputs=[h5_path],
                  extra={"frame": [int(height), int(width)]})


def read_column(h5, name: str, n: int, h5_path: Path) -> np.ndarray:
    """A 1-D dataset of length n from the h5 file."""
    values = np.asarray(h5[name][()])
    if values.shape != (n,):
        raise ValueError(f"{h5_path}: dataset {name!r} must have shape ({n},), got {values.shape}")
    return values


# folder ----------------------------------------------------------------------------------------


def walk_images(root: Path, extensions: tuple[str, ...] | frozenset[str] = IMAGE_EXTENSIONS,
                ) -> Iterator[tuple[Path, str]]:
    """(path, skip reason) of every image file under root: '' for a file to decode, else why it cannot be.

    Order: a folder's files by name, then its sub-folders by name, recursively; hidden files and
    folders are ignored. Symbolic links are followed, each real folder (device, inode) walked once, so
    the walk always ends: a link back to a folder on its own path and a link that cannot be resolved
    because it points to itself (ELOOP) are yielded as "symlink loop", a second way into a folder
    walked already as "already walked", an unreadable folder as "unreadable folder".
    """
    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix() or "."

    def identity(path: Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    walked = {identity(root): root}
    stack: list[tuple[Path, frozenset]] = [(root, frozenset(walked))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            yield folder, f"unreadable folder: {rel(folder)}: {err.strerror}"
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()
                key = identity(path) if is_dir else None
            except OSError as err:
                if err.errno == errno.ELOOP:
                    yield path, unreadable_reason(path, rel(path), err)
                    continue
                is_dir = False
            if is_dir:
                folders.append((path, key))
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                yield path, ""
        todo = []
        for path, key in folders:
            if key in ancestors:
                yield path, (f"symlink loop: {rel(path)} -> {os.readlink(path)} leads back to "
                             f"{rel(walked[key])}")
            elif key in walked:
                yield path, f"already walked: {rel(path)} is the folder {rel(walked[key])} (symbolic link)"
            else:
                walked[key] = path
                todo.append((path, ancestors | {key}))
        stack.extend(reversed(todo))  # popped in name order


def unreadable_reason(path: Path, rel: str, err: OSError) -> str:
    """The skip reason of an entry whose file cannot be reached (os.stat failed with err)."""
    if err.errno == errno.ELOOP:
        return f"symlink loop: {rel} -> {os.readlink(path)} never resolves"
    if err.errno == errno.ENOENT:
        if path.is_symlink():
            return f"missing: {rel} is a broken symbolic link (to {os.readlink(path)})"
        return f"missing: image file {rel} not found"
    return f"unreadable: {rel}: {err.strerror}"


def read_folder(path: Path) -> Source:
    """Any folder of images, recursively; id = relative path without extension."""
    require_dir(path, "folder")
    found = [(p.relative_to(path).as_posix(), reason) for p, reason in walk_images(path)]
    if all(reason for _, reason in found):
        raise ValueError(f"folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                         + "".join(f"; {reason}" for _, reason in found[:3]))
    files = [rel for rel, _ in found]
    ids = [rel if reason else os.path.splitext(rel)[0] for rel, reason in found]
    skip = duplicate_reasons(ids, files, [reason for _, reason in found])
    return Source("folder", path, ids, files, pd.DataFrame(index=pd.RangeIndex(len(files))), skip)
