"""`digits`: scikit-learn's 1,797 handwritten digits (UCI optdigits test set), shipped inside scikit-learn.

The offline dataset of `autolora demo` and of CPU tests: no download, no --data-dir. Each image is 8x8 with
integer values 0..16 (white strokes on black, about 180 per digit); they are scaled to uint8 0..255 (value·255/16)
and, by default, kept at their native 8x8 (`SCALE = 1`; the tiny ResNet's stages then see 8x8, 4x4 and 2x2 maps).
Nearest upsampling (`load_digits_array(scale=2)` → 16x16) adds no information but multiplies the cost
of every forward by the scale squared, which on a CPU is what AutoAttack's 5,000-query Square attack spends
its time on; an L∞ perturbation of an upsampled image can moreover change each copy of an original pixel
independently, a slightly larger threat than at the native size.

Classes are the digit names "0".."9", so `--classes 5,6,7,8,9` selects digits. There is no official test split:
a seeded stratified `test_fraction` of each class is held out (the generic protocol of `autolora.data`).

Training augmentation is the digits' own, not the CIFAR one: a random shift of at most one original pixel
(RandomCrop with zero padding of `SCALE` pixels), no horizontal flips (a mirrored digit is not the same digit).
Evaluation sees the images unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import require
from .core import ArrayPool
from .sources import Source, register

SCALE = 1  # native 8x8; see the module docstring


def load_digits_array(scale: int = SCALE) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8·scale, 8·scale), labels int64 (N,)) of scikit-learn's digits."""
    d = require("sklearn.datasets", "demo", "dataset 'digits' (scikit-learn's images)").load_digits()
    img = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if scale > 1:
        img = img.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.ascontiguousarray(img), np.asarray(d.target, dtype=np.int64)


@dataclass
class DigitsSource(Source):
    train_transform: object = None  # replaces the generic low-resolution training augmentation


def digits_train_transform(size: int, scale: int):
    from torchvision import transforms as T

    return T.Compose([T.RandomCrop(size, padding=scale), T.ToTensor()])


@register("digits")
def build_digits(data_dir=None, *, download=False, skip_bad_images=False) -> Source:
    scale = SCALE
    images, labels = load_digits_array(scale)
    size = images.shape[1]
    return DigitsSource(ArrayPool(images, labels), None, [str(i) for i in range(10)], "low", uniform=True,
                        record={"source": "sklearn.datasets.load_digits: 8x8 values 0..16 scaled to 0..255"
                                          + (f", nearest-upsampled x{scale} to {size}x{size}" if scale > 1 else "")},
                        train_transform=digits_train_transform(size, scale))
