"""Tests for vitlinearizer.data: Fashion-MNIST idx files, robust ImageFolder trees, synthetic data, splits."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vitlinearizer.data import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    SPLITS,
    DataConfig,
    DataWarning,
    FashionMNIST,
    ImageFolderDataset,
    SyntheticDataset,
    balanced_subset,
    build_dataset,
    build_transform,
    check_data_source,
    dataset_info,
    load_rgb,
    read_idx,
    show_data_warnings_plainly,
    stratified_split,
)

FMNIST_PRESENT = os.path.isfile(os.path.join(DEFAULT_FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not FMNIST_PRESENT, reason="Debian package dataset-fashion-mnist not installed")


# ------------------------------------------------------------------------------------------------ Fashion-MNIST
@needs_fmnist
@pytest.mark.parametrize("img_size", [32, (24, 40), 28])
def test_fmnist_shapes_and_labels(img_size):
    cfg = DataConfig(name="fashion_mnist", img_size=img_size, max_eval_samples=64)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    for split in ("train", "holdout", "test"):
        ds = build_dataset(cfg, split)
        assert ds.num_classes == 10 and ds.classes == FASHION_MNIST_CLASSES
        x, y = next(iter(DataLoader(ds, batch_size=16, shuffle=True)))
        assert x.shape == (16, 3, h, w) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
        x0, y0 = ds[-1]
        assert x0.shape == (3, h, w) and isinstance(y0, int)
        assert torch.equal(x0[0], x0[1]) or split == "train"  # grey replicated (train may colour-augment)


@needs_fmnist
def test_fmnist_split_sizes_disjoint_deterministic():
    cfg = DataConfig(name="fashion_mnist", img_size=28, holdout_fraction=0.1, seed=3)
    train, hold, test = (build_dataset(cfg, s) for s in ("train", "holdout", "test"))
    assert (len(train), len(hold), len(test)) == (54000, 6000, 10000)
    assert not set(train.keys.tolist()) & set(hold.keys.tolist())
    assert len(set(train.keys.tolist()) | set(hold.keys.tolist())) == 60000
    assert np.array_equal(hold.class_counts(), np.full(10, 600))  # stratified
    assert np.array_equal(build_dataset(cfg, "holdout").keys, hold.keys)
    other = build_dataset(DataConfig(name="fashion_mnist", img_size=28, seed=4), "holdout")
    assert not np.array_equal(other.keys, hold.keys)
    with pytest.raises(ValueError, match="holdout_fraction"):
        build_dataset(DataConfig(name="fashion_mnist", holdout_fraction=0.0), "holdout")
    assert len(build_dataset(DataConfig(name="fashion_mnist", holdout_fraction=0.0), "train")) == 60000


@needs_fmnist
def test_fmnist_subsets_balanced_and_inside_their_split():
    cfg = DataConfig(name="fashion_mnist", img_size=28, max_train_samples=100, max_eval_samples=55, seed=1)
    train, hold, test = (build_dataset(cfg, s) for s in ("train", "holdout", "test"))
    assert np.array_equal(train.class_counts(), np.full(10, 10))
    for ds in (hold, test):
        assert len(ds) == 55 and np.ptp(ds.class_counts()) <= 1
    full_hold = build_dataset(DataConfig(name="fashion_mnist", seed=1), "holdout")
    assert set(hold.keys.tolist()) <= set(full_hold.keys.tolist())
    assert not set(train.keys.tolist()) & set(full_hold.keys.tolist())
    assert np.array_equal(build_dataset(cfg, "train").keys, train.keys)


@needs_fmnist
def test_fmnist_normalisation_is_roughly_standard():
    ds = build_dataset(DataConfig(name="fashion_mnist", img_size=28, max_eval_samples=500), "test")
    x, _ = next(iter(DataLoader(ds, batch_size=500)))
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_fmnist_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="sudo apt-get install dataset-fashion-mnist") as err:
        FashionMNIST(str(tmp_path), "train")
    assert "data root" in str(err.value)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "nowhere")), "test")


def _write_idx(path, arr, magic=None):
    header = struct.pack(">I", magic if magic is not None else 0x0800 | arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_corruption(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "ok.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "ok.gz", 3), arr)
    _write_idx(tmp_path / "magic.gz", arr, magic=0x0D0803)
    with pytest.raises(ValueError, match="magic.gz.*magic"):
        read_idx(tmp_path / "magic.gz", 3)
    with pytest.raises(ValueError, match="magic"):  # labels file passed where images are expected
        read_idx(tmp_path / "ok.gz", 1)
    good = (tmp_path / "ok.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz", 3)
    (tmp_path / "notgz.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(ValueError, match="notgz.gz"):
        read_idx(tmp_path / "notgz.gz", 3)


def test_fmnist_from_custom_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), img_size=16, holdout_fraction=0.25)
    assert [len(build_dataset(cfg, s)) for s in ("train", "holdout", "test")] == [30, 10, 20]


# ---------------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_learnable():
    cfg = DataConfig(name="synthetic", img_size=(16, 24), num_classes=4, synthetic_length=200, seed=7,
                     augment="none")
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    assert len(a) == 180 and a.num_classes == 4
    x, y = a[5]
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32 and 0 <= y < 4
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == b[5][1]
    other = build_dataset(DataConfig(name="synthetic", img_size=(16, 24), num_classes=4, synthetic_length=200,
                                     seed=8, augment="none"), "train")
    assert not torch.equal(other[5][0], x)
    test = build_dataset(cfg, "test")
    assert not torch.equal(test[0][0], SyntheticDataset(4, 200, (16, 24), 7, stream=0,
                                                        transform=build_transform(cfg, False))[0][0])
    # Nearest class mean on raw pixels must beat chance by far: the classes carry learnable structure.
    xs, ys = map(torch.stack, zip(*[(a[i][0].flatten(), torch.tensor(a[i][1])) for i in range(len(a))]))
    means = torch.stack([xs[ys == c].mean(0) for c in range(4)])
    xt, yt = map(torch.stack, zip(*[(test[i][0].flatten(), torch.tensor(test[i][1])) for i in range(100)]))
    acc = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert acc > 0.8


@pytest.mark.parametrize("augment,aa", [("simple", None), ("timm", "rand-m9-mstd0.5-inc1"), ("none", None)])
def test_train_transforms_shapes(augment, aa):
    cfg = DataConfig(name="synthetic", img_size=(20, 28), augment=augment, auto_augment=aa, re_prob=0.25,
                     synthetic_length=20)
    ds = build_dataset(cfg, "train")
    for i in range(3):
        x, y = ds[i]
        assert x.shape == (3, 20, 28) and torch.isfinite(x).all()


# --------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,field", [
    (dict(name="mnist"), "data.name"),
    (dict(img_size=-3), "data.img_size"),
    (dict(img_size=(32, 0)), "data.img_size"),
    (dict(holdout_fraction=1.0), "data.holdout_fraction"),
    (dict(holdout_fraction=-0.1), "data.holdout_fraction"),
    (dict(max_train_samples=-5), "data.max_train_samples"),
    (dict(max_eval_samples=0), "data.max_eval_samples"),
    (dict(augment="heavy"), "data.augment"),
    (dict(verify="quick"), "data.verify"),
    (dict(std=(0.1, 0.0, 0.1)), "data.std"),
    (dict(mean=(0.1, 0.2)), "data.mean"),
    (dict(name="synthetic", num_classes=1), "data.num_classes"),
    (dict(name="imagefolder"), "pass data.root pointing at a folder with train/ and val/"),
])
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("/", "/")):
        DataConfig(**kwargs)


def test_config_normalises_and_rejects_unknown_keys():
    cfg = DataConfig.from_dict({"name": "synthetic", "img_size": [24, 32], "mean": [0.5], "std": [0.25]})
    assert cfg.img_size == (24, 32) and cfg.mean == (0.5,) * 3 and cfg.std == (0.25,) * 3
    with pytest.raises(ValueError, match="img_sz"):
        DataConfig.from_dict({"img_sz": 32})
    cfg.holdout_fraction = 2.0  # mutated after construction: build_dataset re-validates
    with pytest.raises(ValueError, match="holdout_fraction"):
        build_dataset(cfg, "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(name="synthetic"), "val")


def test_dataset_info():
    info = dataset_info(DataConfig(name="fashion_mnist"))
    assert info["num_classes"] == 10 and info["class_names"][9] == "Ankle boot"
    assert info["mean"] == pytest.approx((0.286,) * 3, abs=1e-3) and len(info["std"]) == 3
    info = dataset_info(DataConfig(name="synthetic", num_classes=5, mean=[0.5], std=[0.5]))
    assert info["num_classes"] == 5 and info["mean"] == (0.5, 0.5, 0.5)


def test_split_helpers_stratify_and_balance():
    targets = np.repeat([0, 1, 2], [50, 30, 20])
    keep, hold = stratified_split(targets, 0.1, seed=0)
    assert np.bincount(targets[hold]).tolist() == [5, 3, 2]
    assert len(keep) + len(hold) == 100 and not set(keep) & set(hold)
    assert np.array_equal(stratified_split(targets, 0.1, seed=0)[1], hold)
    assert np.bincount(targets[balanced_subset(targets, 30, 0)]).tolist() == [10, 10, 10]
    assert np.bincount(targets[balanced_subset(targets, 70, 0)]).tolist() == [25, 25, 20]


# ------------------------------------------------------------------------------------------------- ImageFolder
def _noise(rng, size=(20, 20)):
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture
def tree(tmp_path):
    """train/{a_mixed (every mode + bad files), b_plain, c_empty}, val/{a_mixed, b_plain}."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    mixed, plain, empty = (root / "train" / c for c in ("a_mixed", "b_plain", "c_empty"))
    for d in (mixed, plain, empty, root / "val" / "a_mixed", root / "val" / "b_plain"):
        d.mkdir(parents=True)
    _noise(rng).save(mixed / "rgb.jpg")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(mixed / "cmyk.jpg")
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> composited to white
    rgba.save(mixed / "rgba.png")
    g16 = np.zeros((20, 20), np.uint16)
    g16[:, :10], g16[:, 10:] = 65535, 32896  # > 255: clipping would make both halves white
    Image.fromarray(g16).save(mixed / "gray16.png")
    Image.fromarray(g16.astype(np.int32)).save(mixed / "gray32.tif")  # mode "I"
    Image.new("L", (20, 20), 77).save(mixed / "gray.png")
    _noise(rng).convert("P").save(mixed / "palette.png")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 0] + [0, 255, 0] * 255)
    pal.putpixel((5, 5), 1)
    pal.save(mixed / "palette_transparent.gif", transparency=0)
    _noise(rng, (64, 64)).save(mixed / "big.jpg", quality=95)
    data = (mixed / "big.jpg").read_bytes()
    (mixed / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (mixed / "zero.png").write_bytes(b"")
    (mixed / "fake.png").write_bytes(b"this is not a png")
    (mixed / "notes.txt").write_text("not an image")
    (mixed / "README").write_text("not an image either")
    for i in range(6):
        _noise(rng).save(plain / f"{i}.png")
    (empty / "README.md").write_text("nothing here yet")
    for c in ("a_mixed", "b_plain"):
        for i in range(3):
            _noise(rng).save(root / "val" / c / f"{i}.bmp")
    bad = {str(mixed / n) for n in ("truncated.jpg", "zero.png", "fake.png")}
    return root, bad


def _build_quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return ImageFolderDataset(*args, **kwargs)


def test_imagefolder_scan_skips_and_reports(tree):
    root, bad = tree
    with pytest.warns(DataWarning) as record:
        ds = ImageFolderDataset(root, "train")
    messages = "\n".join(str(w.message) for w in record)
    assert "3 unreadable file(s)" in messages and all(p in messages for p in bad)
    assert "c_empty" in messages  # empty class warned about
    assert {p for p, _ in ds.skipped} == bad and all(reason for _, reason in ds.skipped)
    assert ds.classes == ["a_mixed", "b_plain", "c_empty"] and ds.num_classes == 3
    assert ds.class_counts().tolist() == [9, 6, 0]  # empty class keeps its index
    assert ds.report["ignored"] == 3 and ds.report["skipped"] == 3 and ds.report["valid"] == 15
    assert ds.report["empty_classes"] == ["c_empty"]
    assert not any(p.endswith((".txt", "README")) for p, _ in ds.samples)


def test_imagefolder_strict_raises_naming_files(tree):
    root, bad = tree
    with pytest.raises(ValueError, match="strict") as err:
        _build_quiet(root, "train", strict=True)
    assert all(p in str(err.value) for p in bad)


def test_imagefolder_mode_conversion(tree):
    root, _ = tree
    ds = _build_quiet(root, "train")
    by_name = {os.path.basename(p): i for i, (p, label) in enumerate(ds.samples) if label == 0}
    assert len(by_name) == 9
    for name, i in by_name.items():
        x, y = ds[i]
        assert x.shape[0] == 3 and x.dtype == torch.float32 and y == 0, name
    px = lambda name, yx: (ds[by_name[name]][0][:, yx[0], yx[1]] * 255).round().tolist()  # noqa: E731
    for name in ("gray16.png", "gray32.tif"):
        assert px(name, (0, 0)) == [255] * 3 and px(name, (0, 15)) == [128] * 3, name  # scaled, not clipped
    assert Image.open(ds.samples[by_name["gray16.png"]][0]).mode == "I;16"
    assert px("rgba.png", (0, 0)) == [255] * 3 and px("rgba.png", (5, 5)) == [255, 0, 0]
    assert px("palette_transparent.gif", (0, 0)) == [255] * 3 and px("palette_transparent.gif", (5, 5)) == [0, 255, 0]
    assert px("gray.png", (3, 3)) == [77] * 3
    r, g, b = px("cmyk.jpg", (10, 10))
    assert r > 200 and g < 60 and b < 60
    assert load_rgb(ds.samples[by_name["palette.png"]][0]).mode == "RGB"


def test_imagefolder_val_classes(tree, tmp_path):
    root, _ = tree
    with pytest.warns(DataWarning, match="c_empty"):  # val lacking a train class is fine
        val = ImageFolderDataset(root, "val", class_names=["a_mixed", "b_plain", "c_empty"])
    assert val.num_classes == 3 and val.class_counts().tolist() == [3, 3, 0]
    (root / "val" / "zebra").mkdir()
    _noise(np.random.default_rng(1)).save(root / "val" / "zebra" / "z.png")
    with pytest.raises(ValueError, match="zebra"):
        build_dataset(DataConfig(name="imagefolder", root=str(root), img_size=16), "test")
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "missing")), "train")
    all_bad = tmp_path / "allbad" / "train" / "x"
    all_bad.mkdir(parents=True)
    (all_bad / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="no decodable images"):
        _build_quiet(tmp_path / "allbad", "train")


def test_imagefolder_getitem_replaces_bad_files_deterministically(tree):
    root, bad = tree
    ds = _build_quiet(root, "train", verify="header")  # headers of the truncated JPEG look fine
    assert {p for p, _ in ds.skipped} == bad - {str(root / "train" / "a_mixed" / "truncated.jpg")}
    i = [p for p, _ in ds.samples].index(str(root / "train" / "a_mixed" / "truncated.jpg"))
    with pytest.warns(DataWarning, match="truncated.jpg"):
        x, y = ds[i]
    assert torch.equal(x, ds[i + 1][0]) and y == ds[i + 1][1]  # replaced by the next sample
    assert any(p.endswith("truncated.jpg") for p, _ in ds.skipped)


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_leaves_out_a_file_that_fails_to_load_instead_of_scoring_a_replacement(tree, workers):
    """Training replaces a file that fails at load time by the next sample; evaluation must not, or that sample
    is scored twice and the failed file counted in n."""
    from vitlinearizer.engine import evaluate_classifier

    root, _ = tree
    ds = _build_quiet(root, "train", verify="header")  # the truncated JPEG passes the header check
    ds.transform = lambda img: torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)
    truncated = str(root / "train" / "a_mixed" / "truncated.jpg")
    assert truncated in {p for p, _ in ds.samples}

    class Probe(torch.nn.Module):  # logits that remember every image it is shown
        def __init__(self):
            super().__init__()
            self.anchor, self.seen = torch.nn.Parameter(torch.zeros(())), []

        def forward(self, x):
            self.seen.extend(x.flatten(1).sum(1).tolist())
            return torch.zeros(len(x), ds.num_classes)

    probe = Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        result = evaluate_classifier(probe, ds, batch_size=4, num_workers=workers)
    assert result["n"] == len(ds) - 1
    if workers == 0:  # every loadable image exactly once (as a multiset of image sums: two images are equal)
        loadable = [i for i, (p, _) in enumerate(ds.samples) if p != truncated]
        assert sorted(probe.seen) == pytest.approx(sorted(float(ds.transform(ds.load(i)).sum()) for i in loadable))
        assert truncated in {p for p, _ in ds.skipped}
    with warnings.catch_warnings():  # the caller's dataset keeps training's mode: the failed file is replaced
        warnings.simplefilter("ignore", DataWarning)
        assert ds[[p for p, _ in ds.samples].index(truncated)] is not None


@pytest.mark.parametrize("verify", ["none", "full"])
def test_imagefolder_dataloader_never_raises(tree, verify):
    root, bad = tree
    ds = _build_quiet(root, "train", verify=verify,
                      transform=build_transform(DataConfig(name="imagefolder", root=str(root), img_size=16), True))
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for x, y in DataLoader(ds, batch_size=4, num_workers=0):
            assert x.shape[1:] == (3, 16, 16) and int(y.max()) < 3
            seen += len(y)
    assert seen == len(ds)
    assert {p for p, _ in ds.skipped} == bad


def test_imagefolder_build_dataset_splits(tree):
    root, _ = tree
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=(16, 20), holdout_fraction=0.25, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        train, hold, test = (build_dataset(cfg, s) for s in ("train", "holdout", "test"))
    assert (len(train), len(hold), len(test)) == (11, 4, 6)
    assert not {p for p, _ in train.samples} & {p for p, _ in hold.samples}
    assert train.classes == hold.classes == test.classes == dataset_info(cfg)["class_names"]
    assert len(train.skipped) == 3  # the scan report travels with every split
    x, y = next(iter(DataLoader(test, batch_size=6)))
    assert x.shape == (6, 3, 16, 20)
    assert dataset_info(cfg)["mean"] == pytest.approx((0.485, 0.456, 0.406))
    cfg.strict = True
    with pytest.raises(ValueError, match="truncated.jpg"):
        build_dataset(cfg, "train")


def test_build_dataset_takes_the_classes_of_a_tree_without_train(tree):
    root, _ = tree
    shutil.rmtree(root / "train")
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16, max_eval_samples=4)
    with pytest.warns(DataWarning, match="c_empty"):
        test = build_dataset(cfg, "test", classes=["b_plain", "a_mixed", "c_empty"])
    assert test.classes == ["b_plain", "a_mixed", "c_empty"]  # the given label order, not the folders'
    assert test.class_counts().tolist() == [2, 2, 0]  # max_eval_samples, class-balanced
    assert all(Path(p).parent.name == test.classes[t] for p, t in test.samples)
    with pytest.raises(ValueError, match=r"class folder\(s\) the model was not trained on: \['b_plain'\]"):
        build_dataset(cfg, "test", classes=["a_mixed"])


@pytest.mark.parametrize("name", ["validation", "test"])
def test_imagefolder_eval_split_alternatives(tree, name):
    root, _ = tree
    (root / "val").rename(root / name)
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16)
    with pytest.warns(DataWarning, match="c_empty"):
        test = build_dataset(cfg, "test")
    assert len(test) == 6 and test.split_dir == root / name
    (root / "val" / "b_plain").mkdir(parents=True)  # val/ comes first when several exist
    _noise(np.random.default_rng(2)).save(root / "val" / "b_plain" / "only.png")
    with pytest.warns(DataWarning, match="a_mixed"):
        assert len(build_dataset(cfg, "test")) == 1


def test_check_data_source_finds_missing_folders_without_reading_images(tree, tmp_path, monkeypatch):
    root, _ = tree
    cfg = DataConfig(name="imagefolder", root=str(root), img_size=16)

    def no_scan(*args, **kwargs):
        raise AssertionError("check_data_source must not scan or open images")

    real_walk = os.walk

    def walk_only_folders_of_no_class(top, *args, **kwargs):  # whether such a folder is empty is looked up
        if Path(top).name != "zebra":
            raise AssertionError("check_data_source must not scan or open images")
        return real_walk(top, *args, **kwargs)

    monkeypatch.setattr(Image, "open", no_scan)
    monkeypatch.setattr(os, "walk", walk_only_folders_of_no_class)
    check_data_source(cfg)
    (root / "val").rename(root / "elsewhere")
    check_data_source(cfg, splits=("train", "holdout"))
    with pytest.raises(FileNotFoundError, match=r"no evaluation folder in .*tree: looked for val/, validation/, test/"):
        check_data_source(cfg)
    (root / "elsewhere" / "zebra").mkdir()
    (root / "elsewhere").rename(root / "test")
    check_data_source(cfg, splits=("test",))  # an empty folder of no class adds no image: ignored
    (root / "test" / "zebra" / "z.png").write_bytes(b"")  # a file of an image's name, never opened here
    with pytest.raises(ValueError, match="zebra"):
        check_data_source(cfg, splits=("test",))
    with pytest.raises(FileNotFoundError, match="train/ and val/ .or validation/ or test/"):
        check_data_source(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "bare" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        check_data_source(DataConfig(name="imagefolder", root=str(tmp_path / "bare")), splits=("train",))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        check_data_source(DataConfig(name="fashion_mnist", root=str(tmp_path)), splits=("test",))
    with pytest.raises(ValueError, match="holdout_fraction > 0"):
        check_data_source(DataConfig(name="synthetic", holdout_fraction=0), splits=("holdout",))
    check_data_source(DataConfig(name="synthetic"), splits=SPLITS)


@pytest.mark.parametrize("link,target", [
    ("loop", ".."),  # the split folder: would also label b's images as a
    ("sub/up", ".."),  # the class folder itself
    ("sub/same", "."),
])
def test_imagefolder_symlink_loops_neither_repeat_nor_mix_classes(tmp_path, link, target):
    rng = np.random.default_rng(0)
    root, shared = tmp_path / "farm", tmp_path / "shared"
    for d in (root / "train" / "a" / "sub", root / "train" / "b", shared):
        d.mkdir(parents=True)
    _noise(rng).save(root / "train" / "a" / "a0.png")
    _noise(rng).save(root / "train" / "a" / "sub" / "a1.png")
    _noise(rng).save(root / "train" / "b" / "b0.png")
    _noise(rng).save(shared / "s0.png")
    (root / "train" / "a" / link).symlink_to(target)  # one loop at a time: unpruned, several explode exponentially
    (root / "train" / "b" / "linked").symlink_to(shared)  # symlink farms are still followed...
    (root / "train" / "b" / "linked_again").symlink_to(shared)  # ...once per real folder
    ds = ImageFolderDataset(root, "train", verify="none")
    names = sorted((os.path.basename(p), ds.classes[t]) for p, t in ds.samples)
    assert names == [("a0.png", "a"), ("a1.png", "a"), ("b0.png", "b"), ("s0.png", "b")]


def test_data_warnings_print_only_the_message(tree, monkeypatch):
    root, _ = tree
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # undone after the test
    show_data_warnings_plainly()
    show_data_warnings_plainly()  # idempotent: the CLI may install it more than once per process
    assert warnings.formatwarning("3 files", DataWarning, "/lib/data.py", 7, "warnings.warn(msg)") == \
        "DataWarning: 3 files\n"
    other = warnings.formatwarning("careful", UserWarning, "/lib/data.py", 7, "warnings.warn(msg)")
    assert other.startswith("/lib/data.py:7: UserWarning: careful") and "warnings.warn(msg)" in other
    script = ("import warnings\nfrom vitlinearizer.data import DataConfig, build_dataset, show_data_warnings_plainly\n"
              "show_data_warnings_plainly()\n"
              f"build_dataset(DataConfig(name='imagefolder', root={str(root)!r}, img_size=16), 'train')\n"
              "warnings.warn('unrelated')\n")
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stderr
    assert "DataWarning: 3 unreadable file(s)" in err and "DataWarning: " in err.split("\n")[0]
    assert "ImageFolderDataset(" not in err and "data.py" not in err  # no library source line or location
    assert "<string>:5: UserWarning: unrelated" in err
