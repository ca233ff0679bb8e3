"""A cv_fold job over a small digits set, with the files it reads, for the tests of training jobs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from conftest import digits_at

from imgpipe.learn.cv import assign_folds
from imgpipe.workflow.stage_job import StageJob


def fold_job(tmp_path, best: dict | None, k: int = 3):
    """A cv_fold job over 120 digits (4 classes, pairs of images in one group) and its folds."""
    images, labels = digits_at(8, 400)
    keep = np.flatnonzero(labels < 4)[:120]
    images, labels = images[keep], labels[keep]
    n = len(labels)
    np.save(tmp_path / "shard.npy", images)
    index = pd.DataFrame(
        {
            "id": range(n),
            "path": [f"/d/{i}.png" for i in range(n)],
            "relpath": [f"{i}.png" for i in range(n)],
            "label": labels.astype(str),
            "source": "train",
            "sha256": "0",
            "group": np.arange(n) // 2,
            "near_group": np.arange(n) // 2,
            "shard": 0,
            "row": range(n),
            "array": str(tmp_path / "shard.npy"),
        }
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    pd.DataFrame({"id": range(n), "role": "train"}).to_csv(tmp_path / "split.csv", index=False)
    np.save(tmp_path / "aug.npy", np.zeros((0, 8, 8, 1), np.uint8))
    pd.DataFrame({"aug_row": [], "source_id": []}).to_csv(tmp_path / "aug.csv", index=False)
    folds = assign_folds(index, k, False, seed=0)
    folds.to_csv(tmp_path / "folds.csv", index=False)
    # The image settings ingest would have made the arrays with (results/ingest/image.json).
    image = {"size": int(images.shape[1]), "mode": "gray", "fit": "pad"}
    (tmp_path / "image.json").write_text(json.dumps(image))
    inputs = {
        "index": str(tmp_path / "index.csv"),
        "split": str(tmp_path / "split.csv"),
        "aug_images": str(tmp_path / "aug.npy"),
        "aug_index": str(tmp_path / "aug.csv"),
        "folds": str(tmp_path / "folds.csv"),
        "image": str(tmp_path / "image.json"),
    }
    if best is not None:
        (tmp_path / "best.yaml").write_text(json.dumps(best))
        inputs["best"] = str(tmp_path / "best.yaml")
    job = StageJob(
        input=inputs,
        output={
            "oof": str(tmp_path / "f0" / "oof.csv"),
            "summary": str(tmp_path / "f0" / "s.json"),
        },
        params={
            "model": {"name": "smallcnn", "channels": [4], "dropout": 0.0},
            "train": {"lr": 0.01, "max_epochs": 6, "min_steps": 0, "batch_size": 16},
            "split": {"val_fraction": 0.2, "seed": 0},
            "fit": "pad",
        },
        wildcards={"fold": "0"},
    )
    return job, index, folds
