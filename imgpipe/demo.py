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


def write_digits_tree(out_dir: str | os.PathLike, list_path: str | os.PathLike) -> int:
    """Write the digits as ``<out_dir>/<class>/<index>.png`` and their list; return the count.

    The tree is written to a temporary sibling and renamed into place, and the
    list (path,label) last, so a killed job never leaves a tree that looks complete.
    """
    import cv2

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    images, labels = digits_images()
    written = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        class_dir = tmp / str(label)
        class_dir.mkdir(parents=True, exist_ok=True)
        name = f"{label}/{index:04d}.png"
        if not cv2.imwrite(str(tmp / name), image):
            raise OSError(f"could not write {tmp / name}")
        written.append(f"{out / name},{label}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    list_tmp = Path(f"{list_path}.tmp")
    list_tmp.write_text("path,label\n" + "".join(written), encoding="utf-8")
    os.replace(list_tmp, list_path)
    return len(images)
