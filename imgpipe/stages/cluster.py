"""The cluster stage (rule cluster): K-means on pixels or embeddings of the kept images,
scored on the test role, with its montages, projection and optional export of the
clusters as folders. The clustering itself is imgpipe.learn.clustering."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imgpipe.core.atomic import atomic_directory, write_csv, write_json
from imgpipe.core.errors import DataError
from imgpipe.core.plots import image_grid, pyplot, save_figure
from imgpipe.learn.clustering import (
    cluster_metrics,
    contingency_table,
    fit_kmeans,
    k_scan,
    pixel_features,
    plot_k_scan,
)
from imgpipe.workflow.settings import ClusterSettings, filled
from imgpipe.workflow.stage_job import StageJob

log = logging.getLogger(__name__)

EXPORT_MODES = ("none", "symlink", "copy")

# Marker shapes cycled over classes in the projection plot (colour = cluster).
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")


# ----------------------------------------------------------------------------- features


# ----------------------------------------------------------------------------- K-means


# ----------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------- k scan


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
