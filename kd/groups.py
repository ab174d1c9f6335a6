"""Subjects: which images belong together (one patient's scans, one object's photos), named by `data.groups`.

Near-duplicates of one subject on both sides of a split flatter every held-out figure, so a subject's images
stay in one split and one fold (kd.data carves the splits by subject, kd.crossval cuts the folds with
scikit-learn's StratifiedGroupKFold), and a subject found in two given splits is leakage, as an image in two
splits is. Without `data.groups` each image is its own subject, and identical images (by content) share one.

    data.groups: column:patient          # a column of the CSV (every split given as a CSV needs it)
    data.groups: pattern:^(P\\d+)_        # a regular expression on the file name: its first group, else its match
"""
from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from typing import Any

from kd.errors import ConfigError, DataError

log = logging.getLogger("kd")
COLUMN, PATTERN = "column:", "pattern:"
SPLITS = ("train", "val", "test")
MAX = 20  # pairs listed


def check_spec(spec: str, source: str) -> None:
    """`data.groups` names a column (of a CSV source) or a valid pattern; refused before anything is read."""
    if not spec:
        return
    if source == "digits":
        raise ConfigError("'data.groups': the digits have no subjects (each scan is its own writer's digit)")
    if spec.startswith(COLUMN):
        if source != "csv":
            raise ConfigError(f"'data.groups' {spec} names a CSV column, but data.source is {source} "
                              "(use pattern:REGEX on the file names)")
        if not spec[len(COLUMN):]:
            raise ConfigError("'data.groups' column: needs a column name (column:patient)")
    elif spec.startswith(PATTERN):
        try:
            re.compile(spec[len(PATTERN):])
        except re.error as e:
            raise ConfigError(f"'data.groups' {spec[len(PATTERN):]} is not a regular expression ({e})") from None
    else:
        raise ConfigError(f"'data.groups' {spec} must be column:NAME (a CSV column) or pattern:REGEX (on the "
                          "file name)")


def column_of(spec: str) -> str | None:
    """The CSV column `data.groups` names, if it names one."""
    return spec[len(COLUMN):] if spec.startswith(COLUMN) else None


def subjects_of(spec: str, split: str, paths: list[str], by_file: dict[str, str]) -> list[str] | None:
    """The subject of each image of one split: from the CSV column (`by_file`, which kd.data read with the
    files) or the file name; None where `data.groups` is not set."""
    if not spec:
        return None
    return [by_file[p] for p in paths] if column_of(spec) else subjects_by_name(spec, split, paths)


def subjects_by_name(spec: str, split: str, paths: list[str]) -> list[str]:
    """The subject of each image of one split from its file name (`pattern:REGEX`)."""
    pattern = re.compile(spec[len(PATTERN):])
    out, unmatched = [], []
    for path in paths:
        found = pattern.search(os.path.basename(path))
        if found is None:
            unmatched.append(path)
            continue
        out.append(found.group(1) if found.groups() else found.group(0))
    if unmatched:
        raise DataError(f"data.groups: the pattern '{pattern.pattern}' finds no subject in {len(unmatched)} of the "
                        f"{len(paths)} file names of data.{split} (first: {unmatched[0]})")
    return out


def check_leakage(splits: dict[str, Any], allow: bool) -> None:
    """The same image (by content) in two splits, or one subject's images in two splits, is an error (a warning
    with `data.allow_leakage`), listed pair by pair. `splits`: kd.data's Split by name (its paths, hashes and
    subjects; not imported here, which kd.data imports)."""
    found = []
    images = _shared({name: (splits[name].hashes, splits[name].paths) for name in SPLITS})
    if images:
        found.append(_listed(f"{len(images)} identical images in two splits",
                             [f"{sa}: {pa}  ==  {sb}: {pb}" for _, (sa, pa), (sb, pb) in images]))
    if all(splits[name].subjects is not None for name in SPLITS):
        shared = _shared({name: (splits[name].subjects or [], splits[name].paths) for name in SPLITS})
        one_each = {(key, sa, sb): (pa, pb) for key, (sa, pa), (sb, pb) in shared}  # a pair per subject
        if one_each:
            found.append(_listed(f"{len({k for k, _, _ in one_each})} subjects (data.groups) with images in two "
                                 "splits", [f"subject {key}: {sa}: {pa}  and  {sb}: {pb}"
                                            for (key, sa, sb), (pa, pb) in one_each.items()]))
    if not found:
        return
    message = "\n".join(found)
    if not allow:
        raise DataError(message + "\nRemove the copies, or set data.allow_leakage: true to go on regardless.")
    log.warning("%s\n(allowed by data.allow_leakage)", message)


def _shared(keys: dict[str, tuple[list[str], list[str]]]) -> list[tuple[str, tuple[str, str], tuple[str, str]]]:
    """(key, (split, path), (split, path)) for every two images of different splits with the same key."""
    where: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, (values, paths) in keys.items():
        for key, path in zip(values, paths, strict=True):
            where[key].append((name, path))
    return [(key, a, b) for key, places in where.items() for n, a in enumerate(places) for b in places[n + 1:]
            if a[0] != b[0]]


def _listed(headline: str, lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - MAX} more" if len(lines) > MAX else ""
    return f"data leakage: {headline}:\n" + "\n".join(f"  {line}" for line in lines[:MAX]) + more
