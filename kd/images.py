"""Decoding image files into uint8 RGB arrays of one size, safely and in parallel."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # unsigned 16-bit greyscale: a fixed range 0..65535


class BadImage(Exception):
    """A file that is not a usable image; the message says why."""


@dataclass
class Decoded:
    """The outcome of decoding a list of files: arrays for the good ones, reasons for the rest."""
    arrays: list[np.ndarray | None]  # size x size x 3 uint8, None where the file was bad
    hashes: list[str]                # sha1 of the file bytes ("" where unreadable)
    errors: list[str]                # "" where the file was good


def file_hash(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@contextlib.contextmanager
def _no_bomb_warning() -> Iterator[None]:
    """Pillow's DecompressionBombWarning silenced while decoding: our own size check (`max_pixels`) replaces it, and
    Pillow's hard error (twice its limit) stays as a backstop. Only here, so importing kd leaves the process's warning
    filters as they were. `warnings.catch_warnings` swaps the process-wide filter list, so it is entered in one
    thread at a time: `decode_files` opens it once around its whole thread pool, never in each thread."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        yield


def decode_bytes(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Decode an image held in memory into a size x size x 3 uint8 array (squashed, not cropped)."""
    with _no_bomb_warning():
        return _decode(data, size, max_pixels)


def _decode(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """`decode_bytes`, where the caller silences Pillow's decompression-bomb warning."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise BadImage(f"{img.width}x{img.height} pixels is over the decompression-bomb limit "
                           f"of {max_pixels} (data.max_image_pixels)")
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that is enough
        img.load()
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can identify") from None
    except Image.DecompressionBombError as e:
        raise BadImage(str(e)) from None
    except (OSError, SyntaxError, ValueError, TypeError, MemoryError, EOFError) as e:
        raise BadImage(f"cannot decode: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: deeper greyscale is scaled to 8 bits, palettes and alpha dropped.

    Greyscale deeper than 8 bits is scaled by the range its format fixes, never by what one image happens to
    contain, so a pixel value decodes to the same 8-bit value in every image of a dataset:

    - 16-bit modes (I;16, I;16B, I;16L, I;16N): 0..65535 maps to 0..255 (value / 257, rounded), whatever this
      image's maximum: 51400 is 200, and 200 is 1 (a dim 16-bit image stays dim, not stretched to 8-bit values);
    - 32-bit integer "I" whose values all lie in 0..65535 (how Pillow opens a 16-bit PGM): the same rule;
    - "I" with values outside 0..65535, and float "F": their formats fix no range, so these alone are scaled
      min-max per image, over a range that always includes 0: min(0, darkest pixel) becomes 0 and
      max(0, brightest pixel) 255 (an all-zero image stays 0). There the same value can decode differently
      in two images.
    """
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        per_image = img.mode == "F" or lo < 0 or hi > 65535  # no range fixed by the format: min-max
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0 if per_image else arr / 257.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_file(path: str, size: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """Decode one file, returning the array and the hash of its bytes."""
    with _no_bomb_warning():
        return _decode_file(path, size, max_pixels)


def _decode_file(path: str, size: int, max_pixels: int) -> tuple[np.ndarray, str]:
    """`decode_file`, where the caller silences Pillow's decompression-bomb warning."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from None
    return _decode(data, size, max_pixels), file_hash(data)


MAX_AUTO_WORKERS = 8


def resolve_workers(workers: int) -> int:
    """`data.workers` as a count: 0 is one per core this process may run on (its CPU affinity where the system
    has one, else every core), at most `MAX_AUTO_WORKERS` (several trials may stream on one node at once). The one
    resolution, for the decoding threads and the streaming DataLoader alike."""
    if workers > 0:
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_WORKERS, cores))


def decode_files(paths: list[str], size: int, max_pixels: int, workers: int = 0, keep_pixels: bool = True,
                 progress: bool = True, desc: str = "decoding images") -> Decoded:
    """Decode every file once, in a thread pool (Pillow releases the GIL while decoding).

    `keep_pixels=False` still decodes (to find bad files) but keeps only hashes: the streaming pipeline.
    """
    Image.MAX_IMAGE_PIXELS = max(2 * max_pixels, Image.MAX_IMAGE_PIXELS or 0)

    def one(path: str) -> tuple[np.ndarray | None, str, str]:
        try:
            arr, digest = _decode_file(path, size, max_pixels)
            return (arr if keep_pixels else None), digest, ""
        except BadImage as e:
            return None, "", str(e)

    with _no_bomb_warning(), ThreadPoolExecutor(max_workers=resolve_workers(workers)) as pool:
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc=desc, unit="img",
                            disable=None if progress and len(paths) >= 200 else True, leave=False))
    return Decoded([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])


def list_images(root: str, allow_external_links: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files under `root` (recursively, sorted), and (path, reason) for links that leave it."""
    real_root = os.path.realpath(root)
    found, refused = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            if not allow_external_links and not is_inside(path, real_root):
                refused.append((path, f"a link to {os.path.realpath(path)}, outside {root} "
                                      "(set data.allow_external_links: true to follow it)"))
                continue
            found.append(path)
    return found, refused


def is_inside(path: str, real_root: str) -> bool:
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)
