"""Load test of ``cbir serve`` on loopback: concurrent searches, then the same with a writer.

    nice -n 5 .venv/bin/python bench/load_test.py            # gpr-mini, 16 clients, 2,000 searches

1. Builds (or incrementally updates) an index of the collection (default
   ``../shared/datasets/gpr-mini/images``) in ``bench/results/loadtest-db`` with the
   default descriptor; a rerun reuses it.
2. Starts ``cbir serve`` as a separate process on 127.0.0.1 with a token file.
3. Phase "search": ``--clients`` threads, each with its own keep-alive HTTP connection,
   send ``--requests`` searches between them: half upload a collection image (decode +
   model + FAISS), half search by the id of an indexed image (stored vector + FAISS).
4. Phase "search + writer": the same searches while one more client adds images from
   ``--writer-images`` (default ``../shared/datasets/train-pool``) through ``POST
   /images`` until the searches are done; afterwards the collection size must have
   grown by exactly the number of acknowledged adds, and the added images are
   deleted again (``DELETE /images/{id}``) so that the next run starts from the same
   index.

An error is any request that fails, returns a status other than the expected one, or
returns a result list of the wrong length. Figures: errors, throughput, median and
99th-percentile latency, per phase and per query kind, plus the ratio of the writer
phase to the plain phase (same run, same machine, so the ratio is comparable even on
a shared, noisy machine). Prints a Markdown table and writes bench/results/load_test.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass
class Sample:
    kind: str  # "upload", "id" or "add"
    seconds: float
    ok: bool
    detail: str = ""


@dataclass
class PhaseResult:
    name: str
    wall_seconds: float
    samples: list[Sample] = field(default_factory=list)
    writes: list[Sample] = field(default_factory=list)

    def summary(self) -> dict:
        def stats(samples: list[Sample]) -> dict:
            lat = np.array([s.seconds for s in samples]) * 1000 if samples else np.zeros(0)
            return {
                "requests": len(samples),
                "errors": sum(not s.ok for s in samples),
                "median_ms": round(float(np.median(lat)), 1) if lat.size else None,
                "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat.size else None,
            }

        out = stats(self.samples)
        out["throughput_rps"] = round(len(self.samples) / self.wall_seconds, 1)
        out["wall_seconds"] = round(self.wall_seconds, 1)
        out["by_kind"] = {
            kind: stats([s for s in self.samples if s.kind == kind]) for kind in ("upload", "id")
        }
        if self.writes:
            out["writer"] = stats(self.writes)
            out["writer"]["adds_per_second"] = round(
                sum(s.ok for s in self.writes) / self.wall_seconds, 2
            )
        out["error_details"] = sorted({s.detail for s in self.samples + self.writes if not s.ok})[
            :10
        ]
        return out


def list_images(folder: Path) -> list[Path]:
    from cbir.data.datasets import list_images as walk

    return [Path(p) for p in walk(folder)]


def build_index(db: Path, images: Path) -> dict:
    """Create or update the benchmark index (incremental: a rerun extracts nothing)."""
    from cbir.index import Index

    start = time.perf_counter()
    with Index.open(db) as idx:
        report = idx.sync([images], progress=True)
        stats = idx.stats()
    return {
        "images": stats["images"],
        "descriptor": stats["descriptor"],
        "index": stats["index"],
        "extracted_now": report.extracted,
        "seconds": round(time.perf_counter() - start, 1),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db: Path, port: int, token_file: Path, upload_dir: Path, threads: int):
    cmd = [
        sys.executable,
        "-m",
        "cbir.cli.main",
        "serve",
        "--db",
        str(db),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--token-file",
        str(token_file),
        "--upload-dir",
        str(upload_dir),
        "--log-level",
        "warning",
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(RESULTS / "load_test_server.log", "w")  # noqa: SIM115 - closed in stop_server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, log, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start within 300 s")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, log) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def search_worker(
    base: str,
    jobs,
    k: int,
    uploads: list[bytes],
    ids: list[int],
    out: list[Sample],
    lock: threading.Lock,
) -> None:
    """One client: its own connection; takes job numbers until none are left."""
    with httpx.Client(base_url=base, timeout=120) as client:
        for job in jobs:
            if job % 2 == 0:
                kind = "upload"
                data = uploads[(job // 2) % len(uploads)]
                kwargs = {"files": {"image": ("q.jpg", data, "image/jpeg")}, "data": {"k": str(k)}}
            else:
                kind = "id"
                kwargs = {"data": {"id": str(ids[(job // 2) % len(ids)]), "k": str(k)}}
            start = time.perf_counter()
            try:
                r = client.post("/search", **kwargs)
                ok = r.status_code == 200 and r.json()["count"] == k
                detail = "" if ok else f"{kind}: HTTP {r.status_code} {r.text[:120]}"
            except Exception as exc:  # the load test counts every failure, whatever it is
                ok, detail = False, f"{kind}: {type(exc).__name__}: {exc}"
            sample = Sample(kind, time.perf_counter() - start, ok, detail)
            with lock:
                out.append(sample)


def writer_worker(
    base: str,
    token: str,
    files: list[Path],
    stop: threading.Event,
    out: list[Sample],
    added: list[int],
) -> None:
    """Adds images one after another until ``stop`` is set."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=300, headers=headers) as client:
        for path in files:
            if stop.is_set():
                break
            start = time.perf_counter()
            try:
                r = client.post("/images", files={"image": (path.name, path.read_bytes())})
                ok = r.status_code == 201
                detail = "" if ok else f"add: HTTP {r.status_code} {r.text[:120]}"
                if ok:
                    added.append(int(r.json()["id"]))
            except Exception as exc:
                ok, detail = False, f"add: {type(exc).__name__}: {exc}"
            out.append(Sample("add", time.perf_counter() - start, ok, detail))


def run_phase(
    name: str,
    base: str,
    args,
    uploads: list[bytes],
    ids: list[int],
    writer: tuple[str, list[Path]] | None = None,
) -> tuple[PhaseResult, list[int]]:
    jobs = iter(range(args.requests))
    jobs_lock = threading.Lock()

    def next_job():
        while True:
            with jobs_lock:
                job = next(jobs, None)
            if job is None:
                return
            yield job

    samples: list[Sample] = []
    lock = threading.Lock()
    writes: list[Sample] = []
    added: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=search_worker, args=(base, next_job(), args.k, uploads, ids, samples, lock)
        )
        for _ in range(args.clients)
    ]
    writer_thread = None
    if writer is not None:
        token, files = writer
        writer_thread = threading.Thread(
            target=writer_worker, args=(base, token, files, stop, writes, added)
        )
    start = time.perf_counter()
    if writer_thread is not None:
        writer_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    if writer_thread is not None:
        writer_thread.join()
    return PhaseResult(name, wall, samples, writes), added


def markdown(results: dict) -> str:
    rows = [
        "| phase | searches | errors | throughput (searches/s) | median (ms) | p99 (ms) "
        "| upload median / p99 (ms) | by-id median / p99 (ms) "
        "| writer: adds (errors), median (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["phases"].items():
        up, by_id = s["by_kind"]["upload"], s["by_kind"]["id"]
        w = s.get("writer")
        writer = f"{w['requests'] - w['errors']} ({w['errors']}), {w['median_ms']}" if w else "-"
        rows.append(
            f"| {name} | {s['requests']} | {s['errors']} | {s['throughput_rps']} | "
            f"{s['median_ms']} | {s['p99_ms']} | {up['median_ms']} / {up['p99_ms']} | "
            f"{by_id['median_ms']} / {by_id['p99_ms']} | {writer} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=Path, default=ROOT.parent / "shared/datasets/gpr-mini/images"
    )
    parser.add_argument(
        "--writer-images", type=Path, default=ROOT.parent / "shared/datasets/train-pool"
    )
    parser.add_argument("--db", type=Path, default=RESULTS / "loadtest-db")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=0, help="server search threads (default: one per core)"
    )
    parser.add_argument(
        "--query-images",
        type=int,
        default=200,
        help="distinct collection images used as uploaded queries",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_test.json")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for folder in (args.images, args.writer_images):
        if not folder.is_dir():
            raise SystemExit(f"{folder} not found (benchmark data: ../shared/datasets)")

    print(f"indexing {args.images} into {args.db} ...", flush=True)
    index_info = build_index(args.db, args.images)
    print(f"index: {index_info}", flush=True)

    rng = random.Random(args.seed)
    collection = list_images(args.images)
    query_files = rng.sample(collection, min(args.query_images, len(collection)))
    uploads = [p.read_bytes() for p in query_files]
    writer_files = list_images(args.writer_images)
    rng.shuffle(writer_files)

    token = secrets.token_hex(32)
    token_file = RESULTS / "load_test.token"
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    upload_dir = RESULTS / "loadtest-uploads"
    port = free_port()
    proc, log, base = start_server(args.db, port, token_file, upload_dir, args.threads)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python bench/load_test.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "index": index_info,
        "clients": args.clients,
        "requests_per_phase": args.requests,
        "k": args.k,
        "phases": {},
    }
    try:
        with httpx.Client(base_url=base, timeout=120) as client:
            stats = client.get("/stats").json()
            results["server"] = stats["server"]
            # warm-up (first model call, caches) and a pool of real catalogue ids
            ids: set[int] = set()
            for data in uploads[:10]:
                r = client.post("/search", files={"image": ("q.jpg", data)}, data={"k": "100"})
                r.raise_for_status()
                ids.update(h["id"] for h in r.json()["results"])
        id_pool = sorted(ids)
        rng.shuffle(id_pool)

        print(f"phase 1: {args.requests} searches, {args.clients} clients ...", flush=True)
        plain, _ = run_phase("search", base, args, uploads, id_pool)
        results["phases"]["search"] = plain.summary()
        print(json.dumps(results["phases"]["search"]), flush=True)

        before = httpx.get(f"{base}/health").json()["images"]
        print(f"phase 2: the same with a writer adding images ({before} indexed) ...", flush=True)
        mixed, added = run_phase(
            "search + writer", base, args, uploads, id_pool, writer=(token, writer_files)
        )
        after = httpx.get(f"{base}/health").json()["images"]
        summary = mixed.summary()
        summary["collection_before_after"] = [before, after]
        summary["consistent"] = after == before + len(set(added))
        results["phases"]["search + writer"] = summary
        print(json.dumps(summary), flush=True)

        removed_errors = 0
        with httpx.Client(
            base_url=base, timeout=120, headers={"Authorization": f"Bearer {token}"}
        ) as client:
            for image_id in sorted(set(added)):
                removed_errors += client.delete(f"/images/{image_id}").status_code != 200
            final = client.get("/health").json()["images"]
        results["cleanup"] = {
            "removed": len(set(added)),
            "errors": removed_errors,
            "images_after": final,
            "restored": final == before,
        }
    finally:
        stop_server(proc, log)

    p1, p2 = results["phases"]["search"], results["phases"]["search + writer"]
    results["ratios_writer_vs_plain"] = {
        "throughput": round(p2["throughput_rps"] / p1["throughput_rps"], 2),
        "median": round(p2["median_ms"] / p1["median_ms"], 2),
        "p99": round(p2["p99_ms"] / p1["p99_ms"], 2),
    }
    args.out.write_text(json.dumps(results, indent=1))
    print()
    print(markdown(results))
    print(f"\nratios (writer / plain): {results['ratios_writer_vs_plain']}")
    print(
        f"consistent collection size after writes: {p2['consistent']}; "
        f"cleanup: {results['cleanup']}"
    )
    print(f"-> {args.out}")
    total_errors = p1["errors"] + p2["errors"] + p2.get("writer", {}).get("errors", 0)
    if total_errors or not p2["consistent"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
