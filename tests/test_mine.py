"""Mining without labels: known duplicates and transformed copies are found, no false pair,
clusters and negatives never cross, and no file or folder name is read."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scenes import write_scene_set
from typer.testing import CliRunner

pytest.importorskip("cv2")

from cbir.train import load_train_data  # noqa: E402
from cbir.train.discovery import connected_clusters, knn_candidates, mine_folder, mine_pairs  # noqa: E402
from cbir.train.mining import mine_epoch  # noqa: E402
from cbir.verify import GeometricVerifier  # noqa: E402

N_SCENES, COPIES, SINGLETONS = 4, 3, 6


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("unlabelled") / "pics"
    return root, write_scene_set(root, N_SCENES, COPIES, SINGLETONS)


@pytest.fixture(scope="module")
def mined(scene_set):
    """Mined with the real default descriptor (EfficientNet-Lite0), as ``cbir mine`` does."""
    root, _ = scene_set
    return mine_folder(root, neighbours=5, workers=1)


def _truth_pairs(truth: dict[str, int]) -> set[frozenset[str]]:
    by_scene: dict[int, list[str]] = {}
    for name, s in truth.items():
        if s >= 0:
            by_scene.setdefault(s, []).append(name)
    return {frozenset((a, b)) for names in by_scene.values() for a in names for b in names if a < b}


def test_knn_candidates_are_unique_unordered_and_exclude_self() -> None:
    v = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2]]  # 0,1 identical; 2,3 identical
    pairs = knn_candidates(v / np.linalg.norm(v, axis=1, keepdims=True), 1)
    assert {tuple(p) for p in pairs} >= {(0, 1), (2, 3)}
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)


def test_clusters_are_connected_components() -> None:
    c = connected_clusters(7, np.array([[0, 3], [3, 5], [1, 2]]))
    assert c.tolist() == [0, 1, 1, 0, -1, 0, -1]


def test_mining_finds_the_copies_and_no_false_pair(scene_set, mined) -> None:
    _, truth = scene_set
    found = {frozenset((mined.files[i].name, mined.files[j].name)) for i, j in mined.pairs}
    true = _truth_pairs(truth)
    assert found, "nothing verified"
    assert found <= true, f"false pairs: {found - true}"
    # every copy is linked to its scene: one cluster per scene, holding all its images
    assert mined.n_clusters == N_SCENES
    for s in range(N_SCENES):
        ids = {int(mined.clusters[k]) for k, f in enumerate(mined.files) if truth[f.name] == s}
        assert len(ids) == 1 and -1 not in ids
    singles = [int(mined.clusters[k]) for k, f in enumerate(mined.files) if truth[f.name] == -1]
    assert singles == [-1] * SINGLETONS
    rep = mined.report()
    assert rep["pairs_verified"] == len(found) and rep["pairs_tried"] >= len(found)
    assert rep["clusters"] == N_SCENES and rep["images_in_clusters"] == N_SCENES * (COPIES + 1)


def test_mined_csv_trains_and_negatives_never_come_from_the_own_cluster(scene_set, mined, tmp_path) -> None:
    out = mined.write_csv(tmp_path / "pairs.csv")
    data = load_train_data([out])
    assert data.pairs is not None and len(data.pairs) == 2 * len(mined.pairs)
    # the CSV's clusters are the mined clusters: never two scenes in one cluster
    _, truth = scene_set
    for lab in np.unique(data.labels):
        scenes = {truth[data.files[i].name] for i in data.members(lab)}
        assert len(scenes) == 1
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(data), 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for epoch in range(3):
        t = mine_epoch(data, lambda idx: vecs[idx], n_tuples=20, n_negatives=3, pool_size=len(data),
                       rng=np.random.default_rng(epoch))  # fmt: skip
        for q, p, negs in zip(t.queries, t.positives, t.negatives, strict=True):
            assert data.labels[p] == data.labels[q]
            for n in negs[negs >= 0]:
                assert data.labels[n] != data.labels[q]


def test_mining_reads_no_name(scene_set, tiny_file, tmp_path) -> None:
    """The same pixels under other names (and in other folders) give the same pairs (every pair
    is a candidate here, so the k-NN tie order of the random test model cannot differ)."""
    root, truth = scene_set
    other = tmp_path / "renamed"
    names = sorted(truth)
    mapping = {}
    for k, name in enumerate(names):
        new = other / f"dir{k % 3}" / f"z{len(names) - k:03d}.jpg"  # another order, other folders
        new.parent.mkdir(parents=True, exist_ok=True)
        new.write_bytes((root / name).read_bytes())
        mapping[new.name] = name
    a = mine_folder(root, model=str(tiny_file), neighbours=len(names), workers=1, features="orb")
    b = mine_folder(other, model=str(tiny_file), neighbours=len(names), workers=1, features="orb")
    pa = {frozenset((a.files[i].name, a.files[j].name)) for i, j in a.pairs}
    pb = {frozenset((mapping[b.files[i].name], mapping[b.files[j].name])) for i, j in b.pairs}
    assert pa == pb


def test_only_verified_candidates_are_kept() -> None:
    class Fake:
        def __init__(self, ok: bool) -> None:
            self.verified, self.inliers = ok, 20 if ok else 3

    files = [Path(f"f{i}") for i in range(4)]
    v = np.eye(4, dtype=np.float32)
    res = mine_pairs(files, v, lambda a, b: Fake({a.name, b.name} == {"f0", "f1"}), neighbours=3)
    assert res.tried == 6 and res.pairs.tolist() == [[0, 1]] and res.clusters.tolist() == [0, 0, -1, -1]


def test_cli_mine_writes_csv_and_report(scene_set, tiny_file, tmp_path) -> None:
    from cbir.cli.main import app

    root, truth = scene_set
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["mine", str(root), "--out", str(out), "--model", str(tiny_file), "-k", "30",
                                 "--verify", "orb", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "verified" in r.output and out.with_suffix(".json").is_file()
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["query", "positive", "cluster"] and len(rows) > 1
    true = _truth_pairs(truth)
    assert all(frozenset((Path(q).name, Path(p).name)) in true for q, p, _ in rows[1:])


def test_verifier_setting_errors_reach_the_cli(scene_set, tmp_path) -> None:
    from cbir.cli.main import app

    r = CliRunner().invoke(app, ["mine", str(scene_set[0]), "--out", str(tmp_path / "x.csv"), "--verify", "surf"])
    assert r.exit_code != 0 and "surf" in r.output


def test_verifier_is_used_as_given() -> None:
    assert GeometricVerifier("orb", min_inliers=20).settings()["min_inliers"] == 20


def test_cli_defaults_match_the_library() -> None:
    """The CLI module repeats two defaults so that `cbir --help` imports no torch; they must agree."""
    from cbir.cli.mine_cmds import NEIGHBOURS  # first: no import cycle either
    from cbir.train.discovery import DEFAULT_NEIGHBOURS
    from cbir.verify import DEFAULT_MIN_INLIERS

    assert NEIGHBOURS == DEFAULT_NEIGHBOURS
    from cbir.cli.mine_cmds import MinInliersOpt

    assert f"[default: {DEFAULT_MIN_INLIERS}]" in MinInliersOpt.__metadata__[0].help
