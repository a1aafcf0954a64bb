"""Registry of the command families: one module each, attached to one typer app.

The command modules are imported here so that ``cbir --help`` lists them; each one imports
its heavy dependencies (torch, FAISS, ONNX Runtime, FastAPI) inside its functions, so the
help and the option parsing stay fast (tests/test_cli_conventions.py checks what gets imported).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import click
import typer
import typer.core

from cbir.cli import output
from cbir.errors import CbirError


def _plain_help() -> None:
    """Help without typer's type labels: no ``<bool>`` after a flag, no ``<list[Path]>`` or
    ``{dirs}...`` for an argument; an option's or argument's ``metavar`` is shown as given."""
    option_type = typer.core.TyperOption.display_type_rich

    def option_display(self: Any, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None
        if self.metavar:
            return self.metavar
        label = option_type(self, ctx)
        many = re.fullmatch(r"<list\[(\w+)\]>", label or "")
        return f"<{many.group(1).lower()}>..." if many else label

    def argument_display(self: Any, ctx: Any) -> str | None:
        return None

    def argument_usage(self: Any) -> str:
        name = self.metavar or self.name.upper()
        many = "..." if self.nargs != 1 and not name.endswith("...") else ""
        return f"{name}{many}" if self.required else f"[{name}]{many}"

    typer.core.TyperOption.display_type_rich = option_display  # type: ignore[method-assign]
    typer.core.TyperArgument.display_type_rich = argument_display  # type: ignore[method-assign]
    if hasattr(typer.core.TyperArgument, "_usage_display_name"):
        typer.core.TyperArgument._usage_display_name = argument_usage  # type: ignore[method-assign]


_plain_help()


class CbirGroup(typer.core.TyperGroup):
    """The one place where errors become what a user sees: a :class:`CbirError` is one
    ``error: <message>`` line on stderr and its ``exit_code`` (docs/cli.md, "Exit codes");
    a reader that closed the pipe ends the command quietly. Wrapping the group's ``invoke``
    covers every command, nested groups (``bench``) included, however the app is run
    (the console script or a test's ``CliRunner``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CbirError as exc:
            output.error(str(exc))
            raise typer.Exit(exc.exit_code) from exc
        except BrokenPipeError:
            output.closed_pipe()


app = typer.Typer(
    cls=CbirGroup,
    name="cbir",
    help="Content-based image retrieval: describe, benchmark, index and search images.",
    epilog="Exit codes: 0 ok, 1 unexpected error, 2 invalid usage, 3 index busy, 4 bad input "
    "(no images, a file given as a folder), 5 index missing or damaged. See docs/cli.md.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from cbir import __version__

        typer.echo(f"cbir {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Options of ``cbir`` itself (``--version``); the commands are registered below."""


bench_app = typer.Typer(help="Score a descriptor on a retrieval benchmark.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

# Command modules register themselves on import.
from cbir.cli import ann_cmds as _ann_cmds  # noqa: E402,F401
from cbir.cli import describe_cmds as _describe_cmds  # noqa: E402,F401
from cbir.cli import duplicates_cmds as _duplicates_cmds  # noqa: E402,F401
from cbir.cli import index_cmds as _index_cmds  # noqa: E402,F401
from cbir.cli import mine_cmds as _mine_cmds  # noqa: E402,F401
from cbir.cli import revisited_cmds as _revisited_cmds  # noqa: E402,F401
from cbir.cli import serve_cmds as _serve_cmds  # noqa: E402,F401
from cbir.cli import train_cmds as _train_cmds  # noqa: E402,F401
