"""Unsupervised clustering of images (K-means on pixels or embeddings) and its evaluation.

Arrays in, arrays out: features are (N, D) float arrays, labels and clusters
integer arrays of length N. The writers (plots, tables, export) each write
their file atomically.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.atomic import atomic_directory, write_csv, write_json
from imgpipe.core.errors import DataError
from imgpipe.core.logs import Progress
from imgpipe.core.plots import image_grid, pyplot, save_figure
from imgpipe.workflow.settings import ClusterSettings, filled
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger(__name__)

# Large-data K-means path (chosen by measurement, see bench/cluster.py): restarts of
# greedy k-means++ seeding (on SEED_PER_CLUSTER * k points) + faiss Lloyd iterations
# on a subsample of SAMPLE_PER_CLUSTER * k points, the best restart polished by a few
# faiss Lloyd passes over all points. On 1,000,000 x 128 blobs in 50 clusters it is
# as good as scikit-learn's KMeans(n_init=1) in NMI at a fraction of the time.
SAMPLE_PER_CLUSTER = 256
SEED_PER_CLUSTER = 20
SAMPLE_ITERATIONS = 20
FULL_PASSES = 3
# Restarts on the subsample cost ~0.1 s each at that size, and a single start fell
# into a worse local minimum in about half the seeds measured: never fewer than this.
MIN_SAMPLE_RESTARTS = 10

# Silhouette is O(N^2): above this many points it is computed on a seeded sample.
SILHOUETTE_SAMPLE = 5000

EXPORT_MODES = ("none", "symlink", "copy")

# Marker shapes cycled over classes in the projection plot (colour = cluster).
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")


# ----------------------------------------------------------------------------- features


# Pixel features are taken at most this many pixels a side (area-averaged): the
# coarse layout is what pixel K-means can use, and it bounds the feature width.
PIXEL_SIDE = 32
# PCA is fitted on at most this many (evenly spaced) images, then applied chunk by chunk.
PCA_SAMPLE = 20_000


def flat_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, C) images as float32 rows in [0, 1], shrunk to PIXEL_SIDE px a side first."""
    import cv2

    if images.shape[1] > PIXEL_SIDE:
        size = (PIXEL_SIDE, PIXEL_SIDE)
        small = [cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images]
        images = np.stack([im.reshape(PIXEL_SIDE, PIXEL_SIDE, -1) for im in small])
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def pixel_features(images: Any, pca_dim: int | None = None, seed: int = 0) -> np.ndarray:
    """Rows of scaled pixels (see flat_pixels), reduced by PCA to ``pca_dim`` unless None.

    ``images`` is an array or ``imgpipe.data.dataset.ShardImages``: it is read chunk
    by chunk, the PCA fitted on at most PCA_SAMPLE images.
    """
    from imgpipe.data.dataset import iter_chunks

    n = len(images)
    if n == 0:
        raise DataError("no images to cluster")
    progress = Progress(n, "pixel features", unit="images")

    def chunks() -> Iterator[np.ndarray]:
        for ids, chunk in iter_chunks(images, np.arange(n)):
            yield flat_pixels(chunk)
            progress.update(int(ids[-1]) + 1)

    width = flat_pixels(images[[0]]).shape[1]
    n_components = min(pca_dim or width, n, width)
    if pca_dim is None or n_components >= width:
        # PCA to as many dimensions as there are pixels only rotates.
        return np.concatenate(list(chunks()))
    from sklearn.decomposition import PCA

    sample = np.linspace(0, n - 1, min(n, PCA_SAMPLE)).round().astype(np.int64)
    pca = PCA(n_components=n_components, random_state=seed).fit(flat_pixels(images[sample]))
    return np.concatenate([pca.transform(rows).astype(np.float32) for rows in chunks()])


# ----------------------------------------------------------------------------- K-means


def _check_k(n_samples: int, n_clusters: int) -> None:
    if n_clusters < 1:
        raise DataError(f"n_clusters must be at least 1 (got {n_clusters})")
    if n_clusters > n_samples:
        raise DataError(f"cannot form {n_clusters} clusters from {n_samples} samples")


def fit_kmeans(
    X: np.ndarray,
    n_clusters: int,
    n_init: int = 10,
    seed: int = 0,
    large_above: int = 200_000,
) -> tuple[np.ndarray, np.ndarray, float]:
    """K-means labels (N,), centers (k, D) and inertia; a fast faiss path above ``large_above`` rows.

    Up to ``large_above`` samples this is scikit-learn's KMeans (k-means++,
    ``n_init`` restarts). Above it see ``fit_kmeans_large``.
    """
    X = np.asarray(X)
    _check_k(len(X), n_clusters)
    if len(X) > large_above:
        return fit_kmeans_large(X, n_clusters, n_init=n_init, seed=seed)
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(X)
    return model.labels_.astype(np.int64), model.cluster_centers_, float(model.inertia_)


def fit_kmeans_large(
    X: np.ndarray,
    n_clusters: int,
    n_init: int = 10,
    seed: int = 0,
    sample_per_cluster: int = SAMPLE_PER_CLUSTER,
    full_passes: int = FULL_PASSES,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Large-data K-means: best of several k-means++ runs on a subsample, polished on all rows.

    1. a seeded subsample of ``sample_per_cluster * k`` rows;
    2. ``max(n_init, MIN_SAMPLE_RESTARTS)`` times: scikit-learn's greedy k-means++ seeding on a smaller
       random part of it (``SEED_PER_CLUSTER * k`` rows: seeding is sequential
       in k and would otherwise dominate) and faiss Lloyd iterations on the
       whole subsample; the restart with the lowest subsample inertia wins
       (restarts are cheap there and avoid the local minima, a merged pair of
       clusters and a split one, that a single start often falls into);
    3. ``full_passes`` faiss Lloyd passes over every row, then an exact
       nearest-centre assignment (faiss IndexFlatL2) that gives labels and inertia.
    Deterministic for a given seed (and thread count).
    """
    import faiss
    from sklearn.cluster import kmeans_plusplus

    X = np.ascontiguousarray(X, dtype=np.float32)
    n, dim = X.shape
    _check_k(n, n_clusters)
    rng = np.random.default_rng(seed)
    m = min(n, sample_per_cluster * n_clusters)
    sample = X if m == n else X[np.sort(rng.choice(n, size=m, replace=False))]

    best_obj, centers = np.inf, None
    # The subsample steps are many small parallel regions: one thread is faster
    # than paying OpenMP's synchronisation, badly so on a busy machine.
    with _single_threaded():
        for restart in range(max(n_init, MIN_SAMPLE_RESTARTS)):
            seeding = sample
            if len(sample) > SEED_PER_CLUSTER * n_clusters:
                picks = rng.choice(len(sample), size=SEED_PER_CLUSTER * n_clusters, replace=False)
                seeding = sample[np.sort(picks)]
            init, _ = kmeans_plusplus(seeding, n_clusters, random_state=seed + restart)
            km = _faiss_kmeans(dim, n_clusters, SAMPLE_ITERATIONS, seed + restart, len(sample))
            obj = km.train(sample, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
            if obj < best_obj:
                best_obj, centers = obj, km.centroids
    if full_passes > 0 and m < n:
        km = _faiss_kmeans(dim, n_clusters, full_passes, seed, n)
        km.train(X, init_centroids=centers)
        centers = km.centroids

    index = faiss.IndexFlatL2(dim)
    index.add(centers)
    distances, nearest = index.search(X, 1)
    # ||x||^2 + ||c||^2 - 2 x.c can round slightly below zero.
    inertia = float(np.clip(distances[:, 0], 0, None).sum(dtype=np.float64))
    return nearest[:, 0].astype(np.int64), centers, inertia


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run faiss (OpenMP) and BLAS on one thread inside the block."""
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def _faiss_kmeans(dim: int, k: int, niter: int, seed: int, n_train: int):  # noqa: ANN202
    import faiss

    return faiss.Kmeans(
        dim,
        k,
        niter=niter,
        nredo=1,
        seed=seed,
        # use every training row (no faiss-side subsampling) and no warning on small inputs
        max_points_per_centroid=n_train // k + 1,
        min_points_per_centroid=1,
        verbose=False,
    )


# ----------------------------------------------------------------------------- metrics


def contingency_table(
    labels: np.ndarray,
    clusters: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Counts of each class (columns) in each cluster (rows), every observed id included."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    table = pd.crosstab(
        pd.Series(clusters, name="cluster"), pd.Series(labels, name="class"), dropna=False
    )
    if class_names is not None:
        table = table.rename(columns=lambda code: class_names[code])
    return table


def _counts(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """(n_clusters, n_classes) contingency counts."""
    from sklearn.metrics.cluster import contingency_matrix

    return contingency_matrix(clusters, labels)


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy after the best one-to-one matching of clusters to classes (Hungarian algorithm).

    Convention: each cluster stands for at most one class and each class for at
    most one cluster. With more clusters than classes, every point of an
    unmatched cluster counts as an error; with fewer clusters than classes,
    every point of an unmatched class does. (``purity`` is the many-to-one
    alternative that lets several clusters share a class.)
    """
    from scipy.optimize import linear_sum_assignment

    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no samples")
    counts = _counts(labels, np.asarray(clusters))
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of points in their cluster's majority class (many-to-one: clusters may share a class)."""
    labels = np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no samples")
    return float(_counts(labels, np.asarray(clusters)).max(axis=1).sum() / len(labels))


def sampled_silhouette(
    X: np.ndarray, clusters: np.ndarray, seed: int = 0, sample: int = SILHOUETTE_SAMPLE
) -> float | None:
    """Silhouette score (on a seeded sample above ``sample`` rows); None when undefined."""
    from sklearn.metrics import silhouette_score

    clusters = np.asarray(clusters)
    n_found = len(np.unique(clusters))
    if n_found < 2 or n_found >= len(clusters):
        return None  # undefined for one cluster or one point per cluster
    size = sample if len(clusters) > sample else None
    return float(silhouette_score(X, clusters, sample_size=size, random_state=seed))


def cluster_metrics(
    labels: np.ndarray,
    clusters: np.ndarray,
    X: np.ndarray,
    inertia: float,
    seed: int = 0,
) -> dict:
    """Agreement with the classes (Hungarian accuracy, purity, NMI, ARI) and cluster quality."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    return {
        "n_samples": int(len(labels)),
        "n_classes": int(len(np.unique(labels))),
        "n_clusters": int(len(np.unique(clusters))),
        "hungarian_accuracy": hungarian_accuracy(labels, clusters),
        "purity": purity(labels, clusters),
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "silhouette": sampled_silhouette(X, clusters, seed=seed),
        "inertia": float(inertia),
    }


# ----------------------------------------------------------------------------- k scan


def k_scan(
    X: np.ndarray,
    k_values: Sequence[int],
    n_init: int = 10,
    seed: int = 0,
    large_above: int = 200_000,
) -> pd.DataFrame:
    """Inertia and (sampled) silhouette of K-means for each k: the elbow / silhouette table."""
    rows = []
    ks = sorted(set(int(k) for k in k_values))
    progress = Progress(len(ks), "k scan", unit="k values")
    for k in ks:
        clusters, _, inertia = fit_kmeans(X, k, n_init=n_init, seed=seed, large_above=large_above)
        rows.append(
            {"k": k, "inertia": inertia, "silhouette": sampled_silhouette(X, clusters, seed=seed)}
        )
        progress.advance()
    return pd.DataFrame(rows, columns=["k", "inertia", "silhouette"])


def plot_k_scan(table: pd.DataFrame, path: str | os.PathLike, chosen: int | None = None) -> None:
    """Elbow (inertia) and silhouette against k side by side, the ``chosen`` k marked, as one PNG."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), layout="constrained")
    for ax, column in ((left, "inertia"), (right, "silhouette")):
        values = pd.to_numeric(table[column], errors="coerce")
        ax.plot(table["k"], values, marker="o")
        if chosen is not None:
            ax.axvline(chosen, color="0.5", linestyle="--", linewidth=1, label=f"k = {chosen}")
        ax.set_xlabel("k (clusters)")
        ax.set_ylabel(column)
        ax.set_xticks(table["k"].tolist())
        ax.grid(alpha=0.3)
    left.set_title("elbow")
    right.set_title("silhouette (higher is better)")
    if chosen is not None:
        right.legend(fontsize=8)
    if len(table) < 2:
        fig.suptitle("one k only: list more in cluster.k_values for a scan", fontsize=9)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- figures


def plot_montages(
    images: Any,
    clusters: np.ndarray,
    path: str | os.PathLike,
    per_cluster: int = 10,
    seed: int = 0,
) -> None:
    """One PNG with a row of (seeded random) sample images per cluster (only those are read)."""
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    rows, titles = [], []
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        chosen = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        rows.append(list(images[chosen]))
        titles.append(f"cluster {cluster}\n(n={len(members)})")
    image_grid(rows, path, row_titles=titles)


def _projection_axes(X: np.ndarray, tsne: bool, seed: int) -> list[tuple[str, np.ndarray]]:
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    n_components = min(2, X.shape[0], X.shape[1])
    pca = PCA(n_components=n_components, random_state=seed).fit_transform(X)
    if n_components < 2:  # one feature (or one point): put everything on a line
        pca = np.column_stack([pca[:, 0], np.zeros(len(pca))])
    views = [("PCA", pca)]
    if tsne and len(X) > 3:
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(X) - 1) / 3)
        views.append(
            (
                "t-SNE",
                TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X),
            )
        )
    return views


def plot_projection(
    X: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    tsne: bool = False,
    class_names: Sequence[str] | None = None,
    max_points: int = 5000,
    seed: int = 0,
) -> None:
    """2-D PCA (and optionally t-SNE) scatter: colour = cluster, marker shape = class."""
    plt = pyplot()
    clusters = np.asarray(clusters)
    labels = np.asarray(labels)
    if len(clusters) > max_points:  # keeps the figure legible and t-SNE affordable
        keep = np.sort(np.random.default_rng(seed).choice(len(clusters), max_points, replace=False))
        X, clusters, labels = np.asarray(X)[keep], clusters[keep], labels[keep]
    views = _projection_axes(X, tsne, seed)
    cluster_ids = np.unique(clusters)
    cmap = plt.get_cmap("tab10" if len(cluster_ids) <= 10 else "tab20")
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(cluster_ids)}
    fig, axes = plt.subplots(1, len(views), figsize=(6 * len(views), 5.5), squeeze=False)
    for ax, (title, xy) in zip(axes[0], views, strict=True):
        for i, cls in enumerate(np.unique(labels)):
            mask = labels == cls
            name = class_names[cls] if class_names is not None else str(cls)
            ax.scatter(
                xy[mask, 0],
                xy[mask, 1],
                c=[colour[c] for c in clusters[mask]],
                marker=MARKERS[i % len(MARKERS)],
                s=12,
                alpha=0.7,
                linewidths=0,
                label=name,
            )
        ax.set_title(f"{title}: colour = cluster, marker = class")
        ax.set_xticks([])
        ax.set_yticks([])
    legend = axes[0][-1].legend(
        title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=1.5
    )
    for handle in legend.legend_handles:  # class legend: shape only, not a cluster colour
        handle.set_color("0.3")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- export


def _free_name(folder: Path, name: str) -> str:
    """``name``, or ``stem-1.ext``, ``stem-2.ext``... if it already exists in ``folder``."""
    stem, suffix = os.path.splitext(name)
    candidate, n = name, 0
    while os.path.lexists(folder / candidate):
        n += 1
        candidate = f"{stem}-{n}{suffix}"
    return candidate


def export_clusters(
    paths: Sequence[str | os.PathLike],
    clusters: np.ndarray,
    out_dir: str | os.PathLike,
    mode: str = "symlink",
) -> pd.DataFrame:
    """Link or copy each image into ``out_dir/cluster_<c>/``; return (path, cluster, exported).

    Sources are never moved or changed: ``symlink`` points at the source's
    absolute path, ``copy`` uses shutil.copy2 (content and timestamps). Names
    that collide (same file name from two folders) get a ``-1``, ``-2``...
    suffix. ``none`` writes nothing. The folders are filled in a temporary
    sibling renamed to ``out_dir`` when complete; ``out_dir`` must not exist or
    be empty (it is never merged into or overwritten).
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"export mode must be one of {', '.join(EXPORT_MODES)}, not {mode!r}")
    clusters = np.asarray(clusters)
    if len(paths) != len(clusters):
        raise ValueError(f"{len(paths)} paths but {len(clusters)} cluster ids")
    out = Path(out_dir)
    with atomic_directory(out) as tmp:
        exported = [
            _place(Path(source).absolute(), int(c), tmp, mode)
            for source, c in zip(paths, clusters, strict=True)
        ]
    return pd.DataFrame(
        {
            "path": [str(Path(source).absolute()) for source in paths],
            "cluster": clusters.astype(int),
            "exported": [
                str(out / target.relative_to(tmp)) if target else "" for target in exported
            ],
        },
        columns=["path", "cluster", "exported"],
    )


def _place(source: Path, cluster: int, root: Path, mode: str) -> Path | None:
    """Link or copy one image into ``root/cluster_<cluster>/`` under a free name (None for none)."""
    if mode == "none":
        return None
    if not source.is_file():
        raise DataError(f"cannot export {source}: no such file")
    folder = root / f"cluster_{cluster}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / _free_name(folder, source.name)
    if mode == "symlink":
        os.symlink(source, target)
    else:
        shutil.copy2(source, target)
    return target


# ----------------------------------------------------------------------------- stage


def feature_matrix(
    features: str,
    images: Any,
    settings: Mapping,
    model_path: str | os.PathLike | None = None,
    embed: Callable[[str | os.PathLike, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The (N, D) rows to cluster: scaled pixels (+PCA) or the model's embeddings.

    ``embed(model_path, images)`` defaults to ``imgpipe.infer.inference.embed`` (the
    final model's penultimate layer).
    """
    if features == "pixels":
        return pixel_features(images, settings["pca_dim"], settings["seed"])
    if features == "embeddings":
        if model_path is None:
            raise ValueError("embeddings need the trained model's checkpoint")
        if embed is None:
            from imgpipe.infer.inference import embed
        X = np.asarray(embed(model_path, images), dtype=np.float32)
        if X.ndim != 2 or len(X) != len(images):
            raise DataError(f"embeddings of shape {X.shape} for {len(images)} images")
        if not np.isfinite(X).all():
            raise DataError(f"{model_path}: the model's embeddings contain NaN or infinity")
        return X
    raise ValueError(f"unknown feature space {features!r} (pixels or embeddings)")


def check_k_values(k_values: Sequence[int], n_samples: int) -> list[int]:
    """The distinct k values to scan, refusing any above the number of images."""
    too_large = sorted(k for k in set(k_values) if k > n_samples)
    if too_large:
        raise DataError(
            f"cluster.k_values: k={too_large} exceeds the number of images ({n_samples})"
        )
    return sorted(set(int(k) for k in k_values))


def run_cluster(job: StageJob, embed: Callable[..., np.ndarray] | None = None) -> dict:
    """The cluster stage (one feature space): K-means with BLAS / faiss kept to the job's threads."""
    import faiss
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(job.threads)
    if embed is None:
        from imgpipe.infer.inference import embed as model_embed
        from imgpipe.infer.modelfile import configured_factories

        # A model built by package.module:factory loads when the user's config names it.
        embed = partial(model_embed, model_factory=configured_factories(job.config))
    with threadpool_limits(limits=job.threads):
        return cluster_images(
            job.input["index"],
            job.output,
            job.params["settings"],
            job.wildcards["features"],
            model_path=job.input.get("model"),
            embed=embed,
            split_path=job.input.get("split"),
        )


# The role whose scores are the headline: images no model (nor any choice) was fitted on.
HEADLINE_ROLE = "test"


def scores_by_role(
    labels: np.ndarray,
    clusters: np.ndarray,
    X: np.ndarray,
    roles: np.ndarray,
    inertia: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Cluster metrics on the test role (the headline), and per role and over all images.

    K-means itself never sees a label, but embeddings come from a model
    trained on the train (and, after a sweep, val) images, which it separates
    almost perfectly: only the test role measures how well the learned
    features group images the model never saw. The headline is test's scores,
    ``scored_on`` says so, and ``by_role`` gives train / val / test / all.
    """
    by_role = {"all": cluster_metrics(labels, clusters, X, inertia, seed=seed)}
    for role in ("train", "val", "test"):
        members = roles == role
        if members.sum() >= 2:
            by_role[role] = cluster_metrics(
                labels[members], clusters[members], X[members], float("nan"), seed=seed
            )
            del by_role[role]["inertia"]
    headline = HEADLINE_ROLE if HEADLINE_ROLE in by_role else "all"
    return {
        **by_role[headline],
        "inertia": float(inertia),
        "scored_on": headline,
        "by_role": by_role,
    }


def cluster_images(
    index_path: str | os.PathLike,
    outputs: Mapping[str, str],
    settings: Mapping,
    features: str,
    model_path: str | os.PathLike | None = None,
    embed: Callable[[str | os.PathLike, np.ndarray], np.ndarray] | None = None,
    split_path: str | os.PathLike | None = None,
) -> dict:
    """Features, K-means, metrics, tables, figures and export of one feature space; returns metrics.

    ``outputs`` names the files: assignments, metrics, contingency, montage,
    scatter, k_scan, k_scan_png and export (a folder). ``embed`` as in
    ``feature_matrix``. Every image is clustered; the scores are the test
    role's (``split_path``: split.csv), with each role's and all images' beside
    them (see ``scores_by_role``); without a split every image counts as "all".
    """
    from imgpipe.data.dataset import class_names, label_codes, load_index, open_images
    from imgpipe.data.split import load_split

    # The rule's section (without features), or a test's partial one: the schema fills the rest.
    settings = filled("cluster", settings)
    cfg = ClusterSettings.from_config(settings)
    index = load_index(index_path)
    if len(index) == 0:
        raise DataError(f"{index_path}: no images to cluster")
    names = class_names(index)
    labels = label_codes(index)
    n_clusters = cfg.n_clusters or len(names)
    if n_clusters > len(index):
        raise DataError(
            f"cluster.n_clusters: {n_clusters} clusters asked for but only {len(index)} images"
        )
    if n_clusters < 2:
        raise DataError(
            f"clustering needs at least 2 clusters; the data has {len(names)} class "
            f"({names[0]!r}) and cluster.n_clusters is unset"
        )
    seed = cfg.seed
    n_init = cfg.n_init
    large_above = cfg.large_above
    k_values = check_k_values(cfg.k_values, len(index))

    images = open_images(index)
    roles = (
        load_split(split_path).reindex(index["id"]).fillna("none").to_numpy()
        if split_path
        else np.full(len(index), "none")
    )
    start = time.perf_counter()
    X = feature_matrix(features, images, settings, model_path, embed)
    log.info("%s features: %d x %d in %.1fs", features, *X.shape, time.perf_counter() - start)

    start = time.perf_counter()
    clusters, _, inertia = fit_kmeans(X, n_clusters, n_init, seed, large_above)
    fit_seconds = time.perf_counter() - start
    metrics = scores_by_role(labels, clusters, X, roles, inertia, seed=seed)
    metrics.update(
        features=features,
        n_features=int(X.shape[1]),
        method="faiss-large" if len(X) > large_above else "sklearn",
        fit_seconds=round(fit_seconds, 3),
    )
    log.info("k=%d: %s", n_clusters, metrics)

    assignments = pd.DataFrame(
        {
            "id": index["id"],
            "path": index["path"],
            "label": index["label"],
            "role": roles,
            "cluster": clusters,
        }
    )
    write_csv(assignments, outputs["assignments"])
    write_json(metrics, outputs["metrics"])
    scored = roles == metrics["scored_on"] if metrics["scored_on"] != "all" else slice(None)
    contingency = contingency_table(labels[scored], clusters[scored], names)
    write_csv(contingency, outputs["contingency"], index=True)
    plot_montages(images, clusters, outputs["montage"], seed=seed)
    plot_projection(X, clusters, labels, outputs["scatter"], cfg.tsne, names, seed=seed)

    # The chosen k is always a row (reusing its fit), so the table is never empty.
    scan = k_scan(X, [k for k in k_values if k != n_clusters], n_init, seed, large_above)
    chosen = pd.DataFrame(
        [
            {
                "k": n_clusters,
                "inertia": inertia,
                "silhouette": metrics["by_role"]["all"]["silhouette"],
            }
        ]
    )
    if len(scan):
        scan = pd.concat([scan, chosen], ignore_index=True).sort_values("k", ignore_index=True)
    else:
        scan = chosen
    write_csv(scan, outputs["k_scan"])
    plot_k_scan(scan, outputs["k_scan_png"], chosen=n_clusters)

    mode = cfg.export
    exported = export_clusters(index["path"].tolist(), clusters, outputs["export"], mode)
    if mode != "none":
        log.info("exported %d images (%s) to %s", len(exported), mode, outputs["export"])
    return metrics
