"""Near-duplicate benchmark: cbir's CNN similarity against perceptual hashes on generated pairs.

Pairs (cbir.eval.near_duplicates): positives are an image and a transformed copy (resize,
low-quality JPEG, crop, colour change, small rotation, and combinations); negatives are two
distinct images of the same class, the second transformed the same way. Three splits from
../shared/datasets (the project's benchmark data, see its README):

- ``train-pool/calibration``: every other class of train-pool (sorted by name). The ONLY
  split any setting is chosen on: cbir's default threshold, the hashes' calibrated distance,
  and the cbir thresholds that match a hash's precision.
- ``train-pool/held-out``: the other train-pool classes (disjoint classes and images).
- ``gpr-mini (report only)``: gpr-mini images; reported, never used to choose anything.

Methods, all on the same pairs in the same run:
- cbir: cosine of the default descriptor (efficientnet-lite0, GeM), "duplicate if >= T";
  and cbir's star groups (cbir.index.duplicates) built over each split's images at T
  (a pair counts as found when both images land in one group).
- cbir + verify: the same, and the pair must pass geometric verification (cbir.verify:
  SIFT + RANSAC homography, the ``mine`` extra) - what ``cbir duplicates --verify`` does.
- PHash and DHash (imagehash, the library behind imagededup; 64-bit hashes): "duplicate if
  Hamming distance <= d", at imagededup's default d = 10 and at the d calibrated for the
  target precision.

Calibrated on the calibration split only: cbir's default threshold (the lowest cosine with
precision >= --target-precision); for --verify, the fewest inliers that keep that precision
(from MIN_INLIERS_GRID), the cosine floor (the lowest cosine of a calibration duplicate it
admits, rounded down to 0.05) and k, the neighbours verified per image (from K_GRID, by the
recall of the groups). Equal precision: for every hash operating point, cbir's threshold
(and for cbir + verify, threshold and inliers) with the most calibration recall at that
hash's calibration precision; both are then reported on the held-out splits.

Usage (from the project root; the images it makes go to --work):
    nice -n 19 .venv/bin/python bench/duplicates.py [--pairs 400] [--target-precision 0.95] [--write-calibration]
    .venv/bin/python bench/duplicates.py --render bench/results/duplicates.json   # the markdown tables again
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbir.eval import near_duplicates as nd
from cbir.extract import extract
from cbir.index.duplicates import Verification, group_duplicates
from cbir.models import build_descriptor

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "train-pool/calibration"
IMAGEDEDUP_DEFAULT_DISTANCE = 10  # imagededup's max_distance_threshold default for its 64-bit hashes
MIN_INLIERS_GRID = (6, 8, 10, 12, 15, 20)
K_GRID = (5, 10, 20)  # neighbours verified per image: the smallest within 0.01 of the best group recall


@dataclass
class Split:
    name: str
    pairs: list[nd.Pair]
    labels: np.ndarray
    cosine: np.ndarray | None = None
    inliers: np.ndarray | None = None
    hash_distance: dict[str, np.ndarray] | None = None
    features: dict[str, np.ndarray] | None = None


def split_classes(datasets: Path) -> dict[str, dict[str, list[Path]]]:
    """The three splits' classes (class name -> files)."""
    tp = datasets / "train-pool"
    pool = nd.class_images(tp, "objects/*/*.jpg", lambda p: f"objects/{p.parent.name}")
    pool.update(nd.class_images(tp, "characters/*/*.png", lambda p: f"characters/{p.parent.name}"))
    names = sorted(pool)
    gpr = nd.class_images(datasets / "gpr-mini" / "images", "*.jpg", lambda p: p.name.split("_", 1)[0])
    return {
        CALIBRATION: {c: pool[c] for c in names[0::2]},
        "train-pool/held-out": {c: pool[c] for c in names[1::2]},
        "gpr-mini (report only)": gpr,
    }


def hash_distances(splits: list[Split]) -> None:
    import imagehash
    from PIL import Image

    cache: dict[tuple[str, str], Any] = {}

    def h(kind: str, path: str) -> Any:
        if (kind, path) not in cache:
            with Image.open(path) as im:
                cache[kind, path] = getattr(imagehash, kind)(im.convert("RGB"))
        return cache[kind, path]

    for s in splits:
        s.hash_distance = {
            name: np.array([h(kind, p.a) - h(kind, p.b) for p in s.pairs], dtype=np.int64)
            for name, kind in (("PHash", "phash"), ("DHash", "dhash"))
        }


def describe(splits: list[Split], workers: int) -> dict[str, Any]:
    paths = sorted({x for s in splits for p in s.pairs for x in (p.a, p.b)})
    desc = build_descriptor()
    res = extract(desc, paths, workers=workers, progress=False)
    if res.failures:
        raise SystemExit(f"{len(res.failures)} images failed: {res.failures[:3]}")
    row = {p: i for i, p in enumerate(res.paths)}
    for s in splits:
        s.features = {p: res.features[row[p]] for q in s.pairs for p in (q.a, q.b)}
        s.cosine = np.array([float(s.features[p.a] @ s.features[p.b]) for p in s.pairs], np.float32)
    return {"descriptor": res.descriptor["name"], "images": len(paths), "seconds": round(res.seconds, 1)}


def verify_pairs(splits: list[Split], verifier: Any) -> float:
    """Inliers of every labelled pair (features are cached per image); seconds taken."""
    start = time.perf_counter()
    for s in splits:
        s.inliers = np.array([verifier.verify(p.a, p.b).inliers for p in s.pairs], np.int64)
    return round(time.perf_counter() - start, 1)


def group_scores(
    s: Split, threshold: float, verifier: Any = None, verification: Verification | None = None
) -> nd.Scores:
    """Precision/recall of "a and b land in one of cbir's star groups", the groups built over
    all of the split's images by the code ``cbir duplicates`` runs (with ``verifier``: --verify)."""
    paths = sorted(s.features)
    x = np.stack([s.features[p] for p in paths])
    check = None
    if verifier is not None:

        def check(pairs: np.ndarray) -> np.ndarray:
            return np.array([verifier.verify(paths[a], paths[b]).inliers >= verification.min_inliers for a, b in pairs])

    group_of: dict[str, int] = {}
    for g, members in enumerate(
        group_duplicates(x, threshold, check=check, verification=verification or Verification())
    ):
        for r, _ in members:
            group_of[paths[r]] = g
    same = np.array([group_of.get(p.a, -1) == group_of.get(p.b, -2) for p in s.pairs])
    r = nd.precision_recall(same.astype(np.float32), s.labels, 1.0)
    return nd.Scores(threshold, r.precision, r.recall, r.predicted)


def verified_score(s: Split, v: Verification) -> np.ndarray:
    """+inf for a pair that --verify admits (cosine >= floor and enough inliers), else its
    cosine: "score >= T" is then exactly "cosine >= T or verified"."""
    ok = (s.cosine >= v.floor) & (s.inliers >= v.min_inliers)
    return np.where(ok, np.inf, s.cosine).astype(np.float64)


def calibrate_verification(cal: Split, threshold: float, target: float, k: int) -> Verification:
    """On the calibration split only: the fewest inliers (from MIN_INLIERS_GRID) at which
    "cosine >= threshold or verified" keeps precision >= target (fewest: most recall), then
    the floor = the lowest cosine (rounded down to 0.05) of a true pair it admits, so no
    calibration duplicate is lost and fewer candidates are verified."""
    chosen = MIN_INLIERS_GRID[-1]
    for m in MIN_INLIERS_GRID:
        score = verified_score(cal, Verification(m, -1.0, k))
        if nd.precision_recall(score, cal.labels, threshold).precision >= target:
            chosen = m
            break
    admitted = cal.labels & (cal.inliers >= chosen) & (cal.cosine < threshold)
    floor = round(float(np.floor(cal.cosine[admitted].min() * 20) / 20), 2) if admitted.any() else threshold
    return Verification(chosen, floor, k)


def hash_points(cal: Split, target: float) -> list[dict[str, Any]]:
    """Each hash at imagededup's default distance and at the distance calibrated for ``target``."""
    points = []
    for hname in ("PHash", "DHash"):
        d_cal = int(-nd.threshold_for_precision(-cal.hash_distance[hname].astype(np.float64), cal.labels, target))
        for label, d in (("imagededup default", IMAGEDEDUP_DEFAULT_DISTANCE), ("calibrated", d_cal)):
            p_cal = nd.precision_recall(-cal.hash_distance[hname], cal.labels, -d).precision
            points.append({"hash": hname, "setting": label, "distance": d, "calibration_precision": round(p_cal, 4)})
    return points


def evaluate(splits: list[Split], target: float, verifier: Any) -> dict[str, Any]:
    cal = next(s for s in splits if s.name == CALIBRATION)
    t = nd.threshold_for_precision(cal.cosine, cal.labels, target)
    out: dict[str, Any] = {"default_threshold": round(t, 4)}
    v = None
    if verifier is not None:
        v = calibrate_verification(cal, t, target, K_GRID[0])
        by_k = {kk: group_scores(cal, t, verifier, Verification(v.min_inliers, v.floor, kk)) for kk in K_GRID}
        best = max(r.recall for r in by_k.values())
        v = Verification(v.min_inliers, v.floor, min(kk for kk, r in by_k.items() if r.recall >= best - 0.01))
        out["verification"] = {**verifier.settings(), "min_inliers": v.min_inliers, "floor": v.floor, "k": v.k}
        out["calibration_groups_by_k"] = {kk: r.as_dict() for kk, r in by_k.items()}
    points = hash_points(cal, target)
    for pt in points:  # cbir's thresholds matching each hash's calibration precision
        p_h = pt["calibration_precision"]
        pt["cbir_threshold"] = round(nd.threshold_for_precision(cal.cosine, cal.labels, p_h), 4)
        if v is not None:
            pt["verify_min_inliers"], pt["verify_threshold"] = match_precision(cal, v, p_h)
    out["equal_precision"] = points
    out["splits"] = {}
    for s in splits:
        rows: dict[str, Any] = {"pairs": {"positive": int(s.labels.sum()), "negative": int((~s.labels).sum())}}
        rows[f"cbir cosine >= {t:.4f} (default)"] = nd.precision_recall(s.cosine, s.labels, t).as_dict()
        rows["cbir groups (default)"] = group_scores(s, t).as_dict()
        if v is not None:
            rows["cbir + verify (default)"] = nd.precision_recall(verified_score(s, v), s.labels, t).as_dict()
            rows["cbir groups + verify (default)"] = group_scores(s, t, verifier, v).as_dict()
        for pt in points:
            key = f"{pt['hash']} d<={pt['distance']} ({pt['setting']})"
            hashed = nd.precision_recall(-s.hash_distance[pt["hash"]], s.labels, -pt["distance"])
            rows[key] = hashed.as_dict()
            at = f"at {pt['hash']} d<={pt['distance']}'s calibration precision"
            rows[f"cbir {at}"] = nd.precision_recall(s.cosine, s.labels, pt["cbir_threshold"]).as_dict()
            if v is not None:
                matched = Verification(pt["verify_min_inliers"], v.floor, v.k)
                verified = nd.precision_recall(verified_score(s, matched), s.labels, pt["verify_threshold"])
                rows[f"cbir + verify {at}"] = verified.as_dict()
        rows["recall by recipe: cbir default / cbir + verify / PHash d<=10"] = by_recipe(s, t, v)
        out["splits"][s.name] = rows
    return out


def match_precision(cal: Split, v: Verification, precision: float) -> tuple[int, float]:
    """(min inliers, threshold) of "cosine >= T or verified" with the most calibration recall
    at calibration precision >= ``precision`` (both chosen here: fewer inliers admit more
    pairs, a higher T fewer); if none reaches it, the most precise."""
    best: tuple[tuple[bool, float, int, float], int, float] | None = None
    for m in MIN_INLIERS_GRID:
        score = verified_score(cal, Verification(m, v.floor, v.k))
        t = nd.threshold_for_precision(score, cal.labels, precision)
        r = nd.precision_recall(score, cal.labels, t)
        reached = r.precision >= precision
        key = (reached, r.recall if reached else r.precision, m, -t)
        if best is None or key > best[0]:
            best = (key, m, t)
    assert best is not None
    return best[1], round(best[2], 4)


def by_recipe(s: Split, t: float, v: Verification | None) -> dict[str, str]:
    out = {}
    for recipe in nd.RECIPES:
        m = np.array([p.duplicate and tuple(p.recipe) == recipe for p in s.pairs])
        if m.any():
            c = float(np.mean(s.cosine[m] >= t))
            cv = float(np.mean(verified_score(s, v)[m] >= t)) if v is not None else float("nan")
            h = float(np.mean(s.hash_distance["PHash"][m] <= IMAGEDEDUP_DEFAULT_DISTANCE))
            out["+".join(recipe)] = f"{c:.2f} / {cv:.2f} / {h:.2f}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    ap.add_argument("--pairs", type=int, default=300, help="positives per split (as many negatives)")
    ap.add_argument("--target-precision", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-verify", action="store_true", help="skip geometric verification (no OpenCV)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "duplicates")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "duplicates.json")
    ap.add_argument(
        "--write-calibration",
        action="store_true",
        help="record the calibrated default threshold in bench/duplicates_calibration.json",
    )
    ap.add_argument("--render", type=Path, help="only print the markdown tables of a saved run (its --out JSON)")
    args = ap.parse_args()
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return
    start = time.perf_counter()
    splits = []
    for i, (name, classes) in enumerate(split_classes(args.datasets).items()):
        pairs = nd.make_pairs(classes, args.pairs, args.work / name.split(" ")[0], seed=args.seed + i)
        splits.append(Split(name, pairs, np.array([p.duplicate for p in pairs])))
    run: dict[str, Any] = {"command": "bench/duplicates.py " + " ".join(_argv()), "seed": args.seed}
    run["uptime_start"] = _uptime()
    run["extraction"] = describe(splits, args.workers)
    hash_distances(splits)
    verifier = None
    if not args.no_verify:
        from cbir.verify import GeometricVerifier

        verifier = GeometricVerifier(min_inliers=4, cache_size=20_000)  # inliers are thresholded here
        run["verification_seconds"] = verify_pairs(splits, verifier)
    run["target_precision"] = args.target_precision
    run.update(evaluate(splits, args.target_precision, verifier))
    run["seconds"] = round(time.perf_counter() - start, 1)
    run["machine"] = {"python": platform.python_version(), "uptime": _uptime()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_pair_scores(splits, args.out.with_suffix(".pairs.json"))
    args.out.write_text(json.dumps(run, indent=1))
    print(json.dumps(run, indent=1))
    args.out.with_suffix(".md").write_text(markdown(run))
    if args.write_calibration:
        record = {
            "default_threshold": run["default_threshold"],
            "rule": f"lowest cosine threshold with precision >= {args.target_precision} on {CALIBRATION} pairs",
            "calibration_split": CALIBRATION,
            "descriptor": run["extraction"]["descriptor"],
            "pairs_per_split": args.pairs,
            "seed": args.seed,
            "command": run["command"],
            "verification": run.get("verification"),
        }
        (ROOT / "bench" / "duplicates_calibration.json").write_text(json.dumps(record, indent=1) + "\n")


def markdown(run: dict[str, Any]) -> str:
    """The results as markdown tables: per split, each hash operating point next to cbir at
    that point's (calibration) precision, then cbir's defaults; recall by recipe."""
    names = list(run["splits"])
    head = "| method | " + " | ".join(f"{n}: P / R" for n in names) + " |\n|---|" + "---|" * len(names) + "\n"

    def row(label: str, key: str) -> str:
        cells = [run["splits"][n].get(key) for n in names]
        return f"| {label} | " + " | ".join(f"{c['precision']:.3f} / {c['recall']:.3f}" for c in cells) + " |\n"

    out = ["### Recall at equal precision\n\n", head]
    for pt in run["equal_precision"]:
        key = f"{pt['hash']} d<={pt['distance']} ({pt['setting']})"
        at = f"at {pt['hash']} d<={pt['distance']}'s calibration precision"
        out.append(row(f"**{pt['hash']}** d <= {pt['distance']} ({pt['setting']})", key))
        out.append(row(f"cbir cosine >= {pt['cbir_threshold']}", f"cbir {at}"))
        if "verify_threshold" in pt:
            label = f"cbir + verify (cosine >= {pt['verify_threshold']} or >= {pt['verify_min_inliers']} inliers)"
            out.append(row(label, f"cbir + verify {at}"))
    t = run["default_threshold"]
    out += ["\n### cbir's defaults (pairs, and groups built over each split's images)\n\n", head]
    out.append(row(f"cbir cosine >= {t} (default)", f"cbir cosine >= {t:.4f} (default)"))
    out.append(row("cbir groups (`cbir duplicates`)", "cbir groups (default)"))
    if "verification" in run:
        out.append(row("cbir + verify", "cbir + verify (default)"))
        out.append(row("cbir groups + verify (`cbir duplicates --verify`)", "cbir groups + verify (default)"))
    key = "recall by recipe: cbir default / cbir + verify / PHash d<=10"
    out += ["\n### Recall by recipe: cbir default / cbir + verify / PHash d <= 10\n\n"]
    out.append("| recipe | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
    for recipe in run["splits"][names[0]][key]:
        out.append(f"| {recipe} | " + " | ".join(run["splits"][n][key].get(recipe, "") for n in names) + " |\n")
    return "".join(out)


def save_pair_scores(splits: list[Split], path: Path) -> None:
    """Every pair with its scores, for looking at the failures behind the figures."""
    rows = []
    for s in splits:
        for i, p in enumerate(s.pairs):
            row = {"split": s.name, "a": p.a, "b": p.b, "duplicate": p.duplicate, "recipe": "+".join(p.recipe)}
            row["cosine"] = round(float(s.cosine[i]), 4)
            row.update({h: int(d[i]) for h, d in s.hash_distance.items()})
            if s.inliers is not None:
                row["inliers"] = int(s.inliers[i])
            rows.append(row)
    path.write_text(json.dumps(rows))


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


if __name__ == "__main__":
    main()
