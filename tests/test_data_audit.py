"""Regression tests from an audit of ImageFolder data loading with a user's own photos."""
from __future__ import annotations

import numpy as np
from PIL import Image

from vitlinearizer.data import DataConfig, ImageFolderDataset, build_dataset, load_rgb

EXIF_ORIENTATION = 0x0112


def _sideways_photo(path):
    """A 40x20 (W x H) JPEG whose EXIF says "rotate 90 degrees clockwise to view", as phones write portrait
    photos; the stored left half is red, so upright the top half is red."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[EXIF_ORIENTATION] = 6
    im.save(path, quality=95, exif=exif)


def test_exif_rotated_photos_load_upright(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "portrait").mkdir(parents=True)
        (tmp_path / split / "other").mkdir(parents=True)
        _sideways_photo(tmp_path / split / "portrait" / "phone.jpg")
        Image.new("RGB", (20, 40), (0, 255, 0)).save(tmp_path / split / "other" / "g.png")
    im = load_rgb(tmp_path / "train" / "portrait" / "phone.jpg")
    assert im.size == (20, 40)  # (W, H) as a viewer shows it, not as stored
    top, bottom = np.asarray(im)[5, 10], np.asarray(im)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    ds = ImageFolderDataset(tmp_path, "train")
    x, _ = ds[[p for p, _ in ds.samples].index(str(tmp_path / "train" / "portrait" / "phone.jpg"))]
    assert x.shape == (3, 40, 20)
    # Through the evaluation transform (a portrait-shaped input keeps the whole photo): red on top.
    test = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), img_size=(40, 20), mean=0, std=1), "test")
    x, label = test[[p for p, _ in test.samples].index(str(tmp_path / "val" / "portrait" / "phone.jpg"))]
    assert test.classes[label] == "portrait"
    assert x[0, :15].mean() > 0.8 and x[2, :15].mean() < 0.2 and x[2, 25:].mean() > 0.8


def test_file_names_that_are_not_utf8_split_and_load(tmp_path):
    import os
    import warnings

    # Latin-1 names (old archives): Linux hands them to Python with surrogate escapes.
    root = os.fsencode(tmp_path)
    for split in (b"train", b"val"):
        for label in (b"a", b"b"):
            os.makedirs(root + b"/" + split + b"/" + label)
            for i in range(4):
                name = os.fsdecode(root + b"/" + split + b"/" + label + b"/caf\xe9%d.png" % i)
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(name)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), img_size=8, holdout_fraction=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, holdout = build_dataset(cfg, "train"), build_dataset(cfg, "holdout")
    assert len(train) + len(holdout) == 8 and len(holdout) == 2
    assert train[0][0].shape == (3, 8, 8)
    assert train.listing_fingerprint() == build_dataset(cfg, "train").listing_fingerprint()


def test_a_class_folder_spelt_in_other_code_points_is_named_as_such(tmp_path):
    import unicodedata

    import pytest

    for split, form in (("train", "NFC"), ("val", "NFD")):
        for name in ("cat", unicodedata.normalize(form, "dög")):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "a.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), img_size=8)
    with pytest.raises(ValueError, match="in other Unicode code points .*rename one of the two folders"):
        build_dataset(cfg, "test")
