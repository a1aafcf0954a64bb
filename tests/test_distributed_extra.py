"""The distributed extra stays optional: the base CLI never imports it, and a command that
needs a missing piece says which extra installs it (exit status, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import modules_loaded_by_help
from typer.testing import CliRunner

from cbir.cli.commands import app

HEAVY = ("ray", "pyarrow", "pymilvus", "milvus_lite")


def test_ray_address_is_checked(tmp_path: Path, image_dir, tiny_descriptor) -> None:
    desc = tmp_path / "tiny.cbir"
    tiny_descriptor.save(desc)
    res = CliRunner().invoke(app, ["extract", str(image_dir), "-m", str(desc), "--ray", "imgs/", "--out", "o"])
    assert res.exit_code == 2 and "--ray takes auto, local" in " ".join(res.output.split())


def test_cbir_help_imports_none_of_the_extra() -> None:
    assert modules_loaded_by_help([["--help"], ["extract", "--help"], ["index", "--help"]], HEAVY) == []


@pytest.mark.parametrize("blocked", ["ray", "pymilvus"])
def test_a_missing_dependency_names_the_extra(blocked, monkeypatch, tmp_path: Path, image_dir, tiny_descriptor) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # import fails as if it were not installed
    desc = tmp_path / "tiny.cbir"
    tiny_descriptor.save(desc)
    if blocked == "ray":
        args = ["extract", str(image_dir), "-m", str(desc), "--ray", "auto", "--out", str(tmp_path / "emb")]
    else:
        args = ["index", str(image_dir), "--db", str(tmp_path / "db"), "-m", str(desc), "--store", "milvus"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    said = " ".join(res.output.split())  # unwrapped
    assert "pip install 'cbir[distributed]'" in said and f"needs {blocked}" in said
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_actor_folders_of_dead_processes_are_swept(tmp_path: Path) -> None:
    """A killed describing actor runs no clean-up; the next actor on the node removes its
    folder (~40 MB each), and only folders of processes that are gone."""
    from cbir.distributed.extraction import ACTOR_FOLDER_PREFIX, sweep_actor_folders

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)  # exited: its folder is stale
    dead = tmp_path / f"{ACTOR_FOLDER_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{ACTOR_FOLDER_PREFIX}{os.getpid()}-def"
    foreign = [tmp_path / f"{ACTOR_FOLDER_PREFIX}notapid", tmp_path / "other-123-x"]
    for d in (dead, live, *foreign):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"x" * 10)
    assert sweep_actor_folders(tmp_path) == [str(dead)]
    assert not dead.exists()
    assert live.exists() and all(d.exists() for d in foreign)


def _shipped(tmp_path: Path, descriptor, done: np.ndarray | None = None) -> tuple:
    """What the driver ships to the describing actors: descriptor file, ONNX export, keys done."""
    from cbir.distributed.extraction import _onnx_files

    path = tmp_path / "tiny.cbir"
    descriptor.save(path)
    onnx_files, engine = _onnx_files(descriptor, "onnx")
    assert engine == "onnx"
    return path.read_bytes(), engine, onnx_files, np.array([], dtype="S16") if done is None else done


def _shard_rows(shard_dir: Path, name: str) -> tuple[list[str], list]:
    """(paths, vectors: None where the image failed) of one written shard."""
    import pyarrow.parquet as pq

    t = pq.read_table(shard_dir / name)
    return t.column("path").to_pylist(), t.column("vector").to_pylist()


def test_an_actor_holding_two_cpus_describes_in_lanes(
    tmp_path: Path, image_dir: Path, tiny_descriptor, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A describing actor with 2 CPUs runs two one-thread ONNX calls and decodes on one
    thread, as one machine does; one with 1 CPU runs one call; both give the same rows."""
    ray = pytest.importorskip("ray")
    pa = pytest.importorskip("pyarrow")
    from cbir.data.datasets import list_images
    from cbir.distributed.extraction import DescribeFiles

    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the shipped files, without a cluster
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the actors' folders
    shipped = _shipped(tmp_path, tiny_descriptor)
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = DescribeFiles(shipped, "/", str(tmp_path / "two"), 4, None, threads=2)
    one = DescribeFiles(shipped, "/", str(tmp_path / "one"), 4, None, threads=1)
    paths = [str(p) for p in list_images(image_dir)]
    a, b = two(pa.table({"text": paths})), one(pa.table({"text": paths}))
    assert (two.runner.engine, two.runner.lanes, two.threads) == ("onnx", 2, 1)
    assert (one.runner.engine, one.runner.lanes, one.threads) == ("onnx", 1, 1)
    assert a.to_pylist() == b.to_pylist() == [{"shard": a["shard"][0].as_py(), "described": len(paths), "failed": 0}]
    pa_, va = _shard_rows(tmp_path / "two", a["shard"][0].as_py())
    pb_, vb = _shard_rows(tmp_path / "one", b["shard"][0].as_py())
    assert pa_ == pb_ == paths
    np.testing.assert_array_equal(np.array(va, np.float32), np.array(vb, np.float32))


def test_an_actor_writes_only_rows_not_yet_written(
    tmp_path: Path, image_dir: Path, tiny_descriptor, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume happens in the actor: listed paths whose (path, size, mtime) is already
    written are dropped before anything is read; a block with nothing left writes no shard
    and loads no model. Relative lines are resolved from the list's folder."""
    ray = pytest.importorskip("ray")
    pa = pytest.importorskip("pyarrow")
    from cbir.data.datasets import list_images
    from cbir.distributed.embeddings import key_digests
    from cbir.distributed.extraction import DescribeFiles

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    paths = [str(p) for p in list_images(image_dir)]
    stats = [os.stat(p) for p in paths[:3]]
    done = np.sort(key_digests(paths[:3], [s.st_size for s in stats], [s.st_mtime_ns for s in stats]))
    shards = tmp_path / "shards"
    shards.mkdir()
    actor = DescribeFiles(_shipped(tmp_path, tiny_descriptor, done), str(image_dir), str(shards), 4, None, threads=1)

    assert actor(pa.table({"text": paths[:3]})).num_rows == 0
    assert actor.runner is None and not list(shards.iterdir())  # nothing to do: no model loaded

    relative = [os.path.relpath(p, image_dir) for p in paths] + ["missing.jpg"]
    out = actor(pa.table({"text": relative}))
    assert out.to_pylist() == [{"shard": out["shard"][0].as_py(), "described": len(paths) - 3, "failed": 1}]
    written, vectors = _shard_rows(shards, out["shard"][0].as_py())
    assert written == paths[3:] + [str(image_dir / "missing.jpg")]
    assert vectors[-1] is None and all(v is not None for v in vectors[:-1])


@pytest.mark.parametrize(
    ("rows", "block_rows", "actors", "blocks"),
    [
        (22824, 1024, 2, 24),  # 23 blocks would leave one actor alone with the last one
        (5706, 1024, 2, 6),
        (201, 10, 2, 22),
        (1025, 1024, 1, 2),  # one actor: just at most block_rows each
        (3, 1024, 8, 3),  # never more blocks than rows
        (0, 1024, 2, 1),
    ],
)
def test_blocks_are_a_multiple_of_the_actors(rows: int, block_rows: int, actors: int, blocks: int) -> None:
    from cbir.distributed.extraction import plan_blocks

    assert plan_blocks(rows, block_rows, actors) == blocks
    if rows:
        assert -(-rows // blocks) <= block_rows
