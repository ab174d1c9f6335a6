"""Datasets: three sources (folder, csv, built-in digits) -> stratified splits of uint8 tensors.

Every image is decoded once and cached on disk (keyed by the file list, sizes and modification times),
so later runs and every trial of a search start from `N x 3 x H x W` uint8 tensors. Splits carved from
one pool are stratified, seeded and keep identical images together; the test split is never seen by
the search. The same image in two splits is leakage, reported pair by pair.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from kd.config import MAX_IMAGE_PIXELS, DataConfig, SplitSource
from kd.errors import DataError
from kd.files import CacheError, file_lock, load_tensors, save_tensors
from kd.groups import check_leakage, column_of, subjects_of
from kd.images import IMAGE_EXTENSIONS, decode_files, is_inside, list_images, resolve_workers

log = logging.getLogger("kd")
SPLITS = ("train", "val", "test")
CACHE_VERSION = 2  # 2: 16-bit images decode by one fixed rule
MAX_LISTED = 20


@dataclass
class Split:
    labels: torch.Tensor            # int64, N
    paths: list[str]
    hashes: list[str]               # content hash per image: leakage detection and fingerprints
    images: torch.Tensor | None = None  # uint8 N x 3 x H x W; None in the streaming pipeline
    subjects: list[str] | None = None   # the subject of each image (data.groups: kd.groups); None: not given

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray | list[int]) -> Split:
        idx = np.asarray(idx, dtype=np.int64)
        images = self.images[torch.from_numpy(idx)] if self.images is not None else None
        return Split(self.labels[torch.from_numpy(idx)], [self.paths[i] for i in idx],
                     [self.hashes[i] for i in idx], images,
                     [self.subjects[i] for i in idx] if self.subjects is not None else None)

    def groups(self) -> list[str]:
        """What must stay together in one split and one fold: the subjects where named, else identical images."""
        return self.subjects if self.subjects is not None else self.hashes


@dataclass
class Dataset:
    classes: list[str]
    image_size: int
    train: Split
    val: Split
    test: Split
    fingerprint: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    workers: int = 0                  # streaming pipeline: DataLoader workers decoding each batch
    max_pixels: int = MAX_IMAGE_PIXELS

    def split(self, name: str) -> Split:
        return getattr(self, name)

    def class_counts(self, split: str = "train") -> list[int]:
        return torch.bincount(self.split(split).labels, minlength=len(self.classes)).tolist()

    def describe(self) -> str:
        parts = []
        for name in SPLITS:
            counts = ", ".join(f"{c} {n}" for c, n in zip(self.classes, self.class_counts(name), strict=False))
            parts.append(f"{name} {len(self.split(name))} ({counts})")
        text = f"{len(self.classes)} classes at {self.image_size}px: " + "; ".join(parts)
        return text + (f"; {len(self.skipped)} files skipped" if self.skipped else "")


def load_dataset(cfg: DataConfig, progress: bool = True) -> Dataset:
    """Load, decode (cached), split and check the dataset described by `cfg`."""
    skipped: list[tuple[str, str]] = []
    if cfg.source == "digits":
        classes, given = _digits(cfg)
    else:
        subjects: dict[str, str] = {}  # file -> subject, from the CSV column data.groups names
        entries = {name: _entries(cfg, name, src, skipped, subjects) for name, src in
                   (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)) if src is not None}
        classes = _classes(cfg, entries)
        given = {name: _decode(cfg, name, ents, classes, skipped, progress) for name, ents in entries.items()}
        for name, split in given.items():
            split.subjects = subjects_of(cfg.groups, name, split.paths, subjects)
    _report_skipped(skipped, cfg)
    splits = _carve(given, classes, cfg)
    for name in SPLITS:
        counts = torch.bincount(splits[name].labels, minlength=len(classes)).tolist()
        empty = [c for c, n in zip(classes, counts, strict=False) if n == 0]
        if empty:
            raise DataError(f"the {name} split has no images of class {', '.join(empty)}: "
                            "every class needs images in train, val and test")
    check_leakage(splits, cfg.allow_leakage)
    fingerprint = _fingerprint(classes, cfg, splits)
    dataset = Dataset(classes, cfg.image_size, splits["train"], splits["val"], splits["test"], fingerprint, skipped,
                      resolve_workers(cfg.workers), cfg.max_image_pixels)
    log.info("data: %s", dataset.describe())
    return dataset


def load_labelled(cfg: DataConfig, src: SplitSource, classes: list[str], progress: bool = True) -> Split:
    """One labelled folder or CSV as a single split whose labels index `classes` (an exported model's)."""
    skipped: list[tuple[str, str]] = []
    entries = _entries(cfg, "evaluate", src, skipped, {})
    unknown = sorted({label for _, label in entries if label not in classes
                      and not (_is_int(label) and 0 <= int(label) < len(classes))})
    if unknown:
        raise DataError(f"{src.path}: labels {', '.join(unknown)} are not classes of the model ({', '.join(classes)})")
    split = _decode(cfg, "evaluate", entries, classes, skipped, progress)
    _report_skipped(skipped, cfg)
    return split


# -------------------------------------------------------------------------------------------- sources

def _digits(cfg: DataConfig) -> tuple[list[str], dict[str, Split]]:
    """scikit-learn's 1797 real 8x8 scans of handwritten digits: one digit against all the others (~10%)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # N x 8 x 8
    labels = torch.from_numpy((digits.target == cfg.digits_minority).astype(np.int64))
    x = torch.from_numpy(small).float().unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    hashes = [hashlib.sha1(s.tobytes()).hexdigest() for s in small]
    paths = [f"digits[{i}]" for i in range(len(small))]
    return ["other", f"digit_{cfg.digits_minority}"], {"train": Split(labels, paths, hashes, images)}


def _entries(cfg: DataConfig, split: str, src: SplitSource, skipped: list,
             subjects: dict[str, str]) -> list[tuple[str, str]]:
    """(file path, label text) for one split on disk, with every problem named (and, from a CSV, each file's
    subject into `subjects` where data.groups names a column)."""
    if cfg.source == "folder":
        return _folder_entries(cfg, split, src.path, skipped)
    return _csv_entries(cfg, split, src, subjects)


def _folder_entries(cfg: DataConfig, split: str, root: str, skipped: list) -> list[tuple[str, str]]:
    if not os.path.isdir(root):
        raise DataError(f"data.{split}: folder {root} does not exist" if not os.path.exists(root)
                        else f"data.{split}: {root} is a file; the folder source expects ROOT/<class>/<images>")
    class_dirs = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if cfg.classes is not None:
        missing = [c for c in cfg.classes if c not in class_dirs]
        if missing:
            raise DataError(f"data.{split}: {root} has no folder for class {', '.join(missing)} "
                            f"(found: {', '.join(class_dirs) or 'none'})")
        class_dirs = [c for c in class_dirs if c in cfg.classes]
    if not class_dirs:
        raise DataError(f"data.{split}: {root} has no class folders; expected ROOT/<class>/<images>")
    split_names = {"train", "val", "valid", "validation", "test"}
    if set(class_dirs) <= split_names and "train" in class_dirs:
        given = " ".join(f"data.{'val' if d.startswith('val') else d}={os.path.join(root, d)}" for d in class_dirs)
        raise DataError(f"data.{split}: {root} holds split folders ({', '.join(class_dirs)}), not class folders; "
                        f"give each split: {given}")
    entries: list[tuple[str, str]] = []
    for name in class_dirs:
        files, refused = list_images(os.path.join(root, name), cfg.allow_external_links)
        skipped.extend(refused)
        if not files:
            raise DataError(f"data.{split}: class folder {os.path.join(root, name)} has no images "
                            f"(looked for {', '.join(sorted({'.jpg', '.png', '.bmp', '.tif', '.webp'}))}, ...)")
        entries.extend((f, name) for f in files)
    return entries


def _csv_entries(cfg: DataConfig, split: str, src: SplitSource, subjects: dict[str, str]) -> list[tuple[str, str]]:
    path = src.path
    image_dir = os.path.abspath(src.images or os.path.dirname(os.path.abspath(path)))
    file_col, label_col = src.file_column or cfg.file_column, src.label_column or cfg.label_column
    if not os.path.isfile(path):
        raise DataError(f"data.{split}: CSV file {path} does not exist")
    if not os.path.isdir(image_dir):
        raise DataError(f"data.{split}.images: image folder {image_dir} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            records = list(reader)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text CSV file") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    file_col, label_col = _csv_columns(path, list(columns), records, file_col, label_col)
    group_col = column_of(cfg.groups)
    if group_col is not None and group_col not in columns:
        raise DataError(f"data.groups: {path} has no column '{group_col}' (columns: {', '.join(columns)})")
    rows = [(i + 2, (r.get(file_col) or "").strip(), (r.get(label_col) or "").strip()) for i, r in enumerate(records)]
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    real_dir = os.path.realpath(image_dir)
    seen: dict[str, tuple[int, str]] = {}
    entries, duplicates = [], 0
    for line, name, label in rows:
        if not name or not label:
            raise DataError(f"{path}, line {line}: empty {'file name' if not name else 'label'}")
        full = os.path.normpath(os.path.join(image_dir, name))
        inside_by_name = full.startswith(image_dir.rstrip(os.sep) + os.sep)
        if os.path.isabs(name) or not inside_by_name:
            raise DataError(f"{path}, line {line}: '{name}' points outside the image folder {image_dir}")
        if not cfg.allow_external_links and not is_inside(full, real_dir):
            raise DataError(f"{path}, line {line}: '{name}' is a link to {os.path.realpath(full)}, outside the "
                            f"image folder {image_dir} (set data.allow_external_links: true to follow it)")
        if not os.path.isfile(full):
            raise DataError(f"{path}, line {line}: image '{name}' not found (looked for {full})")
        if full in seen:
            first_line, first_label = seen[full]
            if first_label != label:
                raise DataError(f"{path}: '{name}' is labelled '{first_label}' on line {first_line} "
                                f"and '{label}' on line {line}")
            duplicates += 1
            continue
        seen[full] = (line, label)
        entries.append((full, label))
        if group_col is not None:
            subjects[full] = (records[line - 2].get(group_col) or "").strip()
            if not subjects[full]:
                raise DataError(f"{path}, line {line}: no subject in column '{group_col}' (data.groups)")
    if duplicates:
        log.warning("%s: %d duplicate rows ignored (same file, same label)", path, duplicates)
    return entries


def _csv_columns(path: str, columns: list[str], records: list[dict], file_col: str, label_col: str) -> tuple[str, str]:
    """The configured columns; when they are absent, the one column of image file names and, in a two-column
    file, the other one as labels (said in the log). Anything less clear is an error listing the columns."""
    if file_col not in columns:
        def share_of_image_names(col: str) -> float:
            names = [os.path.splitext((r.get(col) or "").strip())[1].lower() for r in records]
            return sum(ext in IMAGE_EXTENSIONS for ext in names) / max(len(names), 1)
        looks_like_files = [c for c in columns if share_of_image_names(c) > 0.5]
        if len(looks_like_files) == 1:
            log.info("%s: no column '%s'; using '%s', which holds image file names", path, file_col,
                     looks_like_files[0])
            file_col = looks_like_files[0]
    if label_col not in columns and file_col in columns and len(columns) == 2:
        other = columns[1 - columns.index(file_col)]
        log.info("%s: no column '%s'; using '%s' as the label", path, label_col, other)
        label_col = other
    for col, key in ((file_col, "file_column"), (label_col, "label_column")):
        if col not in columns:
            raise DataError(f"{path}: no column '{col}' (data.{key}); the columns are: "
                            f"{', '.join(columns) or 'none (empty file)'}")
    return file_col, label_col


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _classes(cfg: DataConfig, entries: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Class names in order: data.classes, or the sorted labels (numerically when all are integers)."""
    labels = {label for ents in entries.values() for _, label in ents}
    if cfg.classes is not None:
        classes = list(cfg.classes)
        for split, ents in entries.items():
            for path, label in ents:
                if label not in classes and not (_is_int(label) and 0 <= int(label) < len(classes)):
                    raise DataError(f"data.{split}: label '{label}' of {path} is not one of data.classes "
                                    f"({', '.join(classes)}) nor an index into them")
        return classes
    if all(_is_int(label) for label in labels):
        classes = [str(v) for v in sorted({int(label) for label in labels})]
    else:
        classes = sorted(labels)
    train_labels = {_label_name(label, classes) for _, label in entries["train"]}
    if len(train_labels) < 2:
        raise DataError(f"data.train has a single class ({', '.join(train_labels) or 'none'}): "
                        "classification needs at least two")
    for split, ents in entries.items():
        extra = {_label_name(label, classes) for _, label in ents} - train_labels
        if extra:
            raise DataError(f"data.{split} has class {', '.join(sorted(extra))}, which data.train lacks")
    return classes


def _label_name(label: str, classes: list[str]) -> str:
    if label in classes:
        return label
    return str(int(label)) if _is_int(label) and str(int(label)) in classes else classes[int(label)]


# ------------------------------------------------------------------------------------ decoding + cache

def _decode(cfg: DataConfig, split: str, entries: list[tuple[str, str]], classes: list[str],
            skipped: list, progress: bool) -> Split:
    paths = [p for p, _ in entries]
    keep_pixels = cfg.pipeline == "memory"
    ok, hashes, errors, images = _decode_cached(cfg, paths, keep_pixels, progress, f"decoding {split}")
    skipped.extend((p, e) for p, e in zip(paths, errors, strict=False) if e)
    good = [i for i in range(len(paths)) if ok[i]]
    if not good:
        raise DataError(f"data.{split}: none of the {len(paths)} images could be decoded "
                        f"(first problem: {paths[0]}: {errors[0]})")
    labels = torch.tensor([classes.index(_label_name(entries[i][1], classes)) for i in good], dtype=torch.int64)
    return Split(labels, [paths[i] for i in good], [hashes[i] for i in good], images)


def _decode_cached(cfg: DataConfig, paths: list[str], keep_pixels: bool, progress: bool, desc: str):
    listing = []
    for p in paths:
        try:
            st = os.stat(p)
            listing.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
        except OSError:
            listing.append((os.path.abspath(p), -1, 0))
    key = hashlib.sha256(json.dumps([CACHE_VERSION, cfg.image_size, cfg.max_image_pixels, keep_pixels, listing])
                         .encode()).hexdigest()[:24]
    path = os.path.join(cfg.cache_dir, "data", f"{key}.safetensors")
    with file_lock(path):
        if os.path.exists(path):
            try:
                tensors, meta = load_tensors(path)
                if meta["n"] == len(paths):
                    ok = tensors["ok"].tolist()
                    return ok, meta["hashes"], meta["errors"], tensors["images"] if keep_pixels else None
                log.warning("data cache %s does not match its file list; rebuilding it", path)
            except CacheError as e:
                log.warning("data cache rebuilt: %s", e)
        dec = decode_files(paths, cfg.image_size, cfg.max_image_pixels, cfg.workers, keep_pixels, progress, desc)
        ok = [e == "" for e in dec.errors]
        size = cfg.image_size
        if keep_pixels and any(ok):
            stacked = np.stack([a for a in dec.arrays if a is not None])
            images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
        else:
            images = torch.zeros((0, 3, size, size), dtype=torch.uint8)
        save_tensors(path, {"images": images, "ok": torch.tensor(ok, dtype=torch.bool)},
                     {"n": len(paths), "hashes": dec.hashes, "errors": dec.errors})
        return ok, dec.hashes, dec.errors, images if keep_pixels else None


def _report_skipped(skipped: list[tuple[str, str]], cfg: DataConfig) -> None:
    if not skipped:
        return
    lines = [f"  {p}: {why}" for p, why in skipped[:MAX_LISTED]]
    more = f"\n  ... and {len(skipped) - MAX_LISTED} more" if len(skipped) > MAX_LISTED else ""
    if cfg.on_bad_image == "error":
        raise DataError(f"{len(skipped)} files are not usable images (data.on_bad_image: error):\n"
                        + "\n".join(lines) + more)
    log.warning("skipped %d files that are not usable images:\n%s%s", len(skipped), "\n".join(lines), more)


# ------------------------------------------------------------------------------------ splits + checks

def _carve(given: dict[str, Split], classes: list[str], cfg: DataConfig) -> dict[str, Split]:
    """Carve the missing val/test splits out of train, stratified by class, each group (a subject's images, or
    identical images) kept together."""
    missing = [s for s in ("val", "test") if s not in given]
    if not missing:
        return given
    pool = given["train"]
    fractions = {"val": cfg.val_fraction, "test": cfg.test_fraction}
    if len(missing) == 1:  # only one split carved: its fraction is of the pool that is left
        fractions = {missing[0]: fractions[missing[0]]}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(pool.groups()):
        groups[h].append(i)
    rng = np.random.default_rng(cfg.split_seed)
    chosen: dict[str, list[int]] = {s: [] for s in ("train", *missing)}
    for c, name in enumerate(classes):
        keys = [h for h, members in groups.items() if int(pool.labels[members[0]]) == c]
        keys = [keys[i] for i in rng.permutation(len(keys))]
        n = len(keys)
        counts = {s: max(1, round(n * f)) for s, f in fractions.items()}
        if n - sum(counts.values()) < 1:
            raise DataError(f"class '{name}' has only {n} distinct images or subjects: too few to split into "
                            f"train/{'/'.join(missing)} (each needs at least one)")
        start = 0
        for s in missing:
            chosen[s].extend(i for h in keys[start:start + counts[s]] for i in groups[h])
            start += counts[s]
        chosen["train"].extend(i for h in keys[start:] for i in groups[h])
    out = dict(given)
    for s, idx in chosen.items():
        out[s] = pool.subset(sorted(idx))
    return out


def _fingerprint(classes: list[str], cfg: DataConfig, splits: dict[str, Split]) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, classes, cfg.image_size, cfg.source]).encode())
    for name in SPLITS:
        h.update(name.encode())
        h.update("".join(splits[name].hashes).encode())
        h.update("\0".join(splits[name].subjects or []).encode())
        h.update(splits[name].labels.numpy().tobytes())
    return h.hexdigest()[:24]
