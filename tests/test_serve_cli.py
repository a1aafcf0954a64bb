"""``cbir serve``: start-up refusals, token set-up, and a real server process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.index import Index
from cbir.serve.security import ServeConfigError
from cbir.serve.server import GENERATED_TOKEN_FILE, resolve_token

TOKEN = "cli-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, tiny_descriptor) -> Path:
    base = tmp_path_factory.mktemp("serve_cli")
    for i in range(6):
        make_image(base / "images" / f"p{i}.jpg", seed=200 + i)
    folder = base / "db"
    with Index.create(folder, model=tiny_descriptor) as idx:
        idx.sync([base / "images"], progress=False, workers=0)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(result) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def test_refuses_writes_on_public_host_without_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path), "--host", "0.0.0.0",
                                      "--writes"])
    assert result.exit_code == 2
    assert "refusing to start" in _text(result) and "not a loopback" in _text(result)
    assert not (tmp_path / GENERATED_TOKEN_FILE).exists()


def test_refuses_a_weak_token_file(tmp_path: Path) -> None:
    weak = tmp_path / "token"
    weak.write_text("1234\n")
    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path), "--token-file", str(weak)])
    assert result.exit_code == 2 and "at least 16 characters" in _text(result)


def test_missing_index_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--db", str(tmp_path / "nothing"), "--port",
                                      str(_free_port())])
    assert result.exit_code == 5 and "no index in" in _text(result)
    assert "Traceback" not in result.output


def test_resolve_token_rules(tmp_path: Path) -> None:
    writes, setup = resolve_token(tmp_path, "0.0.0.0", None, None)
    assert not writes and setup.token is None  # no token file: read-only
    writes, setup = resolve_token(tmp_path, "127.0.0.1", None, True)
    assert writes and setup.generated and setup.path == tmp_path / GENERATED_TOKEN_FILE
    assert (setup.path.stat().st_mode & 0o077) == 0
    again = resolve_token(tmp_path, "localhost", None, True)[1]
    assert again.token == setup.token and not again.generated  # reused, not replaced
    with pytest.raises(ServeConfigError, match="not a loopback"):
        resolve_token(tmp_path, "0.0.0.0", None, True)
    f = tmp_path / "tok"
    f.write_text(TOKEN)
    f.chmod(0o644)
    writes, setup = resolve_token(tmp_path, "0.0.0.0", f, None)
    assert writes and setup.token == TOKEN and "readable by other users" in setup.warning
    assert resolve_token(tmp_path, "0.0.0.0", f, False)[0] is False  # --read-only wins


@pytest.mark.slow
def test_cbir_serve_process(db: Path, tmp_path: Path) -> None:
    """The real command: uvicorn on 127.0.0.1, search, a token-guarded add, clean shutdown."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    port = _free_port()
    cbir = Path(sys.executable).with_name("cbir")
    cmd = [str(cbir), "serve", "--db", str(db), "--port", str(port), "--token-file",
           str(token_file), "--upload-dir", str(tmp_path / "up"), "--threads", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        assert httpx.get(f"{base}/health").json()["images"] == 6
        r = httpx.post(f"{base}/search", data={"id": "1", "k": "3"})
        assert r.status_code == 200 and r.json()["count"] == 3
        assert "server" not in r.headers  # no version banner
        upload = make_image(tmp_path / "new.png", seed=999).read_bytes()
        denied = httpx.post(f"{base}/images", files={"image": ("n.png", upload, "image/png")})
        assert denied.status_code == 401
        added = httpx.post(f"{base}/images", files={"image": ("n.png", upload, "image/png")},
                           headers={"Authorization": f"Bearer {TOKEN}"})
        assert added.status_code == 201, added.text
        assert httpx.get(f"{base}/health").json()["images"] == 7
        page = httpx.get(f"{base}/")
        assert page.status_code == 200 and "Image search" in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    # uvicorn shuts down gracefully, then re-raises the interrupt: cbir exits 130 (Ctrl-C)
    assert proc.returncode in (0, 130), out
    assert "Application shutdown complete" in out
    assert "GET /health 200" in out  # request log
    assert TOKEN not in out
