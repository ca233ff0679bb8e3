"""The demo dataset: scikit-learn's bundled handwritten digits as a PNG ImageFolder tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1,797 digits as uint8 8x8 images (0-255) and their integer labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def write_digits_tree(out_dir: str | os.PathLike) -> int:
    """Write the digits as ``<out_dir>/<class>/<index>.png``; return the number written.

    The tree is written to a temporary sibling and renamed into place, so a
    killed job never leaves a half-written tree that looks complete.
    """
    import cv2

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    images, labels = digits_images()
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        class_dir = tmp / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(class_dir / f"{index:04d}.png"), image):
            raise OSError(f"could not write {class_dir / f'{index:04d}.png'}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return len(images)
