"""Parquet embeddings folders and ``cbir index --from`` (no Ray needed: the folder is written
with the same shard writer the Ray job uses): rows, resume keys, damaged shards, the
descriptor check, and an import that a later sync finds complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

pq = pytest.importorskip("pyarrow.parquet", reason="needs the distributed extra: pip install 'cbir[distributed]'")

from cbir.distributed.embeddings import (  # noqa: E402
    EmbeddingsError,
    EmbeddingsFolder,
    contains,
    key_digests,
    rows_table,
    write_shard,
)
from cbir.distributed.importer import import_vectors  # noqa: E402
from cbir.extract import extract  # noqa: E402
from cbir.index import DescriptorMismatchError, Index, file_sha256  # noqa: E402
from cbir.models import build_descriptor  # noqa: E402


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in range(12):
        make_image(tmp_path / "images" / f"{i:02d}.jpg", seed=500 + i)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"nope")
    return tmp_path / "images"


def write_folder(out: Path, images: Path, descriptor, *, shards: int = 3) -> EmbeddingsFolder:
    """What ``cbir extract --ray`` writes, made here with the same pieces and no cluster."""
    folder = EmbeddingsFolder(out)
    folder.prepare(descriptor)
    paths = sorted(str(p) for p in images.iterdir())
    res = extract(descriptor, paths, workers=0, progress=False, engine="torch")
    vec = dict(zip(res.paths, res.features, strict=True))
    errors = {f.path: f.reason for f in res.failures}
    for part in np.array_split(np.arange(len(paths)), shards):
        ps = [paths[i] for i in part]
        st = [os.stat(p) for p in ps]
        table = rows_table(descriptor.dim, ps, [s.st_size for s in st], [s.st_mtime_ns for s in st],
                           [file_sha256(p) for p in ps],
                           np.stack([vec.get(p, np.zeros(descriptor.dim, np.float32)) for p in ps]),
                           [errors.get(p) for p in ps])  # fmt: skip
        write_shard(folder.shard_dir, table)
    folder.write_manifest({})
    return folder


def test_folder_rows_keys_and_damage(tmp_path, images, tiny_descriptor) -> None:
    folder = write_folder(tmp_path / "emb", images, tiny_descriptor)
    manifest = json.loads(folder.manifest_path.read_text())
    assert (manifest["rows"], manifest["failed"], manifest["shards"]) == (12, 1, 3)
    assert manifest["descriptor"]["identity"] == tiny_descriptor.identity()
    rows = list(folder.iter_rows())
    assert sum(len(r.paths) for r in rows) == 12 and rows[0].vectors.shape[1] == tiny_descriptor.dim
    assert [f for r in rows for f in r.failures][0][0].endswith("broken.jpg")
    done = folder.done_keys()
    st = os.stat(images / "03.jpg")
    probe = key_digests([str(images / "03.jpg")] * 2, [st.st_size] * 2, [st.st_mtime_ns, st.st_mtime_ns + 1])
    assert contains(done, probe).tolist() == [True, False]  # a touched file is described again
    # the same rows always get the same shard name (a re-run block replaces, never adds)
    first = folder.shards()[0]
    assert write_shard(folder.shard_dir, pq.read_table(first)) == first.name and len(folder.shards()) == 3
    # a torn shard and a killed writer's temporary are cleaned; their rows are simply redone
    sorted(folder.shards())[1].write_bytes(b"PAR1 torn")
    (folder.shard_dir / ".part-x.parquet.123.tmp").write_bytes(b"x")
    assert folder.clean() == 1 and len(folder.shards()) == 2
    assert not list(folder.shard_dir.glob(".*.tmp"))
    other = build_descriptor("timm:resnet10t", pretrained=False, pooling="mac", image_size=64)
    with pytest.raises(EmbeddingsError, match="another descriptor"):
        folder.prepare(other)


def test_import_parquet_then_sync_describes_nothing(tmp_path, images, tiny_descriptor) -> None:
    folder = write_folder(tmp_path / "emb", images, tiny_descriptor)
    db = tmp_path / "db"
    report = import_vectors(folder.root, db)
    assert (report.added, report.failed, report.unchanged) == (12, 1, 0)
    with Index.open(db) as idx:
        assert idx.descriptor.identity() == tiny_descriptor.identity() and len(idx) == 12
        for p in sorted(images.glob("0*.jpg"))[::3]:
            assert idx.search(str(p), k=1)[0].path == str(p)
        assert idx.sync([images], progress=False, workers=0).extracted == 1  # only the broken file
    assert import_vectors(folder.root, db).unchanged == 12  # a re-import adds nothing


def test_import_refuses_another_descriptor(tmp_path, images, tiny_descriptor) -> None:
    folder = write_folder(tmp_path / "emb", images, tiny_descriptor)
    db = tmp_path / "db"
    other = build_descriptor("timm:resnet10t", pretrained=False, pooling="mac", image_size=64)
    with Index.create(db, model=other):
        pass
    with pytest.raises(DescriptorMismatchError):
        import_vectors(folder.root, db)
    with pytest.raises(DescriptorMismatchError):
        import_vectors(folder.root, tmp_path / "db2", model=other)


def test_cli_imports_npy_and_refuses_without_the_descriptor(tmp_path, images, tiny_descriptor) -> None:
    desc = tmp_path / "tiny.cbir"
    tiny_descriptor.save(desc)
    cbir = [sys.executable, "-m", "cbir.cli.main"]
    run = lambda *a: subprocess.run([*cbir, *map(str, a)], capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("extract", images, "--out", tmp_path / "x.npy", "-m", desc, "-q", "--engine", "torch").returncode == 0
    res = run("index", "--from", tmp_path / "x.npy", "--db", tmp_path / "db")
    assert res.returncode != 0 and "--model" in res.stderr and "Traceback" not in res.stderr
    res = run("index", "--from", tmp_path / "x.npy", "--db", tmp_path / "db", "-m", desc, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["added"] == 12
    res = run("index", images, "--db", tmp_path / "db", "--engine", "torch", "-q", "--json")
    assert json.loads(res.stdout)["extracted"] == 1  # the imported files are not described again
