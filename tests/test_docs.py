"""The documentation: every public name has an API entry, and no relative link is broken.

Fast checks on the Markdown files only; the site itself is built by
``mkdocs build --strict`` in CI (``.ci/run``), not from pytest.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import maml_func

REPO = Path(__file__).resolve().parents[1]
API_PAGE = REPO / "docs" / "api.md"
# [text](target) and ![alt](target); the target ends at whitespace (a title may follow) or ")".
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target><[^>]+>|[^)\s]+)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The link targets of a Markdown page that name a file of the repository (not a URL, not an anchor alone)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))  # code blocks hold no links
    targets = [m["target"].strip("<>") for m in LINK.finditer(text)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith(("#", "/"))]


def test_every_public_name_has_an_api_entry() -> None:
    entries = set(re.findall(r"^::: maml_func\.(\w+)\s*$", API_PAGE.read_text(encoding="utf-8"), re.MULTILINE))
    missing = [name for name in maml_func.__all__ if name != "__version__" and name not in entries]
    assert not missing, (
        "docs/api.md has no entry for " + ", ".join(missing) + "; add under the heading of its topic, with a blank "
        "line before and after each:\n" + "\n\n".join(f"::: maml_func.{name}" for name in missing))
    unknown = sorted(entries - set(maml_func.__all__))
    assert not unknown, (f"docs/api.md documents {unknown}, which are not in maml_func.__all__; remove their "
                         "'::: maml_func.<name>' lines or export the names")


def test_relative_links_point_to_existing_files() -> None:
    broken = []
    for page in pages():
        for target in relative_links(page):
            path = unquote(target.split("#", 1)[0])
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: ({target})")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_the_link_check_sees_links() -> None:
    # The README links to the docs pages; a pattern that matched nothing would pass the check above vacuously.
    targets = relative_links(REPO / "README.md")
    assert "docs/api.md" in targets and "benchmarks/README.md" in targets
    assert relative_links(REPO / "docs" / "index.md").count("api.md") == 1
