"""Fit the synthetic-descriptor model to real descriptors and show that its draws look real.

Regenerates ``src/cbir/index/synthetic_descriptors.npz`` (the model ``cbir bench ann
--synthetic`` draws from) from the default descriptor (EfficientNet-Lite0 GeM, 1280-d)
of ``train-pool`` and ``rparis-mini``; gpr-mini is never used. Steps:

1. Describe both datasets with ``cbir extract`` (cached in ``--cache``).
2. Labels: a train-pool image's class folder, an rparis-mini image's landmark.
3. Choose the number of domains and the sub-cluster structure by two-fold
   cross-validation over classes (:func:`cbir.index.synthetic.cross_validate`).
4. Validation: fit on 80% of the classes, draw clusters of the sizes of the 20% held out,
   and compare them with those held-out real descriptors (eigenvalue spectrum, similarity
   to the 1st and 10th neighbour and of random pairs), beside isotropic Gaussian clusters
   (the generator bench/index_bench.py used). Also recall@10 of the planner's index
   family on both at the same size, which is what the model is for.
5. Fit on everything and write the package file; a figure and a JSON/Markdown summary.

Usage (from the project root, ~10-20 min on 2 cores, most of it describing images):

    nice -n 19 .venv/bin/python bench/fit_synthetic.py --datasets ../shared/datasets \\
        --cache out/descriptors --figure docs/images/ann-synthetic.png --out out/fit_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cbir.index import ann
from cbir.index.stores.base import SearchParams
from cbir.index.stores.faiss_index import search_parameters
from cbir.index.synthetic import (
    MODEL_FILE,
    DescriptorModel,
    cross_validate,
    fit_model,
    neighbour_profile,
    profile_distance,
)

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("train-pool", "rparis-mini")


def describe(dataset: Path, cache: Path) -> tuple[np.ndarray, list[str]]:
    """Default-descriptor vectors of every image of ``dataset`` and their file paths, by
    ``cbir extract`` (run once; its .npy and manifest are reused)."""
    out = cache / f"{dataset.name}.npy"
    manifest = out.with_suffix(".json")
    if not (out.is_file() and manifest.is_file()):
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "cbir.cli.main", "extract", str(dataset), "--out", str(out), "-q"]
        subprocess.run(cmd, check=True)
    return np.load(out), json.loads(manifest.read_text())["files"]


def class_of(path: str, dataset: Path) -> str:
    """train-pool: ``domain/class`` folders; rparis-mini: the landmark in the file name."""
    rel = Path(path).resolve().relative_to(dataset.resolve())
    if len(rel.parts) >= 3:
        return "/".join(rel.parts[:2])
    return rel.stem.rsplit("_", 1)[0]


def isotropic_clusters(sizes: np.ndarray, dim: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """bench/index_bench.py's generator: random unit centres plus isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim)).astype(np.float32)
    faiss.normalize_L2(centres)
    x = np.repeat(centres, sizes, axis=0)
    x += rng.normal(0.0, spread / np.sqrt(dim), x.shape).astype(np.float32)
    faiss.normalize_L2(x)
    return x


def spectrum(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the covariance, largest first, as shares of the total variance."""
    c = x - x.mean(0)
    s = np.linalg.svd(c.astype(np.float64), compute_uv=False) ** 2
    return s / s.sum()


def ann_recall(x: np.ndarray, seed: int) -> dict[str, float]:
    """recall@10 of the planner's index family (IVF + 4-bit fast-scan PQ, refined on full
    vectors) on ``x``, and of the same with a PCA to 256 dimensions first: 10% of ``x`` as
    queries, the rest as the collection, every list visited (only the codes differ)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    nq = len(x) // 10
    q, db = np.ascontiguousarray(x[perm[:nq]]), np.ascontiguousarray(x[perm[nq:]])
    _, truth = faiss.knn(q, db, 10, metric=faiss.METRIC_INNER_PRODUCT)
    out = {}
    for factory in (ann.ann_plan(len(db), x.shape[1]).factory, "PCAR256," + ann.ann_plan(len(db), 256).factory):
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        index.train(db)
        index.add(db)
        nlist = ann.parse_factory(factory, x.shape[1]).nlist
        for k_factor in (1, 4, 16):
            params = search_parameters(index, SearchParams(nprobe=nlist, k_factor=k_factor), None)
            _, found = index.search(q, 10, params=params)
            hits = [len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]
            out[f"{factory} k_factor={k_factor}"] = float(np.mean(hits))
    return out


def fidelity(x: np.ndarray, labels: np.ndarray, model: DescriptorModel, seed: int) -> dict[str, dict[str, float]]:
    """:func:`ann_recall` on all the real descriptors, on model draws of the same cluster
    sizes, and on isotropic clusters: does the index find synthetic data as hard as real?"""
    _, sizes = np.unique(labels, return_counts=True)
    sets = {
        "real (all fitted)": x,
        "synthetic (model)": model.draw_clusters(sizes, seed=seed),
        "isotropic clusters": isotropic_clusters(sizes, x.shape[1], seed),
    }
    return {name: ann_recall(v, seed) for name, v in sets.items()}


#: (domains, share, size) settings tried by cross-validation; share 1 = no sub-clusters
SETTINGS = [(d, 1.0, 1.0) for d in (1, 2, 3)] + [
    (d, share, size) for d in (1, 2, 3) for share in (0.8, 0.6, 0.4) for size in (3.0, 6.0)
]


def validate(x: np.ndarray, labels: np.ndarray, setting: tuple[int, float, float], seed: int) -> dict[str, Any]:
    """Fit on 80% of the classes; compare draws with the held-out 20%."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    held = np.isin(labels, rng.choice(classes, max(1, len(classes) // 5), replace=False))
    model = fit_model(x[~held], labels[~held], domains=setting[0], substructure=setting[1:], seed=seed)
    _, sizes = np.unique(labels[held], return_counts=True)
    sets = {
        "real (held-out classes)": x[held],
        "synthetic (model)": model.draw_clusters(sizes, seed=seed),
        "isotropic clusters": isotropic_clusters(sizes, x.shape[1], seed),
    }
    profiles = {name: neighbour_profile(v) for name, v in sets.items()}
    real = profiles["real (held-out classes)"]
    return {
        "held_out_classes": int(len(sizes)),
        "held_out_images": int(held.sum()),
        "sets": sets,
        "profiles": profiles,
        "spectra": {name: spectrum(v) for name, v in sets.items()},
        "distance_to_real": {name: profile_distance(real, p) for name, p in profiles.items()},
    }


def figure(result: dict[str, Any], path: Path) -> None:
    """Spectrum and neighbour-similarity distributions of the three sets, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    styles = {"real (held-out classes)": "k-", "synthetic (model)": "C0--", "isotropic clusters": "C3:"}
    for name, style in styles.items():
        ev = result["spectra"][name]
        ev = ev[ev > 1e-9]  # beyond the sample's rank: rounding noise, not spectrum
        axes[0].loglog(np.arange(1, len(ev) + 1), ev, style, label=name)
        for ax, key in zip(axes[1:], ("nn1", "nn10", "pairs"), strict=True):
            values = np.sort(result["profiles"][name][key])
            ax.plot(values, np.linspace(0, 1, len(values)), style, label=name)
    axes[0].set(title="eigenvalue spectrum", xlabel="principal axis", ylabel="share of variance")
    titles = {"nn1": "similarity to nearest neighbour", "nn10": "similarity to 10th neighbour",
              "pairs": "similarity of random pairs"}  # fmt: skip
    for ax, key in zip(axes[1:], titles, strict=True):
        ax.set(title=titles[key], xlabel="cosine similarity", ylabel="cumulative share")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['held_out_images']} descriptors of {result['held_out_classes']} held-out classes "
                 "vs model draws of the same cluster sizes")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def summary(
    result: dict[str, Any], setting: tuple[int, float, float], cv: dict[tuple, float], model_path: Path
) -> dict[str, Any]:
    qs = (0.1, 0.5, 0.9)
    deciles = {
        name: {key: [round(float(np.quantile(v, q)), 3) for q in qs] for key, v in prof.items()}
        for name, prof in result["profiles"].items()
    }
    axes_for = {
        name: {f"{int(p * 100)}%": int(np.searchsorted(np.cumsum(ev), p)) + 1 for p in (0.5, 0.8, 0.9)}
        for name, ev in result["spectra"].items()
    }
    return {
        "setting": {"domains": setting[0], "share": setting[1], "subcluster_size": setting[2]},
        "cv_distance": {f"domains={d} share={sh} size={sz}": v for (d, sh, sz), v in sorted(cv.items())},
        "held_out_classes": result["held_out_classes"],
        "held_out_images": result["held_out_images"],
        "similarity_quantiles_10_50_90": deciles,
        "axes_for_variance_share": axes_for,
        "profile_distance_to_real": result["distance_to_real"],
        "recall_at_10": result["recall"],  # set by main: fidelity() on the final model
        "model_file": str(model_path),
        "model_bytes": model_path.stat().st_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--cache", type=Path, default=ROOT / "out" / "descriptors")
    ap.add_argument("--model", type=Path, default=ROOT / "src" / "cbir" / "index" / MODEL_FILE)
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "ann-synthetic.png")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "fit_synthetic.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", help="domains,share,size: skip the cross-validation (e.g. a previous run's choice)")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)  # k-means on a loaded 2-core machine spins with more
    t = time.perf_counter()
    xs, labels = [], []
    for name in DATASETS:
        x, files = describe(args.datasets / name, args.cache)
        xs.append(x)
        labels += [f"{name}:{class_of(f, args.datasets / name)}" for f in files]
    x, lab = np.concatenate(xs).astype(np.float32), np.asarray(labels)
    print(f"{len(x)} descriptors of {len(np.unique(lab))} classes", flush=True)
    if args.setting:
        d, share, size = args.setting.split(",")
        setting, cv = (int(d), float(share), float(size)), {}
    else:
        cv = cross_validate(x, lab, SETTINGS, seed=args.seed)
        setting = min(cv, key=cv.get)
    print(f"(domains, share, size) = {setting}; cross-validated distances {cv}", flush=True)
    result = validate(x, lab, setting, args.seed)
    model = fit_model(x, lab, domains=setting[0], substructure=setting[1:], seed=args.seed,
                      source=f"{' + '.join(DATASETS)}: {len(x)} efficientnet-lite0 GeM descriptors, "
                      f"{len(np.unique(lab))} classes")  # fmt: skip
    model.save(args.model)
    result["recall"] = fidelity(x, lab, DescriptorModel.load(args.model), args.seed)  # as shipped (float16)
    figure(result, args.figure)
    out = summary(result, setting, cv, args.model)
    out["seconds"] = time.perf_counter() - t
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
