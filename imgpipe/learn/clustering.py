"""Unsupervised clustering, arrays in and arrays out: pixel features, K-means (scikit-learn,
or faiss on a subsample for large data), the scores of clusters against labels, a k scan.

Features are (N, D) float arrays, labels and clusters integer arrays of length N."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.errors import DataError
from imgpipe.core.logs import Progress
from imgpipe.core.plots import pyplot, save_figure

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
