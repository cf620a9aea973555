"""Dataset readers: one builder per dataset name, registered in `BUILDERS`.

A builder reads a dataset's own layout and returns a `Source` (pools of untransformed images and
class names); class filtering, splitting, subsetting and transforms are done generically in
`autolora.data`. To add a dataset:

    @register("name")
    def build(data_dir, *, download=False, skip_bad_images=False) -> Source: ...

A builder may also take `classes=None`, a hint naming the classes wanted, to skip reading the others;
it then returns them as `classes` and every class in the data as `available`.

Layouts (DIR = --data-dir):
- cifar10 / cifar100: torchvision's files (DIR/cifar-10-batches-py, DIR/cifar-100-python);
  test = the official test set.
- dtd: DIR/dtd/images/<class>/*.jpg and DIR/dtd/labels/{train1,val1,test1}.txt; split 1,
  train = train1 + val1, test = test1. DIR may also be the dtd/ folder itself, or hold torchvision's
  download (DIR/dtd/dtd/images, ...).
- cub200: DIR/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt,
  images/}; the official split. DIR may also be CUB_200_2011/ itself.
- dogs120 (Stanford Dogs): DIR/Images/<wnid-Name>/*.jpg with train_list.mat / test_list.mat beside
  Images/ or under DIR/lists/; the official split; class name = folder name.
- caltech256: DIR/256_ObjectCategories/<NNN.name>/*.jpg (257 folders including 257.clutter).
  There is no official split: the test set is a seeded stratified `test_fraction` of each class
  (default 0.2). The AutoLoRa paper used 38,550 train / 3,549 test images (about 8.4% test); pass
  test_fraction=0.084 to match its size. DIR may also be 256_ObjectCategories/ itself, or hold
  torchvision's download (DIR/caltech256/256_ObjectCategories).
- imagefolder: DIR/train/<class>/... and optionally DIR/test/<class>/... (same class folders);
  without test/, a seeded stratified `test_fraction` of train is held out as the test set.
  Classes are the folder names, sorted.

`download=True` (--download) fetches cifar10, cifar100, dtd and caltech256 with torchvision's downloaders
when the data is not already there; a failed download leaves nothing behind and raises one UserError.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import UserError, require
from .core import ArrayPool, class_folders, folder_pool, listed_pool


@dataclass
class Source:
    """What a builder found. `test=None` means: hold out a seeded stratified test split of `train`."""

    train: object  # FilePool | ArrayPool
    test: object | None
    classes: list[str]
    resolution: str  # "low" | "high" | "auto" (decide from the first image's size)
    uniform: bool = False  # all images have the same native size (no resize guard needed)
    record: dict = field(default_factory=dict)  # extra fields for DataBundle.record
    available: list[str] | None = None  # every class name in the data, when `classes` is a subset

    def __post_init__(self):
        if self.available is None:
            self.available = list(self.classes)


BUILDERS: dict[str, Callable[..., Source]] = {}


def register(name: str):
    """Decorator: make a builder available as `build_data(name, ...)`."""

    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def need_dir(data_dir, dataset: str, layout: str) -> str:
    """The data directory as an absolute path, or UserError when it is missing."""
    if not data_dir:
        raise UserError(f"dataset '{dataset}' needs a data directory: pass --data-dir DIR ({layout})")
    path = os.path.abspath(os.path.expanduser(str(data_dir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--data-dir {path} is a file, not a directory: pass the folder holding the {dataset} data "
                        f"({layout})")
    if not os.path.isdir(path):
        raise UserError(f"data directory {path} does not exist: pass --data-dir pointing at the {dataset} "
                        f"data ({layout})")
    return path


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


# --------------------------------------------------------------------------- torchvision downloads


def _reason(e: BaseException) -> str:
    """One line saying why a download failed."""
    import urllib.error

    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason  # "[Errno -2] Name or service not known" rather than "<urlopen error ...>"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _entries(path: str) -> set[str] | None:
    """Names in folder `path` (None when nothing is there)."""
    if not os.path.lexists(path):
        return None
    return set(os.listdir(path)) if os.path.isdir(path) and not os.path.islink(path) else set()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _download(name: str, root: str, fetch: Callable[[], object], url: str, folder: str | None = None,
              layout: str | None = None) -> None:
    """Run `fetch()`, a torchvision downloader writing into `root` (or `root/folder`).

    On failure whatever it created there (folders, a partial archive, a half-extracted tree) is removed,
    so that nothing is later mistaken for the dataset, and one UserError names what failed and the fix.
    """
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--data-dir {root} is not a directory: pass a folder to download {name} into")
    top = root  # the outermost folder that makedirs will create, if any
    while not os.path.lexists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    watched = [top] if top != root else []
    watched += [root] + ([os.path.join(root, folder)] if folder else [])
    before = {p: _entries(p) for p in watched}  # parents first
    try:
        os.makedirs(root, exist_ok=True)
        fetch()
    except BaseException as e:
        for path, names in before.items():
            if names is None:
                _remove(path)
            elif os.path.isdir(path):
                for new in set(os.listdir(path)) - names:
                    _remove(os.path.join(path, new))
        if not isinstance(e, Exception):  # Ctrl-C: cleaned up, then stop as asked
            raise
        raise UserError(f"could not download {name} from {url} into {root} ({_reason(e)}): check the internet "
                        f"connection, or download it by hand and extract it into {root}"
                        + (f" ({layout.replace('DIR', root)})" if layout else "")) from None


def _locate(dataset: str, name: str, data_dir, download: bool, find: Callable[[str], str | None],
            fetch: Callable[[str], object], url: str, folder: str, layout: str) -> tuple[str, str]:
    """(root, base) of a dataset that torchvision can download: `find(root)` is the data's folder relative
    to `root`, or None; with `download` and nothing found, `fetch(root)` first downloads it into `root/folder`."""
    if download and data_dir:
        root = os.path.abspath(os.path.expanduser(str(data_dir)))
        if not os.path.isdir(root) or find(root) is None:
            _download(name, root, lambda: fetch(root), url, folder, layout)
    root = need_dir(data_dir, dataset, layout)
    base = find(root)
    if base is None:
        raise UserError(f"{root} is not the {name} dataset ({layout}): extract the archive there, pass --download "
                        "to fetch it, or fix --data-dir")
    return root, base


def _first_dir(root: str, candidates) -> str | None:
    """The first of `candidates` (paths relative to `root`) that is a folder."""
    return next((c for c in candidates if os.path.isdir(os.path.join(root, c))), None)


# ----------------------------------------------------------------------------------------- CIFAR


def _cifar(name: str, cls_name: str, data_dir, download: bool) -> Source:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    pretty = cls_name.replace("CIFAR", "CIFAR-")
    if not data_dir:
        raise UserError(f"dataset '{name}' needs a data directory: pass --data-dir DIR "
                        f"(add --download to fetch {pretty} into it)")
    root = os.path.abspath(os.path.expanduser(str(data_dir)))
    if os.path.basename(root.rstrip(os.sep)) == cls.base_folder:  # DIR points at the extracted folder
        root = os.path.dirname(root)
    if download:
        _download(pretty, root, lambda: cls(root, train=True, download=True), cls.url)
    try:
        train = cls(root, train=True, download=False)
        test = cls(root, train=False, download=False)
    except RuntimeError:
        raise UserError(f"{pretty} not found (or corrupted) in {os.path.join(root, cls.base_folder)}: pass "
                        f"--download to fetch it, or --data-dir pointing at the folder that contains "
                        f"{cls.base_folder}") from None
    return Source(ArrayPool(train.data, train.targets), ArrayPool(test.data, test.targets),
                  list(train.classes), "low", uniform=True)


@register("cifar10")
def build_cifar10(data_dir, *, download=False, skip_bad_images=False) -> Source:
    return _cifar("cifar10", "CIFAR10", data_dir, download)


@register("cifar100")
def build_cifar100(data_dir, *, download=False, skip_bad_images=False) -> Source:
    return _cifar("cifar100", "CIFAR100", data_dir, download)


# ------------------------------------------------------------------------------------------- DTD


@register("dtd")
def build_dtd(data_dir, *, download=False, skip_bad_images=False) -> Source:
    import torchvision.datasets as tvd

    layout = "expected DIR/dtd/images/<class>/*.jpg and DIR/dtd/labels/train1.txt, from dtd-r1.0.1.tar.gz"
    # hand-extracted archive (in DIR, or DIR is dtd/ itself) or torchvision's download (DIR/dtd/dtd/)
    candidates = [os.path.join(*p, "images") for p in (("dtd",), (), ("dtd", "dtd"))]
    root, images = _locate("dtd", "DTD", data_dir, download, lambda r: _first_dir(r, candidates),
                           lambda r: tvd.DTD(r, split="train", partition=1, download=True), tvd.DTD._URL, "dtd", layout)
    base = os.path.dirname(images)
    classes = class_folders(os.path.join(root, base, "images"))
    if not classes:
        raise UserError(f"no class folders in {os.path.join(root, base, 'images')}: {layout}")
    index = {c: i for i, c in enumerate(classes)}

    def items(split_files):
        out = []
        for fname in split_files:
            path = os.path.join(root, base, "labels", fname)
            if not os.path.isfile(path):
                raise UserError(f"DTD split file {path} is missing: re-extract dtd-r1.0.1.tar.gz into {root}")
            for line in _read_lines(path):
                cname = line.split("/")[0]
                if cname not in index:
                    raise UserError(f"{path} lists '{line}' but there is no images/{cname}/ folder: "
                                    "re-extract the DTD archive")
                out.append((line, index[cname]))
        return out

    prefix, labels_dir = os.path.join(base, "images"), os.path.join(root, base, "labels")
    train = listed_pool(root, prefix, items(["train1.txt", "val1.txt"]), skip_bad_images,
                        listed_in=os.path.join(labels_dir, "train1.txt or val1.txt"))
    test = listed_pool(root, prefix, items(["test1.txt"]), skip_bad_images,
                       listed_in=os.path.join(labels_dir, "test1.txt"))
    return Source(train, test, classes, "high", record={"split": "dtd split 1 (train1+val1 / test1)"})


# ---------------------------------------------------------------------------------------- CUB-200


@register("cub200")
def build_cub200(data_dir, *, download=False, skip_bad_images=False) -> Source:
    layout = "expected DIR/CUB_200_2011/images.txt and images/, from CUB_200_2011.tgz"
    root = need_dir(data_dir, "cub200", layout)
    base = next((b for b in ("CUB_200_2011", "") if os.path.isfile(os.path.join(root, b, "images.txt"))), None)
    if base is None:
        raise UserError(f"{root} is not the CUB-200-2011 dataset ({layout}): extract the archive there or fix --data-dir")
    tables = {}
    for fname in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"):
        path = os.path.join(root, base, fname)
        if not os.path.isfile(path):
            raise UserError(f"CUB-200-2011 file {path} is missing: re-extract CUB_200_2011.tgz into {root}")
        try:
            tables[fname] = dict(line.split(None, 1) for line in _read_lines(path))
        except ValueError:
            raise UserError(f"cannot parse {path} (expected '<id> <value>' lines): re-extract the archive") from None
    class_ids = sorted(tables["classes.txt"], key=int)
    classes = [tables["classes.txt"][i].strip() for i in class_ids]
    label_of = {cid: k for k, cid in enumerate(class_ids)}
    train_items, test_items = [], []
    for img_id, rel in tables["images.txt"].items():
        try:
            label = label_of[tables["image_class_labels.txt"][img_id].strip()]
            is_train = tables["train_test_split.txt"][img_id].strip() == "1"
        except KeyError:
            raise UserError(f"image id {img_id} of images.txt has no class or split entry in "
                            f"{os.path.join(root, base)}: re-extract the archive") from None
        (train_items if is_train else test_items).append((rel.strip(), label))
    prefix = os.path.join(base, "images")
    listed = os.path.join(root, base, "images.txt")
    return Source(listed_pool(root, prefix, train_items, skip_bad_images, listed),
                  listed_pool(root, prefix, test_items, skip_bad_images, listed),
                  classes, "high", record={"split": "official train_test_split.txt"})


# ---------------------------------------------------------------------------------- Stanford Dogs


def _mat_file_list(path: str) -> list[str]:
    loadmat = require("scipy.io", "datasets", "dataset 'dogs120' (its .mat split lists)").loadmat
    try:
        m = loadmat(path)
        raw = m["file_list"]
    except Exception as e:  # noqa: BLE001 - any parse failure is a user data problem
        raise UserError(f"cannot read 'file_list' from {path} ({e}): re-extract lists.tar of Stanford Dogs") from None
    if raw.dtype.kind in "US":
        return [str(s).strip() for s in raw.ravel()]
    return [str(np.asarray(e).ravel()[0]).strip() for e in raw.ravel()]


@register("dogs120")
def build_dogs120(data_dir, *, download=False, skip_bad_images=False) -> Source:
    layout = "expected DIR/Images/<wnid-Name>/*.jpg and train_list.mat/test_list.mat from lists.tar"
    root = need_dir(data_dir, "dogs120", layout)
    if not os.path.isdir(os.path.join(root, "Images")):
        raise UserError(f"{root} has no Images/ folder ({layout}): extract images.tar there or fix --data-dir")
    classes = class_folders(os.path.join(root, "Images"))
    if not classes:
        raise UserError(f"no class folders in {os.path.join(root, 'Images')}: {layout}")
    index = {c: i for i, c in enumerate(classes)}
    pools = []
    for split in ("train", "test"):
        path = next((p for p in (os.path.join(root, f"{split}_list.mat"), os.path.join(root, "lists", f"{split}_list.mat"))
                     if os.path.isfile(p)), None)
        if path is None:
            raise UserError(f"{split}_list.mat not found in {root} or {os.path.join(root, 'lists')}: "
                            "extract lists.tar of Stanford Dogs there")
        items = []
        for rel in _mat_file_list(path):
            cname = rel.replace("\\", "/").split("/")[0]
            if cname not in index:
                raise UserError(f"{path} lists '{rel}' but there is no Images/{cname}/ folder: re-extract images.tar")
            items.append((rel, index[cname]))
        pools.append(listed_pool(root, "Images", items, skip_bad_images, listed_in=path))
    return Source(pools[0], pools[1], classes, "high", record={"split": "official train_list.mat/test_list.mat"})


# ------------------------------------------------------------------------------------ Caltech-256


CALTECH256_URL = "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"  # torchvision's


@register("caltech256")
def build_caltech256(data_dir, *, download=False, skip_bad_images=False) -> Source:
    import torchvision.datasets as tvd

    layout = "expected DIR/256_ObjectCategories/<NNN.name>/*.jpg, from 256_ObjectCategories.tar"
    folder = "256_ObjectCategories"

    def find(root):  # hand-extracted archive (in DIR, or DIR itself) or torchvision's download (DIR/caltech256/)
        found = _first_dir(root, (folder, os.path.join("caltech256", folder)))
        return found if found is not None or os.path.basename(root) != folder else ""

    root, base = _locate("caltech256", "Caltech-256", data_dir, download, find,
                         lambda r: tvd.Caltech256(r, download=True), CALTECH256_URL, "caltech256", layout)
    classes = class_folders(os.path.join(root, base))
    if not classes:
        raise UserError(f"no class folders in {os.path.join(root, base)}: {layout}")
    # Top level of each folder only: the archive has stray subfolders (e.g. 056.dog/greg) of duplicates.
    pool = folder_pool(root, base, classes, skip_bad_images, recursive=False)
    return Source(pool, None, classes, "high")


# ------------------------------------------------------------------------------------ ImageFolder


@register("imagefolder")
def build_imagefolder(data_dir, *, download=False, skip_bad_images=False, classes=None) -> Source:
    layout = "expected DIR/train/<class>/*.jpg and optionally DIR/test/<class>/*.jpg"
    root = need_dir(data_dir, "imagefolder", layout)
    if not os.path.isdir(os.path.join(root, "train")):
        raise UserError(f"{root} has no train/ folder: put the images in {os.path.join(root, 'train')}/<class>/... "
                        f"({layout})")
    names = class_folders(os.path.join(root, "train"))
    if not names:
        raise UserError(f"no class folders in {os.path.join(root, 'train')}: put each class's images in "
                        f"{os.path.join(root, 'train')}/<class>/")
    use = names if classes is None else [c for c in names if c in set(classes)]
    has_test = os.path.isdir(os.path.join(root, "test"))
    if has_test:
        test_names = class_folders(os.path.join(root, "test"))
        wanted = set(names) if classes is None else set(use)
        only_train = sorted(wanted - set(test_names))
        only_test = sorted(set(test_names) - set(names)) if classes is None else []
        if only_train or only_test:
            parts = ([f"only in train/: {', '.join(only_train)}"] if only_train else []) + \
                    ([f"only in test/: {', '.join(only_test)}"] if only_test else [])
            raise UserError(f"class folders of {root}/train and {root}/test differ ({'; '.join(parts)}): "
                            "make them match, or pick common classes with --classes")
    # Only the selected class folders are listed (other folders are neither read nor checked).
    train = folder_pool(root, "train", use, skip_bad_images)
    test = folder_pool(root, "test", use, skip_bad_images) if has_test else None
    return Source(train, test, use, "auto", available=names)
