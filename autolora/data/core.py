"""Building blocks shared by all datasets: image pools, views, file listing, seeded splits, transforms.

A *pool* holds the untransformed images of one copy of a split (files on disk or an in-memory array)
and loads item i as an RGB PIL image. A *view* is a torch Dataset over some indices of a pool with
(possibly remapped) labels and a transform; train and val are two views of one pool, so they never
share items. Everything here is picklable, so DataLoader workers can use it.

Splits are seeded per class: the items of a class (in sorted order) are shuffled by a generator
seeded with (seed, purpose, class name). A class's split therefore depends only on its own files,
the seed and the fraction, not on which other classes are present (the `classes` filter and
`build_test_set` reproduce the same split).
"""
from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SKIP_HINT = "delete or replace it, or pass --skip-bad-images to skip unreadable files"


# ----------------------------------------------------------------------------------------- pools


class FilePool:
    """Image files `root/relpath` with integer labels; `load(i)` decodes lazily."""

    def __init__(self, root: str, relpaths: list[str], labels):
        self.root = str(root)
        self.relpaths = list(relpaths)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.relpaths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.relpaths[i])

    def load(self, i: int) -> Image.Image:
        path = self.path(int(i))
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise UserError(f"cannot decode image {path} ({e}): delete or replace the file and rerun") from None

    def size(self, i: int) -> tuple[int, int]:
        """(width, height) from the header only."""
        path = self.path(int(i))
        try:
            with Image.open(path) as im:
                return im.size
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read image {path} ({e}): delete or replace the file and rerun") from None


class ArrayPool:
    """Images in a uint8 array (N,H,W,3) or (N,H,W), e.g. torchvision CIFAR."""

    def __init__(self, data, labels):
        self.data = np.asarray(data)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.data[int(i)]).convert("RGB")

    def size(self, i: int) -> tuple[int, int]:
        return int(self.data.shape[2]), int(self.data.shape[1])


class View(Dataset):
    """Items `(transform(pool[indices[k]]), targets[k])`; `targets` are labels in the run's class order."""

    def __init__(self, pool, indices, targets, transform, classes: list[str]):
        self.pool = pool
        self.indices = np.asarray(indices, dtype=np.int64)
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.classes = list(classes)
        assert len(self.indices) == len(self.targets)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        img = self.pool.load(self.indices[k])
        return self.transform(img), self.targets[k]

    def files(self) -> list[str] | None:
        """Paths of the items relative to the pool's root (None for in-memory data)."""
        if not isinstance(self.pool, FilePool):
            return None
        return [self.pool.relpaths[i] for i in self.indices]


# --------------------------------------------------------------------------------------- listing


def _signature_problem(path: str) -> str | None:
    """Cheap check that a file is a whole JPEG/PNG/BMP/WebP (its first bytes, and for JPEG and PNG whether it ends
    with the format's end marker); the problem or None. A JPEG or PNG without its end marker is decoded in full,
    so only a file that really is cut off (or otherwise undecodable) is reported."""
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read()
    except PermissionError as e:
        return f"permission denied ({e.strerror})"
    except OSError as e:
        return e.strerror or str(e)
    if not head:
        return "empty file"
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else _decode_problem(path)
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail[-64:] else _decode_problem(path)
    if head[:2] == b"BM" or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not a JPEG/PNG/BMP/WebP image"


def _decode_problem(path: str) -> str | None:
    """Decode the whole image; the problem (e.g. truncated) or None."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"cannot be decoded: {e}"


def check_images(root: str, relpaths: list[str], skip_bad_images: bool) -> list[bool]:
    """Which files are whole images (first and last bytes; a file without its end marker is decoded in full), so
    50k files take seconds and a cut-off file is found before training, not in the middle of it.

    A bad file raises UserError naming it, or with `skip_bad_images` is dropped with one warning that counts them.
    Files that pass but fail to decode later still raise UserError naming them when loaded.
    """
    ok, bad = [], []
    for rel in relpaths:
        path = os.path.join(root, rel)
        problem = _signature_problem(path)
        if problem is not None:
            if not skip_bad_images:
                raise UserError(f"unreadable image {path} ({problem}): {SKIP_HINT}")
            bad.append(rel)
        ok.append(problem is None)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"skipped {len(bad)} unreadable image(s) under {root}: {shown}", stacklevel=3)
    return ok


def list_images(folder: str, recursive: bool = True) -> list[str]:
    """Image files (by extension, case-insensitive) under `folder`, relative to it, sorted.

    Links to files are followed. Links to folders are followed only when they stay inside `folder` and lead to a
    folder not listed yet: a link out of the class folder (whose images would take this class's label) or back up
    into it (a loop, which would list the same images again and again) is skipped, with one warning that counts
    the skipped links and names the first. An unreadable folder is a UserError (permission denied)."""
    found = []
    if not recursive:
        try:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.lower().endswith(IMAGE_EXTS) and not e.name.startswith(".") and e.is_file():
                        found.append(e.name)
        except PermissionError:
            raise UserError(f"cannot read class folder {folder}: permission denied; fix its permissions (chmod) or "
                            "remove it") from None
        return sorted(found)
    top = os.path.realpath(folder)
    visited, skipped = {top}, []

    def denied(err):
        raise UserError(f"cannot read {err.filename}: permission denied; fix its permissions (chmod) or remove it") \
            if isinstance(err, PermissionError) else err

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=denied):
        keep = []
        for d in dirnames:
            if d.startswith("."):
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                real = os.path.realpath(full)
                inside = real == top or real.startswith(top + os.sep)
                if not inside or real in visited:
                    skipped.append((full, os.readlink(full), "outside the class folder" if not inside
                                    else "a folder listed already (a loop)"))
                    continue
                visited.add(real)
            else:
                visited.add(os.path.realpath(full))
            keep.append(d)
        dirnames[:] = keep
        rel = os.path.relpath(dirpath, folder)
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                found.append(name if rel == "." else os.path.join(rel, name))
    if skipped:
        link, target, why = skipped[0]
        warnings.warn(f"skipped {len(skipped)} folder link(s) under {folder} whose images are not read: {link} -> "
                      f"{target} ({why})" + (f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""),
                      stacklevel=2)
    return sorted(found)


def class_folders(folder: str) -> list[str]:
    """Sorted names of the (non-hidden) subfolders of `folder`."""
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise UserError(f"cannot read {folder}: permission denied; fix its permissions (chmod)") from None


def folder_pool(root: str, split_dir: str, classes: list[str], skip_bad_images: bool,
                recursive: bool = True) -> FilePool:
    """A FilePool of `root/split_dir/<class>/...` for the given classes (label = position in `classes`)."""
    relpaths, labels = [], []
    for label, name in enumerate(classes):
        cdir = os.path.join(root, split_dir, name)
        files = list_images(cdir, recursive)
        if not files:
            raise UserError(f"class folder {cdir} has no images ({'/'.join(e[1:] for e in IMAGE_EXTS)}): "
                            "add images to it or remove the folder")
        rels = [os.path.join(split_dir, name, f) for f in files]
        ok = check_images(root, rels, skip_bad_images)
        rels = [r for r, good in zip(rels, ok) if good]
        if not rels:
            raise UserError(f"class folder {cdir} has no readable images: replace them or remove the folder")
        relpaths += rels
        labels += [label] * len(rels)
    return FilePool(root, relpaths, labels)


def listed_pool(root: str, prefix: str, items: list[tuple[str, int]], skip_bad_images: bool,
                listed_in: str) -> FilePool:
    """A FilePool of files named in an index file (`prefix/relpath`, label); missing files are errors."""
    items = sorted(items)
    relpaths = [os.path.join(prefix, rel) for rel, _ in items]
    for rel in relpaths:
        if not os.path.isfile(os.path.join(root, rel)):
            raise UserError(f"image {os.path.join(root, rel)} (listed in {listed_in}) is missing: "
                            "re-extract the dataset archive into the data directory")
    ok = check_images(root, relpaths, skip_bad_images)
    return FilePool(root, [r for r, g in zip(relpaths, ok) if g], [lab for (_, lab), g in zip(items, ok) if g])


# ---------------------------------------------------------------------------------------- splits


def _rng(seed: int, purpose: str, class_name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) % 2**32, zlib.crc32(purpose.encode()), zlib.crc32(class_name.encode())])


def _by_class(indices: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(indices, kind="stable")
    indices, labels = indices[order], labels[order]
    return {int(c): indices[labels == c] for c in np.unique(labels)}


def split_fraction(indices, labels, class_names, fraction: float, seed: int, purpose: str):
    """Stratified split of `indices` -> (rest, taken): round(fraction*n) per class, at least 1 when the
    class has 2+ items (and at least 1 always stays in `rest`)."""
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    rest, taken = [], []
    for c, members in _by_class(indices, labels).items():
        n = len(members)
        k = int(round(n * fraction))
        if fraction > 0 and n >= 2:
            k = max(k, 1)
        k = min(k, n - 1) if n >= 1 else 0
        perm = _rng(seed, purpose, class_names[c]).permutation(n)
        taken.append(members[perm[:k]])
        rest.append(members[perm[k:]])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
    return cat(rest), cat(taken)


def tail_fraction(indices, fraction: float):
    """(rest, taken): the last round(fraction·n) of `indices` in their order (RoLI's CIFAR validation split: the last
    10 % of the official train split, `train[45000:50000]`)."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    k = min(int(round(len(indices) * fraction)), max(len(indices) - 1, 0))
    return indices[:len(indices) - k], indices[len(indices) - k:]


def allocate(counts, m: int) -> np.ndarray:
    """Split a budget of m items over classes proportionally to `counts` (largest remainder; at least
    one per non-empty class when m allows)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if m >= total:
        return counts.copy()
    quota = m * counts / total
    alloc = np.floor(quota).astype(np.int64)
    if m >= int((counts > 0).sum()):
        alloc = np.maximum(alloc, (counts > 0).astype(np.int64))
    while alloc.sum() < m:
        alloc[int(np.argmax(np.where(alloc < counts, quota - alloc, -np.inf)))] += 1
    while alloc.sum() > m:
        alloc[int(np.argmax(np.where(alloc > 1, alloc - quota, -np.inf)))] -= 1
    return alloc


def stratified_subset(indices, labels, class_names, m: int | None, seed: int, purpose: str) -> np.ndarray:
    """A seeded subset of m of `indices` with class proportions kept (all of them when m is None)."""
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if m is None or m >= len(indices):
        return np.sort(indices)
    groups = _by_class(indices, labels)
    alloc = allocate([len(g) for g in groups.values()], m)
    picked = [members[_rng(seed, purpose, class_names[c]).permutation(len(members))[:k]]
              for (c, members), k in zip(groups.items(), alloc)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


# ------------------------------------------------------------------------------------ transforms


@dataclass
class Transforms:
    train: object
    test: object
    image_size: int


def make_transforms(resolution: str, size: int = 32, uniform: bool = True, augmentation: str = "autolora") -> Transforms:
    """Test transforms: ToTensor at low resolution; Resize(256) + CenterCrop(224) at high. No normalisation (the model
    does it). `uniform=False` (files of unknown size) prefixes Resize(size) + CenterCrop(size) at low resolution, a
    no-op on images already size x size. Training `augmentation`:
    - autolora (the AutoLoRa paper's): RandomCrop(size, padding=4) + flip at low resolution; Resize(256) +
      RandomResizedCrop(224) + flip at high;
    - roli (RoLI's `src/data/transforms.py`, and no augmentation for CIFAR in its `tf_dataset.py`): none at low
      resolution; Resize(256) + RandomCrop(224) + flip at high;
    - none: the test transforms."""
    if resolution == "low":
        fit = [] if uniform else [T.Resize(size), T.CenterCrop(size)]
        test = T.Compose(fit + [T.ToTensor()])
        if augmentation == "autolora":
            return Transforms(T.Compose(fit + [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]),
                              test, size)
        return Transforms(test, test, size)
    test = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    if augmentation == "autolora":
        train = T.Compose([T.Resize(256), T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    elif augmentation == "roli":
        train = T.Compose([T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip(), T.ToTensor()])
    else:
        train = test
    return Transforms(train, test, 224)
