import os
import shutil
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import kd.data
from kd.data import load_dataset
from kd.errors import DataError
from search.config import load_config
from tests.helpers import make_folder_dataset, write_image


def folder_cfg(tmp_path, root, *sets):
    return load_config(None, ["data.source=folder", f"data.train={root}", f"data.cache_dir={tmp_path / 'cache'}",
                              "data.image_size=16", *sets]).data


def csv_cfg(tmp_path, *sets):
    return load_config(None, ["data.source=csv", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16",
                              *sets]).data


def test_digits_is_an_imbalanced_binary_task_split_stratified():
    data = load_dataset(load_config(None, ["data.cache_dir=/nonexistent-unused"]).data, progress=False)
    assert data.classes == ["other", "digit_8"]
    total = sum(len(data.split(s)) for s in ("train", "val", "test"))
    assert total == 1797
    for s in ("train", "val", "test"):
        counts = data.class_counts(s)
        assert 0.08 < counts[1] / sum(counts) < 0.12
        assert data.split(s).images.shape[1:] == (3, 32, 32) and data.split(s).images.dtype == torch.uint8
    assert set(data.train.hashes).isdisjoint(data.test.hashes)


def test_folder_source_splits_stratified_seeded_and_disjoint(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"B": 30, "M": 10})
    a = load_dataset(folder_cfg(tmp_path, root), progress=False)
    b = load_dataset(folder_cfg(tmp_path, root), progress=False)
    assert a.classes == ["B", "M"]
    assert a.class_counts("val") == [6, 2] and a.class_counts("test") == [6, 2] and a.class_counts("train") == [18, 6]
    assert a.test.paths == b.test.paths and a.fingerprint == b.fingerprint
    paths = [set(a.split(s).paths) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    other_seed = load_dataset(folder_cfg(tmp_path, root, "data.split_seed=1"), progress=False)
    assert other_seed.test.paths != a.test.paths


def test_every_image_mode_becomes_rgb_at_the_right_size(tmp_path):
    root = tmp_path / "ds"
    modes = [("L", "png"), ("RGBA", "png"), ("P", "png"), ("I;16", "png"), ("CMYK", "jpg"), ("1", "bmp"),
             ("RGB", "webp")]
    for i, (mode, ext) in enumerate(modes):
        for cls in ("a", "b"):
            name = f"{mode.replace(';', '')}_{i}.{ext}"
            write_image(root / cls / name, mode, size=(40, 23), seed=i * 2 + (cls == "b"))
    for cls in ("a", "b"):  # enough images per class to carve val and test
        for j in range(3):
            write_image(root / cls / f"extra{j}.png", seed=100 + j + 10 * (cls == "b"))
    data = load_dataset(folder_cfg(tmp_path, root), progress=False)
    total = sum(len(data.split(s)) for s in ("train", "val", "test"))
    assert total == 2 * (len(modes) + 3) and not data.skipped
    paths = [os.path.basename(p) for s in ("train", "val", "test") for p in data.split(s).paths]
    images = torch.cat([data.split(s).images for s in ("train", "val", "test")])
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8
    grey = [i for i, p in enumerate(paths) if p.startswith(("L_", "I16_"))]
    assert len(grey) == 4
    for i in grey:
        assert torch.equal(images[i][0], images[i][1]) and torch.equal(images[i][1], images[i][2])
    sixteen = [i for i, p in enumerate(paths) if p.startswith("I16_")]
    for i in sixteen:  # 16-bit values are scaled to 8 bits (random data: mid-grey), not clipped to white
        assert 100 < images[i].float().mean() < 160



def _encoded(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, fmt)
    return buf.getvalue()


def test_a_16_bit_value_decodes_the_same_in_every_image_whatever_that_images_maximum(tmp_path):
    from kd.images import SIXTEEN_BIT_MODES, decode_bytes
    bright = np.zeros((8, 8), dtype=np.uint16)
    bright[0, 0], bright[0, 1] = 51400, 200  # max 51400
    dim = np.zeros((8, 8), dtype=np.uint16)
    dim[0, 1] = 200                           # max 200: was read as 8-bit, so 200 stayed 200
    for name, data in [("bright", _encoded(bright)), ("dim", _encoded(dim))]:
        assert Image.open(__import__("io").BytesIO(data)).mode in SIXTEEN_BIT_MODES
        out = decode_bytes(data, 8, 10_000)  # 8x8: no resizing, the pixels are the decoded values
        assert out[0, 1].tolist() == [1, 1, 1], name  # round(200 / 257)
        assert out[1, 1].tolist() == [0, 0, 0], name
    assert decode_bytes(_encoded(bright), 8, 10_000)[0, 0].tolist() == [200, 200, 200]  # 51400 / 257

    # 32-bit "I" images inside 0..65535 (a 16-bit PGM opens as "I") follow the same fixed rule
    pgm = _encoded(dim, "PPM")
    assert Image.open(__import__("io").BytesIO(pgm)).mode == "I"
    assert decode_bytes(pgm, 8, 10_000)[0, 1].tolist() == [1, 1, 1]
    # float images have no fixed range: scaled per image, 0 to the brightest pixel (documented in to_rgb)
    flt = np.zeros((8, 8), dtype=np.float32)
    flt[0, 1], flt[0, 2] = 2.0, 4.0
    out = decode_bytes(_encoded(flt, "TIFF", "F"), 8, 10_000)
    assert out[0, 1, 0] == 128 and out[0, 2, 0] == 255 and out[1, 1, 0] == 0

def _bad_files(root):
    (root / "B" / "empty.png").write_bytes(b"")
    (root / "B" / "text.jpg").write_text("this is not a jpeg")
    good = (root / "M" / "M_0.png").read_bytes()
    (root / "M" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_images_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "ds", {"B": 12, "M": 6})
    _bad_files(root)
    data = load_dataset(folder_cfg(tmp_path, root), progress=False)
    assert sorted(os.path.basename(p) for p, _ in data.skipped) == ["empty.png", "text.jpg", "truncated.png"]
    assert "skipped 3 files" in caplog.text and "empty file (0 bytes)" in caplog.text
    assert "not an image" in caplog.text
    assert sum(len(data.split(s)) for s in ("train", "val", "test")) == 18


def test_on_bad_image_error_is_fatal_and_lists_the_files(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"B": 12, "M": 6})
    _bad_files(root)
    with pytest.raises(DataError, match=r"(?s)3 files are not usable images.*empty\.png"):
        load_dataset(folder_cfg(tmp_path, root, "data.on_bad_image=error"), progress=False)


def test_decompression_bomb_limit(tmp_path, caplog):
    root = make_folder_dataset(tmp_path / "ds", {"B": 6, "M": 6})
    write_image(root / "B" / "huge.png", size=(300, 300))
    data = load_dataset(folder_cfg(tmp_path, root, "data.max_image_pixels=10000"), progress=False)
    assert [os.path.basename(p) for p, _ in data.skipped] == ["huge.png"]
    assert "decompression-bomb limit" in data.skipped[0][1]


def test_importing_kd_leaves_the_warning_filters_alone():
    import subprocess
    import sys
    # kd.images' own imports first (torch and scipy, which kd.data brings, set filters of their own at import)
    script = ("import warnings, numpy, PIL.Image, tqdm; before = list(warnings.filters); import kd, kd.images; "
              "assert warnings.filters == before, [f for f in warnings.filters if f not in before]")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_pillows_bomb_warning_is_silenced_while_decoding_only(tmp_path, monkeypatch):
    """Over Pillow's warning size and under its error (twice that): our own limit decides, without Pillow's warning,
    in one decode and in decode_files' thread pool alike; the filters are as they were afterwards."""
    import io
    import warnings

    from kd.images import BadImage, decode_bytes, decode_file, decode_files
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns over 1000 pixels, refuses over 2000
    path = write_image(tmp_path / "big.png", size=(40, 40))  # 1600 pixels
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "PNG")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        assert decode_bytes(buf.getvalue(), 8, 10_000).shape == (8, 8, 3)  # under our limit: decoded
        assert decode_file(str(path), 8, 10_000)[0].shape == (8, 8, 3)
        with pytest.raises(BadImage, match="over the decompression-bomb limit of 400"):
            decode_bytes(buf.getvalue(), 8, 400)
        decoded = decode_files([str(path)] * 4, 8, 400, workers=2, progress=False)  # Pillow's limit stays 1000
        assert all("over the decompression-bomb limit of 400" in e for e in decoded.errors)
        assert warnings.filters == before
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)], seen
    with pytest.warns(Image.DecompressionBombWarning):  # outside a decode, Pillow's own warning is as it was
        Image.open(path)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"B": 6, "M": 6})
    outside = write_image(tmp_path / "secret" / "x.png", seed=99)
    os.symlink(outside, root / "B" / "link.png")
    data = load_dataset(folder_cfg(tmp_path, root), progress=False)
    assert any("link.png" in p and "outside" in why for p, why in data.skipped)
    allowed = load_dataset(folder_cfg(tmp_path, root, "data.allow_external_links=true"), progress=False)
    assert not allowed.skipped


@pytest.mark.parametrize("layout, message", [
    ({"B": 5, "M": 0}, "class folder .*M has no images"),
    ({"B": 5}, "single class"),
    ({}, "has no class folders"),
])
def test_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "ds"
    root.mkdir()
    for cls, n in layout.items():
        (root / cls).mkdir()
        for i in range(n):
            write_image(root / cls / f"{i}.png", seed=i)
    with pytest.raises(DataError, match=message):
        load_dataset(folder_cfg(tmp_path, root), progress=False)


def test_missing_folder_and_too_few_images_to_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(folder_cfg(tmp_path, tmp_path / "nope"), progress=False)
    root = make_folder_dataset(tmp_path / "ds", {"B": 10, "M": 2})
    with pytest.raises(DataError, match="class 'M' has only 2 distinct images"):
        load_dataset(folder_cfg(tmp_path, root), progress=False)


def _csv_split(base, name, rows, header="file,label"):
    d = base / name
    d.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, label in enumerate(rows):
        write_image(d / f"{name}_{i}.png", seed=zlib.crc32(f"{name}/{i}".encode()))
        lines.append(f"{name}_{i}.png,{label}")
    (d / "labels.csv").write_text("\n".join(lines) + "\n")
    return d / "labels.csv"


def test_csv_source_with_given_splits_and_integer_labels(tmp_path):
    tr = _csv_split(tmp_path, "train", [0] * 8 + [1] * 4)
    va = _csv_split(tmp_path, "val", [0, 0, 1])
    te = _csv_split(tmp_path, "test", [0, 0, 0, 1])
    cfg = csv_cfg(tmp_path, f"data.train={tr}", f"data.val={va}", f"data.test={te}", "data.classes=[benign, malignant]")
    data = load_dataset(cfg, progress=False)
    assert data.classes == ["benign", "malignant"]
    assert data.class_counts("train") == [8, 4] and data.class_counts("val") == [2, 1]
    assert data.class_counts("test") == [3, 1]
    no_names = load_dataset(csv_cfg(tmp_path, f"data.train={tr}", f"data.val={va}", f"data.test={te}"), progress=False)
    assert no_names.classes == ["0", "1"]


def test_csv_names_columns_and_carved_test(tmp_path):
    tr = _csv_split(tmp_path, "train", ["cat"] * 9 + ["dog"] * 6, header="image,kind")
    cfg = csv_cfg(tmp_path, f"data.train={tr}", "data.file_column=image", "data.label_column=kind")
    data = load_dataset(cfg, progress=False)
    assert data.classes == ["cat", "dog"] and all(len(data.split(s)) for s in ("train", "val", "test"))


@pytest.mark.parametrize("mutate, message", [
    (lambda lines: lines + ["ghost.png,0"], r"line 14: image 'ghost.png' not found"),
    (lambda lines: ["name,kind,extra"] + [ln + ",x" for ln in lines[1:]],
     r"no column 'label' \(data.label_column\); the columns are: name, kind, extra"),
    (lambda lines: ["id,label"] + [f"{i},0" for i in range(len(lines) - 1)],
     r"no column 'file' \(data.file_column\); the columns are: id, label"),
    (lambda lines: lines + ["../outside.png,1"], r"points outside the image folder"),
    (lambda lines: lines + [lines[1].split(",")[0] + ",1"], r"is labelled '0' on line 2 and '1' on line 14"),
    (lambda lines: lines + ["train_1.png,"], r"line 14: empty label"),
    (lambda lines: lines[:1], r"has a header but no rows"),
])
def test_csv_errors_name_the_file_and_line(tmp_path, mutate, message):
    tr = _csv_split(tmp_path, "train", [0] * 8 + [1] * 4)
    write_image(tmp_path / "outside.png")
    lines = tr.read_text().splitlines()
    tr.write_text("\n".join(mutate(lines)) + "\n")
    with pytest.raises(DataError, match=message):
        load_dataset(csv_cfg(tmp_path, f"data.train={tr}"), progress=False)


def test_csv_unknown_label_and_duplicate_rows(tmp_path, caplog):
    tr = _csv_split(tmp_path, "train", ["a"] * 8 + ["b"] * 4)
    with pytest.raises(DataError, match=r"label 'b' of .* is not one of data\.classes"):
        load_dataset(csv_cfg(tmp_path, f"data.train={tr}", "data.classes=[a, c]"), progress=False)
    lines = tr.read_text().splitlines()
    tr.write_text("\n".join(lines + [lines[1], lines[2]]) + "\n")
    data = load_dataset(csv_cfg(tmp_path, f"data.train={tr}"), progress=False)
    assert "2 duplicate rows ignored" in caplog.text
    assert sum(len(data.split(s)) for s in ("train", "val", "test")) == 12


def test_leakage_between_given_splits_is_reported_pair_by_pair(tmp_path, caplog):
    train = make_folder_dataset(tmp_path / "train", {"B": 10, "M": 5})
    test = make_folder_dataset(tmp_path / "test", {"B": 3, "M": 2}, start_seed=1000)
    shutil.copy(train / "B" / "B_3.png", test / "B" / "copy.png")
    sets = [f"data.test={test}"]
    leak = r"data leakage: 1 identical images in two splits:\n.*B_3\.png  ==  test: .*copy\.png"
    with pytest.raises(DataError, match=leak):
        load_dataset(folder_cfg(tmp_path, train, *sets), progress=False)
    data = load_dataset(folder_cfg(tmp_path, train, *sets, "data.allow_leakage=true"), progress=False)
    assert "allowed by data.allow_leakage" in caplog.text and len(data.test) == 6


def test_duplicates_inside_one_pool_stay_in_one_split(tmp_path):
    from kd.crossval import make_folds, pooled
    root = make_folder_dataset(tmp_path / "ds", {"B": 20, "M": 8})
    for i in range(5):
        shutil.copy(root / "B" / f"B_{i}.png", root / "B" / f"dup_{i}.png")
    data = load_dataset(folder_cfg(tmp_path, root), progress=False)  # no leakage error: copies are kept together
    split_of = {os.path.basename(p): s for s in ("train", "val", "test") for p in data.split(s).paths}
    assert len(split_of) == 33  # every copy kept, each in one split
    assert {f"dup_{i}.png": split_of[f"dup_{i}.png"] for i in range(5)} == \
        {f"dup_{i}.png": split_of[f"B_{i}.png"] for i in range(5)}  # each copy where its original is
    # and cross-validation's folds of train + val keep them together too
    folds = make_folds(data, 3, seed=0)
    fold_of = {os.path.basename(p): int(f) for p, f in zip(pooled(data).paths, folds.ids, strict=True)}
    pairs = [(f"dup_{i}.png", f"B_{i}.png") for i in range(5) if f"B_{i}.png" in fold_of]
    assert len(pairs) >= 3, split_of  # most pairs are in train + val (the seed puts them there)
    assert all(fold_of[dup] == fold_of[orig] for dup, orig in pairs), \
        [(dup, fold_of[dup], orig, fold_of[orig]) for dup, orig in pairs]


def test_decoded_images_are_cached_and_changes_invalidate(tmp_path, monkeypatch, caplog):
    root = make_folder_dataset(tmp_path / "ds", {"B": 8, "M": 6})
    first = load_dataset(folder_cfg(tmp_path, root), progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")
    real = kd.data.decode_files
    monkeypatch.setattr(kd.data, "decode_files", no_decoding)
    second = load_dataset(folder_cfg(tmp_path, root), progress=False)
    assert torch.equal(first.train.images, second.train.images)

    monkeypatch.setattr(kd.data, "decode_files", real)
    write_image(root / "B" / "B_0.png", seed=555)  # same name, new content and mtime
    third = load_dataset(folder_cfg(tmp_path, root), progress=False)
    assert third.fingerprint != first.fingerprint

    cache_files = list((tmp_path / "cache" / "data").glob("*.safetensors"))
    for f in cache_files:  # corrupt every cache entry in the middle
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    again = load_dataset(folder_cfg(tmp_path, root), progress=False)
    assert "data cache rebuilt" in caplog.text and torch.equal(again.train.images, third.train.images)


def test_images_are_decoded_at_the_configured_size(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"B": 6, "M": 6})
    data = load_dataset(folder_cfg(tmp_path, root, "data.image_size=20"), progress=False)
    assert data.train.images.shape[1:] == (3, 20, 20)
    png = np.asarray(Image.open(root / "B" / "B_0.png").convert("RGB").resize((20, 20), Image.BILINEAR))
    i = [os.path.basename(p) for p in data.train.paths + data.val.paths + data.test.paths].index("B_0.png")
    all_images = torch.cat([data.train.images, data.val.images, data.test.images])
    assert np.array_equal(all_images[i].permute(1, 2, 0).numpy(), png)


def test_csv_columns_are_found_when_the_defaults_are_absent(tmp_path, caplog):
    tr = _csv_split(tmp_path, "train", ["a"] * 8 + ["b"] * 4, header="filename,class")
    data = load_dataset(csv_cfg(tmp_path, f"data.train={tr}"), progress=False)
    assert data.classes == ["a", "b"]
    assert "using 'filename', which holds image file names" in caplog.text
    assert "using 'class' as the label" in caplog.text


def test_split_folders_given_as_one_pool_are_explained(tmp_path):
    for split in ("train", "val", "test"):
        make_folder_dataset(tmp_path / "ds" / split, {"B": 3, "M": 3})
    with pytest.raises(DataError, match=r"holds split folders \(test, train, val\), not class folders; give each "
                                        r"split: data.test=.*data.train=.*data.val="):
        load_dataset(folder_cfg(tmp_path, tmp_path / "ds"), progress=False)
