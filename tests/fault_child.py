"""The body of a ``cbir index`` process with a fault armed, run by tests/test_index_faults.py
in a forkserver child (cbir preloaded there, so each run skips the import of torch)."""

from __future__ import annotations

import sys


def run_cli(argv: list[str], fault: str | None, children_file: str | None) -> None:
    """``cbir ARGV`` as its own process, with ``CBIR_FAULT=fault`` in effect."""
    from cbir.cli.main import main
    from cbir.index import faults

    faults.configure(fault, children_file)
    sys.argv = ["cbir", *argv]
    main()
