"""``cbir index/search/stats/duplicates`` end to end (kills mid-run: test_index_faults.py)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cbir.cli.commands import app

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    """Exit code and stdout (messages on stderr, e.g. a model export, are left out)."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def test_index_search_stats_duplicates(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    db = tmp_path / "db"
    code, out = cli("index", image_dir, "--db", db, "--model", tiny_file, "-j", "0", "-q", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["added"] == 12 and report["extracted"] == 12 and report["images"] == 12

    query = image_dir / "img_04.jpg"
    code, out = cli("search", query, "--db", db, "--k", "5", "--json")
    assert code == 0, out
    payload = json.loads(out)
    assert list(payload) == ["query", "results"] and len(payload["results"]) == 5
    assert all(set(r) == {"id", "path", "score"} for r in payload["results"])
    assert payload["results"][0]["path"] == str(query)
    scores = [r["score"] for r in payload["results"]]
    assert scores == sorted(scores, reverse=True)
    code, out = cli(
        "search", query, "--db", db, "--k", "3", "--json", "--exclude-self", "--qe", "2"
    )
    assert code == 0 and str(query) not in [r["path"] for r in json.loads(out)["results"]]

    code, out = cli("search", query, "--db", db, "--k", "3")  # the table
    assert code == 0 and "img_04.jpg" in out

    (image_dir / "img_00.jpg").unlink()
    (image_dir / "img_01.jpg").unlink()
    code, out = cli("index", image_dir, "--db", db, "-j", "0", "-q", "--json")
    assert code == 0 and json.loads(out)["removed"] == 2 and json.loads(out)["extracted"] == 0
    code, out = cli("stats", "--db", db, "--json")
    stats = json.loads(out)
    assert stats["images"] == 10 == len([p for p in image_dir.rglob("*") if p.is_file()])
    assert (
        stats["failures"] == []
        and stats["index"] == "Flat"
        and stats["descriptor"].startswith("timm:resnet10t")
    )

    code, out = cli("duplicates", "--db", db, "--threshold", "-1", "--json")
    payload = json.loads(out)
    groups = payload["groups"]
    assert code == 0 and len(groups) == 1 and len(groups[0]["members"]) == 10  # everything is "similar" at -1
    assert len(payload["remove"]) == 9 and groups[0]["keep"] not in payload["remove"]
    code, out = cli("duplicates", "--db", db, "--threshold", "1.0")
    assert code == 0 and "no duplicates" in out


def test_cli_errors_are_messages_not_tracebacks(
    tmp_path: Path, image_dir: Path, tiny_file: Path
) -> None:
    code, out = cli("search", image_dir / "img_00.jpg", "--db", tmp_path / "none")
    assert code == 5 and "no index" in out and "Traceback" not in out  # 5: index missing or damaged
    code, out = cli("stats", "--db", tmp_path / "none")
    assert code == 5 and "no index" in out
    db = tmp_path / "db"
    assert cli("index", image_dir, "--db", db, "--model", tiny_file, "-j", "0", "-q")[0] == 0
    code, out = cli(
        "index", image_dir, "--db", db, "--model", tiny_file, "--image-size", "48", "-j", "0", "-q"
    )
    assert code == 2 and "incomparable" in out and "Traceback" not in out  # 2: invalid argument
    code, out = cli("search", tmp_path / "missing.jpg", "--db", db)
    assert code == 4 and "neither an indexed path nor an image file" in out  # 4: bad input
    code, out = cli(
        "index",
        image_dir,
        "--db",
        tmp_path / "ivf",
        "--model",
        tiny_file,
        "--index",
        "IVF256,PQ8",
        "-q",
    )
    assert code == 1 and "needs at least 256" in out
