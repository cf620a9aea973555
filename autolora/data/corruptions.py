"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019) in their official `.npy` layout, as RobustBench
reads them (`robustbench.data.load_corruptions_cifar`):

    DIR/<corruption>.npy   uint8 (50000, 32, 32, 3): severities 1..5 as consecutive blocks of 10,000 test images
    DIR/labels.npy         (50000,): the test labels, repeated for each severity

(A block is a fifth of labels.npy: 10,000 in the official files, fewer in a test's miniature of the layout.)

The 15 standard corruptions (the benchmark's mean: RobustBench's `corruptions_acc` is the mean accuracy over these
15 × 5 severities) and the 4 extra ones the generator also writes (speckle_noise, gaussian_blur, spatter, saturate).
Nothing is downloaded: a missing DIR is an error that names the archives on Zenodo.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
ZENODO = {"CIFAR-10-C": "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar",
          "CIFAR-100-C": "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's fine labels in their index order (the meta file's fine_label_names: alphabetical)
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split())


def _fetch_hint() -> str:
    return "; get CIFAR-10-C or CIFAR-100-C from Zenodo (" + ", ".join(ZENODO.values()) + ") and untar it"


def find_corruptions(root: str) -> tuple[list[str], np.ndarray]:
    """(the corruptions present in `root`, standard ones first in the benchmark's order, then the extra ones; the
    labels). One UserError for a missing directory, a missing labels.npy or no corruption file."""
    if not os.path.isdir(root):
        raise UserError(f"--corruptions {root}: no such directory{_fetch_hint()}")
    labels_path = os.path.join(root, "labels.npy")
    if not os.path.exists(labels_path):
        raise UserError(f"--corruptions {root} has no labels.npy: it is not CIFAR-10-C / CIFAR-100-C's layout "
                        f"(<corruption>.npy and labels.npy){_fetch_hint()}")
    names = [c for c in (*CORRUPTIONS, *EXTRA_CORRUPTIONS) if os.path.exists(os.path.join(root, c + ".npy"))]
    if not names:
        raise UserError(f"--corruptions {root} holds none of the corruption files ({', '.join(CORRUPTIONS[:3])}, ... "
                        f".npy){_fetch_hint()}")
    try:
        labels = np.load(labels_path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"{labels_path} is not a readable .npy file ({e})") from None
    if labels.ndim != 1 or len(labels) == 0 or len(labels) % len(SEVERITIES):
        raise UserError(f"{labels_path} has shape {labels.shape}: the official layout has {len(SEVERITIES)} "
                        "severities × 10,000 labels")
    return names, np.asarray(labels)


def class_names(labels: np.ndarray) -> tuple[str, ...]:
    """CIFAR-10's or CIFAR-100's class names, by the labels' range."""
    return CIFAR10_CLASSES if int(labels.max()) < len(CIFAR10_CLASSES) else CIFAR100_CLASSES


class CorruptedImages(Dataset):
    """One (corruption, severity) block of the official files: the images of the run's classes, as (x in [0, 1]
    C×H×W float, label index among `run_classes`), at most `limit` of them (the first ones, as RobustBench takes)."""

    def __init__(self, root: str, corruption: str, severity: int, labels: np.ndarray, run_classes,
                 limit: int | None = None):
        path = os.path.join(root, corruption + ".npy")
        try:
            images = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable .npy file ({e})") from None
        n = len(labels) // len(SEVERITIES)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(labels) or images.shape[-1] != 3:
            raise UserError(f"{path} holds {images.dtype} {images.shape}: the official layout is uint8 "
                            f"({len(labels)}, H, W, 3), severities as blocks of {n}")
        block = slice((severity - 1) * n, severity * n)
        names = class_names(labels)
        index = {c: i for i, c in enumerate(run_classes)}
        remap = np.array([index.get(c, -1) for c in names])
        y = remap[np.asarray(labels[block], dtype=np.int64)]
        keep = np.flatnonzero(y >= 0)[:limit]
        self.images, self.rows, self.y = images, keep + block.start, torch.from_numpy(y[keep])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        x = torch.from_numpy(np.array(self.images[self.rows[i]])).permute(2, 0, 1).float().div_(255)
        return x, self.y[i]


def set_name(labels: np.ndarray) -> str:
    """"CIFAR-10" or "CIFAR-100": the set whose classes `labels` index (`class_names`)."""
    return "CIFAR-10" if class_names(labels) is CIFAR10_CLASSES else "CIFAR-100"


def check_classes(labels: np.ndarray, run_classes, root: str) -> None:
    """UserError unless some of the run's classes are classes of the corrupted set (matched by name)."""
    names = class_names(labels)
    if not set(run_classes) & set(names):
        raise UserError(f"none of the run's classes ({', '.join(list(run_classes)[:5])}, ...) is a {set_name(labels)} "
                        f"class, the classes of {root}: corruptions are evaluated on a model of those classes")
