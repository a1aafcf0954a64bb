"""The shared CLI options: declared once, present on every command that describes images,
with a command's own defaults and omissions, and handed to the command as one object."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cbir.cli.commands import app
from cbir.cli.options import (
    DescriptorOptions,
    ExtractionOptions,
    descriptor_options,
    extraction_options,
)

runner = CliRunner()
DESCRIPTOR_FLAGS = ["--model", "--weights", "--pooling", "--scales", "--image-size", "--resize",
                    "--crop", "--token"]  # fmt: skip
EXTRACTION_FLAGS = ["--batch-size", "--workers", "--max-pixels", "--quiet"]


def _help(*command: str) -> str:
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize(
    ("command", "whiten", "engine"),
    [
        (("extract",), True, True),
        (("whiten",), False, True),
        (("bench", "gpr1200"), True, True),
        (("bench", "revisited"), True, True),
        (("rmac-whiten",), False, False),
        (("index",), True, True),
    ],
)
def test_every_describing_command_has_the_shared_options(command, whiten: bool, engine: bool) -> None:
    text = _help(*command)
    for flag in DESCRIPTOR_FLAGS + EXTRACTION_FLAGS:
        assert flag in text, (command, flag)
    assert ("--whiten " in text) == whiten
    assert ("--engine" in text) == engine


def _toy_app(received: list) -> typer.Typer:
    toy = typer.Typer()

    @toy.command()
    @extraction_options(omit=("engine",), batch_size=8)
    @descriptor_options(pooling="rmac")
    def go(
        name: str,
        *,
        describe: DescriptorOptions,
        extraction: ExtractionOptions,
    ) -> None:
        received.append((name, describe, extraction))

    return toy


def test_options_arrive_as_objects_with_the_commands_defaults() -> None:
    received: list = []
    toy = _toy_app(received)
    res = runner.invoke(toy, ["x", "--scales", "ms", "--workers", "3", "-q"])
    assert res.exit_code == 0, res.output
    name, describe, extraction = received[-1]
    assert name == "x"
    assert describe == DescriptorOptions(pooling="rmac", scales="ms")
    assert describe.customised()
    assert extraction == ExtractionOptions(batch_size=8, workers=3, quiet=True)
    assert extraction.kwargs(engine=False) == {
        "batch_size": 8, "workers": 3, "max_pixels": ExtractionOptions().max_pixels, "progress": False,
    }  # fmt: skip
    res = runner.invoke(toy, ["x", "--engine", "torch"])
    assert res.exit_code != 0 and "No such option" in res.output  # omitted


def test_default_options_are_not_customised() -> None:
    assert not DescriptorOptions().customised()
    assert not DescriptorOptions(model="m.cbir").customised()  # the model alone is not
    assert DescriptorOptions(token="cls").customised()


def test_declaration_mistakes_fail_at_import_time(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="no parameter 'describe'"):

        @descriptor_options()
        def no_target(name: str) -> None: ...

    with pytest.raises(TypeError, match="declares shared options itself"):

        @descriptor_options()
        def clash(model: str, *, describe: DescriptorOptions) -> None: ...

    with pytest.raises(TypeError, match="no such option"):
        descriptor_options(colour="red")
