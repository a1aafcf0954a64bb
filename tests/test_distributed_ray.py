"""Distributed extraction on a real two-node Ray cluster (``ray start`` twice, 1 CPU each).

The cluster runs in its own process groups; the fixture stops it by group id and checks
that nothing of it is left running. The CLI is the driver, as for a user, so a kill of
the driver or of one describing actor is a kill of a real process of a real job.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

pytest.importorskip("ray", reason="needs the distributed extra: pip install 'cbir[distributed]'")
pq = pytest.importorskip("pyarrow.parquet")

from cbir.distributed.extraction import ACTOR_FOLDER_PREFIX  # noqa: E402  (after the skip)

N_IMAGES = 200
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(pgids: set[int]) -> list[int]:
    """Live (non-zombie) processes of these process groups and all their descendants (Ray
    starts its worker processes in process groups of their own, under the raylet)."""
    procs: dict[int, tuple[int, int]] = {}  # pid -> (ppid, pgid)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            procs[int(entry)] = (int(fields[1]), int(fields[2]))
    found = {pid for pid, (_, pgid) in procs.items() if pgid in pgids}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found and pid not in found}
        found |= more
        grew = bool(more)
    return sorted(found)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Cluster:
    """A head node and a second node joining it, each ``ray start --block`` in its own
    session, so every process of the cluster is in one of two known process groups."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="cbir-ray-", dir="/tmp")  # short: socket paths
        self.nodes: list[subprocess.Popen] = []
        # token authentication, as on a real cluster, with a token of its own (not ~/.ray)
        token = Path(self.temp) / "auth_token"
        token.write_text(os.urandom(32).hex())
        self.tmp = Path(self.temp) / "tmp"  # the nodes' TMPDIR: where the actors' folders go
        self.tmp.mkdir()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(self.tmp)}  # fmt: skip

    def _start(self, *args: str) -> None:
        cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args]
        log = open(Path(self.temp) / f"node{len(self.nodes)}.log", "wb")  # noqa: SIM115
        self.nodes.append(subprocess.Popen(cmd, stdout=log, stderr=log, env=self.env, start_new_session=True))

    def start(self) -> None:
        self._start("--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                    f"--temp-dir={self.temp}", "--include-dashboard=false")  # fmt: skip
        self._wait_cpus(1)
        self._start(f"--address={self.address}", "--node-ip-address=127.0.0.1")
        self._wait_cpus(2)

    def _wait_cpus(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"],
                                 capture_output=True, text=True, env=self.env)  # fmt: skip
            m = re.search(r"/(\d+(?:\.\d+)?) CPU", res.stdout)
            if m and float(m.group(1)) >= n:
                return
            if any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"a ray node exited: {self.logs()}")
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {n} CPUs: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in Path(self.temp).glob("node*.log"))

    def pids(self) -> list[int]:
        return _cluster_pids({p.pid for p in self.nodes})

    def stop(self) -> list[int]:
        """Stop both nodes (their process groups and every process below them, by id);
        returns what is still alive after (nothing)."""
        groups = {p.pid for p in self.nodes}
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in _cluster_pids(groups):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while _cluster_pids(groups) and time.monotonic() < deadline:
                time.sleep(0.2)
        for p in self.nodes:
            p.wait(timeout=10)
        left = _cluster_pids(groups)
        shutil.rmtree(self.temp, ignore_errors=True)
        return left


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"stray Ray processes: {[_cmdline(p) for p in left]}"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-images")
    for i in range(N_IMAGES):
        make_image(root / f"d{i % 4}" / f"img_{i:03d}.jpg", seed=1000 + i, size=(64 + i % 7 * 8, 56))
    (root / "d0" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def descriptor_file(tiny_file) -> Path:
    return tiny_file


@pytest.fixture(scope="module")
def reference(images, descriptor_file) -> dict[str, np.ndarray]:
    """Single-process vectors of the same images, with the same engine (ONNX)."""
    from cbir.data.datasets import list_images
    from cbir.extract import extract
    from cbir.models.descriptor import Descriptor

    res = extract(Descriptor.load(descriptor_file), list_images(images), workers=0, engine="onnx", progress=False)
    assert [f.path for f in res.failures] == [str(images / "d0" / "broken.jpg")]
    return {os.path.abspath(p): v for p, v in zip(res.paths, res.features, strict=True)}


def _cli(*args: str) -> list[str]:
    return [str(BIN / "cbir"), "extract", *args]


def _extract_args(images: Path, out: Path, cluster: Cluster, descriptor_file: Path, block: int) -> list[str]:
    return _cli(str(images), "--out", str(out), "--model", str(descriptor_file), "--engine", "onnx",
                "--block-rows", str(block), "--batch-size", "8", "-q", f"--ray={cluster.address}")  # fmt: skip


def _run(args: list[str], cluster: Cluster) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=cluster.env, timeout=600)


def _rows(out: Path) -> tuple[Counter, dict[str, np.ndarray], dict[str, str]]:
    """(rows per path over all shards, vectors, errors) read straight from the Parquet files."""
    counts: Counter = Counter()
    vectors: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    for shard in sorted((out / "embeddings").glob("*.parquet")):
        t = pq.read_table(shard)
        for path, vec, err in zip(t["path"].to_pylist(), t["vector"].to_pylist(), t["error"].to_pylist(), strict=True):
            counts[path] += 1
            if err is None:
                vectors[path] = np.asarray(vec, np.float32)
            else:
                errors[path] = err
    return counts, vectors, errors


def _check_complete(out: Path, reference: dict[str, np.ndarray], broken: str) -> None:
    counts, vectors, errors = _rows(out)
    assert set(counts) == set(reference) | {broken}
    assert max(counts.values()) == 1, [p for p, c in counts.items() if c > 1]  # every image exactly once
    assert list(errors) == [broken]
    for path, ref in reference.items():
        v = vectors[path]
        cos = float(v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref)))
        assert cos > 0.9999, (path, cos)
    assert not list((out / "embeddings").glob(".*.tmp"))


def _wait_for_shards(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(list((out / "embeddings").glob("*.parquet"))) < n:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.05)


def test_two_node_extraction_equals_single_process(cluster, images, descriptor_file, reference, tmp_path):
    out = tmp_path / "emb"
    res = _run(_extract_args(images, out, cluster, descriptor_file, 25), cluster)
    assert res.returncode == 0, res.stderr
    assert "2 Ray workers, onnx" in res.stdout, res.stdout
    _check_complete(out, reference, str(images / "d0" / "broken.jpg"))
    assert (out / "descriptor.cbir").is_file()
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == N_IMAGES and manifest["failed"] == 1
    assert manifest["failures"][0]["reason"].startswith("not an image")
    # a re-run of a complete folder describes nothing and writes nothing
    before = sorted(p.name for p in (out / "embeddings").iterdir())
    res = _run(_extract_args(images, out, cluster, descriptor_file, 25), cluster)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("0 images described, 0 failed"), res.stdout
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == before


def _actor_pids(cluster: Cluster) -> list[int]:
    return [p for p in cluster.pids() if "DescribeFiles" in _cmdline(p)]


def test_worker_killed_mid_run_loses_and_duplicates_nothing(cluster, images, descriptor_file, reference, tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.Popen(_extract_args(images, out, cluster, descriptor_file, 10),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)  # fmt: skip
    try:
        _wait_for_shards(out, 2, proc)
        victims = _actor_pids(cluster)
        assert victims, "no describing actor found to kill"
        os.kill(victims[0], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert victims[0] not in cluster.pids()
    _check_complete(out, reference, str(images / "d0" / "broken.jpg"))
    # no actor folder is left: the others were removed as their actors exited, the killed
    # actor's by the driver at the end of the job (all nodes share this machine's TMPDIR)
    deadline = time.monotonic() + 60
    while (left := sorted(p.name for p in cluster.tmp.glob(f"{ACTOR_FOLDER_PREFIX}*"))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"actor folders left behind: {left} (killed actor: {victims[0]}, alive: {cluster.pids()})"


def test_rerun_after_interrupted_run_writes_only_missing_rows(cluster, images, descriptor_file, reference, tmp_path):
    out = tmp_path / "emb"
    proc = subprocess.Popen(_extract_args(images, out, cluster, descriptor_file, 10),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cluster.env)  # fmt: skip
    try:
        _wait_for_shards(out, 3, proc)
    finally:
        proc.kill()  # the driver: Ray ends the job's actors with it
        proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("*.parquet")}
    done, _, _ = _rows(out)
    assert 0 < sum(done.values()) < N_IMAGES + 1

    res = _run(_extract_args(images, out, cluster, descriptor_file, 10), cluster)
    assert res.returncode == 0, res.stderr
    m = re.match(r"(\d+) images described, (\d+) failed", res.stdout)
    assert m and int(m.group(1)) + int(m.group(2)) == N_IMAGES + 1 - sum(done.values()), res.stdout
    after = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("*.parquet")}
    assert all(after[name] == mtime for name, mtime in first.items())  # nothing rewritten
    _check_complete(out, reference, str(images / "d0" / "broken.jpg"))


def test_int8_job_ships_the_int8_graph(cluster, images, descriptor_file, tmp_path):
    """``--engine onnx-int8``: quantised once by the driver, run by the actors; the folder's
    descriptor and manifest record int8 numerics, so an import builds an int8 index."""
    calib = tmp_path / "calib"
    for i in range(24):
        make_image(calib / f"c{i:02d}.jpg", seed=5000 + i, size=(48 + i % 5 * 8, 56))
    out = tmp_path / "emb8"
    args = _extract_args(images, out, cluster, descriptor_file, 50)
    args[args.index("--engine") + 1] = "onnx-int8"
    args += ["--calibrate", str(calib)]
    res = _run(args, cluster)
    assert res.returncode == 0, res.stderr
    assert "2 Ray workers, onnx-int8" in res.stdout, res.stdout
    import json

    from cbir.models.descriptor import Descriptor

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == N_IMAGES and manifest["descriptor"]["name"].endswith("onnx-int8")
    stored = Descriptor.load(out / "descriptor.cbir")
    assert stored.numerics["engine"] == "onnx-int8"
    assert manifest["descriptor"]["identity"] == stored.identity() != Descriptor.load(descriptor_file).identity()
