"""Benchmark the large-data K-means path against scikit-learn's KMeans (prints, asserts nothing).

    .venv/bin/python bench/cluster.py            # 1,000,000 x 128 float32, 50 blobs
    .venv/bin/python bench/cluster.py --n 100000 # quick check

Same data (make_blobs, cluster_std=12), same seed, one run each: wall time,
CPU time and NMI against the true blob labels, then the NMI difference and
the time ratio. Also the candidate that was not chosen (MiniBatchKMeans +
full Lloyd passes) with ``--minibatch``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgpipe.learn import clustering  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--std", type=float, default=12.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-init", type=int, default=10, help="restarts of our large path")
    parser.add_argument("--minibatch", action="store_true", help="also time MiniBatchKMeans+Lloyd")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads (both)")
    args = parser.parse_args()
    if args.threads:
        import faiss
        from threadpoolctl import threadpool_limits

        faiss.omp_set_num_threads(args.threads)
        threadpool_limits(limits=args.threads)

    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.datasets import make_blobs
    from sklearn.metrics import normalized_mutual_info_score as nmi

    X, y = make_blobs(
        n_samples=args.n,
        n_features=args.dim,
        centers=args.k,
        cluster_std=args.std,
        random_state=args.seed,
    )
    X = X.astype(np.float32)
    print(
        f"data: {args.n:,} x {args.dim} float32, {args.k} blobs (std {args.std}), cores {os.cpu_count()}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    (labels, _, inertia), wall, cpu = timed(
        lambda: clustering.fit_kmeans(X, args.k, args.n_init, args.seed, large_above=0)
    )
    ours = nmi(y, labels)
    print(
        f"ours (faiss large path, n_init={args.n_init}): {wall:7.2f} s wall {cpu:7.2f} s cpu"
        f"  NMI {ours:.4f}  inertia {inertia:.5g}"
    )
    if args.minibatch:

        def minibatch_then_lloyd():
            mb = MiniBatchKMeans(args.k, n_init=1, random_state=args.seed, batch_size=4096).fit(X)
            return KMeans(args.k, init=mb.cluster_centers_, n_init=1, max_iter=3).fit(X)

        model, wall_mb, cpu_mb = timed(minibatch_then_lloyd)
        print(
            f"MiniBatchKMeans + 3 Lloyd passes:       {wall_mb:7.2f} s wall {cpu_mb:7.2f} s cpu"
            f"  NMI {nmi(y, model.labels_):.4f}  inertia {model.inertia_:.5g}"
        )
    if args.skip_sklearn:
        return
    model, wall_sk, cpu_sk = timed(lambda: KMeans(args.k, n_init=1, random_state=args.seed).fit(X))
    reference = nmi(y, model.labels_)
    print(
        f"sklearn KMeans(n_init=1):               {wall_sk:7.2f} s wall {cpu_sk:7.2f} s cpu"
        f"  NMI {reference:.4f}  inertia {model.inertia_:.5g}"
    )
    print(f"NMI ours - sklearn: {ours - reference:+.4f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"cpu time ratio sklearn / ours: {cpu_sk / cpu:.1f}")
    print(f"imgpipe kmeans vs sklearn KMeans: ratio {wall_sk / wall:.1f}")


if __name__ == "__main__":
    main()
