"""How a field of :class:`~maml_func.config.TrainConfig` is declared, once: :func:`option` and its checks.

A field says everything about itself in its declaration: its default, its help
text, its group, its check, whether a resumed run may change it, and its form
on the command line. Everything else said about an option is read from there:
the class docstring (:func:`document`), the command line's flags with their
help and defaults (:mod:`maml_func.parser`), the fields a resumed run may
change (:data:`maml_func.config.RESUMABLE_FIELDS`) and the defaults that
:func:`maml_func.config.make_config` starts from (:func:`default`). A new
option is one edit.

The checks (:func:`at_least`, :func:`positive`, :func:`one_of`,
:func:`nonempty`) make ``check(where, name, value)`` functions from
:mod:`maml_func.checks`, whose errors name the field, the value and the fix.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Tasks:
    ...     n_way: int = option(5, "classes per task", group="Tasks", check=at_least(2))
    >>> default(Tasks.__dataclass_fields__["n_way"]), describe_default(None)
    (5, 'none')
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from typing import Any

from maml_func import checks

__all__ = ["GROUPS", "Check", "at_least", "default", "describe_default", "document", "flag_of", "nonempty", "one_of",
           "option", "positive"]

#: The groups of :class:`~maml_func.config.TrainConfig`'s fields, in the order the docs and ``--help`` show them.
GROUPS = ("Data", "Tasks", "Model", "Algorithm", "Optimization", "Output")

#: ``check(where, name, value)``: the value, or a ``ValueError`` naming ``where``, the field, the value and the fix.
Check = Callable[[str, str, Any], Any]


def option(default: Any = dataclasses.MISSING, help: str = "", *, group: str, check: Check | None = None,
           resumable: bool = False, metavar: str | None = None, flag: str | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with everything said about it in one place.

    Args:
        default: the default value (``factory`` for a mutable one).
        help: one line for the docs and ``--help``; the default is appended there.
        group: one of :data:`GROUPS`.
        check: ``check(where, name, value)`` raises a ``ValueError`` that names
            the field, the value and the fix (see :mod:`maml_func.checks`).
        resumable: a resumed run may change it (it does not touch the trajectory).
        metavar: the value's placeholder on the command line.
        flag: the command-line flag, when it is not ``--`` and the name with ``-`` for ``_``.
        factory: makes the default, for a mutable one (a dict).
    """
    if group not in GROUPS:
        raise ValueError(f"option: group must be one of {GROUPS}, got {group!r}")
    metadata = {"help": help, "group": group, "check": check, "resumable": resumable, "metavar": metavar,
                "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default(field: dataclasses.Field[Any]) -> Any:
    """The default of a field declared with :func:`option` (a fresh one for a mutable default)."""
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def flag_of(field: dataclasses.Field[Any]) -> str:
    """A field's command-line flag: its own, or ``--`` and the name with ``-`` for ``_`` (``--n-way``)."""
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def at_least(minimum: int, hint: str = "", *, none_ok: bool = False) -> Check:
    """An int ``>= minimum`` (or ``None`` with ``none_ok``)."""
    def check(where: str, name: str, value: Any) -> Any:
        if none_ok and value is None:
            return None
        return checks.integer(where, name, value, minimum=minimum, hint=hint)
    return check


def positive(hint: str = "", *, none_ok: bool = False, expect: str | None = None) -> Check:
    """A number ``> 0`` (or ``None`` with ``none_ok``)."""
    def check(where: str, name: str, value: Any) -> Any:
        return checks.number(where, name, value, positive=True, none_ok=none_ok, expect=expect, hint=hint)
    return check


def one_of(options: tuple[Any, ...], expect: str | None = None) -> Check:
    """One of ``options``."""
    def check(where: str, name: str, value: Any) -> Any:
        return checks.choice(where, name, value, options, expect=expect)
    return check


def nonempty(*, none_ok: bool = False) -> Check:
    """A non-empty string (a name or a path), or ``None`` with ``none_ok``."""
    def check(where: str, name: str, value: Any) -> Any:
        return checks.text(where, name, value, none_ok=none_ok,
                           expect="a string (a path) or None" if none_ok else None)
    return check


def describe_default(value: Any) -> str:
    """A default as the docs and ``--help`` show it: ``on``/``off``, ``none``, ``0.001``, ``auto``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    return "{}" if isinstance(value, dict) else str(value)


def document(cls: type) -> type:
    """Write the field list of dataclass ``cls``, by group, into its docstring's ``{fields}`` placeholder."""
    lines: list[str] = []
    for group in GROUPS:
        lines.append(f"{group}:")
        for f in dataclasses.fields(cls):
            if f.metadata["group"] == group:
                entry = f"{f.name}: {f.metadata['help']} (default: {describe_default(default(f))})."
                lines.extend(textwrap.wrap(entry, 104, initial_indent="    ", subsequent_indent="        "))
        lines.append("")
    cls.__doc__ = (cls.__doc__ or "").replace("{fields}", "\n    ".join(lines).rstrip())
    return cls
