"""Cluster stage: K-means paths, matching-based accuracy, tables, figures, export, the rule."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import make_blobs
from sklearn.metrics import (
    accuracy_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)
from threadpoolctl import threadpool_limits

from imgpipe.core.errors import DataError
from imgpipe.learn import clustering
from imgpipe.learn.clustering import (
    cluster_metrics,
    contingency_table,
    fit_kmeans,
    hungarian_accuracy,
    k_scan,
    pixel_features,
    plot_k_scan,
    purity,
)
from imgpipe.stages.cluster import (
    cluster_images,
    export_clusters,
    plot_montages,
    plot_projection,
    scores_by_role,
)
from imgpipe.stages.demo import digits_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is small and shared: one BLAS/OpenMP thread avoids oversubscription."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    faiss.omp_set_num_threads(before)


def assert_png(path, min_side=50):
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    assert min(image.shape[:2]) >= min_side


# ----- Hungarian accuracy and purity on hand-made cases -----


def test_a_relabelled_perfect_clustering_scores_one():
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    clusters = np.array([7, 7, 4, 4, 9, 9, 1])  # same partition, arbitrary ids
    assert hungarian_accuracy(labels, clusters) == 1.0
    assert purity(labels, clusters) == 1.0
    assert accuracy_score(labels, clusters) == 0.0  # why raw accuracy on ids is wrong


def test_a_known_confusion():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    clusters = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    # cluster 1 -> class 0 (3 right), cluster 0 -> class 1 (3 right)
    assert hungarian_accuracy(labels, clusters) == pytest.approx(6 / 8)
    assert accuracy_score(labels, clusters) == pytest.approx(2 / 8)


def test_more_clusters_than_classes_count_the_unmatched_cluster_as_wrong():
    labels = np.array([0, 0, 0, 1, 1, 1])
    clusters = np.array([0, 0, 2, 1, 1, 1])  # class 0 split over clusters 0 and 2
    assert hungarian_accuracy(labels, clusters) == pytest.approx(5 / 6)
    assert purity(labels, clusters) == 1.0  # many-to-one: both clusters may say "class 0"


def test_fewer_clusters_than_classes_count_the_unmatched_class_as_wrong():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([0, 0, 0, 0, 1, 1, 1])  # classes 0 and 1 merged
    assert hungarian_accuracy(labels, clusters) == pytest.approx(5 / 7)
    assert purity(labels, clusters) == pytest.approx(5 / 7)


def brute_force_accuracy(labels, clusters):
    """Best one-to-one matching by trying every injective assignment (small cases only)."""
    cluster_ids, class_ids = np.unique(clusters), np.unique(labels)
    best = 0
    if len(cluster_ids) <= len(class_ids):
        for classes in itertools.permutations(class_ids, len(cluster_ids)):
            mapping = dict(zip(cluster_ids, classes, strict=True))
            best = max(best, sum(mapping[c] == y for c, y in zip(clusters, labels, strict=True)))
    else:
        for chosen in itertools.permutations(cluster_ids, len(class_ids)):
            mapping = dict(zip(chosen, class_ids, strict=True))
            best = max(
                best, sum(mapping.get(c, -1) == y for c, y in zip(clusters, labels, strict=True))
            )
    return best / len(labels)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), min_size=1, max_size=30),
    st.permutations(range(5)),
)
def test_hungarian_equals_brute_force_and_ignores_cluster_ids(pairs, permutation):
    labels = np.array([p[0] for p in pairs])
    clusters = np.array([p[1] for p in pairs])
    accuracy = hungarian_accuracy(labels, clusters)
    assert accuracy == pytest.approx(brute_force_accuracy(labels, clusters))
    assert hungarian_accuracy(labels, np.array(permutation)[clusters]) == pytest.approx(accuracy)
    assert accuracy <= purity(labels, clusters) + 1e-12


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    clusters = np.where(rng.random(400) < 0.7, labels, rng.integers(0, 6, 400))
    X = rng.normal(size=(400, 3)) + labels[:, None]
    metrics = cluster_metrics(labels, clusters, X, inertia=12.5)
    assert metrics["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert metrics["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))
    assert metrics["inertia"] == 12.5
    assert metrics["n_clusters"] == 6 and metrics["n_classes"] == 5
    assert -1 <= metrics["silhouette"] <= 1
    json.dumps(metrics)  # plain Python types only


def test_silhouette_is_sampled_and_seeded_above_the_threshold():
    X, y = make_blobs(n_samples=6000, n_features=4, centers=3, random_state=0)
    first = cluster_metrics(y, y, X, 0.0, seed=1)["silhouette"]
    assert first == cluster_metrics(y, y, X, 0.0, seed=1)["silhouette"]
    assert first != cluster_metrics(y, y, X, 0.0, seed=2)["silhouette"]
    assert cluster_metrics(y, np.zeros_like(y), X, 0.0)["silhouette"] is None


def test_contingency_table_counts_each_class_per_cluster():
    labels = np.array([0, 0, 1, 2, 2, 2])
    clusters = np.array([1, 1, 1, 0, 0, 3])
    table = contingency_table(labels, clusters, ["cat", "dog", "eel"])
    assert list(table.index) == [0, 1, 3]
    assert list(table.columns) == ["cat", "dog", "eel"]
    assert table.loc[1, "cat"] == 2 and table.loc[1, "dog"] == 1 and table.loc[0, "eel"] == 2
    assert table.to_numpy().sum() == len(labels)


# ----- features and K-means -----


def test_pixel_features_scale_flatten_and_reduce():
    images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 1), dtype=np.uint8)
    raw = pixel_features(images, None)
    assert raw.shape == (40, 36) and raw.dtype == np.float32
    assert raw.min() >= 0 and raw.max() <= 1
    assert np.allclose(raw[3], images[3].ravel() / 255.0)
    assert pixel_features(images, 5, seed=0).shape == (40, 5)
    assert pixel_features(images, 500).shape == (40, 36)  # more dims than pixels: no PCA


def test_fit_kmeans_is_deterministic_on_both_paths():
    X, _ = make_blobs(n_samples=3000, n_features=8, centers=6, random_state=1)
    for large_above in (10_000, 500):
        first = fit_kmeans(X, 6, n_init=3, seed=4, large_above=large_above)
        again = fit_kmeans(X, 6, n_init=3, seed=4, large_above=large_above)
        np.testing.assert_array_equal(first[0], again[0])
        np.testing.assert_array_equal(first[1], again[1])
        assert first[2] == again[2]
        assert first[1].shape == (6, 8) and set(np.unique(first[0])) == set(range(6))


@pytest.fixture
def spy_large(monkeypatch):
    calls = []
    real = clustering.fit_kmeans_large

    def spy(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(clustering, "fit_kmeans_large", spy)
    return calls


def test_large_path_is_taken_above_the_threshold_and_matches_kmeans(spy_large):
    from sklearn.cluster import KMeans

    # Enough rows that the large path subsamples (SAMPLE_PER_CLUSTER * k) and
    # then polishes on all of them.
    X, y = make_blobs(n_samples=30_000, n_features=16, centers=8, cluster_std=4.0, random_state=0)
    assert len(X) > clustering.SAMPLE_PER_CLUSTER * 8
    clusters, centers, inertia = fit_kmeans(X, 8, n_init=3, seed=0, large_above=10_000)
    assert spy_large == [30_000]
    reference = KMeans(8, n_init=1, random_state=0).fit(X)
    ours = normalized_mutual_info_score(y, clusters)
    assert ours >= normalized_mutual_info_score(y, reference.labels_) - 0.01
    # the returned inertia is the sum of squared distances to the returned centres
    recomputed = ((X - centers[clusters]) ** 2).sum()
    assert inertia == pytest.approx(recomputed, rel=1e-4)
    assert inertia <= reference.inertia_ * 1.01

    fit_kmeans(X[:5000], 8, n_init=1, seed=0, large_above=10_000)
    assert spy_large == [30_000]  # below the threshold: scikit-learn's KMeans


def test_large_path_gives_the_same_result_with_two_threads_and_restores_them():
    import faiss

    X, _ = make_blobs(n_samples=5000, n_features=8, centers=5, random_state=3)
    one = fit_kmeans(X, 5, n_init=2, seed=1, large_above=100)
    faiss.omp_set_num_threads(2)
    two = fit_kmeans(X, 5, n_init=2, seed=1, large_above=100)
    assert faiss.omp_get_max_threads() == 2
    np.testing.assert_array_equal(one[0], two[0])
    assert one[2] == pytest.approx(two[2], rel=1e-6)


def test_more_clusters_than_samples_is_a_data_error():
    with pytest.raises(DataError, match="5 clusters from 3 samples"):
        fit_kmeans(np.zeros((3, 2)), 5)


def test_digits_pixel_baseline_lands_near_the_reference():
    """K-means on the digits' pixels: Hungarian accuracy ~0.79, NMI ~0.74 in the literature."""
    images, labels = digits_images()
    X = pixel_features(images, 50, seed=0)
    clusters, _, inertia = fit_kmeans(X, 10, n_init=10, seed=0)
    metrics = cluster_metrics(labels, clusters, X, inertia)
    assert 0.72 <= metrics["hungarian_accuracy"] <= 0.86
    assert 0.68 <= metrics["nmi"] <= 0.80
    assert metrics["purity"] >= metrics["hungarian_accuracy"]


def test_k_scan_inertia_falls_with_k(tmp_path):
    X, _ = make_blobs(n_samples=600, n_features=5, centers=4, random_state=2)
    table = k_scan(X, [6, 2, 4, 4], n_init=2, seed=0)
    assert list(table["k"]) == [2, 4, 6]
    assert table["inertia"].is_monotonic_decreasing
    assert table["silhouette"].idxmax() == 1  # the true k=4 separates best
    plot_k_scan(table, tmp_path / "k.png", chosen=4)
    assert_png(tmp_path / "k.png")


# ----- figures -----


def test_montage_and_projection_are_written(tmp_path):
    images, labels = digits_images()
    images, labels = images[:300], labels[:300]
    X = pixel_features(images, 10)
    clusters = fit_kmeans(X, 12, n_init=1, seed=0)[0]
    plot_montages(images[:, :, :, None], clusters, tmp_path / "montage.png", per_cluster=6)
    assert_png(tmp_path / "montage.png", min_side=300)
    names = [f"digit {d}" for d in range(10)]
    plot_projection(X, clusters, labels, tmp_path / "pca.png", class_names=names)
    plot_projection(X, clusters, labels, tmp_path / "tsne.png", tsne=True, max_points=120)
    assert_png(tmp_path / "pca.png", min_side=300)
    assert (
        cv2.imread(str(tmp_path / "tsne.png")).shape[1]
        > cv2.imread(str(tmp_path / "pca.png")).shape[1]
    )  # the t-SNE panel sits beside the PCA one
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_montage_of_rgb_images(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 10, 10, 3), dtype=np.uint8)
    plot_montages(images, np.arange(20) % 3, tmp_path / "m.png")
    assert_png(tmp_path / "m.png")


# ----- export -----


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def sources(tmp_path):
    """Four images, two of them with the same file name in different folders."""
    paths = []
    for folder, name in (("a", "x.png"), ("b", "x.png"), ("a", "y.png"), ("b", "z.png")):
        path = tmp_path / "src" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(64))
        paths.append(path)
    return paths


@pytest.mark.parametrize("mode", ["symlink", "copy"])
def test_export_keeps_sources_and_never_overwrites(tmp_path, sources, mode):
    before = {p: (digest(p), p.stat().st_mtime_ns) for p in sources}
    out = tmp_path / "out"
    table = export_clusters(sources, np.array([0, 0, 1, 0]), out, mode)

    assert {p: (digest(p), p.stat().st_mtime_ns) for p in sources} == before
    # Two sources named x.png land in one cluster: the second gets a suffix.
    assert sorted(os.listdir(out / "cluster_0")) == ["x-1.png", "x.png", "z.png"]
    assert os.listdir(out / "cluster_1") == ["y.png"]
    for source, exported in zip(table["path"], table["exported"], strict=True):
        assert digest(exported) == digest(source)
        if mode == "symlink":
            assert os.path.islink(exported) and os.readlink(exported) == source
            assert os.path.isabs(os.readlink(exported))
        else:
            assert not os.path.islink(exported)
            assert os.stat(exported).st_mtime_ns == os.stat(source).st_mtime_ns


def test_export_relative_sources_link_to_absolute_paths(tmp_path, sources, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p, tmp_path) for p in sources]
    table = export_clusters(relative, np.zeros(4, dtype=int), tmp_path / "out", "symlink")
    for source, exported in zip(sources, table["exported"], strict=True):
        assert os.readlink(exported) == str(source)


def test_atomic_export_none_leaves_an_empty_folder_and_refuses_a_full_one(tmp_path, sources):
    out = tmp_path / "export"
    table = export_clusters(sources, np.zeros(4, dtype=int), out, "none")
    assert out.is_dir() and not any(out.iterdir())
    assert (table["exported"] == "").all()
    export_clusters(sources, np.array([0, 1, 0, 1]), out, "copy")  # an empty folder is fine
    assert sorted(os.listdir(out)) == ["cluster_0", "cluster_1"]
    with pytest.raises(FileExistsError):
        export_clusters(sources, np.zeros(4, dtype=int), out, "copy")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_of_a_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        export_clusters([tmp_path / "gone.png"], np.array([0]), tmp_path / "out", "copy")


# ----- the stage, end to end on a small clean index -----


@pytest.fixture
def clean_stage(tmp_path):
    """A clean index over two shard arrays of digits (every other row in each) and its PNGs."""
    images, labels = digits_images()
    images, labels = images[:400, :, :, None], labels[:400]
    n = len(labels)
    shard = np.arange(n) % 2
    row = np.arange(n) // 2
    for s in (0, 1):
        np.save(tmp_path / f"shard-{s}.npy", images[shard == s])
    paths = []
    for i, label in enumerate(labels):
        path = tmp_path / "png" / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), images[i])
        paths.append(str(path))
    index = pd.DataFrame(
        {
            "id": np.arange(n),
            "path": paths,
            "relpath": [os.path.relpath(p, tmp_path / "png") for p in paths],
            "label": labels.astype(str),
            "source": "train",
            "sha256": "x",
            "group": np.arange(n),
            "near_group": np.arange(n),
            "shard": shard,
            "row": row,
            "array": [str(tmp_path / f"shard-{s}.npy") for s in shard],
        }
    )
    index.to_csv(tmp_path / "index.csv", index=False)
    return tmp_path / "index.csv", images, labels


OUTPUT_NAMES = {
    "assignments": "assignments.csv",
    "metrics": "metrics.json",
    "contingency": "contingency.csv",
    "montage": "montage.png",
    "scatter": "scatter.png",
    "k_scan": "k_scan.csv",
    "k_scan_png": "k_scan.png",
    "export": "export",
}


def outputs_in(folder):
    return {key: str(folder / name) for key, name in OUTPUT_NAMES.items()}


SETTINGS = {
    "n_clusters": None,
    "n_init": 3,
    "seed": 0,
    "pca_dim": 20,
    "large_above": 200_000,
    "k_values": [],
    "tsne": False,
    "export": "none",
}


def test_pixel_stage_writes_consistent_outputs(tmp_path, clean_stage):
    index_path, images, labels = clean_stage
    out = outputs_in(tmp_path / "pixels")
    metrics = cluster_images(index_path, out, {**SETTINGS, "export": "symlink"}, "pixels")

    assignments = pd.read_csv(out["assignments"])
    assert list(assignments.columns) == ["id", "path", "label", "role", "cluster"]
    assert list(assignments["id"]) == list(range(len(labels)))
    assert (assignments["label"] == labels).all()
    assert assignments["cluster"].nunique() == 10  # default k: the number of classes
    assert json.loads(Path(out["metrics"]).read_text()) == metrics
    assert metrics["hungarian_accuracy"] == pytest.approx(
        hungarian_accuracy(labels, assignments["cluster"])
    )
    assert metrics["hungarian_accuracy"] > 0.6 and metrics["method"] == "sklearn"
    contingency = pd.read_csv(out["contingency"], index_col=0)
    assert contingency.to_numpy().sum() == len(labels)
    assert list(contingency.columns) == [str(d) for d in range(10)]
    scan = pd.read_csv(out["k_scan"])
    assert list(scan["k"]) == [10] and scan["inertia"][0] == pytest.approx(metrics["inertia"])
    for name in ("montage", "scatter", "k_scan_png"):
        assert_png(out[name])
    links = sorted(Path(out["export"]).glob("cluster_*/*.png"))
    assert len(links) == len(labels) and all(p.is_symlink() for p in links)


def test_embedding_stage_uses_the_model_and_scans_k(tmp_path, clean_stage):
    index_path, images, labels = clean_stage
    seen = []

    def fake_embed(checkpoint, batch):
        seen.append((checkpoint, batch.shape))
        one_hot = np.eye(10, dtype=np.float32)[labels]  # a perfect embedding, plus noise
        return one_hot + np.random.default_rng(0).normal(0, 0.05, one_hot.shape)

    out = outputs_in(tmp_path / "embeddings")
    settings = {**SETTINGS, "k_values": [12, 5, 10]}
    metrics = cluster_images(index_path, out, settings, "embeddings", "m.ckpt", fake_embed)
    assert seen == [("m.ckpt", images.shape)]
    assert metrics["hungarian_accuracy"] == 1.0 and metrics["n_features"] == 10
    assert list(pd.read_csv(out["k_scan"])["k"]) == [5, 10, 12]
    assert os.listdir(out["export"]) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n_clusters": 500}, "500 clusters asked for but only 400 images"),
        ({"k_values": [3, 401]}, r"k_values: k=\[401\]"),
    ],
)
def test_impossible_k_is_a_data_error(tmp_path, clean_stage, settings, message):
    out = outputs_in(tmp_path / "pixels")
    with pytest.raises(DataError, match=message):
        cluster_images(clean_stage[0], out, {**SETTINGS, **settings}, "pixels")
    assert not (tmp_path / "pixels").exists()


# ----- the Snakemake rule -----


def workflow_copy(tmp_path):
    """A workflow folder with the real common.smk + cluster.smk and the repository's code."""
    root = tmp_path / "wf"
    (root / "workflow" / "rules").mkdir(parents=True)
    (root / "scripts").mkdir()
    shutil.copytree(REPO / "config", root / "config")
    shutil.copytree(REPO / "envs", root / "envs")  # the rule names its conda env
    config_path = root / "config" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["cluster"].update(n_init=1, export="symlink")
    config_path.write_text(yaml.safe_dump(config))
    for rel in ("workflow/rules/common.smk", "workflow/rules/cluster.smk", "scripts/cluster.py"):
        shutil.copy(REPO / rel, root / rel)
    (root / "imgpipe").symlink_to(REPO / "imgpipe")
    (root / "Snakefile").write_text(
        'configfile: "config/config.yaml"\n\n'
        'include: "workflow/rules/common.smk"\n'
        'include: "workflow/rules/cluster.smk"\n'
    )
    return root


def snakemake(root, *args):
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", "1", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_rule_needs_the_model_only_for_embeddings(tmp_path, clean_stage):
    root = workflow_copy(tmp_path)
    index_path = root / "results" / "clean" / "index.csv"
    index_path.parent.mkdir(parents=True)
    shutil.copy(clean_stage[0], index_path)
    for shard in (0, 1):
        array = root / "results" / "ingest" / f"shard-{shard}" / "images.npy"
        array.parent.mkdir(parents=True)
        shutil.copy(tmp_path / f"shard-{shard}.npy", array)
    ids = pd.read_csv(index_path)["id"]
    split = root / "results" / "split" / "split.csv"
    split.parent.mkdir(parents=True)
    pd.DataFrame({"id": ids, "role": np.where(ids % 5 == 0, "test", "train")}).to_csv(
        split, index=False
    )

    embeddings = snakemake(root, "-n", "results/cluster/embeddings/metrics.json")
    assert embeddings.returncode != 0
    assert "results/train/final/model.ckpt" in embeddings.stderr + embeddings.stdout

    run = snakemake(root, "results/cluster/pixels/metrics.json")
    assert run.returncode == 0, run.stderr
    for name in OUTPUT_NAMES.values():
        assert (root / "results" / "cluster" / "pixels" / name).exists()
    assert (root / "logs" / "cluster" / "pixels.log").exists()
    assert len(list((root / "results/cluster/pixels/export").glob("cluster_*/*.png"))) == 400
    model = root / "results" / "train" / "final" / "model.ckpt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"a newer model")
    again = snakemake(root, "-n", "results/cluster/pixels/metrics.json")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_cluster_scores_are_the_test_roles_images():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    roles = np.where(np.arange(200) % 5 == 0, "test", "train")
    # Training images perfectly grouped by class (the model learned them), test images not.
    clusters = np.where(roles == "train", labels, rng.integers(0, 4, 200))
    X = rng.normal(size=(200, 3))
    scores = scores_by_role(labels, clusters, X, roles, inertia=1.0)
    assert scores["scored_on"] == "test"
    assert scores["by_role"]["train"]["hungarian_accuracy"] == 1.0
    assert scores["hungarian_accuracy"] == scores["by_role"]["test"]["hungarian_accuracy"] < 0.6
    assert scores["n_samples"] == 40
