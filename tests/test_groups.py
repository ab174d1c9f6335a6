"""Subjects (data.groups): a subject's images stay in one split and one fold; a subject in two splits is leakage."""
import csv
import logging

import pytest

from kd.crossval import make_folds
from kd.data import load_dataset
from kd.errors import ConfigError, DataError
from search.config import load_config
from tests.helpers import write_image

# 24 patients with 5 scans each; patients 0-5 have the rare condition
PATIENTS, SCANS, RARE = 24, 5, 6


def scans(root, layout="csv"):
    """Patient P07's scans are P07_0.png ... P07_4.png; the CSV also names the patient in a column."""
    rows, seed = [], 0
    for p in range(PATIENTS):
        label = "rare" if p < RARE else "common"
        for s in range(SCANS):
            name = f"P{p:02d}_{s}.png"
            folder = root / "images" if layout == "csv" else root / "images" / label
            write_image(folder / name, seed=seed)
            seed += 1
            rows.append({"file": name, "label": label, "patient": f"patient-{p:02d}"})
    if layout == "csv":
        with open(root / "scans.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "label", "patient"])
            writer.writeheader()
            writer.writerows(rows)
        return root / "scans.csv"
    return root / "images"


def data_config(tmp_path, source, train, groups, *extra):
    sets = [f"data.source={source}", f"data.train={train}", f"data.groups={groups}", "data.image_size=16",
            f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25", "data.test_fraction=0.25", *extra]
    if source == "csv":
        sets.append(f"data.train.images={tmp_path / 'images'}")
    return load_config(None, sets).data


def subjects_by_split(data):
    return {name: set(data.split(name).subjects) for name in ("train", "val", "test")}


@pytest.mark.parametrize("source,groups", [("csv", "column:patient"), ("folder", r"pattern:^(P\d+)_")])
def test_a_subjects_images_stay_in_one_split_and_one_fold(tmp_path, source, groups):
    data = load_dataset(data_config(tmp_path, source, scans(tmp_path, source), groups), progress=False)
    by_split = subjects_by_split(data)
    assert sum(len(s) for s in by_split.values()) == PATIENTS  # every patient in exactly one split
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert len(data.train) % SCANS == 0 and len(data.test) % SCANS == 0
    folds = make_folds(data, 3, seed=0)
    pool_subjects = data.train.subjects + data.val.subjects
    fold_of = {}
    for subject, fold in zip(pool_subjects, folds.ids, strict=True):
        assert fold_of.setdefault(subject, fold) == fold  # all of a patient's scans in one fold
    assert set(folds.ids) == {0, 1, 2}
    for dataset in folds.datasets:  # and every fold holds the rare class
        assert 1 in dataset.val.labels.tolist()


def test_without_groups_the_scans_of_one_patient_are_split_apart(tmp_path):
    """What data.groups prevents: with each image its own subject, patients straddle the splits."""
    cfg = data_config(tmp_path, "csv", scans(tmp_path), "")
    data = load_dataset(cfg, progress=False)
    assert data.train.subjects is None
    patient = {p.split("/")[-1][:3] for p in data.train.paths} & {p.split("/")[-1][:3] for p in data.test.paths}
    assert patient  # some patient has scans in train and in test


def test_a_subject_in_two_given_splits_is_leakage_named(tmp_path, caplog):
    with open(scans(tmp_path)) as f:
        rows = list(csv.DictReader(f))
    # test: every scan of patients 1 and 11, and the last scan of patients 0 and 10, whose other scans are in train
    in_test = [r for r in rows if r["file"][:3] in ("P01", "P11") or r["file"] in ("P00_4.png", "P10_4.png")]
    test_rows, train_rows = in_test, [r for r in rows if r not in in_test]
    for name, part in (("train.csv", train_rows), ("test.csv", test_rows)):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "label", "patient"])
            writer.writeheader()
            writer.writerows(part)
    extra = [f"data.test={tmp_path / 'test.csv'}", f"data.test.images={tmp_path / 'images'}"]
    cfg = data_config(tmp_path, "csv", tmp_path / "train.csv", "column:patient", *extra)
    with pytest.raises(DataError) as e:
        load_dataset(cfg, progress=False)
    message = str(e.value)
    assert "2 subjects (data.groups) with images in two splits" in message
    assert "subject patient-00" in message and "subject patient-10" in message
    assert "data.allow_leakage" in message
    allowed = data_config(tmp_path, "csv", tmp_path / "train.csv", "column:patient", *extra, "data.allow_leakage=true")
    with caplog.at_level(logging.WARNING, logger="kd"):
        load_dataset(allowed, progress=False)
    assert "subjects (data.groups) with images in two splits" in caplog.text


@pytest.mark.parametrize("groups,source,words", [
    ("patient", "csv", "must be column:NAME (a CSV column) or pattern:REGEX"),
    ("pattern:P(", "folder", "is not a regular expression"),
    ("column:patient", "folder", "names a CSV column, but data.source is folder"),
    ("pattern:x", "digits", "the digits have no subjects"),
])
def test_a_bad_groups_setting_is_refused_before_anything_is_read(tmp_path, groups, source, words):
    with pytest.raises(ConfigError, match=r"data\.groups") as e:
        data_config(tmp_path, source, tmp_path / "nowhere", groups)
    assert words in str(e.value)


def test_a_missing_column_or_an_unmatched_name_names_the_file(tmp_path):
    train = scans(tmp_path)
    with pytest.raises(DataError, match=r"data.groups: .*scans.csv has no column 'subject' \(columns: file, label, "
                                        r"patient\)"):
        load_dataset(data_config(tmp_path, "csv", train, "column:subject"), progress=False)
    write_image(tmp_path / "images" / "scan-without-patient.png", seed=999)
    with open(train, "a") as f:
        f.write("scan-without-patient.png,common,patient-99\n")
    with pytest.raises(DataError, match="finds no subject in 1 of the 121 file names of data.train "
                                        r"\(first: .*scan-without-patient.png\)"):
        load_dataset(data_config(tmp_path, "csv", train, r"pattern:^(P\d+)_"), progress=False)


def test_the_halves_that_judge_and_cross_fit_keep_a_subject_whole(tmp_path):
    """After the folds: the holdout's cross-fitting halves, the re-ranking's judging halves and the test interval
    all take a patient's scans as one."""
    from kd.schemes import CrossValidated
    from kd.train import HeldOut
    from search.halves import judging_halves
    cfg = load_config(None, ["data.source=csv", f"data.train={scans(tmp_path)}", "data.groups=column:patient",
                             "data.image_size=16", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25",
                             "data.test_fraction=0.25", f"data.train.images={tmp_path / 'images'}", "search.folds=3"])
    data = load_dataset(cfg.data, progress=False)

    def whole(subjects, parts):
        seen = {}
        return all(seen.setdefault(s, p) == p for s, p in zip(subjects, parts, strict=True)) and len(set(parts)) == 2

    validation = HeldOut.validation(data, tune_threshold=True)
    assert validation.groups is not None and whole(data.val.subjects, validation.parts)
    assert whole(data.val.subjects, judging_halves(validation))
    held = CrossValidated.split(cfg, data).held
    assert whole(data.train.subjects + data.val.subjects, judging_halves(held))
    half = held.subset(judging_halves(held) == 0)
    assert len(half.groups) == len(half.labels)
