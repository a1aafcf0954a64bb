"""``cbir bench revisited`` end to end: printed figures equal the protocol on --save-ranks."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import dataset_or_skip, make_image
from typer.testing import CliRunner

from cbir.benchmarks import PostProcessing, describe_revisited, rank_revisited, run_revisited
from cbir.cli.main import app
from cbir.data.revisited import load_revisited
from cbir.eval.revisited import evaluate_revisited

LINE = re.compile(
    r"^(easy|medium|hard|original)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", re.M
)


@pytest.fixture
def mini_revisited(tmp_path: Path) -> Path:
    """3 'landmarks' x 4 database images (shared seeds, different sizes) and 3 queries."""
    root = tmp_path / "rmini"
    imlist, gnd = [], []
    for obj in range(3):
        for view in range(4):
            name = f"obj{obj}_{view}"
            make_image(
                root / "jpg" / f"{name}.jpg", seed=10 * obj + view % 2, size=(96 + 8 * view, 72)
            )
            imlist.append(name)
    qimlist = []
    for obj in range(3):
        make_image(root / "jpg" / f"query{obj}.jpg", seed=10 * obj, size=(100, 80))
        qimlist.append(f"query{obj}")
        ids = [4 * obj + v for v in range(4)]
        gnd.append(
            {"bbx": [5.0, 4.0, 90.0, 70.0], "easy": ids[:2], "hard": ids[2:3], "junk": ids[3:]}
        )
    gnd[2]["hard"] = []  # a query without hard positives
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / "gnd_rmini.pkl").write_bytes(pickle.dumps(data))
    return root


@pytest.fixture
def tiny_file(tmp_path: Path, tiny_descriptor) -> Path:
    path = tmp_path / "tiny.cbir"
    tiny_descriptor.save(path)
    return path


def _printed(output: str) -> dict[str, list[str]]:
    return {m.group(1): list(m.groups()[1:]) for m in LINE.finditer(output)}


def _recomputed(ranks: np.ndarray, root: Path) -> dict[str, list[str]]:
    res = evaluate_revisited(ranks, load_revisited(root).gnd_dicts())
    return {
        name: [f"{100 * v:.2f}" for v in (s.mAP, s.mP[1], s.mP[5], s.mP[10])]
        for name, s in res.settings.items()
    }


def test_printed_figures_equal_protocol_on_saved_ranks(
    mini_revisited: Path, tiny_file: Path, tmp_path: Path
) -> None:
    ranks_path, json_path = tmp_path / "r.npy", tmp_path / "r.json"
    args = ["bench", "revisited", str(mini_revisited), "--model", str(tiny_file), "--qe", "1", "--qe-alpha", "3"]
    args += ["--save-ranks", str(ranks_path), "--out", str(json_path), "--workers", "0", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ranks = np.load(ranks_path)
    assert ranks.shape == (3, 12) and np.issubdtype(ranks.dtype, np.integer)
    assert all(sorted(row) == list(range(12)) for row in ranks.tolist())
    printed = _printed(res.output)
    assert set(printed) == {"easy", "medium", "hard"}
    assert printed == _recomputed(ranks, mini_revisited)
    assert "hard 1" in res.output  # the query without hard positives is reported
    report = json.loads(json_path.read_text())
    for name in ("easy", "medium", "hard"):
        assert f"{report[name]['mAP']:.2f}" == printed[name][0]
        assert [f"{report[name]['mP@k'][k]:.2f}" for k in ("1", "5", "10")] == printed[name][1:]
    assert report["hard"]["queries_without_positives"] == 1
    assert report["post_processing"].startswith("alpha-QE")


def test_post_processing_options_reach_the_ranking(mini_revisited: Path, tiny_descriptor) -> None:
    ds = load_revisited(mini_revisited)
    feats = describe_revisited(ds, tiny_descriptor, workers=0, progress=False)
    base = rank_revisited(feats.queries, feats.database)
    assert (
        base.tolist()
        == np.argsort(-(feats.queries @ feats.database.T), axis=1, kind="stable").tolist()
    )
    for post in (
        PostProcessing(qe_k=2),
        PostProcessing(dba_k=2),
        PostProcessing(diffusion=True, diffusion_k=3, diffusion_kq=2),
    ):
        ranks = rank_revisited(feats.queries, feats.database, post)
        assert ranks.shape == (3, 12)
        assert all(sorted(r) == list(range(12)) for r in ranks.tolist())
    # same features, no second description: run_revisited scores what it is given
    bench = run_revisited(
        mini_revisited, tiny_descriptor, features=feats, post=PostProcessing(qe_k=2)
    )
    assert (
        bench.ranks.tolist()
        == rank_revisited(feats.queries, feats.database, PostProcessing(qe_k=2)).tolist()
    )


def test_queries_are_cropped_to_bbx_unless_full_query(
    mini_revisited: Path, tiny_descriptor
) -> None:
    ds = load_revisited(mini_revisited)
    cropped = describe_revisited(ds, tiny_descriptor, workers=0, progress=False)
    full = describe_revisited(ds, tiny_descriptor, full_query=True, workers=0, progress=False)
    assert cropped.cropped_queries and not full.cropped_queries
    assert not np.allclose(cropped.queries, full.queries)
    assert np.allclose(cropped.database, full.database)


def test_bad_options_are_clear_errors(mini_revisited: Path, tiny_file: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app, ["bench", "revisited", str(mini_revisited), "--model", str(tiny_file), "--qe", "x"]
    )
    assert res.exit_code == 2 and "--qe" in res.output  # an integer now; alpha is --qe-alpha
    res = runner.invoke(
        app, ["bench", "revisited", str(mini_revisited.parent), "--model", str(tiny_file)]
    )
    assert res.exit_code != 0 and "gnd" in res.output


@pytest.mark.slow
@pytest.mark.dataset
def test_rparis_mini_end_to_end(tiny_file: Path, tmp_path: Path) -> None:
    root = dataset_or_skip("rparis-mini")
    ranks_path = tmp_path / "r.npy"
    args = ["bench", "revisited", str(root), "--gnd", str(root / "gnd_rparis-mini.pkl")]
    args += ["--model", str(tiny_file), "--save-ranks", str(ranks_path), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ranks = np.load(ranks_path)
    assert ranks.shape == (12, 238)
    assert _printed(res.output) == _recomputed(ranks, root)


def test_learned_whitening_file_is_used(
    mini_revisited: Path, tiny_file: Path, tmp_path: Path
) -> None:
    from cbir.models.whitening import fit_learned_whitening, pairs_from_labels

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 512))
    q, p = pairs_from_labels(np.repeat(np.arange(15), 4))
    w_path = tmp_path / "lw.pt"
    fit_learned_whitening(x, q, p, dim=32).save(str(w_path))
    json_path = tmp_path / "r.json"
    args = ["bench", "revisited", str(mini_revisited), "--model", str(tiny_file)]
    args += ["--whiten", str(w_path), "--out", str(json_path), "--workers", "0", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(json_path.read_text())["descriptor"].endswith("learned32")
