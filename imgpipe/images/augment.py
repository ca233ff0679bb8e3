"""The augmentation policy: drawn per image on the training device, previewed, optionally materialised.

The ``augment`` config section is one random policy applied by
:func:`augment_batch` to float NCHW batches, with independent draws per image:
a random resized crop, zoom, rotation and shift (one affine map per image, one
``grid_sample`` per batch, black fill), flips, and brightness / contrast
jitter. Training applies it on the device to every training batch
(``augment.on_device``), so each epoch sees new views and no copy is written;
the augment stage draws a preview with the same function and, only when
``augment.copies`` > 0, materialises that many seeded views per training-pool
image.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from imgpipe.core.atomic import atomic_path, write_csv
from imgpipe.core.logs import Progress
from imgpipe.core.plots import image_grid

log = logging.getLogger("imgpipe")

# Views are made for the whole training pool (imgpipe.data.split.POOL_ROLES), so that
# k-fold cross-validation can pick each fold's own views.
CHUNK = 1024  # source images per chunk written to the output array
# The policy's keys and the values that switch each part off: "no augmentation", not a
# default (config/schema.yaml holds the augment section's defaults, filled in at start-up).
# A mapping that leaves a part out (a test's policy of one part, a section of an older model
# file) has that part switched off.
IDENTITY = {
    "crop_area": [1.0, 1.0],
    "crop_ratio": [1.0, 1.0],
    "scale": [1.0, 1.0],
    "rotation": 0.0,
    "translate": 0.0,
    "hflip": False,
    "vflip": False,
    "brightness": 0.0,
    "contrast": 0.0,
}


def policy(cfg: Mapping) -> dict[str, Any]:
    """The augmentation policy of an ``augment`` section (missing parts switched off: IDENTITY)."""
    return {key: cfg.get(key, off) for key, off in IDENTITY.items()}


def is_geometric(cfg: Mapping) -> bool:
    """Whether the policy moves pixels (crop, zoom, rotation, shift, flips)."""
    p = policy(cfg)
    return any(
        p[key] != IDENTITY[key]
        for key in ("crop_area", "scale", "rotation", "translate", "hflip", "vflip")
    )


def _uniform(n: int, bounds: Any, device: torch.device, generator: Any) -> torch.Tensor:
    low, high = (
        (float(bounds[0]), float(bounds[1]))
        if isinstance(bounds, list | tuple)
        else (-float(bounds), float(bounds))
    )
    return low + (high - low) * torch.rand(n, device=device, generator=generator)


def _signs(n: int, enabled: bool, device: torch.device, generator: Any) -> torch.Tensor:
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    return torch.where(flip & enabled, -1.0, 1.0)


def affine_maps(n: int, cfg: Mapping, device: torch.device, generator: Any = None) -> torch.Tensor:
    """(n, 2, 3) maps from output to input coordinates ([-1, 1]), one random draw per image.

    input = crop_centre + shift + crop_box @ rotation @ flips @ output / zoom, where
    the crop box covers ``crop_area`` of the image at aspect ``crop_ratio``.
    """
    p = policy(cfg)
    area = _uniform(n, p["crop_area"], device, generator)
    log_ratio = _uniform(
        n, [math.log(p["crop_ratio"][0]), math.log(p["crop_ratio"][1])], device, generator
    )
    ratio = torch.exp(log_ratio)
    box_w = torch.sqrt(area * ratio).clamp(max=1.0)
    box_h = torch.sqrt(area / ratio).clamp(max=1.0)
    centre_x = _uniform(n, [-1.0, 1.0], device, generator) * (1 - box_w)
    centre_y = _uniform(n, [-1.0, 1.0], device, generator) * (1 - box_h)
    zoom = _uniform(n, p["scale"], device, generator)
    angle = torch.deg2rad(_uniform(n, float(p["rotation"]), device, generator))
    shift_x = 2 * _uniform(n, float(p["translate"]), device, generator)
    shift_y = 2 * _uniform(n, float(p["translate"]), device, generator)
    flip_x = _signs(n, bool(p["hflip"]), device, generator)
    flip_y = _signs(n, bool(p["vflip"]), device, generator)
    cos, sin = torch.cos(angle), torch.sin(angle)
    maps = torch.empty(n, 2, 3, device=device)
    maps[:, 0, 0] = box_w * cos * flip_x / zoom
    maps[:, 0, 1] = -box_w * sin * flip_y / zoom
    maps[:, 1, 0] = box_h * sin * flip_x / zoom
    maps[:, 1, 1] = box_h * cos * flip_y / zoom
    maps[:, 0, 2] = centre_x + shift_x
    maps[:, 1, 2] = centre_y + shift_y
    return maps


def pixel_maps(maps: torch.Tensor, height: int, width: int) -> np.ndarray:
    """(n, 2, 3) maps in pixels (output pixel -> input pixel) of ``affine_maps``' normalised ones.

    grid_sample's convention (align_corners=False): output pixel j has the
    normalised coordinate u = (2j + 1) / W - 1, input coordinate s lies at pixel
    ((s + 1) W - 1) / 2; composing both with the map gives this affine map.
    """
    m = maps.detach().to("cpu", torch.float64).numpy()
    out = np.empty_like(m)
    sides = (width, height)
    for row, side in enumerate(sides):
        a, b, t = m[:, row, 0], m[:, row, 1], m[:, row, 2]
        out[:, row, 0] = a * side / width
        out[:, row, 1] = b * side / height
        out[:, row, 2] = side / 2 * (a * (1 / width - 1) + b * (1 / height - 1) + t + 1) - 0.5
    return out


# CPU uint8 batches from this side on are warped in uint8 (warp_uint8); smaller ones
# take grid_sample like float batches: it costs little there, and runs on small
# images (the demo's 16 px digits) keep their exact results.
UINT8_WARP_MIN_SIDE = 32
_warp_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _warp_threads() -> ThreadPoolExecutor | None:
    """This process's threads for warp_uint8 (torch's thread count; None for one thread).

    Kept per process id: a pool inherited through fork has no threads.
    """
    global _warp_pool
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    if _warp_pool is None or _warp_pool[:2] != (os.getpid(), threads):
        _warp_pool = (os.getpid(), threads, ThreadPoolExecutor(threads, "imgpipe-warp"))
    return _warp_pool[2]


def warp_uint8(
    x: torch.Tensor, maps: torch.Tensor | None, tables: torch.Tensor | None = None
) -> torch.Tensor:
    """Sample a CPU uint8 NCHW batch through ``maps`` as grid_sample does, by OpenCV, in uint8.

    Bilinear with black outside the image (grid_sample's zero padding), at the
    same coordinates; OpenCV's fixed-point bilinear rounds to whole grey levels
    (1/32 px positions), within a level or two of grid_sample on float input.
    About 10x faster than grid_sample on a CPU: no float copy, no sampling grid.

    With ``tables`` ((C, 256) float32), each plane is then looked up in its
    channel's table on the way out (``maps`` None: the lookup alone), and the
    float batch comes back: float conversion and normalisation in the one
    write of the output, while the warped plane is still in the cache.

    The planes are shared among torch's number of threads (OpenCV releases the
    GIL), each warp on one OpenCV thread: a 224 px warp is too small to split,
    and OpenCV's own pool only contended with torch's (1.7x slower on 2 cores).
    """
    n, channels, height, width = x.shape
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    source = x.contiguous().numpy()
    dtype = torch.uint8 if tables is None else torch.float32
    # The strides of x when they are contiguous ones (a one-channel batch may carry
    # either kind): the model then sees the layout the float path would give it,
    # and convolutions pick the same kernels, to the bit.
    result = (
        torch.empty_like(x, dtype=dtype) if x.is_contiguous() else torch.empty(x.shape, dtype=dtype)
    )
    if tables is not None:
        lookup = tables.detach().to("cpu", torch.float32).contiguous().numpy()
    out = result.numpy()
    matrices = None if maps is None else pixel_maps(maps, height, width)
    planes = [(k, c) for k in range(n) for c in range(channels)]

    def work(first: int, step: int) -> None:
        warped = np.empty((height, width), np.uint8) if tables is not None else None
        for k, c in planes[first::step]:
            if matrices is None:
                cv2.LUT(source[k, c], lookup[c], dst=out[k, c])
                continue
            target = out[k, c] if warped is None else warped
            cv2.warpAffine(
                source[k, c],
                matrices[k],
                (width, height),
                dst=target,
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0,
            )
            if warped is not None:
                cv2.LUT(warped, lookup[c], dst=out[k, c])

    pool = _warp_threads() if len(planes) > 1 else None
    if pool is None:
        work(0, 1)
    else:
        step = min(torch.get_num_threads(), len(planes))
        list(pool.map(work, range(step), [step] * step))
    return result


def augment_batch(x: torch.Tensor, cfg: Mapping, generator: Any = None) -> torch.Tensor:
    """Apply the policy to a float NCHW batch in [0, 1], with independent random draws per image.

    Runs wherever ``x`` is (the training device). ``generator`` seeds the draws
    (the augment stage's seeded views); training draws from torch's global RNG,
    which the LightningModule reseeds at every step. A uint8 batch (0-255) is
    taken as well and comes back as float in [0, 1]; on the CPU, from
    UINT8_WARP_MIN_SIDE px on, its geometry is then sampled in uint8
    (``warp_uint8``: same draws, same maps).
    """
    p = policy(cfg)
    n = x.shape[0]
    as_bytes = x.dtype == torch.uint8
    if n == 0:
        return x.float().div_(255.0) if as_bytes else x
    owned = False  # whether x is a tensor made here (then changed in place: fewer copies)
    if is_geometric(p):
        maps = affine_maps(n, p, x.device, generator)
        if as_bytes and x.device.type == "cpu" and min(x.shape[2:]) >= UINT8_WARP_MIN_SIDE:
            x = warp_uint8(x, maps)
        else:
            x = x.float().div_(255.0) if as_bytes else x
            as_bytes = False
            grid = F.affine_grid(maps, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            owned = True
    in_range = as_bytes  # uint8 / 255 lies in [0, 1]: no clamp unless the colour changes
    if as_bytes:
        x, owned = x.float().div_(255.0), True
    if not owned and (p["brightness"] or p["contrast"]):
        x, owned = x.clone(), True
    if p["brightness"]:
        factor = _uniform(n, [1 - p["brightness"], 1 + p["brightness"]], x.device, generator)
        x.mul_(factor[:, None, None, None])
        in_range = False
    if p["contrast"]:
        factor = _uniform(n, [1 - p["contrast"], 1 + p["contrast"]], x.device, generator)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x.sub_(mean).mul_(factor[:, None, None, None]).add_(mean)
        in_range = False
    if in_range:
        return x
    return x.clamp_(0.0, 1.0) if owned else x.clamp(0.0, 1.0)


def iter_views(
    images: Any, cfg: Mapping, copies: int, seed: int, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """Yield the seeded views of ``chunk`` images at a time: uint8 NHWC, ``copies`` rows per image."""
    generator = torch.Generator().manual_seed(int(seed))
    for start in range(0, len(images), chunk):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk]))
        batch = batch.permute(0, 3, 1, 2).float().div(255.0)  # NHWC uint8 -> NCHW [0, 1]
        batch = batch.repeat_interleave(copies, dim=0)
        views = augment_batch(batch, cfg, generator)
        yield views.mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def check_images(images: Any) -> None:
    """Refuse anything but a uint8 NHWC array with 1 or 3 channels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"expected uint8 (N, H, W, 1|3) images, got {images.dtype} {images.shape}")


def write_augmented(
    images: Any,
    source_ids: np.ndarray,
    cfg: Mapping,
    images_path: str | os.PathLike,
    index_path: str | os.PathLike,
) -> int:
    """Stream the views of ``images`` into ``images_path`` (.npy) and write ``aug_row, source_id``.

    Returns the number of views. The array is filled chunk by chunk through a
    memory map, so the pool's views never have to fit in memory at once.
    """
    check_images(images)
    copies, seed = int(cfg["copies"]), int(cfg["seed"])
    total = len(images) * copies
    with atomic_path(images_path) as tmp:
        out = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(total, *images.shape[1:])
        )
        row = 0
        progress = Progress(len(images), "augment", unit="images")
        if total:
            for views in iter_views(images, cfg, copies, seed):
                out[row : row + len(views)] = views
                row += len(views)
                progress.update(row // copies)
        out.flush()
        del out
    index = pd.DataFrame(
        {"aug_row": np.arange(total), "source_id": np.repeat(np.asarray(source_ids), copies)}
    )
    write_csv(index, index_path)
    return total


def plot_preview(
    images: Any,
    cfg: Mapping,
    path: str | os.PathLike,
    examples: int = 12,
    views: int = 6,
) -> None:
    """Save a grid of examples: each row an original image followed by seeded draws of the policy."""
    picks = np.linspace(0, len(images) - 1, min(examples, len(images))).round().astype(np.int64)
    # Evenly spaced examples: the pool is in index (class folder) order, so they span the classes.
    originals = images[np.unique(picks)] if len(images) else np.zeros((0, 1, 1, 1), np.uint8)
    drawn = np.concatenate(
        list(iter_views(originals, cfg, views, int(cfg["seed"]))) or [originals[:0]]
    )
    rows = [[originals[k], *drawn[k * views : (k + 1) * views]] for k in range(len(originals))]
    titles = [["original", *(f"draw {c}" for c in range(1, views + 1))]] + [[""] * (views + 1)] * (
        len(rows) - 1
    )
    where = "on the training device, every epoch" if cfg["on_device"] else "not during training"
    image_grid(
        rows,
        path,
        cell_titles=titles if rows else None,
        title=f"augmentation policy, applied {where}",
        empty_text="no training image",
    )


def augment_pool(
    images: Any, ids: np.ndarray, cfg: Mapping, outputs: Mapping[str, str | os.PathLike]
) -> int:
    """Write the pool's materialised views (images.npy, index.csv; empty at copies 0) and preview.png."""
    total = write_augmented(images, ids, cfg, outputs["images"], outputs["index"])
    log.info(
        "policy %s (on the device: %s); materialised %d views (%d per image) of %d images",
        policy(cfg),
        cfg["on_device"],
        total,
        cfg["copies"],
        len(images),
    )
    plot_preview(images, cfg, outputs["preview"])
    return total
