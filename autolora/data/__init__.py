"""Datasets for robust fine-tuning: `build_data` (train/val/test of one dataset) and `build_test_set`.

Split protocol (all seeded per class, see `core`):
1. test: the dataset's official test split; for datasets without one (caltech256, imagefolder without
   test/) a stratified `test_fraction` of each class is held out, and its files go to `record`.
2. val: a stratified `val_fraction` (at least 1 per class with 2+ images) of the *full* train split,
   with test-time transforms; train and val are disjoint views of the same file list.
3. limit_train: a stratified subset of what remains for training (so val does not depend on it);
   limit_eval: a stratified subset of val and, separately, of test.
Subsets are nested: a smaller limit picks a subset of a larger one's items (same seed).

Items are `(x, y)`: x a float CxHxW tensor in [0,1] (RGB, not normalised; the model normalises),
y an int label indexing `classes`. Dataset layouts are described in `sources`.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from ..errors import UserError, suggest
from .core import FilePool, View, make_transforms, split_fraction, stratified_subset, tail_fraction
from .sources import BUILDERS, Source, register
from ..utils.pixels import LOW_RES_MAX

RESOLUTIONS = ("auto", "low", "high")


@dataclass
class DataBundle:
    """The splits of one run. `record` is JSON-serialisable and enough to reproduce the splits."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    resolution: str  # "low" | "high"
    record: dict


# ------------------------------------------------------------------------------------- checking


def _check_args(dataset, val_fraction, test_fraction, limit_train, limit_eval, seed, resolution):
    if dataset not in BUILDERS:
        raise UserError(f"unknown dataset '{dataset}'{suggest(dataset, BUILDERS)}: choose one of "
                        f"{', '.join(BUILDERS)}")
    for name, value, lo_ok in (("val-fraction", val_fraction, True), ("test-fraction", test_fraction, False)):
        if not isinstance(value, (int, float)) or not ((0 <= value if lo_ok else 0 < value) and value < 1):
            rng = "[0, 1)" if lo_ok else "(0, 1)"
            raise UserError(f"--{name} {value} is out of range: pass a fraction in {rng}, e.g. 0.05")
    for name, value in (("limit-train", limit_train), ("limit-eval", limit_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise UserError(f"--{name} {value} is invalid: pass a positive number of images, or leave it out")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"--seed {seed} is invalid: pass a non-negative integer")
    if resolution not in RESOLUTIONS:
        raise UserError(f"unknown resolution '{resolution}'{suggest(resolution, RESOLUTIONS)}: choose one of "
                        f"{', '.join(RESOLUTIONS)}")


def _load_source(dataset, data_dir, download, skip_bad_images, classes) -> Source:
    fn = BUILDERS[dataset]
    kwargs = dict(download=download, skip_bad_images=skip_bad_images)
    if classes is not None and "classes" in inspect.signature(fn).parameters:
        kwargs["classes"] = list(classes)
    return fn(data_dir, **kwargs)


def _resolve_resolution(resolution: str, src: Source, run_classes) -> tuple[str, int]:
    """("low"|"high", low-resolution crop size), from the first train image of the run's classes."""
    native = None
    if src.resolution == "low" or resolution == "low" or (src.resolution == "auto" and resolution == "auto"):
        kept, _ = _select(src.train.labels, src.classes, run_classes)
        if kept.any():
            native = max(src.train.size(int(np.argmax(kept))))
    if resolution == "auto":
        resolution = src.resolution if src.resolution != "auto" else (
            "low" if native is not None and native <= LOW_RES_MAX else "high")
    size = native if native is not None and native <= LOW_RES_MAX else 32
    return resolution, int(size)


def _select(labels, source_classes, target_classes):
    """(mask of items whose class is kept, their labels remapped by name into target_classes)."""
    pos = {c: i for i, c in enumerate(target_classes)}
    remap = np.array([pos.get(c, -1) for c in source_classes] or [-1], dtype=np.int64)
    new = remap[np.asarray(labels, dtype=np.int64)] if len(labels) else np.zeros(0, dtype=np.int64)
    return new >= 0, new


def _test_items(src: Source, test_fraction: float, seed: int):
    """(train indices, test pool, test indices, held_out?) over the source's own labels."""
    train_idx = np.arange(len(src.train))
    if src.test is not None:
        return train_idx, src.test, np.arange(len(src.test)), False
    train_idx, test_idx = split_fraction(train_idx, src.train.labels, src.classes, test_fraction, seed, "test")
    if len(test_idx) == 0:
        raise UserError(f"too few images to hold out a test split (test fraction {test_fraction}): add images "
                        "(2+ per class), or give the data its own test split (DIR/test/<class>/ for imagefolder)")
    return train_idx, src.train, test_idx, True


# -------------------------------------------------------------------------------------- building


def build_data(dataset: str, data_dir: str | None = None, *, download: bool = False,
               classes: list[str] | None = None, val_fraction: float = 0.05,
               test_fraction: float = 0.2, limit_train: int | None = None,
               limit_eval: int | None = None, seed: int = 0, skip_bad_images: bool = False,
               resolution: str = "auto", split_seed: int | None = None, val_split: str = "stratified",
               augmentation: str = "autolora") -> DataBundle:
    """Train (train transforms), val and test (test-time transforms) of `dataset`, split as described
    in the module docstring. `classes` keeps only those classes (in the dataset's order); `test_fraction`
    is used only by datasets without an official test split. `resolution` "auto" is "low" for CIFAR,
    "high" for the fine-grained sets, and for imagefolder "low" when the first image is <= 64 px.
    `split_seed` (default: `seed`) seeds the held-out test split, the validation split and the limit_eval
    subsets; `seed` the limit_train subset. Runs with one split_seed and different seeds are validated and
    tested on the same images (paired comparisons) while each draws its own training subset."""
    _check_args(dataset, val_fraction, test_fraction, limit_train, limit_eval, seed, resolution)
    if split_seed is not None:
        _check_args(dataset, val_fraction, test_fraction, limit_train, limit_eval, split_seed, resolution)
    sseed = seed if split_seed is None else split_seed
    if classes is not None:
        classes = list(dict.fromkeys(str(c) for c in classes))
        if not classes:
            raise UserError("--classes is empty: name at least two classes, or leave it out to use all")
    src = _load_source(dataset, data_dir, download, skip_bad_images, classes)
    if classes is not None:
        unknown = [c for c in classes if c not in src.available]
        if unknown:
            raise UserError(f"unknown class '{unknown[0]}'{suggest(unknown[0], src.available)} in --classes: "
                            f"the {dataset} classes are {', '.join(src.available[:20])}"
                            + (f" ... ({len(src.available)} in all)" if len(src.available) > 20 else ""))
    run_classes = [c for c in src.classes if classes is None or c in classes]

    # Splits are computed in the source's labels (per-class seeding makes them independent of the filter).
    train_idx, test_pool, test_idx, held_out = _test_items(src, test_fraction, sseed)
    keep, _ = _select(src.train.labels[train_idx], src.classes, run_classes)
    train_idx = train_idx[keep]
    keep, _ = _select(test_pool.labels[test_idx], src.classes, run_classes)
    test_idx = test_idx[keep]
    counts = np.bincount(src.train.labels[train_idx], minlength=len(src.classes))
    empty = [c for i, c in enumerate(src.classes) if c in run_classes and counts[i] == 0]
    if empty:
        raise UserError(f"class '{empty[0]}' has no training images in {data_dir}: add images to it, or leave it "
                        "out with --classes")

    if val_split == "tail":
        train_idx, val_idx = tail_fraction(train_idx, val_fraction)
    else:
        train_idx, val_idx = split_fraction(train_idx, src.train.labels[train_idx], src.classes, val_fraction, sseed,
                                            "val")
    full_train = len(train_idx)
    train_idx = stratified_subset(train_idx, src.train.labels[train_idx], src.classes, limit_train, seed, "limit_train")
    val_idx = stratified_subset(val_idx, src.train.labels[val_idx], src.classes, limit_eval, sseed, "limit_eval_val")
    full_test = len(test_idx)
    test_idx = stratified_subset(test_idx, test_pool.labels[test_idx], src.classes, limit_eval, sseed,
                                 "limit_eval_test")

    if len(test_idx) == 0:
        raise UserError(f"the test split of {dataset} has no images of the run's classes: give the data a test split "
                        "with those classes")
    res, size = _resolve_resolution(resolution, src, run_classes)
    tf = make_transforms(res, size, uniform=src.uniform, augmentation=augmentation)
    if getattr(src, "train_transform", None) is not None and augmentation == "autolora":
        tf.train = src.train_transform  # a source's own augmentation (e.g. digits: no flips)

    def view(pool, idx, transform):
        _, labels = _select(pool.labels[idx], src.classes, run_classes)
        return View(pool, idx, labels, transform, run_classes)

    train, val, test = view(src.train, train_idx, tf.train), view(src.train, val_idx, tf.test), \
        view(test_pool, test_idx, tf.test)
    record = {
        "dataset": dataset,
        "data_dir": os.path.abspath(os.path.expanduser(str(data_dir))) if data_dir else None,
        "seed": int(seed),
        "split_seed": int(sseed),
        "classes": list(run_classes),
        "classes_filter": classes,
        "val_fraction": float(val_fraction),
        "val_split": val_split,
        "augmentation": augmentation,
        "test_fraction": float(test_fraction) if held_out else None,
        "limit_train": None if limit_train is None else int(limit_train),
        "limit_eval": None if limit_eval is None else int(limit_eval),
        "resolution": res,
        "image_size": tf.image_size,
        "test_split": "held-out" if held_out else "official",
        "sizes": {"train": len(train), "val": len(val), "test": len(test),
                  "train_before_limit": full_train, "test_before_limit": full_test},
        **src.record,
    }
    if held_out and isinstance(test_pool, FilePool):
        record["test_files"] = test.files()  # relative to data_dir; exactly the items of `test`
    return DataBundle(train, val, test, run_classes, res, record)


def build_test_set(dataset: str, data_dir: str | None, *, run_classes: list[str], limit_eval: int | None = None,
                   seed: int = 0, download: bool = False, test_fraction: float = 0.2,
                   skip_bad_images: bool = False, resolution: str = "auto") -> Dataset:
    """The test split of another copy of the data, labels remapped to run_classes by class (folder) name;
    a run class missing from the data -> UserError listing it; extra classes in the data are dropped.
    The split and the limit_eval subset are the ones build_data makes with the same arguments."""
    _check_args(dataset, 0.0, test_fraction, None, limit_eval, seed, resolution)
    run_classes = [str(c) for c in run_classes]
    src = _load_source(dataset, data_dir, download, skip_bad_images, run_classes)
    missing = [c for c in run_classes if c not in src.available]
    if missing:
        raise UserError(f"{len(missing)} class(es) of the run are not in the {dataset} data at {data_dir}: "
                        f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}; point --data-dir "
                        "at a copy with the same class folders")
    _, test_pool, test_idx, _ = _test_items(src, test_fraction, seed)
    keep, _ = _select(test_pool.labels[test_idx], src.classes, run_classes)
    test_idx = test_idx[keep]
    test_idx = stratified_subset(test_idx, test_pool.labels[test_idx], src.classes, limit_eval, seed, "limit_eval_test")
    res, size = _resolve_resolution(resolution, src, run_classes)
    tf = make_transforms(res, size, uniform=src.uniform)
    _, labels = _select(test_pool.labels[test_idx], src.classes, run_classes)
    return View(test_pool, test_idx, labels, tf.test, run_classes)


def split_seed_of(cfg) -> int:
    """The seed of a run's held-out test split, validation split and limit-eval subsets: --split-seed, else --seed."""
    return cfg.seed if cfg.split_seed is None else cfg.split_seed


def run_data(cfg) -> DataBundle:
    """The splits a training run's config (`TrainConfig`) asks for."""
    return build_data(cfg.dataset, cfg.data_dir, download=cfg.download, classes=cfg.classes,
                      val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, limit_train=cfg.limit_train,
                      limit_eval=cfg.limit_eval, seed=cfg.seed, skip_bad_images=cfg.skip_bad_images,
                      split_seed=split_seed_of(cfg), val_split=cfg.val_split, augmentation=cfg.augmentation)


# Builders register themselves on import: import any new builder module above this line.
from . import digits as _digits  # noqa: E402,F401  (registers "digits")
DATASETS = tuple(BUILDERS)

__all__ = ["DataBundle", "DATASETS", "BUILDERS", "Source", "register", "build_data", "build_test_set", "run_data",
           "split_seed_of"]
