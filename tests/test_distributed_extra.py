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


def test_light_ray_stages_do_not_import_torch() -> None:
    """The stat and Parquet-writing stages run in Ray worker processes of their own, started
    per job: importing their module (and the package) must not import PyTorch, which costs
    those workers seconds and ~1 GB each."""
    code = (
        "import sys\n"
        "import cbir, cbir.distributed.stages as s\n"
        "assert callable(s.stat_files) and callable(s.shard_sink_class)\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'onnxruntime') if m in sys.modules)\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
        "assert cbir.CbirError.__name__ == 'CbirError'  # the package's names still resolve\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


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


def test_an_actor_holding_two_cpus_describes_in_lanes(
    tmp_path: Path, image_dir: Path, tiny_descriptor, onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A describing actor with 2 CPUs runs two one-thread ONNX calls and decodes on one
    thread, as one machine does; one with 1 CPU runs one call; both give the same rows."""
    ray = pytest.importorskip("ray")
    pa = pytest.importorskip("pyarrow")
    from cbir.data.datasets import list_images
    from cbir.distributed.extraction import DescribeFiles, _onnx_files

    monkeypatch.setattr(ray, "get", lambda ref: ref)  # the shipped files, without a cluster
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the actors' folders
    path = tmp_path / "tiny.cbir"
    tiny_descriptor.save(path)
    onnx_files, engine = _onnx_files(tiny_descriptor, "onnx")
    assert engine == "onnx"
    files = (path.read_bytes(), onnx_files)
    two, one = DescribeFiles(files, 4, None, threads=2), DescribeFiles(files, 4, None, threads=1)
    assert (two.runner.engine, two.runner.lanes, two.threads) == ("onnx", 2, 1)
    assert (one.runner.engine, one.runner.lanes, one.threads) == ("onnx", 1, 1)
    paths = [str(p) for p in list_images(image_dir)]
    stats = [os.stat(p) for p in paths]
    block = pa.table({"path": paths, "size": [s.st_size for s in stats], "mtime_ns": [s.st_mtime_ns for s in stats]})
    a, b = two(block), one(block)
    assert a.column("error").null_count == len(paths)
    np.testing.assert_array_equal(np.array(a.column("vector").to_pylist()), np.array(b.column("vector").to_pylist()))
