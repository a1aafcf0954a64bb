"""The conventions every ``cbir`` command follows (docs/cli.md): a light ``--help``, ``--version``,
``--json`` / ``--format``, output fit for pipes, one error mapping with documented exit codes,
folder walks that skip hidden folders and honour ``--exclude``, files written with the umask,
HEIC/AVIF decoding."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image, modules_loaded_by_help
from typer.testing import CliRunner

from cbir.cli.commands import app

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*args: object) -> tuple[int, str, str]:
    res = runner.invoke(app, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def run_cbir(*args: object, stdin: int | None = None, **kw: object) -> subprocess.CompletedProcess:
    """The real console script path (``python -m``-free): ``cbir.cli.main.main`` in a child."""
    code = "import sys; from cbir.cli.main import main; sys.argv[0] = 'cbir'; main()"
    env = {**os.environ, "COLUMNS": "40", "TQDM_DISABLE": "0"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, **kw)  # fmt: skip


@pytest.fixture
def indexed(tmp_path: Path, image_dir: Path, tiny_file: Path) -> Path:
    """An index of image_dir, one image inside a folder with a long name (paths longer than 80)."""
    deep = image_dir / ("a-folder-with-a-long-name-" * 3) / "inner"
    make_image(deep / "long-file-name-that-would-wrap-in-a-table.jpg", seed=55)
    db = tmp_path / "db"
    code, out, err = cli("index", image_dir, "--db", db, "--model", tiny_file, "-j", "0", "-q")
    assert code == 0, out + err
    return db


# --------------------------------------------------------------------------------------------
# help and version
# --------------------------------------------------------------------------------------------
HEAVY = ("torch", "faiss", "ray", "onnxruntime", "fastapi", "timm", "pyarrow", "pymilvus")


def test_help_imports_no_heavy_module() -> None:
    """`cbir --help` and a command's help stay light: the modules are checked, never the time."""
    commands = [["--help"], ["index", "--help"], ["bench", "revisited", "--help"]]
    assert modules_loaded_by_help(commands, HEAVY) == []


def test_import_cbir_is_light_and_lazy() -> None:
    probe = (
        "import sys, cbir\n"
        f"before = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert callable(cbir.open_index) and cbir.Index.__name__ == 'Index'\n"
        "print(before, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[] True"  # nothing heavy until a facade name is used


def test_version() -> None:
    import cbir

    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"cbir {cbir.__version__}"
    _, out, _ = cli("--help")
    assert "3 index busy" in out and "5 index missing or damaged" in " ".join(out.split())


@pytest.mark.parametrize("command", [[], ["index"], ["search"], ["extract"], ["train"], ["bench", "gpr1200"],
                                     ["bench", "revisited"], ["duplicates"], ["serve"], ["stats"]])  # fmt: skip
def test_help_has_no_type_labels(command: list[str]) -> None:
    code, out, _ = cli(*command, "--help")
    assert code == 0
    text = ANSI.sub("", out)
    for label in ("<bool>", "<list[", "{", "}"):
        assert label not in text, (command, label)


def test_workers_help_matches_the_code() -> None:
    from cbir.extract import default_workers
    from cbir.runtime import usable_cores

    _, out, _ = cli("extract", "--help")
    text = re.sub(r"[\s│]+", " ", out)
    assert "one fewer than the cores" in text and "on 2 cores or fewer 0" in text
    cores = usable_cores()
    assert default_workers() == (0 if cores <= 2 else min(8, cores - 1))


# --------------------------------------------------------------------------------------------
# output formats and pipes
# --------------------------------------------------------------------------------------------
def test_search_formats(indexed: Path, image_dir: Path) -> None:
    query = image_dir / "img_03.jpg"
    code, out, _ = cli("search", query, "--db", indexed, "--k", "4", "--format", "paths")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and all(Path(p).is_file() for p in lines)
    assert lines[0] == str(query)
    code, js, _ = cli("search", query, "--db", indexed, "--k", "4", "--json")
    assert code == 0 and [r["path"] for r in json.loads(js)["results"]] == lines
    code, js2, _ = cli("search", query, "--db", indexed, "--k", "4", "--format", "json")
    assert json.loads(js2) == json.loads(js)
    code, _, err = cli("search", query, "--db", indexed, "--format", "csv")
    assert code == 2 and "--format" in err


def test_piped_table_is_not_wrapped(indexed: Path, image_dir: Path) -> None:
    """COLUMNS=40 and a pipe: a long path still comes out whole, on one line, without colour."""
    proc = run_cbir("search", image_dir / "img_03.jpg", "--db", indexed, "--k", "20")
    assert proc.returncode == 0, proc.stderr
    long_paths = [str(p) for p in image_dir.rglob("long-file-name*")]
    assert long_paths and any(long_paths[0] in line for line in proc.stdout.splitlines())
    assert "\x1b[" not in proc.stdout and "\r" not in proc.stderr


def test_paths_into_head_exits_cleanly(indexed: Path, image_dir: Path) -> None:
    """`cbir search Q --format paths | head -3`: three whole paths, no traceback, status 0."""
    code = "import sys; from cbir.cli.main import main; sys.argv[0] = 'cbir'; main()"
    cmd = [sys.executable, "-c", code, "search", str(image_dir / "img_03.jpg"), "--db", str(indexed), "--k", "12",
           "--format", "paths"]  # fmt: skip
    script = " ".join(map(_quote, cmd)) + " | head -1; echo status=${PIPESTATUS[0]}"
    proc = subprocess.run(["bash", "-c", "set -o pipefail; " + script], capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[0] == str(image_dir / "img_03.jpg")
    assert lines[-1] == "status=0", proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# --------------------------------------------------------------------------------------------
# failures, exit codes, messages
# --------------------------------------------------------------------------------------------
def test_failures_reported_once_with_reasons_in_stats(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    db = tmp_path / "db"
    res = runner.invoke(app, ["index", str(image_dir), "--db", str(db), "--model", str(tiny_file), "-j", "0", "-q"])
    assert res.exit_code == 0
    assert res.stderr.count("broken.jpg") == 1 and "broken.jpg" not in res.stdout
    code, out, _ = cli("stats", "--db", db, "--json")
    failures = json.loads(out)["failures"]
    assert [Path(f["path"]).name for f in failures] == ["broken.jpg"] and failures[0]["reason"]
    code, out, _ = cli("stats", "--db", db, "--format", "paths")
    assert out.splitlines() == [failures[0]["path"]]


def test_a_file_given_as_a_folder(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    code, out, err = cli("index", image_dir / "img_00.jpg", "--db", tmp_path / "db", "--model", tiny_file)
    assert code == 4 and "is a file, not a folder" in " ".join(err.split()) and str(image_dir) in err
    assert not (tmp_path / "db").exists()


def test_an_empty_folder_is_an_error(tmp_path: Path, tiny_file: Path) -> None:
    (tmp_path / "empty" / ".thumbnails").mkdir(parents=True)
    make_image(tmp_path / "empty" / ".thumbnails" / "t.jpg", seed=1)  # hidden: does not count
    code, _, err = cli("index", tmp_path / "empty", "--db", tmp_path / "db", "--model", tiny_file)
    assert code == 4 and "no images in" in err
    code, _, err = cli("extract", tmp_path / "empty", "--out", tmp_path / "f.npy", "--model", tiny_file)
    assert code == 4 and "no images found" in err


def test_missing_index_and_busy_index_exit_codes(tmp_path: Path, indexed: Path, image_dir: Path) -> None:
    from cbir.index import Index

    code, _, err = cli("search", image_dir / "img_00.jpg", "--db", tmp_path / "typo")
    assert code == 5 and "no index" in err and err.count("error:") == 1
    assert not (tmp_path / "typo").exists()  # opening never creates
    with Index.open(indexed) as idx, idx.writer():
        code, _, err = cli("index", image_dir, "--db", indexed, "-q")
    assert code == 3 and "another process is writing" in err


def test_bench_json_is_a_flag_and_out_a_file(tmp_path: Path, tiny_file: Path) -> None:
    from test_cli_core import make_gpr_folder

    root = make_gpr_folder(tmp_path / "gpr")
    out_file = tmp_path / "scores.json"
    code, out, err = cli("bench", "gpr1200", root, "-m", tiny_file, "-j", "0", "-q", "--json", "--out", out_file)
    assert code == 0, err
    printed = json.loads(out)
    assert printed["mAP"] == json.loads(out_file.read_text())["mAP"]


def test_qe_spelling_is_the_same_in_search_and_bench() -> None:
    for command in (["search"], ["bench", "revisited"]):
        _, out, _ = cli(*command, "--help")
        assert "--qe-alpha" in out and "--qe " in out and "--alpha " not in out
    _, out, _ = cli("bench", "revisited", "--help")
    assert "--dba-alpha" in out
    _, out, _ = cli("index", "--help")
    assert "--dba-alpha" in out


# --------------------------------------------------------------------------------------------
# folder walks
# --------------------------------------------------------------------------------------------
def _photo_tree(root: Path) -> None:
    make_image(root / "a.jpg", seed=1)
    make_image(root / "trip" / "b.jpg", seed=2)
    make_image(root / "private" / "c.jpg", seed=3)
    make_image(root / "@eaDir" / "a.jpg" / "SYNOPHOTO_THUMB_M.jpg", seed=4)
    make_image(root / ".thumbnails" / "normal" / "x.png", seed=5)
    make_image(root / ".git" / "y.png", seed=6)
    make_image(root / ".hidden.jpg", seed=7)


def test_list_images_skips_hidden_and_excluded(tmp_path: Path) -> None:
    from cbir.api import list_images

    _photo_tree(tmp_path)
    names = lambda paths: sorted(p.relative_to(tmp_path).as_posix() for p in paths)  # noqa: E731
    assert names(list_images(tmp_path)) == ["a.jpg", "private/c.jpg", "trip/b.jpg"]
    assert names(list_images(tmp_path, exclude=["private"])) == ["a.jpg", "trip/b.jpg"]
    assert names(list_images(tmp_path, exclude=["*/b.jpg", "a.*"])) == ["private/c.jpg"]
    every = names(list_images(tmp_path, include_hidden=True))
    assert ".hidden.jpg" in every and "@eaDir/a.jpg/SYNOPHOTO_THUMB_M.jpg" in every and len(every) == 7


def test_index_remembers_its_walk_rule(tmp_path: Path, tiny_file: Path) -> None:
    photos = tmp_path / "photos"
    _photo_tree(photos)
    db = tmp_path / "db"
    base = ["--db", db, "-j", "0", "-q", "--json"]
    code, out, err = cli("index", photos, "--model", tiny_file, "--exclude", "private", *base)
    assert code == 0, err
    assert json.loads(out)["images"] == 2
    code, out, _ = cli("index", photos, *base)  # no options: the recorded rule, nothing changes
    assert json.loads(out)["images"] == 2 and json.loads(out)["added"] == 0
    code, out, _ = cli("index", photos, "--include-hidden", *base)
    assert json.loads(out)["images"] == 6  # --include-hidden with no --exclude: the exclusion is kept
    code, out, _ = cli("index", photos, "--exclude", "nothing", *base)
    assert json.loads(out)["images"] == 7  # a new --exclude replaces the old one; hidden still included


def test_extract_skips_hidden_folders(tmp_path: Path, tiny_file: Path) -> None:
    _photo_tree(tmp_path / "p")
    code, out, err = cli("extract", tmp_path / "p", "--out", tmp_path / "f.npy", "-m", tiny_file, "-j", "0", "-q",
                         "--exclude", "trip", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["images"] == 2


# --------------------------------------------------------------------------------------------
# files and formats
# --------------------------------------------------------------------------------------------
def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    from cbir.fileio import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


def test_an_index_is_readable_by_other_users_under_umask_022(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    """The README's systemd recipe runs the server as another user: it must read what `cbir index` wrote."""
    old = os.umask(0o022)
    try:
        code, _, err = cli("index", image_dir, "--db", tmp_path / "db", "--model", tiny_file, "-j", "0", "-q")
    finally:
        os.umask(old)
    assert code == 0, err
    written = [p for p in (tmp_path / "db").rglob("*") if p.is_file() and p.name != "lock"]
    assert (tmp_path / "db" / "descriptor.cbir") in written
    private = {p.name: oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o044 != 0o044}
    assert not private, private


@pytest.mark.parametrize("fmt,suffix", [("HEIF", ".heic"), ("AVIF", ".avif")])
def test_heic_and_avif_are_decoded_and_listed(tmp_path: Path, fmt: str, suffix: str) -> None:
    pytest.importorskip("pillow_heif")
    import numpy as np
    from PIL import Image

    from cbir.api import list_images
    from cbir.data.decode import load_image, register_heif

    assert register_heif()
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (220, 30, 30)
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(rgb).save(path, format=fmt, quality=95)
    assert list_images(tmp_path) == [path]
    img = load_image(path)
    assert img.size == (60, 40) and img.mode == "RGB"
    r, g, b = img.getpixel((5, 20))
    assert r > 180 and g < 80 and b < 80


def _leaf_commands() -> list[tuple[tuple[str, ...], Any]]:
    """Every runnable command of ``cbir`` with its path of group names."""
    import typer.main

    def leaves(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
        if hasattr(cmd, "commands"):  # a group (typer's own click types)
            return [leaf for name, sub in cmd.commands.items() for leaf in leaves(sub, (*path, name))]
        return [(path, cmd)]

    return leaves(typer.main.get_command(app))


def test_no_option_name_is_given_to_two_parameters() -> None:
    """Click silently lets the first of two parameters sharing a name (``cbir train -k`` was both
    --negatives and the mining --neighbours) take the value; every name must be unique."""
    for path, cmd in _leaf_commands():
        names = [opt for p in cmd.params for opt in (*getattr(p, "opts", []), *getattr(p, "secondary_opts", []))]
        dupes = sorted({n for n in names if names.count(n) > 1})
        assert not dupes, (path, dupes)


def test_every_command_takes_json_as_a_flag() -> None:
    """`--json` means the same everywhere: a flag that prints JSON on stdout (files: --out)."""
    commands = _leaf_commands()
    assert len(commands) >= 12
    for path, cmd in commands:
        if path == ("serve",):  # a server prints no result
            continue
        flags = [p for p in cmd.params if "--json" in getattr(p, "opts", [])]
        assert flags and flags[0].is_flag, path
