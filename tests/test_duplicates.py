"""Duplicates a user can act on: star groups (no chains), blockwise kNN pairs, --keep rules,
the removal list, the calibrated default, and the near-duplicate pair generator."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.eval import near_duplicates as nd
from cbir.index.duplicates import DEFAULT_THRESHOLD, PairSearch, Verification, group_duplicates
from cbir.index.removal import FileFacts, plan_removal

ROOT = Path(__file__).resolve().parents[1]


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def on_circle(degrees: list[float]) -> np.ndarray:
    a = np.radians(degrees)
    return l2n(np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1))


def test_star_groups_never_chain() -> None:
    # a line of four at 0, 15, 30, 45 degrees: neighbours are within T, two steps apart are not
    x = on_circle([0.0, 15.0, 30.0, 45.0])
    sims = x @ x.T
    t = 0.95
    assert all(sims[i, i + 1] >= t for i in range(3)) and all(sims[i, i + 2] < t for i in range(2))
    groups = group_duplicates(x, t)
    # union-find would make one group of 4 with 0 and 3 at cos 45 = 0.71; a star centred on 1
    # (most neighbours, lowest id) takes 0 and 2; 3's only neighbour is taken: it is left alone
    assert [[r for r, _ in g] for g in groups] == [[1, 0, 2] if sims[1, 0] >= sims[1, 2] else [1, 2, 0]]
    assert groups[0][0] == (1, 1.0)
    for r, s in groups[0][1:]:
        assert s == pytest.approx(float(sims[1, r])) and s >= t


def test_star_groups_on_clusters_every_member_within_threshold_of_its_first() -> None:
    rng = np.random.default_rng(0)
    centres = l2n(rng.normal(size=(40, 16)))
    x = l2n(np.repeat(centres, 6, axis=0) + rng.normal(scale=0.07, size=(240, 16)))
    t = 0.95
    groups = group_duplicates(x, t)
    seen: set[int] = set()
    for g in groups:
        rows = [r for r, _ in g]
        assert not seen & set(rows)  # each image in one group at most
        seen |= set(rows)
        assert all(float(x[r] @ x[rows[0]]) >= t - 1e-6 for r in rows)
        assert [s for _, s in g[1:]] == sorted((s for _, s in g[1:]), reverse=True)
    assert len(groups) >= 30  # the planted clusters are found
    # greedy by neighbour count: a centre has at least as many neighbours as any member of its group
    sims = x @ x.T
    degree = (sims >= t).sum(axis=1) - 1
    first = groups[0]
    assert degree[first[0][0]] == max(degree[r] for r, _ in first)


def test_small_k_and_blocks_find_the_same_pairs_as_a_full_matrix() -> None:
    """k grows for a query whose k-th neighbour is still a candidate: a group larger than k
    is not cut, and blocks do not change the result."""
    rng = np.random.default_rng(1)
    x = l2n(np.vstack([np.ones((25, 8)) + rng.normal(scale=0.05, size=(25, 8)), rng.normal(size=(30, 8))]))
    t = 0.97
    full = group_duplicates(x, t)
    small = group_duplicates(x, t, PairSearch(k=2, max_k=4096, block=7))
    assert small == full
    assert len(full[0]) >= 20
    assert group_duplicates(x, 0.99999) == [] or all(len(g) > 1 for g in group_duplicates(x, 0.99999))


def test_a_pair_returned_from_one_side_only_is_kept() -> None:
    """An approximate index may return b for query a but not a for query b (or the reverse):
    the pair counts either way, once."""
    from cbir.index.duplicates import array_blocks, duplicate_pairs

    x = on_circle([0.0, 1.0, 2.0, 90.0])

    def only_lower(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = q @ x.T
        qid = [int(np.argmax(s[r])) for r in range(len(q))]  # the query's own row
        for r, i in enumerate(qid):
            s[r, i + 1 :] = -np.inf  # query i sees rows <= i only
        order = np.argsort(-s, axis=1)[:, :k]
        scores = np.take_along_axis(s, order, 1)
        return scores, np.where(np.isfinite(scores), order, -1)

    pairs, scores = duplicate_pairs(array_blocks(x, 2), only_lower, lambda ids: (ids, x[ids]), 0.999)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 2]] and len(scores) == 3


def test_verified_pairs_join_below_threshold_only_when_checked_and_above_the_floor() -> None:
    x = on_circle([0.0, 20.0, 90.0, 91.0])  # 0-1 at cos 0.94; 2-3 at 0.9998; 0-2 at 0
    asked: list[tuple[int, int]] = []

    def check(pairs: np.ndarray) -> np.ndarray:
        asked.extend(map(tuple, pairs.tolist()))
        return np.ones(len(pairs), bool)

    v = Verification(min_inliers=10, floor=0.5, k=3)
    groups = group_duplicates(x, 0.99, check=check, verification=v)
    assert sorted([r for r, _ in g] for g in groups) == [[0, 1], [2, 3]]
    assert asked == [(0, 1)]  # not the sure pair 2-3, not 0-2 (below the floor)
    assert group_duplicates(x, 0.99, check=lambda p: np.zeros(len(p), bool), verification=v) == [
        [(2, 1.0), (3, pytest.approx(float(x[2] @ x[3])))]
    ]


class M:
    def __init__(self, id_: int, path: str, score: float) -> None:
        self.id, self.path, self.score = id_, path, score


def test_keep_rules() -> None:
    g = [M(1, "centre.jpg", 1.0), M(2, "big.png", 0.97), M(3, "old.jpg", 0.95), M(4, "bigfile.jpg", 0.94)]
    facts = {
        1: FileFacts(pixels=100, size=10, mtime_ns=500),
        2: FileFacts(pixels=400, size=20, mtime_ns=400),
        3: FileFacts(pixels=100, size=30, mtime_ns=100),
        4: FileFacts(pixels=400, size=90, mtime_ns=300),
    }
    first, largest, oldest = (plan_removal([g], rule, facts)[0] for rule in ("first", "largest", "oldest"))
    assert first.keep.path == "centre.jpg" and [m.path for m in first.remove] == ["big.png", "old.jpg", "bigfile.jpg"]
    assert largest.keep.path == "bigfile.jpg"  # most pixels, then largest file
    assert oldest.keep.path == "old.jpg"
    for plan in (first, largest, oldest):
        assert plan.keep not in plan.remove and len(plan.remove) == 3
    from cbir.errors import CbirError

    with pytest.raises(CbirError, match="keep rule"):
        plan_removal([g], "newest", facts)


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def test_cli_keep_and_paths_output(tmp_path: Path, tiny_file: Path) -> None:
    """Three files at -1 (everything a duplicate) differing in pixels and age: --keep picks
    each in turn; --format paths prints exactly the others, whole, one per line."""
    root = tmp_path / "photos with spaces"
    root.mkdir()
    base = Image.effect_mandelbrot((120, 90), (-2, -1.2, 1, 1.2), 200).convert("RGB")
    files = {"small_old.png": (60, 45, 1_000), "large_new.png": (240, 180, 3_000), "mid.png": (120, 90, 2_000)}
    for name, (w, h, mtime) in files.items():
        base.resize((w, h)).save(root / name)
        os.utime(root / name, (mtime, mtime))
    db = tmp_path / "db"
    assert cli("index", root, "--db", db, "--model", tiny_file, "-j", "0", "-q")[0] == 0

    code, out = cli("duplicates", "--db", db, "-t", "-1", "--keep", "largest", "--format", "paths")
    assert code == 0
    assert sorted(out.splitlines()) == sorted(str(root / n) for n in ("small_old.png", "mid.png"))
    code, out = cli("duplicates", "--db", db, "-t", "-1", "--keep", "oldest", "--json")
    payload = json.loads(out)
    assert payload["groups"][0]["keep"] == str(root / "small_old.png")
    assert sorted(payload["remove"]) == sorted(str(root / n) for n in ("large_new.png", "mid.png"))
    code, out = cli("duplicates", "--db", db, "-t", "-1", "--keep", "first", "--format", "json")
    payload = json.loads(out)
    group = payload["groups"][0]
    assert group["members"][0]["keep"] and group["keep"] == group["members"][0]["path"]
    assert group["members"][0]["score"] == 1.0
    code, out = cli("duplicates", "--db", db, "-t", "-1")  # the table ends with the removal list
    assert code == 0 and "files to remove (2):" in out and out.rstrip().splitlines()[-1] in payload["remove"]
    code, out = cli("duplicates", "--db", db, "--keep", "newest")
    assert code != 0 and "--keep" in out
    code, out = cli("duplicates", "--db", db, "-t", "1.0", "--format", "paths")
    assert code == 0 and out == ""


def scene(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """Random ellipses and rectangles: corners and blobs that local features can match."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, (rng.randrange(256),) * 3)
    draw = ImageDraw.Draw(img)
    for _ in range(80):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        box = (x, y, x + rng.randrange(5, 40), y + rng.randrange(5, 40))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return img


def test_index_verify_groups_a_cropped_copy_below_the_threshold(tmp_path: Path, tiny_file: Path) -> None:
    """--verify's path: at threshold 1.0 no pair is sure; SIFT + RANSAC joins the cropped,
    recompressed copy to its original and leaves a different picture out."""
    pytest.importorskip("cv2")
    from cbir.index import Index

    root = tmp_path / "photos"
    root.mkdir()
    scene(1).save(root / "original.png")
    scene(1).crop((30, 20, 450, 340)).save(root / "copy.jpg", quality=40)
    scene(2).save(root / "other.png")
    with Index.create(tmp_path / "db", model=tiny_file) as idx:
        idx.sync([root], workers=0, progress=False)
        assert idx.duplicates(1.0) == []
        groups = idx.duplicates(1.0, verify=Verification(min_inliers=10, floor=-1.0, k=3))
    assert len(groups) == 1 and sorted(Path(h.path).name for h in groups[0]) == ["copy.jpg", "original.png"]
    assert groups[0][1].score < 1.0
    code, out = cli("duplicates", "--db", tmp_path / "db", "-t", "1.0", "--verify", "--json")  # the CLI's defaults
    payload = json.loads(out)
    assert code == 0 and len(payload["groups"]) == 1 and len(payload["remove"]) == 1
    assert Path(payload["remove"][0]).name in {"copy.jpg", "original.png"}


def test_default_threshold_and_verification_are_the_calibrated_ones() -> None:
    """The defaults in cbir.index.duplicates are the ones bench/duplicates.py chose on train-pool
    (never on gpr-mini) and recorded in bench/duplicates_calibration.json."""
    record = json.loads((ROOT / "bench" / "duplicates_calibration.json").read_text())
    assert record["calibration_split"].startswith("train-pool")
    assert DEFAULT_THRESHOLD == pytest.approx(record["default_threshold"], abs=5e-5)
    v = Verification()
    assert (v.min_inliers, v.floor, v.k) == (
        record["verification"]["min_inliers"],
        pytest.approx(record["verification"]["floor"]),
        record["verification"]["k"],
    )


# -- the pair generator ----------------------------------------------------------------------


def synthetic(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([(x * (1 + c) + y * (3 - c) + rng.integers(0, 255)) % 256 for c in range(3)], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("name", sorted(nd.TRANSFORMS))
def test_each_transform_does_what_it_claims(name: str) -> None:
    img = synthetic(0)
    out, params = nd.TRANSFORMS[name](img, random.Random(3))
    w, h = img.size
    if name == "resize":
        assert 0.35 <= params["scale"] <= 0.7 and out.size == tuple(params["size"])
        assert out.width == round(w * params["scale"])
    elif name == "jpeg":
        assert 10 <= params["quality"] <= 30 and out.format == "JPEG" and out.size == img.size
        assert max(out.quantization[0]) > 40  # a low-quality table (q=95 tops out near 5)
    elif name == "crop":
        x0, y0, x1, y1 = params["box"]
        assert out.size == (x1 - x0, y1 - y0) and 0.74 < out.width / w < 0.93
        assert np.array_equal(np.asarray(out), np.asarray(img)[y0:y1, x0:x1])
    elif name == "colour":
        assert out.size == img.size
        assert max(abs(params[k] - 1.0) for k in ("brightness", "contrast", "saturation")) >= 0.25
        assert not np.array_equal(np.asarray(out), np.asarray(img))
    elif name == "rotate":
        assert 2.0 <= abs(params["angle"]) <= 8.0 and out.size == tuple(params["size"])
        assert out.width < w and abs(out.width / out.height - w / h) < 0.05  # corners cropped, aspect kept
        arr = np.asarray(out)
        assert arr[0, 0].sum() > 0 and arr[-1, -1].sum() > 0  # no black fill left in the corners


def test_make_pairs_positives_are_copies_and_negatives_distinct_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    classes: dict[str, list[Path]] = {}
    for c in range(3):
        for i in range(3):
            p = src / f"c{c}" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            synthetic(10 * c + i).save(p)
            classes.setdefault(f"c{c}", []).append(p)
    pairs = nd.make_pairs(classes, len(nd.RECIPES), tmp_path / "out", seed=1)
    pos = [p for p in pairs if p.duplicate]
    neg = [p for p in pairs if not p.duplicate]
    assert len(pos) == len(neg) == len(nd.RECIPES)
    assert {tuple(p.recipe) for p in pos} == set(nd.RECIPES)  # every recipe, combinations included
    for p in pairs:
        assert [s["transform"] for s in p.steps] == p.recipe and Path(p.b).exists()
        assert Path(p.b).suffix == (".jpg" if p.recipe[-1] == "jpeg" else ".png")
    for p in pos:
        assert p.source_b == p.a
    for p in neg:
        assert p.source_b != p.a and Path(p.source_b).parent == Path(p.a).parent  # same class
    nd.save_pairs(pairs, tmp_path / "pairs.json")
    assert nd.load_pairs(tmp_path / "pairs.json") == pairs


def test_precision_recall_and_threshold_for_precision() -> None:
    scores = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7])
    labels = np.array([True, True, False, True, False, False])
    r = nd.precision_recall(scores, labels, 0.85)
    assert (r.precision, r.recall, r.predicted) == (0.75, 1.0, 4)
    assert nd.threshold_for_precision(scores, labels, 1.0) == 0.95
    assert nd.threshold_for_precision(scores, labels, 0.75) == 0.85
    assert nd.threshold_for_precision(scores, labels, 0.7) == 0.85  # lowest T at >= 0.7 (0.8 gives 0.6)
