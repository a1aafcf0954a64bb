"""The public facade (cbir.api, re-exported by ``cbir``) and the one error base."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cbir
from cbir import api
from cbir.errors import CbirError, InputError, UsageError

SRC = Path(__file__).resolve().parents[1] / "src" / "cbir"


def test_every_facade_name_resolves() -> None:
    import cbir.extract  # noqa: F401  (the submodule of the same name must not replace the function)

    for name in cbir.__all__:
        assert getattr(cbir, name) is not None, name
    assert cbir.open_index is api.open_index and cbir.extract is api.extract
    with pytest.raises(AttributeError):
        cbir.no_such_thing  # noqa: B018


def test_one_index_not_found_error() -> None:
    from cbir.index import IndexNotFoundError
    from cbir.index.errors import IndexNotFoundError as Same

    assert cbir.IndexNotFoundError is IndexNotFoundError is Same
    found = [p for p in SRC.rglob("*.py") if re.search(r"^class IndexNotFoundError\b", p.read_text(), re.M)]
    assert [p.name for p in found] == ["errors.py"]


@pytest.mark.parametrize(
    ("cls", "exit_code", "http"),
    [
        (UsageError, 2, 400),
        (InputError, 4, 422),
        ("IndexBusyError", 3, 409),
        ("IndexNotFoundError", 5, 404),
        ("IndexDamagedError", 5, 500),
        ("DescriptorMismatchError", 2, 400),
        ("QueryError", 4, 400),
    ],
)
def test_errors_share_one_base_with_documented_codes(cls: object, exit_code: int, http: int) -> None:
    klass = getattr(cbir, cls) if isinstance(cls, str) else cls
    assert issubclass(klass, CbirError)
    assert (klass.exit_code, klass.http_status) == (exit_code, http)
    doc = (SRC.parents[1] / "docs" / "cli.md").read_text()
    assert re.search(rf"^\| {exit_code} \|", doc, re.M), f"exit code {exit_code} is documented"


def test_open_index_never_creates(tmp_path: Path) -> None:
    with pytest.raises(cbir.IndexNotFoundError):
        api.open_index(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_create_then_open_then_search(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    db = tmp_path / "db"
    with api.create_index(db, model=tiny_file) as idx:
        report = idx.sync([image_dir], progress=False)
    assert report.added == 12
    with pytest.raises(CbirError):  # the folder holds an index now
        api.create_index(db, model=tiny_file)
    with api.open_index(db, readonly=True) as idx:
        assert len(idx) == 12
    hits = api.search(db, image_dir / "img_02.jpg", k=3)
    assert hits[0].path == str(image_dir / "img_02.jpg") and len(hits) == 3
    stats = api.index_stats(db)
    assert stats["images"] == 12 and stats["failures"] == []
    with pytest.raises(UsageError):
        api.search(db, image_dir / "img_02.jpg", k=0)


def test_index_folders_checks_its_input(tmp_path: Path, image_dir: Path, tiny_file: Path) -> None:
    with pytest.raises(InputError, match="is a file, not a folder"):
        api.index_folders([image_dir / "img_00.jpg"], tmp_path / "db", model=tiny_file)
    with pytest.raises(InputError, match="no such folder"):
        api.index_folders([tmp_path / "nope"], tmp_path / "db", model=tiny_file)
    report, stats = api.index_folders([image_dir], tmp_path / "db", model=tiny_file, workers=0)
    assert report.added == stats["images"] == 12


def test_extract_draws_no_progress_bar_by_default(
    image_dir: Path, tiny_descriptor: object, capfd: pytest.CaptureFixture[str]
) -> None:
    res = cbir.extract(tiny_descriptor, cbir.list_images(image_dir), workers=0)
    assert res.features.shape[0] == 12
    err = capfd.readouterr().err
    assert "it/s" not in err and "%|" not in err and "\r" not in err


def test_user_errors_turns_standard_errors_into_cbir_errors() -> None:
    with pytest.raises(InputError), api.user_errors():
        open("/no/such/file")  # noqa: SIM115
    with pytest.raises(UsageError), api.user_errors():
        int("x")


def test_bench_gpr1200_through_the_facade(tmp_path: Path, tiny_descriptor: object) -> None:
    from test_cli_core import make_gpr_folder

    bench = cbir.bench_gpr1200(make_gpr_folder(tmp_path / "gpr"), tiny_descriptor, workers=0)
    assert 0 < bench.result.mAP <= 1 and len(bench.files) == 12
    with pytest.raises(InputError):
        cbir.bench_gpr1200(tmp_path / "nowhere", tiny_descriptor, workers=0)


def test_the_cli_calls_the_facade(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cbir search` prints what cbir.api.search returns: the command has no search of its own."""
    from cbir.cli.commands import app
    from cbir.index import Hit

    calls = []

    def fake_search(db: object, query: object, k: int = 20, **kw: object) -> list[Hit]:
        calls.append((db, query, k, kw))
        return [Hit(id=7, path="/photos/x.jpg", score=0.5)]

    monkeypatch.setattr(api, "search", fake_search)
    res = CliRunner().invoke(app, ["search", "q.jpg", "--db", str(tmp_path), "--format", "paths", "--qe", "2"])
    assert res.exit_code == 0 and res.stdout == "/photos/x.jpg\n"
    assert calls[0][1] == "q.jpg" and calls[0][3]["qe"] == 2


def test_cli_and_server_do_not_open_indexes_themselves() -> None:
    """Opening an index (what creating means, read-only or not) is decided in cbir.api only."""
    offenders = [
        str(p.relative_to(SRC))
        for folder in ("cli", "serve")
        for p in (SRC / folder).rglob("*.py")
        if re.search(r"\bIndex\.(open|create)\(", p.read_text())
    ]
    assert not offenders, offenders


def test_the_cli_maps_errors_in_one_place() -> None:
    """No command module catches a tuple of exceptions to turn them into messages."""
    catch_and_report = re.compile(
        r"except \([A-Za-z_, ]*Error[A-Za-z_, ]*\) as \w+:\s*\n\s*(raise typer|.*echo|.*print)"
    )
    offenders = [p.name for p in (SRC / "cli").glob("*.py") if catch_and_report.search(p.read_text())]
    assert not offenders, offenders
