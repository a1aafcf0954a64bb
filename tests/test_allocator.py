"""glibc malloc tuning: on by default where glibc is, off with CBIR_TUNE_MALLOC=0.

Each case runs in a fresh interpreter: the setting is per process and applied once.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from cbir.allocator import tune_allocator as t; print(t(), t())"


def _run(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("CBIR_TUNE_MALLOC", None)
    if env_value is not None:
        env["CBIR_TUNE_MALLOC"] = env_value
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tuned_once_on_glibc() -> None:
    assert _run(None) == "True True"


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_environment_switch_turns_it_off(value: str) -> None:
    assert _run(value) == "False False"
