"""Mining precision on train-pool with its folder names hidden (issue 14).

train-pool's images are hard-linked (or copied) into ONE flat folder under names that are a hash of the
file's bytes (no class, no folder, no order), ``cbir mine``'s pipeline runs on that folder,
and only afterwards are the mined pairs scored against the hidden classes: a pair is
correct when both images come from the same class folder. gpr-mini is not touched.

Usage (from the project root; ~5-10 min on 2 CPU cores):

    python bench/mine.py [--verify sift|orb] [--geometry homography|fundamental] [--min-inliers N]
                         [--neighbours K] [--sweep 8,10,12,15]

Prints precision, pairs, clusters, cluster purity and times; writes bench/results/mine.json
and the mined pairs (bench/results/mined-train-pool.csv, usable by ``cbir train``).
``--sweep`` also scores every stricter inlier threshold from the same verification (a pair
verified with N inliers passes every threshold up to N), so one run gives the whole
precision / pairs curve: what a looser or stricter ``--min-inliers`` would buy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from cbir.data.datasets import list_images
from cbir.fileio import atomic_write_text
from cbir.train.discovery import DEFAULT_NEIGHBOURS, connected_clusters, mine_folder
from cbir.verify import DEFAULT_MIN_INLIERS

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("../shared/datasets")


def flatten(source: Path, flat: Path) -> dict[str, str]:
    """Hard-link (or copy) every image under ``source`` into ``flat`` as <sha1 of its bytes>.<ext>;
    returns flat name -> hidden class (its folder relative to ``source``). Not symlinks:
    cbir's folder listing does not follow a link out of the folder, and the link target
    would name the class."""
    flat.mkdir(parents=True, exist_ok=True)
    truth: dict[str, str] = {}
    for f in list_images(source):
        name = hashlib.sha1(f.read_bytes()).hexdigest()[:16] + f.suffix.lower()
        link = flat / name
        if not link.exists():
            try:
                os.link(f.resolve(), link)
            except OSError:  # another file system
                shutil.copyfile(f, link)
        truth[name] = str(f.parent.relative_to(source))
    return truth


def score(pairs: np.ndarray, clusters: np.ndarray, cls: list[str]) -> dict:
    """Precision of ``pairs`` against the hidden classes ``cls``, pure clusters, pairs by domain."""
    correct = np.array([cls[i] == cls[j] for i, j in pairs], dtype=bool)
    pure = sum(len({cls[k] for k in np.flatnonzero(clusters == c)}) == 1 for c in range(int(clusters.max()) + 1))
    domains: dict[str, tuple[int, int]] = {}
    for (i, _j), ok in zip(pairs, correct, strict=True):
        d = cls[i].split("/")[0]
        n, k = domains.get(d, (0, 0))
        domains[d] = (n + 1, k + int(ok))
    return {
        "precision": round(float(correct.mean()), 4) if len(correct) else float("nan"),
        "correct_pairs": int(correct.sum()),
        "pure_clusters": int(pure),
        "pairs_by_domain": {d: {"pairs": n, "correct": k} for d, (n, k) in sorted(domains.items())},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=DATA / "train-pool")
    ap.add_argument("--flat", type=Path, default=ROOT / "bench/results/train-pool-flat")
    ap.add_argument("--verify", default="sift")
    ap.add_argument("--geometry", default="homography")
    ap.add_argument("--min-inliers", type=int, default=None)
    ap.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", default="", help="comma-separated inlier thresholds to score")
    ap.add_argument("--csv", type=Path, default=ROOT / "bench/results/mined-train-pool.csv")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/mine.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    floor = DEFAULT_MIN_INLIERS if args.min_inliers is None else args.min_inliers
    sweep = sorted(int(x) for x in args.sweep.split(",") if x.strip())
    if sweep and sweep[0] < floor:
        ap.error(f"--sweep {sweep[0]} is below --min-inliers {floor}: those pairs are never verified")
    started = datetime.now(UTC).isoformat(timespec="seconds")

    truth = flatten(args.source, args.flat)
    result = mine_folder(
        args.flat,
        features=args.verify,
        geometry=args.geometry,
        min_inliers=args.min_inliers,
        neighbours=args.neighbours,
        workers=args.threads,
        progress=sys.stderr.isatty(),
        log=lambda m: print(m, flush=True),
    )
    result.write_csv(args.csv)
    # scoring: only now are the hidden classes looked at
    cls = [truth[f.name] for f in result.files]
    report = {
        "date": started,
        "command": "python bench/mine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images": len(truth),
        **result.report(),
        **score(result.pairs, result.clusters, cls),
        "load": os.getloadavg(),
    }
    if sweep:
        report["sweep"] = {}
        for t in sweep:
            keep = result.pairs[result.inliers >= t]
            clusters = connected_clusters(len(result.files), keep)
            n = int(clusters.max()) + 1  # ids 0..n-1; -1 everywhere when nothing verified
            report["sweep"][t] = {"pairs_verified": len(keep), "clusters": n, **score(keep, clusters, cls)}
    atomic_write_text(args.json, json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
