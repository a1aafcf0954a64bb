"""What fine-tuning gains and forgets along the WiSE-FT line, scored on gpr-mini (issue 14).

``cbir train --interpolate auto`` chooses the weight ``a`` of the fine-tuned network on
validation data; gpr-mini chooses nothing. This script only *reports*, after the fact, the
gpr-mini mAP (overall and per domain) of every candidate weight between the off-the-shelf
network (``a = 0``) and the fine-tuned one (``a = 1``), and marks the weight that validation
chose, so the docs can show what that choice cost or saved on domains the training data does
not cover.

Usage (from the project root; ~1 min per weight on 2 CPU cores):

    python bench/forgetting.py bench/results/wise.cbir --checkpoint bench/results/wise.ckpt/last.pt

The fine-tuned end is the kept epoch's weights in the training checkpoint (before any
interpolation). Writes bench/results/forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from cbir.benchmarks import run_gpr1200
from cbir.fileio import atomic_write_text
from cbir.models import Descriptor, build_descriptor
from cbir.train.interpolation import AUTO_ALPHAS, interpolate_state

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("../shared/datasets")


def endpoints(trained: Path, checkpoint: Path) -> tuple[Descriptor, dict, dict, dict]:
    """The trained descriptor file, its off-the-shelf start, the kept epoch's weights, and
    what training recorded (settings, kept epoch, the weight validation chose)."""
    desc = Descriptor.load(trained)
    info = desc.meta.get("trained") or {}
    config = info.get("config") or {}
    if not config:
        raise SystemExit(f"{trained} was not written by cbir train (no training record)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    best = state.get("best") or {}
    tuned = best.get("model") if best.get("epoch") == info.get("kept_epoch") else None
    if tuned is None:
        tuned = state["model"]
        if int(state["epoch"]) != int(info.get("kept_epoch", -1)):
            raise SystemExit(f"{checkpoint} does not hold the kept epoch {info.get('kept_epoch')}")
    base = build_descriptor(config["model"], pooling=config.get("pooling", "gem")).state_dict()
    return desc, base, tuned, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trained", type=Path, help="descriptor file written by cbir train")
    ap.add_argument("--checkpoint", type=Path, required=True, help="its last.pt (holds the kept epoch)")
    ap.add_argument("--gpr", default=str(DATA / "gpr-mini"))
    ap.add_argument("--alphas", default=",".join(f"{a:g}" for a in AUTO_ALPHAS))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/forgetting.json")
    args = ap.parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")

    desc, base, tuned, info = endpoints(args.trained, args.checkpoint)
    chosen = (info.get("interpolation") or {}).get("alpha")
    rows: dict[str, dict[str, float]] = {}
    for a in (float(x) for x in args.alphas.split(",")):
        desc.load_state_dict(interpolate_state(base, tuned, a))
        scores = run_gpr1200(args.gpr, desc, workers=args.workers, progress=sys.stderr.isatty()).result.to_dict()
        rows[f"{a:g}"] = scores
        print(f"a={a:g}: mAP {100 * scores['mAP']:.2f}", flush=True)

    cols = list(next(iter(rows.values())))
    ref = rows.get("0")
    print("\n| a (fine-tuned share) | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for a, s in rows.items():
        mark = " (validation's choice)" if chosen is not None and float(a) == float(chosen) else ""
        cells = [
            f"{100 * s[c]:.2f}" + (f" ({100 * (s[c] - ref[c]):+.2f})" if ref is not None and a != "0" else "")
            for c in cols
        ]
        print(f"| {a}{mark} | " + " | ".join(cells) + " |")
    report = {
        "date": started,
        "command": "python bench/forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "trained": str(args.trained),
        "kept_epoch": info.get("kept_epoch"),
        "validation_choice": chosen,
        "validation_scores": (info.get("interpolation") or {}).get("validation"),
        "gpr_mini": rows,
    }
    atomic_write_text(args.json, json.dumps(report, indent=1))
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
