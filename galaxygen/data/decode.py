"""Decode one galaxy image into a small RGB array: central crop, resize, 8-bit RGB.

The crop is a fraction of the frame, not a pixel count: `crop_fraction = crop / 424`,
because the Galaxy Zoo convention (central 207 of 424 px) is defined on 424 px SDSS frames.
A 256 px Galaxy10 frame therefore gets a 125 px crop, a 424 px frame a 207 px crop.

Rules, applied to every image the same way:

- The crop is centred on the central square of the frame (non-square frames: the square
  of side min(W, H) is used, and a note records it).
- JPEGs are decoded at reduced scale by libjpeg (DCT scaling via `Image.draft`) when the
  central crop still has at least `size` pixels at that scale (1/2 for 424 px frames at the
  defaults: the decode is ~1.5-1.9x faster; entropy decoding of the whole file remains).
- Crop and resize are one antialiased Lanczos resampling of the float crop box.
- Greyscale, palette, CMYK and alpha images become RGB (alpha is dropped); 16-bit images
  are scaled to 8 bits (value / 257, rounded), never clipped (32-bit integer images are
  read as 16-bit: clipped to 0-65535, then scaled the same way).
- An image whose central crop is smaller than half the output size is skipped
  ("too small"); between half and the full size it is upscaled, and a note records it.
- An image of more than MAX_PIXELS pixels (25 megapixels, e.g. 5000 x 5000) is skipped ("too
  large") on the size in its header, before any pixel is decoded: memory per decoder stays
  bounded (a 20 kB PNG can declare 13,000 x 13,000 pixels, 0.5 GB as RGB). PIL's own
  decompression-bomb guard (Image.MAX_IMAGE_PIXELS, 89 megapixels by default) is left as it is:
  its warning is silenced, because every image it would warn about is refused here anyway with a
  clearer reason, and its error (beyond twice its limit, raised while reading the header) becomes
  the same "too large" skip.
- Multi-frame images (animated GIF, APNG or WebP, multi-page TIFF) use their first frame, and a
  note records it.
- Anything that cannot be decoded (empty, not an image, truncated, corrupt, floating-point
  pixels) is reported with a reason instead of raising.
- EXIF orientation is ignored (survey cutouts carry none, and orientation is irrelevant here).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

GZ2_FRAME = 424
RESAMPLE = Image.Resampling.LANCZOS
RESAMPLE_NAME = "lanczos"
DECODER_VERSION = 2
MAX_PIXELS = 25_000_000
EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF",
    ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class Decoded:
    """The outcome of decoding one image: pixels (or None) plus what was noticed on the way."""

    pixels: np.ndarray | None
    width: int = 0
    height: int = 0
    note: str = ""
    reason: str = ""


def crop_fraction_of(crop: float) -> float:
    """The crop as a fraction of the frame, from a crop in pixels of a 424 px GZ2 frame."""
    if not 0 < crop <= GZ2_FRAME:
        raise ValueError(f"--crop must be between 1 and {GZ2_FRAME} (pixels of a {GZ2_FRAME} px frame), "
                         f"got {crop}")
    return crop / GZ2_FRAME


def crop_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
    """The centred crop box (left, top, right, bottom) of side crop_fraction * min(width, height)."""
    side = crop_fraction * min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return left, top, left + side, top + side


def draft_request(width: int, height: int, crop_fraction: float, size: int) -> tuple[int, int]:
    """The smallest frame size for Image.draft at which the central crop still has >= size pixels."""
    need = size / crop_fraction
    short = min(width, height)
    return math.ceil(need * width / short), math.ceil(need * height / short)


def too_small(width: int, height: int, crop_fraction: float, size: int) -> str:
    """A skip reason when the central crop is below half the output size, else ''."""
    side = crop_fraction * min(width, height)
    if side < size / 2:
        return (f"too small: {width}x{height}, central crop {side:.1f} px < {size / 2:g} px "
                f"(half of --size {size})")
    return ""


def too_large(width: int, height: int) -> str:
    """A skip reason when a frame has more than MAX_PIXELS pixels, else ''."""
    pixels = width * height
    if pixels > MAX_PIXELS:
        return (f"too large: {width}x{height} is {pixels / 1e6:.1f} megapixels, over the limit of "
                f"{MAX_PIXELS / 1e6:g} megapixels (refused from the header, before decoding)")
    return ""


def frames_note(img: Image.Image) -> str:
    """A note when an image holds several frames (only the first is used), else ''."""
    frames = getattr(img, "n_frames", 1)
    return f"multi-frame: {img.format} with {frames} frames, the first used" if frames > 1 else ""


def open_lazily(path: Path) -> Image.Image:
    """Open an image reading its header only (see the module notes on PIL's decompression-bomb guard)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def notes_for(width: int, height: int, crop_fraction: float, size: int) -> list[str]:
    """Notes on adjustments made to a decodable frame (non-square, upscaled)."""
    notes = []
    if width != height:
        short = min(width, height)
        notes.append(f"non-square {width}x{height}: central {short}x{short} square used")
    side = crop_fraction * min(width, height)
    if side < size:
        notes.append(f"upscaled: central crop {side:.1f} px < {size} px")
    return notes


def sixteen_bit_to_float(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) single-band image as float 'F' on the 0-255 scale (value / 257)."""
    values = np.asarray(img).astype(np.float32)  # the one float copy: clip and scale in place
    np.clip(values, 0, 65535, out=values)
    values /= 257.0
    return Image.fromarray(values)


def normalise_mode(img: Image.Image) -> tuple[Image.Image, str]:
    """Bring an image to a mode that resizes correctly ('RGB', 'L' or 'F' on 0-255); reason if impossible."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img, ""
    if mode in SIXTEEN_BIT_MODES:
        return sixteen_bit_to_float(img), ""
    if mode == "F":
        return img, "unsupported pixel mode F (floating point): convert to 8- or 16-bit first"
    try:
        return img.convert("RGB"), ""
    except ValueError:
        return img, f"unsupported pixel mode {mode}: cannot convert to RGB"


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """An image in mode RGB, L or F (0-255) as a uint8 (H, W, 3) array."""
    if img.mode == "F":
        values = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return np.repeat(values[:, :, None], 3, axis=2)
    if img.mode == "L":
        return np.repeat(np.asarray(img)[:, :, None], 3, axis=2)
    return np.asarray(img, dtype=np.uint8).copy()


def crop_resize(img: Image.Image, crop_fraction: float, size: int) -> np.ndarray:
    """Resample the central crop of a loaded image to size x size RGB uint8."""
    box = crop_box(img.width, img.height, crop_fraction)
    return to_rgb_array(img.resize((size, size), RESAMPLE, box=box))


def extension_note(path: Path, fmt: str | None) -> str:
    """A note when the file's content format differs from what its extension says."""
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if expected and fmt and fmt != expected and not (expected == "TIFF" and fmt.startswith("TIFF")):
        return f"{fmt} data in a {path.suffix} file"
    return ""


def decode_file(path: str | Path, crop_fraction: float, size: int) -> Decoded:
    """Decode one image file to (size, size, 3) uint8, or say why it cannot be."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return Decoded(None, reason="empty file: 0 bytes")
        with open_lazily(path) as img:
            width, height = img.size
            reason = too_large(width, height) or too_small(width, height, crop_fraction, size)
            if reason:
                return Decoded(None, width, height, reason=reason)
            notes = [extension_note(path, img.format), frames_note(img)]
            notes += notes_for(width, height, crop_fraction, size)
            if img.format == "JPEG":
                img.draft(img.mode, draft_request(width, height, crop_fraction, size))
            img.load()
            img, reason = normalise_mode(img)
            if reason:
                return Decoded(None, width, height, reason=reason)
            pixels = crop_resize(img, crop_fraction, size)
    except FileNotFoundError:
        return Decoded(None, reason="missing: file not found")
    except UnidentifiedImageError:
        return Decoded(None, reason="not an image: no image format recognises the content")
    except Image.DecompressionBombError as err:
        return Decoded(None, reason=f"too large: {err} (refused from the header, before decoding)")
    except (OSError, SyntaxError, ValueError) as err:
        return Decoded(None, reason=f"truncated or corrupt: {err}")
    except Exception as err:  # a broken file must never stop a pack: any decoder failure is a skip
        return Decoded(None, reason=f"truncated or corrupt: {type(err).__name__}: {err}")
    return Decoded(pixels, width, height, note="; ".join(n for n in notes if n))


def decode_array(frame: np.ndarray, crop_fraction: float, size: int) -> Decoded:
    """Crop and resize one uint8 (H, W, 3) frame already in memory (Galaxy10)."""
    height, width = frame.shape[:2]
    reason = too_small(width, height, crop_fraction, size)
    if reason:
        return Decoded(None, width, height, reason=reason)
    pixels = crop_resize(Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)), crop_fraction, size)
    return Decoded(pixels, width, height, note="; ".join(notes_for(width, height, crop_fraction, size)))
