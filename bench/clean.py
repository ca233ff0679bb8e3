"""Benchmark: our index + clean against cleanvision's Imagelab and a decode-only pass.

Generates a tree of small PNGs (digits, letters, shapes, photo-like textures,
8..64 px) with planted defects, then times on the same tree, in one run:

(a) ours: imgpipe.data.listing.list_images, imgpipe.data.ingest.index_shard for 2 shards in
    2 processes (like the workflow), imgpipe.stages.clean.run_clean;
(b) cleanvision's Imagelab with its default checks (pip install cleanvision==0.3.7,
    the project's ``bench`` extra);
(c) decode-only: cv2.imread of every file in the same 2 processes, nothing else.

Prints throughputs, ratios, the recall of each cleaner on each planted defect
and the fraction of clean images each flags. No assertions.

    .venv/bin/python bench/clean.py --n 20000 [--keep DIR] [--skip-cleanvision]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from imgpipe.stages.demo import digits_images  # noqa: E402

# Planted defects, as fractions of --n (the rest are clean images).
DEFECT_RATES = {
    "exact_duplicate": 0.03,
    "near_duplicate": 0.03,
    "low_information": 0.015,
    "too_dark": 0.015,
    "too_bright": 0.015,
    "blurry": 0.015,
    "tiny": 0.01,
    "truncated": 0.005,
    "zero_byte": 0.003,
    "text_as_png": 0.003,
}
# File-level defects no decoder can read.
UNDECODABLE = ("truncated", "zero_byte", "text_as_png")
LETTERS = "ABCDEFGH"
SHAPES = ("circle", "square", "triangle")
FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
)
# Workers start as fresh interpreters, like Snakemake's jobs (a forked child
# inherits OpenCV's thread pool mid-state and can hang in cv2.setNumThreads).
FRESH_PROCESSES = multiprocessing.get_context("spawn")
# Cleanvision issue types that are not defects (every grey image is "grayscale").
CLEANVISION_IGNORED = {"grayscale"}


# ----------------------------------------------------------------------------- images


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Photo-like grey texture: random phases, natural 1/f amplitude spectrum, full range."""
    f2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    spectrum = (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w))) / np.maximum(
        f2, 1e-4
    ) ** 0.5
    image = np.real(np.fft.ifft2(spectrum))
    return ((image - image.min()) / max(np.ptp(image), 1e-9) * 255).astype(np.uint8)


def contrasting(rng: np.random.Generator) -> tuple[int, int]:
    """Background and foreground grey levels at least 80 apart."""
    bg = int(rng.integers(0, 256))
    return bg, int((bg + rng.integers(80, 177)) % 256)


def digit_image(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """A sklearn digit upscaled (nearest) to 8..64 px and jittered by a small shift."""
    side = int(rng.integers(8, 65))
    image = cv2.resize(
        digits[rng.integers(len(digits))], (side, side), interpolation=cv2.INTER_NEAREST
    )
    shift = rng.integers(-side // 8, side // 8 + 1, size=2)
    return np.roll(image, tuple(int(s) for s in shift), axis=(0, 1))


def letter_image(rng: np.random.Generator, letter: str) -> np.ndarray:
    """A letter drawn with cv2.putText on a plain background, 16..64 px."""
    h = int(rng.integers(16, 65))
    w = int(np.clip(h * rng.uniform(0.7, 1.4), 16, 64))
    bg, fg = contrasting(rng)
    image = np.full((h, w), bg, np.uint8)
    font, thickness = FONTS[rng.integers(len(FONTS))], int(rng.integers(1, 3))
    (tw, th), base = cv2.getTextSize(letter, font, 1.0, thickness)
    scale = min(w / tw, h / (th + base)) * rng.uniform(0.5, 0.85)
    (tw, th), base = cv2.getTextSize(letter, font, scale, thickness)
    org = ((w - tw) // 2 + int(rng.integers(-2, 3)), (h + th) // 2 + int(rng.integers(-2, 3)))
    line = cv2.LINE_AA if rng.random() < 0.5 else cv2.LINE_8
    cv2.putText(image, letter, org, font, scale, fg, thickness, line)
    return image


def shape_image(rng: np.random.Generator, shape: str) -> np.ndarray:
    """A filled or outlined shape on a plain background, 16..64 px."""
    side = int(rng.integers(16, 65))
    bg, fg = contrasting(rng)
    image = np.full((side, side), bg, np.uint8)
    cx, cy = (side // 2 + int(v) for v in rng.integers(-side // 8, side // 8 + 1, size=2))
    r = int(side * rng.uniform(0.2, 0.4))
    thickness = -1 if rng.random() < 0.5 else int(rng.integers(1, 3))
    if shape == "circle":
        cv2.circle(image, (cx, cy), r, fg, thickness, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(image, (cx - r, cy - r), (cx + r, cy + r), fg, thickness)
    else:
        angles = np.array([-90, 30, 150]) * np.pi / 180 + rng.uniform(-0.3, 0.3)
        points = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1).astype(
            np.int32
        )
        if thickness < 0:
            cv2.fillPoly(image, [points], fg, cv2.LINE_AA)
        else:
            cv2.polylines(image, [points], True, fg, thickness, cv2.LINE_AA)
    return image


def clean_image(
    rng: np.random.Generator, digits: tuple[np.ndarray, np.ndarray]
) -> tuple[str, np.ndarray]:
    """A (class, image) of one of the four families; some colour-tinted."""
    family = rng.integers(4)
    if family == 0:
        label = int(rng.integers(10))
        label_name, image = f"digit{label}", digit_image(rng, digits[0][digits[1] == label])
    elif family == 1:
        letter = LETTERS[rng.integers(len(LETTERS))]
        label_name, image = f"letter{letter}", letter_image(rng, letter)
    elif family == 2:
        shape = SHAPES[rng.integers(len(SHAPES))]
        label_name, image = shape, shape_image(rng, shape)
    else:
        side = int(rng.integers(16, 65))
        label_name, image = (
            "texture",
            texture(rng, side, int(np.clip(side * rng.uniform(0.7, 1.4), 16, 64))),
        )
    if rng.random() < 0.3:
        image = np.clip(image[..., None] * rng.uniform(0.5, 1.0, 3), 0, 255).astype(np.uint8)
    return label_name, image


def defect_image(kind: str, rng: np.random.Generator, original: np.ndarray) -> np.ndarray:
    """Pixels of a planted defect (file-level defects are written in write_tree)."""
    h, w = int(rng.integers(16, 65)), int(rng.integers(16, 65))
    if kind == "near_duplicate":
        noisy = original.astype(np.float64) + rng.normal(0, 2, original.shape) + rng.uniform(-3, 3)
        return np.clip(noisy, 0, 255).astype(np.uint8)
    if kind == "low_information":
        flat = np.full((h, w), rng.integers(0, 256), np.float64)
        return np.clip(flat + rng.normal(0, 0.7, (h, w)), 0, 255).astype(np.uint8)
    if kind == "too_dark":
        return (texture(rng, h, w) * rng.uniform(0.02, 0.07)).astype(np.uint8)
    if kind == "too_bright":
        return (255 - texture(rng, h, w) * rng.uniform(0.02, 0.07)).astype(np.uint8)
    if kind == "blurry":
        return cv2.GaussianBlur(texture(rng, max(h, 32), max(w, 32)), (0, 0), rng.uniform(2.0, 3.5))
    if kind == "tiny":
        if rng.random() < 0.5:
            return texture(rng, int(rng.integers(2, 7)), int(rng.integers(2, 7)))
        return texture(rng, 1, int(rng.integers(30, 80)))
    raise ValueError(kind)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a PNG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def write_tree(root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """Write n PNG files under root/<class>/; return the truth table (relpath, kind, original)."""
    rng = np.random.default_rng(seed)
    images, labels = digits_images()
    counts = {kind: int(round(rate * n)) for kind, rate in DEFECT_RATES.items()}
    n_clean = n - sum(counts.values())
    truth, clean_files = [], []
    for k in range(n_clean):
        label, image = clean_image(rng, (images, labels))
        relpath = f"{label}/c{k:06d}.png"
        write_png(root / relpath, image)
        truth.append({"relpath": relpath, "kind": "clean", "original": ""})
        clean_files.append((relpath, label, image))
    for kind, count in counts.items():
        for k in range(count):
            src_rel, label, original = clean_files[rng.integers(len(clean_files))]
            relpath = f"{label}/{kind}{k:05d}.png"
            path = root / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "exact_duplicate":
                shutil.copyfile(root / src_rel, path)
            elif kind == "truncated":
                data = (root / src_rel).read_bytes()
                path.write_bytes(data[: max(len(data) // 2, 20)])
            elif kind == "zero_byte":
                path.write_bytes(b"")
            elif kind == "text_as_png":
                path.write_text("this is not an image\n" * 3)
            else:
                write_png(path, defect_image(kind, rng, original))
            has_original = kind in ("exact_duplicate", "near_duplicate")
            truth.append(
                {"relpath": relpath, "kind": kind, "original": src_rel if has_original else ""}
            )
    return pd.DataFrame(truth)


# ----------------------------------------------------------------------------- the three runs


def run_ours(
    root: Path, work: Path, config: dict, shards: int = 2
) -> tuple[float, pd.DataFrame, pd.DataFrame]:
    """Index + clean like the workflow; return (seconds, rejected table, index table)."""
    from imgpipe.data.image_settings import resolve_settings
    from imgpipe.data.ingest import ingest_listing
    from imgpipe.data.listing import list_images
    from imgpipe.images.quality import CleanSettings, clean_shards

    start = time.perf_counter()
    files = list_images(root, config["data"]["extensions"])
    files_csv = work / "files.csv"
    files.to_csv(files_csv, index=False)
    # As the image_settings rule: image.size / mode "auto" inferred from the files' headers.
    ok = files.loc[files["status"] == "ok", "path"].tolist()
    image = {
        k: v
        for k, v in resolve_settings(config["image"], ok).items()
        if k in ("size", "mode", "fit")
    }
    ingest_listing(files_csv, image, config["ingest"]["max_pixels"], work, shards)
    outputs = {
        name: work / "clean" / f"{name}.{ext}"
        for name, ext in (
            ("index", "csv"),
            ("rejected", "csv"),
            ("summary", "json"),
            ("examples", "png"),
        )
    }
    clean_shards(
        [work / f"shard-{s}" / "stats.csv" for s in range(shards)],
        [work / f"shard-{s}" / "images.npy" for s in range(shards)],
        outputs,
        CleanSettings.from_config(config["clean"]),
    )
    seconds = time.perf_counter() - start
    rejected = pd.read_csv(outputs["rejected"], dtype=str, keep_default_na=False)
    index = pd.read_csv(outputs["index"], dtype={"relpath": str})
    return seconds, rejected, index


def cleanvision_tree(root: Path, truth: pd.DataFrame, mirror: Path) -> Path:
    """Hard-link the tree without the undecodable files (cleanvision 0.3.7 stops on them)."""
    skip = set(truth.loc[truth["kind"].isin(UNDECODABLE), "relpath"])
    for relpath in truth["relpath"]:
        if relpath not in skip:
            (mirror / relpath).parent.mkdir(parents=True, exist_ok=True)
            os.link(root / relpath, mirror / relpath)
    return mirror


def run_cleanvision(root: Path) -> tuple[float, pd.DataFrame]:
    """Imagelab with its defaults; return (seconds, issues table indexed by relpath)."""
    from cleanvision import Imagelab

    start = time.perf_counter()
    lab = Imagelab(data_path=str(root))
    lab.find_issues(verbose=False)
    seconds = time.perf_counter() - start
    issues = lab.issues.copy()
    issues.index = [os.path.relpath(p, root) for p in issues.index]
    return seconds, issues


def _decode(paths: list[str]) -> int:
    cv2.setNumThreads(1)
    return sum(cv2.imread(p, cv2.IMREAD_UNCHANGED) is not None for p in paths)


def run_decode_only(root: Path, workers: int = 2) -> float:
    """cv2.imread every file (in `workers` processes, like ours); return seconds."""
    start = time.perf_counter()
    paths = sorted(str(p) for p in root.rglob("*.png"))
    with ProcessPoolExecutor(workers, mp_context=FRESH_PROCESSES) as pool:
        list(pool.map(_decode, [paths[k::workers] for k in range(workers)]))
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- scoring


def ours_flags(
    truth: pd.DataFrame, rejected: pd.DataFrame, index: pd.DataFrame
) -> tuple[pd.Series, pd.Series]:
    """Per truth row: flagged (rejected, or in a near-duplicate group of 2+) and the reason."""
    reason = rejected.set_index("relpath")["reason"]
    group_size = index.groupby("group")["id"].transform("size")
    grouped = set(index.loc[group_size > 1, "relpath"])
    why = truth["relpath"].map(reason).fillna("")
    why[(why == "") & truth["relpath"].isin(grouped)] = "near_duplicate_group"
    return why != "", why


def cleanvision_flags(truth: pd.DataFrame, issues: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per truth row: flagged by any default issue type but grayscale, and which ones ('skipped' if unread)."""
    columns = [c for c in issues.columns if c.startswith("is_") and c.endswith("_issue")]
    kept = [c for c in columns if c[3:-6] not in CLEANVISION_IGNORED]
    names = issues[kept].apply(lambda row: "+".join(c[3:-6] for c in kept if row[c]), axis=1)
    why = truth["relpath"].map(names)
    return why.fillna("").astype(bool), why.fillna("skipped")


def report(truth: pd.DataFrame, flags: dict[str, tuple[pd.Series, pd.Series]]) -> None:
    """Print recall per defect type and false positives on clean images."""
    originals = set(truth["original"]) - {""}
    clean_rows = (truth["kind"] == "clean") & ~truth["relpath"].isin(originals)
    print(
        f"\n{'defect':18s} {'n':>5s} "
        + " ".join(f"{name + ' recall':>20s}" for name in flags)
        + "   top reasons (ours | cleanvision)"
    )
    for kind in DEFECT_RATES:
        rows = truth["kind"] == kind
        recalls = [f"{flag[rows].mean():20.3f}" for flag, _ in flags.values()]
        tops = [
            why[rows].value_counts().index[0] if rows.any() else "" for _, why in flags.values()
        ]
        print(f"{kind:18s} {rows.sum():5d} " + " ".join(recalls) + "   " + " | ".join(tops))
    fps = [f"{flag[clean_rows].mean():20.4f}" for flag, _ in flags.values()]
    print(f"{'clean (FP rate)':18s} {clean_rows.sum():5d} " + " ".join(fps))
    for name, (flag, why) in flags.items():
        print(
            f"  {name} on clean images: {why[clean_rows & flag].value_counts().head(6).to_dict()}"
        )
    if "ours" in flags:
        why = flags["ours"][1][clean_rows]
        grouped = (why == "near_duplicate_group").mean()
        rejected = ((why != "") & (why != "near_duplicate_group")).mean()
        print(
            f"  ours rejects {rejected:.4f} of the clean images and groups (keeps) {grouped:.4f}:"
            " near twins the generator made by chance"
        )


def main() -> None:
    """Generate the tree, run the three passes, print figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20000, help="number of files to generate")
    parser.add_argument("--keep", type=Path, help="write the tree and outputs here and keep them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cleanvision", action="store_true")
    args = parser.parse_args()
    if not args.skip_cleanvision and importlib.util.find_spec("cleanvision") is None:
        sys.exit(
            "bench/clean.py compares with cleanvision, which is not installed: "
            "pip install '.[bench]' (or run with --skip-cleanvision)"
        )
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    base = args.keep or Path(tempfile.mkdtemp(prefix="imgpipe-bench-"))
    try:
        root, work = base / "tree", base / "work"
        for folder in (root, work, base / "cleanvision-tree"):
            shutil.rmtree(folder, ignore_errors=True)
        work.mkdir(parents=True)
        start = time.perf_counter()
        truth = write_tree(root, args.n, args.seed)
        print(f"generated {len(truth)} files under {root} in {time.perf_counter() - start:.1f} s")
        n = len(truth)

        decode_s = run_decode_only(root)
        ours_s, rejected, index = run_ours(root, work, config)
        results = {"decode-only": decode_s, "ours": ours_s}
        flags = {"ours": ours_flags(truth, rejected, index)}
        if not args.skip_cleanvision:
            # Imagelab raises OSError / UnidentifiedImageError on a truncated, empty
            # or non-image file and returns nothing: it gets the tree without them
            # (they count as missed).
            print(
                f"cleanvision runs on the tree without the {', '.join(UNDECODABLE)} files (it stops on them)"
            )
            cleanvision_s, issues = run_cleanvision(
                cleanvision_tree(root, truth, base / "cleanvision-tree")
            )
            results["cleanvision"] = cleanvision_s
            flags["cleanvision"] = cleanvision_flags(truth, issues)

        print(
            f"\nthroughput on {n} files ({os.cpu_count()} CPUs; ours and decode-only use 2 processes):"
        )
        for name, seconds in results.items():
            print(f"  {name:12s} {seconds:8.2f} s  {n / seconds:9.0f} images/s")
        print(f"  ours / decode-only: {decode_s / ours_s:.2f}x")
        report(truth, flags)
        if "cleanvision" in results:
            print(f"index+clean vs cleanvision: ratio {results['cleanvision'] / ours_s:.1f}")
        else:
            print(f"index+clean vs decode-only: ratio {decode_s / ours_s:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
