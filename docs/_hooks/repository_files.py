"""MkDocs hook: the repository folders the docs link to are part of the site.

The pages of ``docs/`` link to ``../benchmarks/README.md`` and its figures, so
that the links work where the Markdown is read as files (GitHub, an editor).
MkDocs only knows ``docs/``: this hook adds the Markdown pages, scripts and data files
of each folder of :data:`MIRRORED` to the site under the same path, and points
the ``../<folder>/`` links of the docs pages at those copies. A link to any
other file outside ``docs/`` stays a build warning (a failure under
``--strict``).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

MIRRORED = ("benchmarks",)
SUFFIXES = {".md", ".py", ".png", ".svg", ".jpg", ".jsonl", ".json", ".csv"}  # .py: the scripts, as files
# The target of a Markdown link or image: ](../benchmarks/README.md#anchor)
_OUTWARD = re.compile(r"\]\(\.\./(?P<folder>" + "|".join(MIRRORED) + r")/")


def on_files(files: Files, config) -> Files:
    repository = Path(config["docs_dir"]).parent
    for folder in MIRRORED:
        for path in sorted((repository / folder).iterdir()):
            if path.is_file() and path.suffix in SUFFIXES:
                files.append(File.generated(config, f"{folder}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.split("/", 1)[0] in MIRRORED or "/" in page.file.src_uri:
        return markdown  # the mirrored pages keep their own links; docs pages are one level deep
    return _OUTWARD.sub(lambda m: f"]({m['folder']}/", markdown)
