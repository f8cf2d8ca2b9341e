"""The docs stand alone: README lists every page, and no page points outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from irisnode.commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_readme_lists_every_doc_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert PAGES
    for page in PAGES:
        assert f"docs/{page.name}" in readme, page.name


def test_no_page_points_outside_the_repository() -> None:
    for page in [ROOT / "README.md", *PAGES]:
        text = page.read_text()
        assert "shared/spec" not in text and "../spec" not in text, page.name
        for target in re.findall(r"`(docs/[\w.-]+\.md)`", text):
            assert (ROOT / target).exists(), (page.name, target)


def test_the_cli_page_covers_every_command() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    for name in COMMANDS:
        assert f"`{name}" in text, name
