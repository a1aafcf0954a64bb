"""What hostile uploads and connections cost a running ``cbir serve`` process.

    flock /work/coord/bench.lock .venv/bin/python bench/serve_hardening.py   # b7f237c, then this tree

Runs everything below twice, in the same run: first with the cbir of git revision
``--baseline`` (``git archive`` into ``--work``: the figures before a change), then with
this tree's.

1. Indexes 20 generated photos with the default descriptor (EfficientNet-Lite0 + GeM)
   into ``--work`` with that tree's ``cbir index``.
2. Starts that tree's ``cbir serve`` on 127.0.0.1 (default settings, 2 threads) and
   warms it up with one upload search.
3. For each upload (a 1600 x 1200 JPEG photo, a 109 KB 30000 x 30000 1-bit PNG bomb, a
   95 KB 7000 x 7000 16-bit grey PNG): resets the server process's peak RSS (Linux
   ``/proc/PID/clear_refs``), sends ``POST /search``, and reads the peak (``VmHWM``) and
   the status. The figure is the peak minus the RSS before the request.
4. Opens ``--slowloris`` connections that send a partial request and then one more
   header line every 2 seconds, and counts how many the server still holds open after
   ``--hold`` seconds (and whether ``/health`` still answers meanwhile).

Writes ``bench/results/serve_hardening.json`` and prints Markdown tables.
Memory and connection counts do not depend on the machine's load; the times are only
indicative (a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
#: main before the server hardening of issue 15: the faults this bench was written for.
BEFORE = "b7f237c"
sys.path.insert(0, str(ROOT / "tests"))
_ENV = dict(os.environ)  # the tests' conftest points caches at temporary folders: undone below

from conftest import make_image  # noqa: E402  (the tests' generated photos and PNG writer)
from test_serve_hardening import png_bytes  # noqa: E402

os.environ.clear()
os.environ.update(_ENV)


def _proc_status(pid: int, key: str) -> float:
    """A ``/proc/PID/status`` memory field in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _cbir(src: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "cbir.cli.main", *args], env=env, **kwargs)


def make_inputs(work: Path) -> dict[str, Path]:
    """The collection and the three uploads (made once, reused by later runs)."""
    photos = work / "photos"
    for i in range(20):
        if not (photos / f"p{i:02d}.jpg").exists():
            make_image(photos / f"p{i:02d}.jpg", seed=700 + i, size=(640, 480))
    uploads = {
        "photo 1600x1200 JPEG": (work / "photo.jpg", lambda p: make_image(p, seed=900, size=(1600, 1200))),
        "bomb 30000x30000 1-bit PNG": (work / "bomb.png", lambda p: p.write_bytes(png_bytes(30_000, 30_000, 1))),
        "7000x7000 16-bit PNG": (work / "deep.png", lambda p: p.write_bytes(png_bytes(7000, 7000, 16))),
    }
    for path, make in uploads.values():
        if not path.exists():
            make(path)
    return {name: path for name, (path, _) in uploads.items()}


def start_server(src: Path, db: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = _cbir(src, "serve", "--db", str(db), "--port", str(port), "--threads", "2",
                     stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def measure_uploads(pid: int, port: int, uploads: dict[str, Path]) -> list[dict]:
    url = f"http://127.0.0.1:{port}/search"
    rows = []
    for name, path in uploads.items():
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak := current RSS
        before = _proc_status(pid, "VmRSS")
        start = time.perf_counter()
        r = httpx.post(url, files={"image": (path.name, path.read_bytes())}, data={"k": "5"}, timeout=600)
        seconds = time.perf_counter() - start
        code = None if r.status_code == 200 else r.json().get("error", {}).get("code")
        rows.append({
            "upload": name, "bytes": path.stat().st_size, "status": r.status_code, "code": code,
            "peak_increase_mb": round(_proc_status(pid, "VmHWM") - before, 1), "seconds": round(seconds, 2),
        })
    return rows


def slowloris(port: int, connections: int, hold: float) -> dict:
    """Partial requests kept alive by a header line every 2 s; how many survive ``hold`` s."""
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        s.setblocking(False)
        socks.append(s)
    open_ = set(range(connections))
    start = time.monotonic()
    health_ok = True
    while time.monotonic() - start < hold:
        for i in list(open_):
            try:
                if socks[i].recv(4096) == b"":
                    open_.discard(i)
                    continue
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
                continue
            try:
                socks[i].send(b"X-Slow: 1\r\n")
            except OSError:
                open_.discard(i)
        try:
            health_ok &= httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        except httpx.TransportError:
            health_ok = False
        time.sleep(2)
    for s in socks:
        s.close()
    return {"connections": connections, "hold_seconds": hold, "still_open": len(open_), "health_answered": health_ok}


def run_tree(src: Path, label: str, work: Path, uploads: dict[str, Path], args: argparse.Namespace) -> dict:
    """Index, serve and measure with the cbir of source tree ``src``."""
    db = work / f"db-{label}"
    if _cbir(src, "index", str(work / "photos"), "--db", str(db)).wait() != 0:
        raise SystemExit(f"cbir index failed ({label})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(src, db, port, work / f"serve-{label}.log")
    try:
        warm = {"image": ("w.jpg", (work / "photos" / "p00.jpg").read_bytes())}
        assert httpx.post(f"http://127.0.0.1:{port}/search", files=warm, timeout=300).status_code == 200
        rows = measure_uploads(server.pid, port, uploads)
        loris = slowloris(port, args.slowloris, args.hold)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    return {"label": label, "src": str(src), "uploads": rows, "slowloris": loris}


def checkout(ref: str, work: Path) -> Path:
    """``src/`` of git revision ``ref`` in ``work`` (git archive: no worktree, no checkout)."""
    dest = work / f"src-{ref.replace('/', '_')}"
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--baseline",
        default=BEFORE,
        help=f"git revision measured first, for comparison (default {BEFORE}, main before the fixes; '' to skip)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/cbir-serve-bench"), help="scratch folder")
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--hold", type=float, default=40.0)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    uploads = make_inputs(args.work)
    runs = []
    if args.baseline:
        runs.append(run_tree(checkout(args.baseline, args.work), args.baseline, args.work, uploads, args))
    runs.append(run_tree(ROOT / "src", "this tree", args.work, uploads, args))
    result = {"date": time.strftime("%Y-%m-%d"), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "serve_hardening.json"
    out.write_text(json.dumps(result, indent=2))
    print_table(runs)
    print(f"written: {out}")


def print_table(runs: list[dict]) -> None:
    print("| server | upload | size | status | peak RSS increase (MB) | seconds |")
    print("|---|---|---:|---|---:|---:|")
    for run in runs:
        for r in run["uploads"]:
            status = f"{r['status']} {r['code'] or ''}".strip()
            size = f"{r['bytes'] / 1024:,.0f} KB"
            peak = f"{r['peak_increase_mb']:,.1f}"
            print(f"| {run['label']} | {r['upload']} | {size} | {status} | {peak} | {r['seconds']} |")
    print("\n| server | slowloris connections | still open after | /health answered meanwhile |")
    print("|---|---:|---:|---|")
    for run in runs:
        lo = run["slowloris"]
        print(f"| {run['label']} | {lo['connections']} | {lo['still_open']} after {lo['hold_seconds']:.0f} s "
              f"| {'yes' if lo['health_answered'] else 'no'} |")


if __name__ == "__main__":
    main()
