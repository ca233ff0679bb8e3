"""The training loader holds a few batches, never the dataset: peak memory over an epoch, measured."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
IMAGES, SIDE, BATCH = 4000, 160, 32

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pandas as pd, torch
    sys.path.insert(0, {repo!r})
    from imgpipe.learn.classifier_module import ImageClassifier
    from imgpipe.data.dataset import ShardImages
    from imgpipe.learn.image_datamodule import ImageDataModule

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    torch.set_num_threads(1)
    index = pd.read_csv({index!r})
    images = ShardImages(index)
    labels = np.arange(len(index)) % 4
    data = ImageDataModule(images, labels, np.arange(len(index)), [], batch_size={batch})
    module = ImageClassifier(
        {{"name": "smallcnn", "channels": [4]}}, {{"lr": 0.01}}, 4, 3, {side},
        [0.5] * 3, [0.25] * 3,
        augment_cfg={{"on_device": True, "crop_area": [0.08, 1.0], "hflip": True}},
    )
    loader = data.train_dataloader()
    before = peak_mb()
    seen, total = 0, 0.0
    for x, y in loader:
        total += float(module.preprocess(x, augment=True)[:, :, 0, 0].sum())
        seen += len(y)
    print(json.dumps({{"before": before, "after": peak_mb(), "seen": seen}}))
    """
)


def write_shards(folder: Path) -> int:
    """Two shard arrays of IMAGES 160 px RGB images (~300 MB on disk) and their index; return bytes."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (64, SIDE, SIDE, 3), dtype=np.uint8)
    parts, size = [], 0
    for shard in range(2):
        n = IMAGES // 2
        path = folder / f"shard-{shard}.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, SIDE, SIDE, 3))
        for start in range(0, n, len(tile)):
            array[start : start + len(tile)] = tile[: n - start]
        array.flush()
        size += array.nbytes
        del array
        parts.append(pd.DataFrame({"array": str(path), "row": np.arange(n)}))
    pd.concat(parts).to_csv(folder / "index.csv", index=False)
    return size


def test_an_epoch_of_training_batches_holds_a_few_batches_not_the_dataset(tmp_path):
    on_disk = write_shards(tmp_path)
    script = CHILD.format(repo=str(REPO), index=str(tmp_path / "index.csv"), batch=BATCH, side=SIDE)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["seen"] == IMAGES
    float_batch = BATCH * 3 * SIDE * SIDE * 4 / 2**20  # MB: the biggest thing a step makes
    growth = peak["after"] - peak["before"]
    # A step holds the uint8 batch, its float copy and a few temporaries: at most a
    # handful of batches, while the images on disk are ~100 float batches' worth.
    assert on_disk / 2**20 > 20 * float_batch / 4
    assert growth < 6 * float_batch, (growth, float_batch, on_disk / 2**20)
