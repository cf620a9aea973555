"""autolora.data on tiny generated datasets (a few 8x8 images per class); nothing is downloaded."""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from autolora.data import DATASETS, build_data, build_test_set
from autolora.errors import UserError


def _img(path, size=8, seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _folder(root, counts: dict, split="train", ext=".png", size=8):
    """root/split/<class>/<class>_<i>.ext for each class: n."""
    for c, n in counts.items():
        for i in range(n):
            _img(os.path.join(root, split, c, f"{c}_{i:03d}{ext}"), size=size, seed=i)
    return str(root)


def _labels(ds):
    return Counter(int(t) for t in ds.targets)


# -------------------------------------------------------------------------------------- imagefolder


def test_registry_names():
    assert set(DATASETS) == {"cifar10", "cifar100", "dtd", "caltech256", "cub200", "dogs120", "imagefolder",
                             "digits"}


def test_imagefolder_with_test_dir(tmp_path):
    _folder(tmp_path, {"cat": 6, "ant": 5, "dog": 4})
    _folder(tmp_path, {"cat": 2, "ant": 2, "dog": 3}, split="test", ext=".JPG")
    b = build_data("imagefolder", str(tmp_path), val_fraction=0.2)
    assert b.classes == ["ant", "cat", "dog"] and b.resolution == "low"
    assert len(b.train) + len(b.val) == 15 and len(b.test) == 7
    x, y = b.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert isinstance(y, int)
    xt, _ = b.test[0]
    assert xt.shape == (3, 8, 8)
    assert b.record["test_split"] == "official" and "test_files" not in b.record
    assert b.record["sizes"]["test"] == 7 and b.record["image_size"] == 8
    json.dumps(b.record)
    # the labels follow the class folder of each file
    for ds in (b.train, b.val, b.test):
        for f, t in zip(ds.files(), ds.targets):
            assert f.split(os.sep)[1] == b.classes[t]


def test_imagefolder_held_out_test(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 20})
    b = build_data("imagefolder", str(tmp_path), test_fraction=0.2, val_fraction=0.1, seed=3)
    assert b.record["test_split"] == "held-out" and b.record["test_fraction"] == 0.2
    assert _labels(b.test) == {0: 2, 1: 4}
    assert b.record["test_files"] == b.test.files()
    assert all(os.path.isfile(os.path.join(tmp_path, f)) for f in b.record["test_files"])
    tr, va, te = set(b.train.files()), set(b.val.files()), set(b.test.files())
    assert not (tr & va) and not (tr & te) and not (va & te) and len(tr | va | te) == 30
    json.dumps(b.record)


def test_val_split_deterministic_disjoint_stratified(tmp_path):
    _folder(tmp_path, {"a": 10, "b": 20, "c": 2, "d": 1})
    b1 = build_data("imagefolder", str(tmp_path), val_fraction=0.1, test_fraction=0.01, seed=0)
    b2 = build_data("imagefolder", str(tmp_path), val_fraction=0.1, test_fraction=0.01, seed=0)
    b3 = build_data("imagefolder", str(tmp_path), val_fraction=0.1, test_fraction=0.01, seed=1)
    assert b1.val.files() == b2.val.files() and b1.train.files() == b2.train.files()
    assert b1.val.files() != b3.val.files()
    assert not set(b1.train.files()) & set(b1.val.files())
    # test holds out 1 of a, b, c; val: round(0.1 n) but at least 1 per class with 2+ items left;
    # classes with a single item left ('c', 'd') keep it in train
    assert _labels(b1.test) == {0: 1, 1: 1, 2: 1}
    assert _labels(b1.val) == {0: 1, 1: 2}
    assert _labels(b1.train) == {0: 8, 1: 17, 2: 1, 3: 1}
    # val uses test-time transforms: deterministic tensors
    assert torch.equal(b1.val[0][0], b1.val[0][0])


def test_split_seed_fixes_test_and_val_across_seeds(tmp_path):
    """--split-seed: runs with different seeds share the held-out test, the validation split and the
    limit_eval subsets (paired comparisons), while each draws its own limit_train subset."""
    _folder(tmp_path, {"a": 30, "b": 30})
    kw = dict(val_fraction=0.2, test_fraction=0.2, limit_train=10, limit_eval=4, split_seed=7)
    b0 = build_data("imagefolder", str(tmp_path), seed=0, **kw)
    b1 = build_data("imagefolder", str(tmp_path), seed=1, **kw)
    assert b0.test.files() == b1.test.files() and b0.val.files() == b1.val.files()
    assert b0.train.files() != b1.train.files()
    assert b0.record["split_seed"] == 7
    plain = build_data("imagefolder", str(tmp_path), seed=7, **{**kw, "split_seed": None})
    assert plain.test.files() == b0.test.files() and plain.val.files() == b0.val.files()  # default: --seed
    other = build_data("imagefolder", str(tmp_path), seed=1, **{**kw, "split_seed": None})
    assert other.val.files() != b1.val.files()


def test_limits_stratified_nested_and_val_independent(tmp_path):
    _folder(tmp_path, {"a": 20, "b": 20, "c": 40})
    kw = dict(val_fraction=0.1, test_fraction=0.2, seed=0)
    full = build_data("imagefolder", str(tmp_path), **kw)
    small = build_data("imagefolder", str(tmp_path), limit_train=12, limit_eval=4, **kw)
    smaller = build_data("imagefolder", str(tmp_path), limit_train=8, **kw)
    assert _labels(small.train) == {0: 3, 1: 3, 2: 6}
    assert len(small.val) == 4 and len(small.test) == 4 and set(_labels(small.test)) == {0, 1, 2}
    assert set(small.train.files()) <= set(full.train.files())
    assert set(smaller.train.files()) <= set(small.train.files())  # nested
    assert smaller.val.files() == full.val.files()  # val carved before limit_train
    assert set(small.val.files()) <= set(full.val.files()) and set(small.test.files()) <= set(full.test.files())
    assert small.record["sizes"]["train_before_limit"] == len(full.train)


def test_classes_filter(tmp_path):
    _folder(tmp_path, {"apple": 4, "banana": 4, "cherry": 4})
    b = build_data("imagefolder", str(tmp_path), classes=["cherry", "apple"])
    assert b.classes == ["apple", "cherry"]
    assert set(_labels(b.train)) | set(_labels(b.test)) == {0, 1}
    assert all(f.split(os.sep)[1] in ("apple", "cherry") for f in b.train.files() + b.test.files())
    full = build_data("imagefolder", str(tmp_path))  # per-class seeding: the filter does not move the split
    assert set(b.test.files()) <= set(full.test.files())
    with pytest.raises(UserError, match=r"unknown class 'banan'.*did you mean 'banana'"):
        build_data("imagefolder", str(tmp_path), classes=["banan"])


def test_build_test_set_remaps_by_name(tmp_path):
    run = _folder(tmp_path / "run", {"a": 3, "b": 3, "c": 3})
    other = tmp_path / "other"
    _folder(other, {"a": 2, "b": 2, "c": 2, "z": 2})
    _folder(other, {"a": 2, "b": 1, "c": 3, "z": 2}, split="test")
    run_classes = build_data("imagefolder", run).classes
    ts = build_test_set("imagefolder", str(other), run_classes=["c", "a", "b"])
    assert ts.classes == ["c", "a", "b"] and len(ts) == 6
    for f, t in zip(ts.files(), ts.targets):
        assert f.split(os.sep)[1] == ["c", "a", "b"][t]
    assert run_classes == ["a", "b", "c"]
    with pytest.raises(UserError, match=r"not in the imagefolder data.*: q, r"):
        build_test_set("imagefolder", str(other), run_classes=["a", "q", "r"])
    held = build_test_set("imagefolder", run, run_classes=["b", "a"], seed=0)  # held-out split of train/
    b = build_data("imagefolder", run, classes=["a", "b"], seed=0)
    assert held.files() == b.test.files()
    assert [held.classes[t] for t in held.targets] == [b.classes[t] for t in b.test.targets]


def test_resolution_high_and_forced(tmp_path):
    _folder(tmp_path, {"a": 2, "b": 2}, size=80)
    b = build_data("imagefolder", str(tmp_path), val_fraction=0.0, test_fraction=0.5)
    assert b.resolution == "high" and b.train[0][0].shape == (3, 224, 224) and b.test[0][0].shape == (3, 224, 224)
    lo = build_data("imagefolder", str(tmp_path), test_fraction=0.5, resolution="low")
    assert lo.resolution == "low" and lo.train[0][0].shape == (3, 32, 32) and lo.test[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="unknown resolution"):
        build_data("imagefolder", str(tmp_path), resolution="medium")


def test_picklable_and_rgb(tmp_path):
    _folder(tmp_path, {"a": 3, "b": 3})
    Image.new("L", (8, 8), 128).save(tmp_path / "train" / "a" / "gray.png")
    b = build_data("imagefolder", str(tmp_path))
    for ds in (b.train, b.val, b.test):
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds) and clone.targets == ds.targets
    ds = pickle.loads(pickle.dumps(b.test))
    assert torch.equal(ds[0][0], b.test[0][0])
    all_items = [b.train, b.val, b.test]
    assert all(ds[k][0].shape[0] == 3 for ds in all_items for k in range(len(ds)))


# ------------------------------------------------------------------------------ official layouts


def _fake_dtd(base):
    """What dtd-r1.0.1.tar.gz extracts to (dtd/), at `base`: 2 classes x 4 images; split 1 = 1 train, 1 val, 2 test."""
    files = {c: [f"{c}/{c}_{i:04d}.jpg" for i in range(4)] for c in ("banded", "zigzagged")}
    for c, fs in files.items():
        for i, f in enumerate(fs):
            _img(str(base / "images" / f), seed=i, fmt="JPEG")
    os.makedirs(base / "labels")
    (base / "labels" / "train1.txt").write_text("\n".join(fs[0] for fs in files.values()) + "\n")
    (base / "labels" / "val1.txt").write_text("\n".join(fs[1] for fs in files.values()) + "\n")
    (base / "labels" / "test1.txt").write_text("\n".join(f for fs in files.values() for f in fs[2:]) + "\n")
    (base / "labels" / "train2.txt").write_text("banded/banded_0003.jpg\n")  # other splits are ignored


def _fake_caltech256(base):
    """256_ObjectCategories/ at `base`: 001.ak47 with 10 images, 257.clutter with 5."""
    for c, n in (("001.ak47", 10), ("257.clutter", 5)):
        for i in range(n):
            _img(str(base / c / f"{c[:3]}_{i:04d}.jpg"), seed=i, fmt="JPEG")


def test_dtd(tmp_path):
    base = tmp_path / "dtd"
    _fake_dtd(base)
    for d in (tmp_path, base):
        b = build_data("dtd", str(d), val_fraction=0.5)
        assert b.classes == ["banded", "zigzagged"] and b.resolution == "high"
        assert len(b.train) == 2 and len(b.val) == 2 and len(b.test) == 4 and _labels(b.test) == {0: 2, 1: 2}
        assert b.record["test_split"] == "official" and "test_files" not in b.record
    assert b.test[0][0].shape == (3, 224, 224)
    with pytest.raises(UserError, match="not the DTD dataset"):
        build_data("dtd", str(tmp_path / "dtd" / "labels"))


def test_cub200(tmp_path):
    base = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split = [], [], []
    k = 0
    for ci, c in enumerate(classes):
        for i in range(3):
            k += 1
            rel = f"{c}/img_{i}.jpg"
            _img(str(base / "images" / rel), seed=k, fmt="JPEG")
            images.append(f"{k} {rel}")
            labels.append(f"{k} {ci + 1}")
            split.append(f"{k} {1 if i < 2 else 0}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    for d in (tmp_path, base):
        b = build_data("cub200", str(d), val_fraction=0.5)
        assert b.classes == classes
        assert len(b.train) == 2 and len(b.val) == 2 and len(b.test) == 2 and _labels(b.test) == {0: 1, 1: 1}
        assert all(f.endswith("img_2.jpg") for f in b.test.files())
    os.remove(base / "classes.txt")
    with pytest.raises(UserError, match="classes.txt is missing"):
        build_data("cub200", str(tmp_path))


def test_dogs120_mat_lists(tmp_path):
    from scipy.io import savemat

    classes = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    train, test = [], []
    for ci, c in enumerate(classes):
        for i in range(3):
            rel = f"{c}/{c.split('-')[0]}_{i}.jpg"
            _img(str(tmp_path / "Images" / rel), seed=i + 10 * ci, fmt="JPEG")
            (train if i < 2 else test).append((rel, ci + 1))

    def save(path, items):  # like lists.tar: an Nx1 cell array of file names and Nx1 1-based labels
        cells = np.empty((len(items), 1), dtype=object)
        for k, (r, _) in enumerate(items):
            cells[k, 0] = np.array([r])
        savemat(str(path), {"file_list": cells, "labels": np.array([[lab] for _, lab in items], dtype=np.uint8)})

    save(tmp_path / "train_list.mat", train)
    save(tmp_path / "test_list.mat", test)
    b = build_data("dogs120", str(tmp_path), val_fraction=0.5)
    assert b.classes == classes and len(b.train) == 2 and len(b.val) == 2 and len(b.test) == 2
    assert [f.split(os.sep)[-1] for f in b.test.files()] == ["n02085620_2.jpg", "n02085782_2.jpg"]
    assert b.test.targets == [0, 1]
    os.makedirs(tmp_path / "lists")  # lists/ subfolder is accepted too
    for name in ("train_list.mat", "test_list.mat"):
        os.rename(tmp_path / name, tmp_path / "lists" / name)
    assert len(build_data("dogs120", str(tmp_path)).test) == 2
    os.remove(tmp_path / "lists" / "test_list.mat")
    with pytest.raises(UserError, match="test_list.mat not found"):
        build_data("dogs120", str(tmp_path))


def test_caltech256(tmp_path):
    base = tmp_path / "256_ObjectCategories"
    _fake_caltech256(base)
    _img(str(base / "001.ak47" / "greg" / "dup.jpg"), fmt="JPEG")  # nested folders are not read
    (base / "001.ak47" / "RENAME2").write_text("x")
    b = build_data("caltech256", str(tmp_path), val_fraction=0.0)
    assert b.classes == ["001.ak47", "257.clutter"] and b.resolution == "high"
    assert _labels(b.test) == {0: 2, 1: 1} and len(b.train) == 12
    assert b.record["test_split"] == "held-out"
    assert all(f.startswith("256_ObjectCategories" + os.sep) for f in b.record["test_files"])
    b2 = build_data("caltech256", str(base), val_fraction=0.0, test_fraction=0.084)
    assert len(b2.test) == 2


# ------------------------------------------------------------------- torchvision downloads (faked)


def _fake_download(monkeypatch, module, make, calls):
    """Replace torchvision's download_and_extract_archive in `module`: write the archive, then
    `make(extract_root)` (the tree the real archive extracts to)."""
    def fake(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        calls.append(url)
        os.makedirs(download_root, exist_ok=True)
        open(os.path.join(download_root, filename or os.path.basename(url)), "wb").close()
        make(pathlib.Path(extract_root or download_root))

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", fake)


def test_dtd_download_and_torchvision_layout(tmp_path, monkeypatch):
    calls = []
    _fake_download(monkeypatch, "dtd", lambda r: _fake_dtd(r / "dtd"), calls)  # DTD's root/dtd/dtd/
    root = tmp_path / "data"  # need not exist
    b = build_data("dtd", str(root), download=True, val_fraction=0.5)
    assert calls == ["https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"]
    assert os.path.isdir(root / "dtd" / "dtd" / "images")
    assert b.classes == ["banded", "zigzagged"] and len(b.train) == 2 and len(b.val) == 2 and len(b.test) == 4
    assert all(f.startswith(os.path.join("dtd", "dtd", "images")) for f in b.test.files())
    assert build_data("dtd", str(root), val_fraction=0.5).test.files() == b.test.files()  # no --download
    assert len(build_data("dtd", str(root / "dtd")).test) == 4  # DIR = torchvision's dtd/ folder
    build_data("dtd", str(root), download=True)  # already there: not downloaded again
    assert len(calls) == 1
    hand = tmp_path / "hand"  # the hand-extracted layout is used as it is, never downloaded over
    _fake_dtd(hand / "dtd")
    assert len(build_data("dtd", str(hand), download=True).test) == 4 and len(calls) == 1
    assert not os.path.exists(hand / "dtd" / "dtd")


def test_caltech256_download_and_torchvision_layout(tmp_path, monkeypatch):
    calls = []
    _fake_download(monkeypatch, "caltech", lambda r: _fake_caltech256(r / "256_ObjectCategories"), calls)
    b = build_data("caltech256", str(tmp_path), download=True, val_fraction=0.0)
    assert calls == ["https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"]
    assert b.classes == ["001.ak47", "257.clutter"] and len(b.train) == 12 and _labels(b.test) == {0: 2, 1: 1}
    assert all(f.startswith(os.path.join("caltech256", "256_ObjectCategories")) for f in b.record["test_files"])
    for d in (tmp_path, tmp_path / "caltech256", tmp_path / "caltech256" / "256_ObjectCategories"):
        assert build_data("caltech256", str(d), val_fraction=0.0).classes == b.classes
    build_data("caltech256", str(tmp_path), download=True)
    assert len(calls) == 1


def _offline(monkeypatch):
    """urllib as on a machine without network: every request fails to resolve the host."""
    import socket
    import urllib.error
    import urllib.request

    def urlopen(*a, **k):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.mark.parametrize("name,pretty,url", [
    ("dtd", "DTD", "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"),
    ("caltech256", "Caltech-256", "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar")])
def test_download_offline(tmp_path, monkeypatch, name, pretty, url):
    _offline(monkeypatch)  # torchvision's real download code runs, and fails like it does offline
    root = tmp_path / "new" / "data"
    with pytest.raises(UserError) as err:
        build_data(name, str(root), download=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(
        f"could not download {pretty} from {url} into {root} ([Errno -2] Name or service not known): check the "
        f"internet connection, or download it by hand and extract it into {root} (expected {root}{os.sep}")
    assert os.listdir(tmp_path) == []  # the folders torchvision made are gone
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match=f"could not download {pretty}"):
        build_data(name, str(tmp_path / "mine"), download=True)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # what was there stays, nothing else
    with pytest.raises(UserError, match=f"is not the {pretty} dataset .*--download"):  # without --download
        build_data(name, str(tmp_path / "mine"))
    with pytest.raises(UserError, match="does not exist"):
        build_data(name, str(root))


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    """A download that fails half-way (partial archive) or during extraction (half a tree) is removed:
    it would otherwise be taken for the dataset, by us or by torchvision's own exists-check."""
    import torchvision.datasets.utils as tvu
    import urllib.error

    def partial(url, filename, chunk_size=0):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise urllib.error.URLError("Connection reset by peer")

    monkeypatch.setattr(tvu, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tvu, "_urlretrieve", partial)
    (tmp_path / "dtd").mkdir()  # a folder that was already there is kept, emptied of what the download wrote
    with pytest.raises(UserError, match=r"could not download DTD .*\(Connection reset by peer\)"):
        build_data("dtd", str(tmp_path), download=True)
    assert sorted(os.listdir(tmp_path)) == ["dtd"] and os.listdir(tmp_path / "dtd") == []

    def half_extracted(url, download_root, **kw):
        _img(str(pathlib.Path(download_root) / "256_ObjectCategories" / "001.ak47" / "001_0001.jpg"), fmt="JPEG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torchvision.datasets.caltech.download_and_extract_archive", half_extracted)
    with pytest.raises(UserError, match=r"could not download Caltech-256 .*No space left on device"):
        build_data("caltech256", str(tmp_path), download=True)
    assert sorted(os.listdir(tmp_path)) == ["dtd"]


# ----------------------------------------------------------------------------------------- CIFAR


def _fake_cifar(root, hundred=False, n=10):
    rng = np.random.default_rng(0)
    ncls = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    os.makedirs(folder)
    key = "fine_labels" if hundred else "labels"

    def batch(name, k):
        data = rng.integers(0, 256, (k, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: [i % ncls for i in range(k)]}, f)

    names = [f"c{i}" for i in range(ncls)]
    if hundred:
        batch("train", 2 * ncls)
        batch("test", ncls)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": names}, f)
    else:
        for i in range(1, 6):
            batch(f"data_batch_{i}", n)
        batch("test_batch", n)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": names}, f)
    return names


@pytest.fixture
def no_md5(monkeypatch):
    import torchvision.datasets.cifar as tvc

    monkeypatch.setattr(tvc, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(tmp_path, no_md5, name):
    names = _fake_cifar(tmp_path, hundred=name == "cifar100")
    b = build_data(name, str(tmp_path), val_fraction=0.1, limit_eval=5)
    assert b.classes == names and b.resolution == "low" and b.record["test_split"] == "official"
    assert len(b.train) == (100 if name == "cifar100" else 40)  # 1 val image per class, then limit_eval
    x, y = b.train[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert len(b.test) == 5 and len(b.val) == 5
    ti, vi = set(b.train.indices.tolist()), set(b.val.indices.tolist())
    assert not ti & vi
    json.dumps(b.record)
    pickle.loads(pickle.dumps(b.val))


def test_cifar_missing_and_offline(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc

    with pytest.raises(UserError, match=r"not found.*--download.*--data-dir"):
        build_data("cifar10", str(tmp_path))

    def offline(*a, **k):
        import urllib.error

        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match="could not download CIFAR-100"):
        build_data("cifar100", str(tmp_path / "new"), download=True)


# -------------------------------------------------------------------------------------- bad input


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(UserError, match="does not exist.*--data-dir"):
        build_data("imagefolder", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="needs a data directory"):
        build_data("caltech256", None)
    with pytest.raises(UserError, match="no train/ folder"):
        build_data("imagefolder", str(tmp_path))
    os.makedirs(tmp_path / "train")
    with pytest.raises(UserError, match="no class folders"):
        build_data("imagefolder", str(tmp_path))
    os.makedirs(tmp_path / "train" / "empty")
    with pytest.raises(UserError, match=r"class folder .*empty has no images.*add images"):
        build_data("imagefolder", str(tmp_path))


def test_corrupt_image(tmp_path):
    _folder(tmp_path, {"a": 3, "b": 3})
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(UserError, match=r"unreadable image .*broken\.jpg.*--skip-bad-images"):
        build_data("imagefolder", str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken\.jpg"):
        b = build_data("imagefolder", str(tmp_path), skip_bad_images=True)
    assert len(b.train) + len(b.val) + len(b.test) == 6
    # a valid header with a cut-off body has no end marker: found when listed (decoded in full), or skipped
    bad.unlink()
    trunc = tmp_path / "train" / "b" / "trunc.jpg"
    _img(str(trunc), fmt="JPEG")
    trunc.write_bytes(trunc.read_bytes()[:-50])
    with pytest.raises(UserError, match=r"unreadable image .*trunc\.jpg \(cannot be decoded: image file is truncated"):
        build_data("imagefolder", str(tmp_path))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*trunc\.jpg"):
        assert len(build_data("imagefolder", str(tmp_path), skip_bad_images=True).train) > 0
    # header and end marker whole, the middle garbage: not decoded when listed; fails when loaded, naming the file
    trunc.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 20 + b"\xff\xd9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = build_data("imagefolder", str(tmp_path), val_fraction=0.0, test_fraction=0.01)
    with pytest.raises(UserError, match=r"cannot decode image .*trunc\.jpg"):
        [ds[k] for ds in (b.train, b.test) for k in range(len(ds))]


def test_class_mismatch_and_args(tmp_path):
    _folder(tmp_path, {"a": 2, "b": 2, "c": 2})
    _folder(tmp_path, {"a": 1, "b": 1, "d": 1}, split="test")
    with pytest.raises(UserError, match=r"differ \(only in train/: c; only in test/: d\).*--classes"):
        build_data("imagefolder", str(tmp_path))
    assert build_data("imagefolder", str(tmp_path), classes=["a", "b"]).classes == ["a", "b"]
    with pytest.raises(UserError, match="did you mean 'imagefolder'"):
        build_data("imagefoldr", str(tmp_path))
    with pytest.raises(UserError, match="--val-fraction"):
        build_data("imagefolder", str(tmp_path), val_fraction=1.5)
    with pytest.raises(UserError, match="--limit-train"):
        build_data("imagefolder", str(tmp_path), limit_train=0)


def test_too_few_images_for_held_out_test(tmp_path):
    _folder(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(UserError, match="too few images to hold out a test split"):
        build_data("imagefolder", str(tmp_path))
