"""Budgets in pixel units of images in [0, 1]: parsed from text such as `8/255` and written back that way."""
from __future__ import annotations


def format_pixels(value) -> str:
    """A budget as a user would type it: 8/255 when it is k/255 (within rounding), else the number; "?" for None."""
    if value is None:
        return "?"
    k = float(value) * 255
    return f"{round(k)}/255" if 0 < value <= 1 and abs(k - round(k)) < 1e-3 else f"{float(value):.4g}"


def pixels(text) -> float:
    """A number, or a fraction such as `8/255` (pixel units of images in [0, 1]); ValueError otherwise."""
    t = str(text).strip()
    if "/" in t:
        num, _, den = t.partition("/")
        value = float(num) / float(den)  # ZeroDivisionError -> caught by callers as ValueError-like
    else:
        value = float(t)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text!r} is not a finite number")
    return value


LOW_RES_MAX = 64  # images at most this many pixels on a side are "low" resolution (CIFAR, digits)


def resolution_of(height: int, width: int) -> str:
    """"low" for images of at most LOW_RES_MAX pixels a side, else "high"."""
    return "low" if max(int(height), int(width)) <= LOW_RES_MAX else "high"
