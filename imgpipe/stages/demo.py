"""The demo dataset: scikit-learn's bundled handwritten digits as a PNG ImageFolder tree."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from imgpipe.core.atomic import atomic_directory, write_text
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger("imgpipe")


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
    images, labels = digits_images()
    written = []
    with atomic_directory(out, replace=True) as tmp:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            (tmp / str(label)).mkdir(exist_ok=True)
            name = f"{label}/{index:04d}.png"
            if not cv2.imwrite(str(tmp / name), image):
                raise OSError(f"could not write {tmp / name}")
            written.append(f"{out / name},{label}\n")
    write_text("path,label\n" + "".join(written), list_path)
    return len(images)


def run_demo_data(job: StageJob) -> int:
    """The demo_data stage: write the digits tree and its file list."""
    count = write_digits_tree(job.params["tree"], job.output["listing"])
    log.info("wrote %d demo images to %s", count, job.params["tree"])
    return count
