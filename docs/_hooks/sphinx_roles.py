"""Griffe extension for the docs site: the docstrings' Sphinx habits, read as Google style.

The docstrings are Google style with three habits of Sphinx (napoleon), which
mkdocstrings does not read; before rendering each docstring:

- a role (``:func:`~maml_func.sgd```, ``:class:`TaskBatch```) becomes an
  *optional* autorefs reference: a link when the target is on a page of the
  site, plain code when it is not (a private helper, a module,
  ``torch.func.grad``), never a build warning;
- a double-backquoted literal becomes a Markdown code span;
- ``Example:`` opens an examples section (as ``Examples:`` does), so its
  ``>>>`` lines render as code;
- an argument entry naming several parameters (``params, buffers: dicts ...``)
  becomes one entry per parameter, each with the shared description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :func:`target`, :class:`~pkg.mod.Name`, :meth:`Name.method`, :mod:`pkg.mod`, ...
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`<>]+)`")
_LITERAL = re.compile(r"``(?P<code>[^`]+?)``")
_PACKAGE = "maml_func"
_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_SECTION = re.compile(r"^(?P<indent>[ \t]*)(?:Args|Arguments|Parameters|Other Parameters):[ \t]*$")
_SHARED_ENTRY = re.compile(r"^(?P<indent>[ \t]+)(?P<names>\w+(?:, \w+)+): (?P<text>.*)$")


def _reference(match: re.Match[str]) -> str:
    target = match["target"].strip()
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    # A bare name is tried as the package's public name (``fit`` -> ``maml_func.fit``).
    identifier = target if "." in target or target.startswith(_PACKAGE) else f"{_PACKAGE}.{target}"
    return f'<autoref identifier="{identifier}" optional><code>{shown}</code></autoref>'


def _split_shared_entries(text: str) -> str:
    """``a, b: text`` in an arguments section -> ``a: text`` and ``b: text`` (continuation lines included)."""
    lines, out, in_args, i = text.split("\n"), [], False, 0
    while i < len(lines):
        line = lines[i]
        if _SECTION.match(line):
            in_args = True
        elif line.strip() and not line[:1].isspace():
            in_args = False
        entry = _SHARED_ENTRY.match(line) if in_args else None
        if entry is None:
            out.append(line)
            i += 1
            continue
        indent = entry["indent"]
        rest = []
        i += 1
        while i < len(lines) and lines[i].startswith(indent + " ") and lines[i].strip():
            rest.append(lines[i])
            i += 1
        for name in entry["names"].split(", "):
            out += [f"{indent}{name}: {entry['text']}", *rest]
    return "\n".join(out)


def convert(text: str) -> str:
    """A docstring as mkdocstrings' Google parser reads it (see the module's docstring)."""
    text = _EXAMPLE.sub(lambda m: f"{m['indent']}Examples:", text)
    text = _split_shared_entries(text)
    return _LITERAL.sub(lambda m: f"`{m['code']}`", _ROLE.sub(_reference, text))


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring of the loaded package before mkdocstrings renders it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
