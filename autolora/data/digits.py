"""`digits`: scikit-learn's 1,797 handwritten digits (UCI optdigits test set), shipped inside scikit-learn.

The offline dataset of `autolora demo` and of CPU tests: no download, no --data-dir. Each image is 8x8 with
integer values 0..16 (white strokes on black, about 180 per digit); they are scaled to uint8 0..255 (value·255/16)
and kept at their native 8x8 (the tiny ResNet's stages then see 8x8, 4x4 and 2x2 maps).

Classes are the digit names "0".."9", so `--classes 5,6,7,8,9` selects digits. There is no official test split:
a seeded stratified `test_fraction` of each class is held out (the generic protocol of `autolora.data`).

Training augmentation is the digits' own, not the CIFAR one: a random shift of at most one original pixel
(RandomCrop with zero padding of 1 pixel), no horizontal flips (a mirrored digit is not the same digit).
Evaluation sees the images unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import require
from .core import ArrayPool
from .sources import Source, register

def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8), labels int64 (N,)) of scikit-learn's digits."""
    d = require("sklearn.datasets", "demo", "dataset 'digits' (scikit-learn's images)").load_digits()
    img = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img), np.asarray(d.target, dtype=np.int64)


@dataclass
class DigitsSource(Source):
    train_transform: object = None  # replaces the generic low-resolution training augmentation


def digits_train_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size, padding=1), T.ToTensor()])


@register("digits")
def build_digits(data_dir=None, *, download=False, skip_bad_images=False) -> Source:
    images, labels = load_digits_array()
    return DigitsSource(ArrayPool(images, labels), None, [str(i) for i in range(10)], "low", uniform=True,
                        record={"source": "sklearn.datasets.load_digits: 8x8 values 0..16 scaled to 0..255"},
                        train_transform=digits_train_transform(images.shape[1]))
