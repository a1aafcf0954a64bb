"""Extraction speed on CPU (issues 6 and 16) and evaluation at scale (issue 6).

Part 1, end-to-end images/s on gpr-mini (EfficientNet-Lite0, GeM, 224 squash, batches
of 32), every method measured in the same run, round-robin, ``--repeats`` times; the
medians and their ratios are reported:

- ``naive``: one process: Pillow open + convert + resize, torch eager, batches of 32,
  run in a child process with glibc's default malloc settings (what a user's script gets);
- ``naive, tuned malloc``: the same loop in this process, after
  :func:`cbir.allocator.tune_allocator` (as every in-process method here);
- ``torch``, ``onnx``, ``onnx-int8``: :func:`cbir.extract.extract` with that engine
  (decode workers; the exports and the int8 quantisation are cached first);
- ``onnx``/``onnx-int8`` run in the layout extraction picks by itself: on two cores, two
  lanes (two one-thread model calls side by side, :func:`cbir.runtime.device.plan_lanes`);
  ``..., 1 lane`` rows run the same extraction with one call on every core;
- ``onnx-int8, Pillow resize``: the int8 engine with Pillow's resize instead of its own
  (OpenCV's, :data:`cbir.runtime.quantize.INT8_RESAMPLER`): what that choice buys;
- ``onnx model only``, ``onnx-int8 model only``: the engine's runner on pre-decoded uint8
  batches, one call on every core, and ``..., N lanes``: N one-thread calls at once. An
  engine's ceiling is the better of its model-only layouts.

Then, untimed (``--skip-quality`` to leave out): gpr-mini mAP (all images) and
rparis-mini Medium mAP (GeM, max side 512, aspect kept) with the fp32 and int8 ONNX
engines, and the cosine between their vectors (median, 1st percentile); and the
breakdown of one image's end-to-end time (decode, resize + array, batch transfer between
processes, model) measured stage by stage in this process.

Part 2, the GPR1200 protocol on synthetic clustered descriptors (10 per class, D dims):
the blockwise evaluation vs the full-argsort reference at N = 12,000 (same APs
required), and the blockwise one alone at N = 100,000; each in a fresh process whose
peak resident memory (ru_maxrss) is reported.

Usage (from the project root; on a shared machine under ``flock /work/coord/bench.lock``):
    .venv/bin/python bench/speed.py [--gpr ../shared/datasets/gpr-mini] [--limit 1024]
        [--repeats 3] [--workers N] [--skip-extract] [--skip-quality] [--skip-eval]
Writes bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# part 1: extraction
# ----------------------------------------------------------------------------------------

def best_model_only(rate: dict[str, float], engines: list[str]) -> dict[str, float]:
    """Each engine's ceiling in one set of rates: its best model-only layout."""
    return {e: max(v for m, v in rate.items() if m.startswith(f"{e} model only")) for e in engines}


def shares_of_ceiling(rate: dict[str, float], engines: list[str]) -> dict[str, float]:
    """Each end-to-end row's rate over its engine's ceiling, in one set of rates."""
    best = best_model_only(rate, engines)
    return {m: v / best[m.split(",")[0]] for m, v in rate.items()
            if m.split(",")[0] in best and "model only" not in m}  # fmt: skip


def per_repeat_shares(rates: dict[str, list[float]], engines: list[str]) -> dict[str, list[float]]:
    """:func:`shares_of_ceiling` within each repeat.

    The host's speed drifts by tens of percent over minutes here; within one repeat the
    rows of an engine run back to back, so these shares are less exposed to the drift than
    the ratio of medians taken over the whole run."""
    repeats = len(next(iter(rates.values())))
    each = [shares_of_ceiling({m: r[i] for m, r in rates.items()}, engines) for i in range(repeats)]
    return {m: [s[m] for s in each] for m in each[0]}


def naive_loop(desc, files: list[Path], batch_size: int = 32) -> np.ndarray:
    """The baseline of the issue: decode, resize and run the model one batch at a time."""
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for start in range(0, len(files), batch_size):
            arrays = []
            for f in files[start : start + batch_size]:
                with Image.open(f) as im:
                    arrays.append(desc.preprocess.to_array(im.convert("RGB")))
            x = desc.preprocess.normalize(torch.from_numpy(np.stack(arrays)))
            out.append(desc(x).numpy())
    return np.concatenate(out)


def bench_files(gpr: str, limit: int) -> list[Path]:
    """``limit`` gpr-mini images spread evenly over the collection (0: all of them)."""
    from cbir.data.datasets import load_gpr_collection

    files = load_gpr_collection(gpr).files
    if limit and limit < len(files):
        files = files[:: max(1, len(files) // limit)][:limit]
    return files


def _cpu_seconds() -> dict[str, float]:
    """User and system CPU time of this process and its finished children (the decode
    workers): system time is where thread oversubscription shows."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"user": me.ru_utime + kids.ru_utime, "sys": me.ru_stime + kids.ru_stime}


ENGINE_METHODS = ("torch", "onnx", "onnx-int8")


def bench_extract(args: argparse.Namespace) -> dict:
    from cbir.allocator import tune_allocator
    from cbir.extract import decoded_batches, default_workers, extract
    from cbir.models import build_descriptor
    from cbir.runtime import for_engine, make_runner

    tune_allocator()  # every in-process method runs with it (the untuned naive: a child)
    files = bench_files(args.gpr, args.limit)
    desc = build_descriptor()  # efficientnet-lite0, GeM, 224 squash
    desc8 = for_engine(desc, "onnx-int8", args.calibrate)
    workers = default_workers() if args.workers is None else args.workers
    # exported / quantised once (cached), outside the timings; the runner says what ran
    runners = {"onnx": make_runner(desc, "onnx", device="cpu"),
               "onnx-int8": make_runner(desc8, "onnx-int8", device="cpu", calibrate=args.calibrate)}
    assert {k: r.engine for k, r in runners.items()} == {"onnx": "onnx", "onnx-int8": "onnx-int8"}
    # the layout extraction picks by itself (lanes="auto": on two cores, two one-thread calls)
    laned = {"onnx": make_runner(desc, "onnx", device="cpu", lanes="auto"),
             "onnx-int8": make_runner(desc8, "onnx-int8", device="cpu", calibrate=args.calibrate, lanes="auto")}
    lanes = laned["onnx"].lanes
    stream = decoded_batches(files, desc.preprocess, batch_size=args.batch_size, workers=0)
    predecoded = [a for _, a, _ in stream]

    def t_naive_tuned() -> float:
        t = time.perf_counter()
        naive_loop(desc, files)
        return time.perf_counter() - t

    def t_naive() -> float:  # a fresh process, glibc defaults; its own timing of the loop
        env = dict(os.environ, CBIR_TUNE_MALLOC="0")
        # the child selects the same files itself (a path list would overflow argv at --limit 0)
        cmd = [sys.executable, __file__, "--_naive", "--gpr", args.gpr, "--limit", str(args.limit)]
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return float(done.stdout.strip().splitlines()[-1])

    # the int8 engine resizes with OpenCV; the same engine resizing with Pillow, as
    # the float32 engines do, says in the same run what that choice buys
    desc8_pillow = copy.copy(desc8)
    desc8_pillow.preprocess = dataclasses.replace(desc8.preprocess, resampler="pillow")

    def t_engine(engine: str, workers: int = workers, one_lane: bool = False, d=None) -> float:
        d = d or (desc8 if engine == "onnx-int8" else desc)
        runner = runners[engine] if one_lane else None  # None: extract makes its own (lanes auto)
        res = extract(d, files, engine=engine, device="cpu", calibrate=args.calibrate, workers=workers,
                      batch_size=args.batch_size, progress=False, runner=runner)
        assert not res.failures
        return res.seconds

    def t_ceiling(engine: str) -> float:
        run = runners[engine]
        t = time.perf_counter()
        for batch in predecoded:
            run(batch)
        return time.perf_counter() - t

    def t_ceiling_lanes(engine: str) -> float:
        """The model alone in the lanes layout: ``lanes`` one-thread calls at once."""
        run = laned[engine]
        t = time.perf_counter()
        with ThreadPoolExecutor(run.lanes) as pool:
            for _ in pool.map(run, predecoded):
                pass
        return time.perf_counter() - t

    methods = {"naive": t_naive, "naive, tuned malloc": t_naive_tuned}
    for engine in ENGINE_METHODS:
        methods[engine] = functools.partial(t_engine, engine)
        if args.also_workers is not None and args.also_workers != workers:  # the other decode layout, same run
            methods[f"{engine}, -j {args.also_workers}"] = functools.partial(t_engine, engine, args.also_workers)
        if engine == "onnx-int8":
            methods[f"{engine}, Pillow resize"] = functools.partial(t_engine, engine, d=desc8_pillow)
        if engine != "torch" and lanes > 1:  # the one-call-on-every-core layout, same run
            methods[f"{engine}, 1 lane"] = functools.partial(t_engine, engine, one_lane=True)
        if engine != "torch":
            methods[f"{engine} model only"] = functools.partial(t_ceiling, engine)
            if lanes > 1:
                methods[f"{engine} model only, {lanes} lanes"] = functools.partial(t_ceiling_lanes, engine)
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for rep in range(args.repeats):  # round-robin: load changes hit every method alike
        for name, fn in methods.items():
            before = _cpu_seconds()
            times[name].append(fn())
            after = _cpu_seconds()
            used = {k: after[k] - before[k] for k in after}
            cpu[name].append(used)
            rate = len(files) / times[name][-1]
            print(f"  repeat {rep + 1}: {name:22s} {rate:8.1f} img/s   "
                  f"cpu user {used['user']:6.1f} s  sys {used['sys']:5.1f} s   load {os.getloadavg()[0]:.1f}",
                  flush=True)
    rates = {m: [len(files) / t for t in ts] for m, ts in times.items()}
    med = {m: statistics.median(r) for m, r in rates.items()}
    # an engine's ceiling: its best model-only layout (what the hardware gives this model)
    ceiling = best_model_only(med, list(runners))
    out = {
        "images": len(files), "workers": workers, "repeats": args.repeats,
        "batch_size": args.batch_size,
        "images_per_second": rates, "median_images_per_second": med,
        "ratio_to_naive": {m: med[m] / med["naive"] for m in med},
        "ratio_to_naive_tuned": {m: med[m] / med["naive, tuned malloc"] for m in med},
        "cpu_seconds": cpu,
        "ceiling": ceiling,
        "fraction_of_ceiling": shares_of_ceiling(med, list(ceiling)),
        "fraction_of_ceiling_per_repeat": per_repeat_shares(rates, list(ceiling)),
        "lanes": lanes,
        "int8_over_fp32_onnx": med["onnx-int8"] / med["onnx"],
        "int8_model_only_over_fp32_model_only": med["onnx-int8 model only"] / med["onnx model only"],
    }
    print(f"\nend to end on {len(files)} gpr-mini images, medians of {args.repeats}:")
    print(f"{'method':22s} {'img/s':>8s} {'x naive':>8s} {'x tuned naive':>14s}")
    for m in methods:
        print(f"{m:22s} {med[m]:8.1f} {out['ratio_to_naive'][m]:8.2f} {out['ratio_to_naive_tuned'][m]:14.2f}")
    for e, f in out["fraction_of_ceiling"].items():
        print(f"{e} end to end = {f:.0%} of its model-only ceiling (the best model-only layout)")
    for e, fs in out["fraction_of_ceiling_per_repeat"].items():
        print(f"{e}: share of the ceiling within each repeat {', '.join(f'{f:.0%}' for f in fs)}, "
              f"median {statistics.median(fs):.0%}")
    print(f"onnx-int8 / onnx end to end = {out['int8_over_fp32_onnx']:.2f}x "
          f"(model only {out['int8_model_only_over_fp32_model_only']:.2f}x)")
    out["breakdown"] = breakdown(desc, files, predecoded, runners, args.batch_size, desc8.preprocess)
    if args.ceiling_batches:
        out["model_only_by_batch"] = {
            e: model_only_by_batch(runners[e], predecoded, [int(b) for b in args.ceiling_batches.split(",")],
                                   args.repeats, e)
            for e in runners
        }
    return out


def breakdown(desc, files: list[Path], predecoded: list[np.ndarray], runners: dict, batch_size: int,
              int8_pre) -> dict:
    """Milliseconds per image of each stage, one after the other in this process (one
    core for the decode stages, every core for the model): where end-to-end time goes."""
    import pickle

    from cbir.data.decode import load_image, load_pixels

    pre = desc.preprocess
    stages: dict[str, float] = {}
    t = time.perf_counter()
    for f in files:
        load_image(f, target_size=pre.resized_size)
    stages["decode (Pillow, JPEG draft mode)"] = time.perf_counter() - t
    t = time.perf_counter()
    pixels = [load_pixels(f, target_size=pre.resized_size) for f in files]
    stages["decode (what extraction uses: simplejpeg)"] = time.perf_counter() - t
    t = time.perf_counter()
    arrays = [pre.to_array(px) for px in pixels]
    stages["resize (Pillow: the float32 engines')"] = time.perf_counter() - t
    t = time.perf_counter()
    for px in pixels:
        int8_pre.to_array(px)
    stages[f"resize ({int8_pre.resampler}: the int8 engine's)"] = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(0, len(arrays), batch_size):
        pickle.loads(pickle.dumps(np.stack(arrays[s : s + batch_size]), protocol=pickle.HIGHEST_PROTOCOL))
    stages["stack + transfer between processes"] = time.perf_counter() - t
    for e, run in runners.items():
        t = time.perf_counter()
        for batch in predecoded:
            run(batch)
        stages[f"model ({e}, all cores)"] = time.perf_counter() - t
    ms = {k: 1000 * v / len(files) for k, v in stages.items()}
    print("\nbreakdown, ms per image (stages run one after the other):")
    for k, v in ms.items():
        print(f"  {k:40s} {v:7.2f}")
    return ms


def quality(args: argparse.Namespace) -> dict:
    """gpr-mini and rparis-mini with the fp32 and int8 ONNX engines, and their cosines."""
    from cbir.benchmarks import run_gpr1200, run_revisited
    from cbir.models import build_descriptor
    from cbir.runtime import for_engine

    def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        a, b = a.astype(np.float64), b.astype(np.float64)
        c = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return {"median": float(np.median(c)), "p1": float(np.percentile(c, 1)), "min": float(c.min())}

    out: dict = {}
    desc = build_descriptor()
    gpr = {e: run_gpr1200(args.gpr, for_engine(desc, e, args.calibrate), engine=e, calibrate=args.calibrate,
                          progress=False) for e in ("onnx", "onnx-int8")}
    out["gpr-mini"] = {
        "mAP": {e: g.result.mAP for e, g in gpr.items()},
        "cosine": cosines(gpr["onnx"].extraction.features, gpr["onnx-int8"].extraction.features),
        "images": len(gpr["onnx"].files),
    }
    print(f"\ngpr-mini mAP: fp32 {out['gpr-mini']['mAP']['onnx']:.4f}, int8 {out['gpr-mini']['mAP']['onnx-int8']:.4f}; "
          f"cosine median {out['gpr-mini']['cosine']['median']:.4f}, p1 {out['gpr-mini']['cosine']['p1']:.4f}")
    if Path(args.rparis).exists():
        inst = build_descriptor(resize="keep", image_size=512)
        rp = {e: run_revisited(args.rparis, for_engine(inst, e, args.calibrate), engine=e,
                               calibrate=args.calibrate, progress=False) for e in ("onnx", "onnx-int8")}
        out["rparis-mini"] = {
            "medium mAP (%)": {e: r.result["medium"].mAP * 100 for e, r in rp.items()},
            "easy mAP (%)": {e: r.result["easy"].mAP * 100 for e, r in rp.items()},
            "hard mAP (%)": {e: r.result["hard"].mAP * 100 for e, r in rp.items()},
            "cosine": cosines(rp["onnx"].features.database, rp["onnx-int8"].features.database),
            "descriptor": inst.describe_name() + ", max side 512",
        }
        m = out["rparis-mini"]["medium mAP (%)"]
        print(f"rparis-mini medium mAP: fp32 {m['onnx']:.2f}, int8 {m['onnx-int8']:.2f}")
    return out


def model_only_by_batch(run_onnx, predecoded: list[np.ndarray], sizes: list[int],
                        repeats: int, engine: str = "onnx") -> dict[str, float]:
    """ONNX Runtime on the same pre-decoded images cut into batches of each size (median
    img/s over ``repeats``): where the per-image cost of the graph is lowest."""
    images = np.concatenate(predecoded)
    out = {}
    for b in sizes:
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for s in range(0, len(images), b):
                run_onnx(images[s : s + b])
            rates.append(len(images) / (time.perf_counter() - t))
        out[str(b)] = statistics.median(rates)
        print(f"  {engine} model only, batch {b:3d}: {out[str(b)]:7.1f} img/s "
              f"({1000 / out[str(b)]:.1f} ms per image)", flush=True)
    return out


# ----------------------------------------------------------------------------------------
# part 2: evaluation at scale
# ----------------------------------------------------------------------------------------
def clustered(n: int, dim: int, per_class: int = 10, noise: float = 0.14, seed: int = 0):
    """Unit vectors around random class centres; the noise puts mAP near 0.5 at N = 12,000."""
    rng = np.random.default_rng(seed)
    classes = n // per_class
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(classes), per_class)
    x = centres[labels] + rng.normal(scale=noise, size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def eval_child(n: int, dim: int, method: str) -> None:
    """Runs in a fresh process: one evaluation, prints a JSON line."""
    from cbir.eval import gpr_average_precisions, gpr_average_precisions_full_sort

    x, labels = clustered(n, dim)
    t = time.perf_counter()
    if method == "full":
        aps = gpr_average_precisions_full_sort(x, labels)
    else:
        aps = gpr_average_precisions(x, labels)
    seconds = time.perf_counter() - t
    np.save(os.environ["CBIR_BENCH_APS"], aps)
    print(json.dumps({"seconds": seconds, "mAP": float(aps.mean())}))


def run_child(n: int, dim: int, method: str, aps_path: Path) -> dict:
    env = dict(os.environ, CBIR_BENCH_APS=str(aps_path))
    cmd = [sys.executable, __file__, "--_eval", f"{n},{dim},{method}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} evaluation at N={n} failed (exit {proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return res


def bench_eval(args: argparse.Namespace) -> dict:
    out = {}
    tmp = ROOT / "bench/results"
    tmp.mkdir(parents=True, exist_ok=True)
    for n in (int(v) for v in args.eval_sizes.split(",")):
        row = {}
        methods = ["blockwise", "full"] if n <= args.full_max else ["blockwise"]
        for m in methods:
            row[m] = run_child(n, args.dim, m, tmp / f"aps_{n}_{m}.npy")
            r = row[m]
            print(f"  N={n:7d} {m:9s} {r['seconds']:8.1f} s  peak {r['peak_rss_mib']:7.0f} MiB"
                  f"  mAP {r['mAP']:.6f}", flush=True)
        if "full" in row:
            a, b = np.load(tmp / f"aps_{n}_blockwise.npy"), np.load(tmp / f"aps_{n}_full.npy")
            row["identical_aps"] = bool(np.array_equal(a, b))
            row["speedup"] = row["full"]["seconds"] / row["blockwise"]["seconds"]
            print(f"  N={n}: APs identical: {row['identical_aps']}, "
                  f"blockwise {row['speedup']:.1f}x faster")
        for m in methods:
            (tmp / f"aps_{n}_{m}.npy").unlink(missing_ok=True)
        out[str(n)] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--gpr", default=str(ROOT.parent / "shared/datasets/gpr-mini"))
    ap.add_argument("--limit", type=int, default=1024, help="images spread over gpr-mini; 0: all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the engines (naive: 32)")
    ap.add_argument("--ceiling-batches", default="1,8,16,32,64",
                    help="batch sizes for the model-only sweep ('' to skip)")
    ap.add_argument("--workers", type=int, default=None,
                    help="decode workers (default: cbir's, cbir.extract.default_workers)")
    ap.add_argument("--also-workers", type=int, default=None,
                    help="also time each engine with this many decode workers, in the same run")
    ap.add_argument("--eval-sizes", default="12000,100000")
    ap.add_argument("--full-max", type=int, default=12000, help="largest N for the full sort")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--rparis", default=str(ROOT.parent / "shared/datasets/rparis-mini"))
    ap.add_argument("--calibrate", default=None, help="onnx-int8 calibration images (default: train-pool)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/speed.json"))
    ap.add_argument("--_eval", help=argparse.SUPPRESS)
    ap.add_argument("--_naive", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._naive:
        import torch

        from cbir.models import build_descriptor

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        desc = build_descriptor()
        files = bench_files(args.gpr, args.limit)
        t = time.perf_counter()
        naive_loop(desc, files)
        print(time.perf_counter() - t)
        return
    if args._eval:
        n, dim, method = args._eval.split(",")
        eval_child(int(n), int(dim), method)
        return
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg(),
        "note": (
            "2-core machine: compare rows within this run (round-robin medians); "
            "the load averages say whether other jobs ran"
        ),
        "command": " ".join(sys.argv),
    }
    if not args.skip_extract:
        result["extraction"] = bench_extract(args)
    if not args.skip_quality:
        result["quality"] = quality(args)
    if not args.skip_eval:
        result["evaluation"] = bench_eval(args)
    result["load_average_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
