"""ImageFolder's rule for empty class folders, and data messages that name the command-line option to set."""
from __future__ import annotations

import warnings

import pytest
from PIL import Image

from vitlinearizer.data import DataConfig, DataWarning, build_dataset, check_data_source, dataset_info


def _images(folder, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(folder / f"{i}.png")


@pytest.fixture
def root(tmp_path):
    """train/{cats, dogs}, val/{cats, dogs}: two tiny images each."""
    for split in ("train", "val"):
        for c in ("cats", "dogs"):
            _images(tmp_path / split / c)
    return tmp_path


def _cfg(root, **kw):
    return DataConfig(name="imagefolder", root=str(root), img_size=8, holdout_fraction=0, **kw)


@pytest.mark.parametrize("content", [None, "README.txt"])
def test_an_empty_folder_of_no_class_in_val_is_ignored_with_a_warning(root, content):
    (root / "val" / "zebras").mkdir()
    if content:  # files that are not images do not make it a class either
        (root / "val" / "zebras" / content).write_text("to do")
    check_data_source(_cfg(root))  # what train-teacher and distill run before training: no error
    with pytest.warns(DataWarning, match=r"ignoring folder\(s\) \['zebras'\]: they hold no images .*delete them"):
        test = build_dataset(_cfg(root), "test")
    assert test.classes == ["cats", "dogs"] and len(test) == 4


def test_a_folder_of_no_class_with_images_in_val_is_still_an_error(root):
    _images(root / "val" / "zebras", n=1)
    for check in (lambda: check_data_source(_cfg(root)), lambda: build_dataset(_cfg(root), "test")):
        with pytest.raises(ValueError, match=r"class folder\(s\) the model was not trained on: \['zebras'\]"):
            check()


def test_an_empty_class_folder_in_train_keeps_its_class_and_says_what_to_do(root):
    (root / "train" / "zebras").mkdir()
    with pytest.warns(DataWarning) as record:
        train = build_dataset(_cfg(root), "train")
    message = "\n".join(str(w.message) for w in record)
    assert "['zebras'] hold no usable images" in message
    assert "never sees an example of" in message and "delete the folder(s), or add images" in message
    # Kept deliberately: the class list (and the model's head) comes from the folders before any image is read.
    assert train.classes == ["cats", "dogs", "zebras"] == dataset_info(_cfg(root))["class_names"]
    assert train.class_counts().tolist() == [2, 2, 0]
    # The same folder, empty in val too, is a known class there: not scored, no error, no advice to delete it.
    (root / "val" / "zebras").mkdir()
    with pytest.warns(DataWarning, match=r"\['zebras'\] hold no usable images; those classes are not scored"):
        assert build_dataset(_cfg(root), "test").class_counts().tolist() == [2, 2, 0]


def test_unreadable_file_messages_name_the_config_key_and_the_option(root):
    (root / "train" / "cats" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(DataWarning, match=r"set data\.strict=true \(--data\.strict true\) to make this an error"):
        build_dataset(_cfg(root), "train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(ValueError, match=r"broken\.png(.|\n)*data\.strict=false \(--data\.strict false\)"):
            build_dataset(_cfg(root, strict=True), "train")
