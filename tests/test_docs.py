"""The README is the front door: short, with working links to the reference docs.

The reference pages that several helpers write (ann.md, duplicates.md) are listed in the README
from the start; a link to a page that does not exist yet is allowed only for those two.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the reference pages split out of the README (other pages are checked by their owners' tests)
OWN_NAMES = ("cli", "python-api", "instance-retrieval", "training", "performance", "testing", "descriptors")
OWN_DOCS = [ROOT / "docs" / f"{name}.md" for name in OWN_NAMES]
PENDING = {"docs/ann.md", "docs/duplicates.md"}  # written by the ANN and duplicates work


def _links(text: str) -> list[str]:
    return [m for m in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in m]


def test_readme_is_at_most_12_kb() -> None:
    assert README.stat().st_size <= 12 * 1024


def test_readme_links_resolve() -> None:
    missing = [link for link in _links(README.read_text()) if not (ROOT / link).exists() and link not in PENDING]
    assert not missing, missing


def test_readme_documentation_list_covers_every_topic() -> None:
    text = README.read_text()
    section = text[text.index("## Documentation") :]
    for page in ("indexing", "ann", "scaling-out", "serving", "training", "performance", "instance-retrieval",
                 "descriptors", "cli", "python-api", "duplicates", "testing"):  # fmt: skip
        assert f"(docs/{page}.md)" in section, page


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
    assert "bash scripts/test.sh" in README.read_text()


def test_docs_links_resolve() -> None:
    broken = []
    for page in OWN_DOCS:
        for link in _links(page.read_text()):
            target = (page.parent / link).resolve()
            rel = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else link
            if not target.exists() and rel not in PENDING:
                broken.append(f"{page.relative_to(ROOT)} -> {link}")
    assert not broken, broken


def test_docs_say_what_shared_datasets_is() -> None:
    """Every page that uses ../shared/datasets says what it is (the benchmark data beside the project)."""
    pages = [README, *(ROOT / "docs").rglob("*.md")]
    explained = re.compile(r"beside\W+the\s+project")
    unexplained = [
        p.name for p in pages if "../shared/datasets" in p.read_text() and not explained.search(p.read_text())
    ]
    assert not unexplained, f"say what ../shared/datasets is (benchmark data beside the project root): {unexplained}"


def test_package_description_is_short() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert len(meta["description"]) <= 200
