"""The engine on real photos: a copy of part of ../shared/datasets/gpr-mini."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import dataset_or_skip
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.index import Index, file_sha256

pytestmark = [pytest.mark.slow, pytest.mark.dataset]


def test_gpr_mini_copy_self_retrieval_deletions_and_rerun(tmp_path: Path) -> None:
    source = dataset_or_skip("gpr-mini") / "images"
    # every 20th file: ~200 images across all six domains
    files = sorted(source.iterdir())[::20]
    images = tmp_path / "gpr"
    images.mkdir()
    for f in files:
        shutil.copy2(f, images / f.name)
    db = tmp_path / "db"
    runner = CliRunner()

    first = runner.invoke(app, ["index", str(images), "--db", str(db), "-q", "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["extracted"] == len(files)

    with Index.open(db, readonly=True) as idx:
        for p in sorted(images.iterdir()):
            top = idx.search(str(p), k=1)[0]
            # rank 1 is the file itself, or a byte-identical copy of it (a tie at 1.0)
            assert top.path == str(p) or file_sha256(top.path) == file_sha256(p)
        sample = sorted(images.iterdir())[::25]
        for p in sample:  # from the file's bytes, as an uploaded query would be
            assert idx.search(p.read_bytes(), k=1)[0].score > 0.999

    for p in sorted(images.iterdir())[::7]:
        p.unlink()
    second = runner.invoke(app, ["index", str(images), "--db", str(db), "-q", "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["extracted"] == 0
    stats = json.loads(runner.invoke(app, ["stats", "--db", str(db), "--json"]).stdout)
    assert stats["images"] == len(list(images.iterdir()))
    third = runner.invoke(app, ["index", str(images), "--db", str(db), "-q", "--json"])
    report = json.loads(third.stdout)
    assert report["extracted"] == 0 and report["unchanged"] == stats["images"]
