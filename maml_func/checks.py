"""The one vocabulary for checking arguments at the library's boundary.

Every public constructor and the run configuration check their inputs with
these functions, once, where a value first enters; the code behind them trusts
what it is given. Each check returns the value (so it reads as an assignment)
and raises a ``ValueError`` (``TypeError`` for a wrong kind of object) whose
text names the caller, the argument, the bad value and what is expected::

    steps = checks.integer("adapt", "steps", steps, minimum=0)
    # ValueError: adapt: steps must be an int >= 0, got -1

``bool`` is a subclass of ``int`` in Python, so ``True`` would pass a naive
``isinstance(x, int)``; :func:`is_int` and :func:`is_number` are the only
places that tell them apart.

Checks that take ``hint`` append it to the message, e.g. ``"; a task needs at
least two classes"``; ``expect`` replaces the generated description of what is
expected (``"a positive int"``) where a message has its own words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any, TypeVar

__all__ = ["brief", "choice", "fail", "flag", "integer", "is_int", "is_number", "number", "text"]

T = TypeVar("T")


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fail(where: str, name: str, expect: str, value: object, hint: str = "") -> None:
    """Raise the vocabulary's ``ValueError``: ``"{where}: {name} must be {expect}, got {value!r}{hint}"``."""
    raise ValueError(f"{where}: {name} must be {expect}, got {value!r}{hint}")


def _range(kind: str, minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{kind} in [{minimum}, {maximum}]"
    if minimum is not None or maximum is not None:
        return f"{kind} >= {minimum}" if minimum is not None else f"{kind} <= {maximum}"
    return kind


def _outside(value: Any, minimum: float | None, maximum: float | None) -> bool:
    return (minimum is not None and value < minimum) or (maximum is not None and value > maximum)


def integer(where: str, name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
            none_ok: bool = False, expect: str | None = None, hint: str = "") -> Any:
    """``value`` if it is an int in ``[minimum, maximum]`` (or ``None`` with ``none_ok``); else ``ValueError``.

    Example:
        >>> integer("evaluate", "num_tasks", 600, minimum=1)
        600
        >>> integer("evaluate", "num_tasks", True, minimum=1)
        Traceback (most recent call last):
        ...
        ValueError: evaluate: num_tasks must be an int >= 1, got True
    """
    if value is None and none_ok:
        return None
    if not is_int(value) or _outside(value, minimum, maximum):
        fail(where, name, expect or _range("an int", minimum, maximum) + (" or None" if none_ok else ""), value, hint)
    return value


def number(where: str, name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
           positive: bool = False, none_ok: bool = False, expect: str | None = None, hint: str = "") -> Any:
    """``value`` if it is a finite number in range (``positive``: > 0), or ``None`` with ``none_ok``.

    Example:
        >>> number("sgd", "lr", 0.4, positive=True)
        0.4
    """
    if value is None and none_ok:
        return None
    if not is_number(value) or (positive and not value > 0) or _outside(value, minimum, maximum):
        words = "a positive number" if positive else _range("a number", minimum, maximum)
        if words == "a number":
            words = "a finite number"
        fail(where, name, expect or words + (" or None" if none_ok else ""), value, hint)
    return value


def flag(where: str, name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, not ``"yes"``)."""
    if not isinstance(value, bool):
        fail(where, name, "true or false", value, "")
    return value


def choice(where: str, name: str, value: T, options: Collection[Any], *, expect: str | None = None,
           hint: str = "") -> T:
    """``value`` if it is one of ``options`` (``True`` is not ``1`` here)."""
    if isinstance(value, bool) or value not in options:
        fail(where, name, expect or f"one of {tuple(options)}", value, hint)
    return value


def text(where: str, name: str, value: Any, *, none_ok: bool = False, expect: str | None = None) -> Any:
    """``value`` if it is a non-empty string (or ``None`` with ``none_ok``)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, str) or not value:
        fail(where, name, expect or ("a non-empty string" + (" or None" if none_ok else "")), value, "")
    return value


def brief(exc: BaseException) -> str:
    """An exception's text cut to its first non-empty line, for messages that must stay one line.

    Errors of other libraries can be paragraphs (torch's ``weights_only``
    explanation is five lines); a message that quotes one says what went wrong
    in a line and keeps the rest out.

    torch's refusal of an unsafe pickle is told by its reason only: its first
    line advises turning the safe loader off, which a message must never repeat.

    Example:
        >>> brief(RuntimeError("Weights only load failed.\\n\\nIn PyTorch 2.6 ..."))
        'Weights only load failed.'
    """
    text = str(exc)
    unsafe = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text) if "Weights only load failed" in text else None
    if unsafe:
        return f"torch's safe loader refused it: {unsafe.group(1).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
