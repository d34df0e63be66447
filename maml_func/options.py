"""Keyword options of a factory, typed by its signature; factories named by import path.

``--model-option pool=False`` arrives as the text ``"False"``, which Python
reads as true. So every option is converted to the type of the parameter it
sets, read from the factory's signature (its annotation, else its default),
wherever it comes from: the command line, a TOML or JSON file, or Python. A
value that cannot be read as that type, or a key the factory does not take, is
refused with one line naming the key, the value and the accepted form.

A parameter without type information (``**kwargs``, ``Any``, a class the
command line cannot spell) takes a JSON-like literal: a number, ``true`` /
``false``, ``null`` / ``none``, a JSON list, else the text itself.

Example:
    >>> from maml_func.models import Conv4
    >>> typed_options("TrainConfig", "model_options", "Conv4", Conv4, {"pool": "False"})
    {'pool': False}
    >>> import_object("torchvision.models:resnet18", "TrainConfig", "model").__name__
    'resnet18'
"""

from __future__ import annotations

import collections.abc
import difflib
import importlib
import inspect
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from maml_func import checks

__all__ = ["IMPORT_FORM", "import_object", "is_import_path", "literal", "network_factory", "parameters", "returns",
           "typed_options"]

#: The form of an import path, as the errors show it.
IMPORT_FORM = "package.module:factory (e.g. torchvision.models:resnet18)"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

# The types an option can be read as, in the order a text is tried against a union (``int | str``: "8" is 8).
_ORDER = ("none", "bool", "int", "float", "list", "tuple", "str")
_FORMS = {"none": "none", "bool": "true or false (also yes/no, 1/0)", "int": "an integer (e.g. 5)",
          "float": "a number (e.g. 0.01)", "list": "integers separated by commas (e.g. 64,160,320,640)",
          "tuple": "integers separated by commas (e.g. 64,160,320,640)", "str": "a string"}
_SCALARS: dict[Any, str] = {bool: "bool", int: "int", float: "float", str: "str", type(None): "none", None: "none"}
_TRUE, _FALSE, _NONE = ("true", "yes", "1"), ("false", "no", "0"), ("none", "null")

Kinds = frozenset[str]


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:attribute``."""
    return _IMPORT_PATH.fullmatch(name) is not None


def import_object(path: str, where: str, name: str) -> Callable[..., Any]:
    """The callable that the import path ``package.module:attribute`` names.

    Raises:
        ValueError: the path is malformed, its module cannot be imported, or
            it has no such attribute, or the attribute is not callable; the
            message names ``where``, the field ``name`` and the form expected.
    """
    if not is_import_path(path):
        checks.fail(where, name, f"an import path {IMPORT_FORM}", path)
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        own = err.name is None or module_name == err.name or module_name.startswith(err.name + ".")
        missing = "" if own else f" (importing it needs {err.name!r}, which is not installed)"
        raise ValueError(f"{where}: {name} {path!r}: no module named {module_name!r} can be imported{missing}; "
                         f"the form is {IMPORT_FORM}, with the package importable here (installed, or on "
                         "PYTHONPATH)") from None
    except Exception as err:  # the module's own code failed: say so in one line
        raise ValueError(f"{where}: {name} {path!r}: importing {module_name!r} failed: {type(err).__name__}: "
                         f"{checks.brief(err)}") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{where}: {name} {path!r}: {getattr(target, '__name__', module_name)!r} has no "
                             f"attribute {part!r}; the form is {IMPORT_FORM}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{where}: {name} {path!r} is a {type(target).__name__}, not a function or class; name a "
                         "callable that returns the network")
    return target


def network_factory(path: str, where: str) -> Callable[..., Any]:
    """The factory an import path names, if it declares that it makes a network.

    A checkpoint's config names code that ``maml-func eval`` and ``--resume``
    run: only an ``nn.Module`` class, or a function annotated to return one,
    is called, never any other function a crafted checkpoint could name.

    Raises:
        ValueError: as :func:`import_object`, or the factory declares no ``nn.Module``.
    """
    factory = import_object(path, where, "model")
    made = returns(factory)
    if not (isinstance(made, type) and issubclass(made, nn.Module)):
        name = path.rpartition(":")[2].rpartition(".")[2]
        raise ValueError(f"{where}: model {path!r} is neither an nn.Module class nor a function annotated to "
                         f"return one; annotate the factory (def {name}(...) -> nn.Module): a config or checkpoint "
                         "names the code that builds the network, so only a declared network factory is called")
    return factory


def literal(text: str) -> Any:
    """A value without type information: a JSON literal (``5``, ``0.1``, ``true``, ``null``, ``[1, 2]``), else the text.

    ``True`` / ``False`` / ``None`` are read as well, in any case.

    Example:
        >>> literal("5"), literal("False"), literal("none"), literal("relu")
        (5, False, None, 'relu')
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in _NONE:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _globals_of(factory: Any) -> dict[str, Any]:
    module = sys.modules.get(getattr(factory, "__module__", "") or "")
    return dict(vars(module)) if module is not None else {}


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) evaluated where it was written; else as is."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, namespace)  # noqa: S307 - the factory's own annotation, in its own module
    except Exception:
        return inspect.Parameter.empty  # a name only its type checker knows: no type information


def _kinds(annotation: Any) -> Kinds | None:
    """What an annotation lets an option be; ``None`` when it says nothing usable."""
    try:
        scalar = _SCALARS.get(annotation)
    except TypeError:  # an unhashable annotation object
        scalar = None
    if scalar is not None:
        return frozenset({scalar})
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_kinds(a) for a in args]
        return None if any(p is None for p in parts) else frozenset().union(*parts)  # type: ignore[arg-type]
    sequences = {tuple: "tuple", list: "list", collections.abc.Sequence: "list"}
    if origin in sequences and args and all(a is int or a is Ellipsis for a in args):
        return frozenset({sequences[origin]})
    return None


def _kinds_of_default(default: Any) -> Kinds | None:
    if isinstance(default, (list, tuple)) and default and all(checks.is_int(v) for v in default):
        return frozenset({"tuple" if isinstance(default, tuple) else "list"})
    kind = _SCALARS.get(type(default))
    return frozenset({kind}) if kind is not None and default is not None else None


def _parameters(factory: Callable[..., Any], skip: int) -> tuple[dict[str, Kinds | None], bool]:
    """``factory``'s keyword parameters (past the first ``skip``) with their kinds; whether it takes ``**kwargs``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return {}, True
    namespace = _globals_of(inspect.unwrap(factory) if not isinstance(factory, type) else factory)
    found: dict[str, Kinds | None] = {}
    open_ = False
    for i, p in enumerate(signature.parameters.values()):
        if p.kind is p.VAR_KEYWORD:
            open_ = True
        elif i >= skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            annotation = _resolve(p.annotation, namespace)
            kinds = _kinds(annotation) if annotation is not p.empty else None
            found[p.name] = kinds if kinds is not None else (
                _kinds_of_default(p.default) if p.default is not p.empty else None)
    return found, open_


def returns(factory: Callable[..., Any]) -> Any:
    """What ``factory`` makes: a class itself, else its resolved return annotation (``None`` without one)."""
    if isinstance(factory, type):
        return factory
    try:
        annotation = inspect.signature(factory).return_annotation
    except (TypeError, ValueError):
        return None
    resolved = _resolve(annotation, _globals_of(inspect.unwrap(factory)))
    return None if resolved is inspect.Signature.empty else resolved


def parameters(factory: Callable[..., Any], *, skip: int = 0, closed_by_return: bool = False
               ) -> tuple[dict[str, Kinds | None], bool]:
    """The keyword options ``factory`` takes, with what each may be, and whether it takes any other key.

    A factory with ``**kwargs`` that is annotated to return a class (``resnet18
    -> ResNet``) passes them on, most likely to that class: its parameters give
    the types of those keys. With ``closed_by_return`` (the library's own
    algorithms, which do pass them on) the class's parameters are also the only
    other keys accepted.
    """
    found, open_ = _parameters(factory, skip)
    made = returns(factory)
    if open_ and isinstance(made, type) and made is not factory:
        passed_on, still_open = _parameters(made, skip)
        found = {**passed_on, **found}
        open_ = still_open or not closed_by_return
    return found, open_


def _from_text(text: str, kinds: Kinds) -> Any:
    """``text`` read as the first of ``kinds`` that fits; ``ValueError`` if none does."""
    lowered = text.strip().lower()
    for kind in _ORDER:
        if kind not in kinds:
            continue
        if kind == "none" and lowered in _NONE:
            return None
        if kind == "bool" and lowered in _TRUE + _FALSE:
            return lowered in _TRUE
        if kind == "int" and re.fullmatch(r"[+-]?\d+", lowered):
            return int(lowered)
        if kind == "float":
            try:
                value = float(lowered)
            except ValueError:
                continue
            if math.isfinite(value):
                return value
        if kind in ("list", "tuple"):
            items = [t for t in re.split(r"[,\s]+", lowered.strip("[]() ")) if t]
            if all(re.fullmatch(r"[+-]?\d+", t) for t in items):
                return (tuple if kind == "tuple" else list)(int(t) for t in items)
        if kind == "str":
            return text
    raise ValueError(text)


def _coerce(value: Any, kinds: Kinds) -> Any:
    """``value`` as one of ``kinds``; ``ValueError`` if it is none of them."""
    if isinstance(value, str):
        return _from_text(value, kinds)
    if value is None and "none" in kinds:
        return None
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
    elif checks.is_int(value):
        for kind, convert in (("int", int), ("float", float), ("bool", bool)):
            if kind in kinds and (kind != "bool" or value in (0, 1)):
                return convert(value)
    elif isinstance(value, float) and "float" in kinds:
        return value
    elif isinstance(value, (list, tuple)) and all(checks.is_int(v) for v in value):
        for kind, convert in (("tuple", tuple), ("list", list)):
            if kind in kinds:
                return convert(value)
    raise ValueError(value)


def _describe(kinds: Kinds) -> str:
    forms = dict.fromkeys(_FORMS[k] for k in _ORDER if k in kinds)
    return " or ".join(forms)


def typed_options(where: str, name: str, owner: str, factory: Callable[..., Any], options: Mapping[str, Any], *,
                  skip: int = 0, reserved: Mapping[str, str] | None = None, closed_by_return: bool = False
                  ) -> dict[str, Any]:
    """``options`` (``name`` of a config, for ``factory``, called ``owner`` in messages) typed by its signature.

    Args:
        where, name, owner: for the messages: ``"TrainConfig"``, ``"model_options"``, ``"Conv4"``.
        factory: the function or class the options are passed to.
        options: the keys and values as given (texts from the command line, or values).
        skip: leading parameters the caller passes itself (the model of an algorithm).
        reserved: keys that the config's own fields set, each with its field (``"in_channels": "channels"``).
        closed_by_return: see :func:`parameters`.

    Raises:
        ValueError: one line naming the key, the value and the accepted form;
            or the key the factory does not take (with the keys it does); or
            the reserved key and the flag to use instead.
    """
    reserved = reserved or {}
    clash = sorted(set(options) & set(reserved))
    if clash:
        fields = [reserved[k] for k in clash]
        flags = ", ".join("--" + f.replace("_", "-") for f in fields)
        raise ValueError(f"{where}: {name} {clash} are fields of the config; set them with {flags} instead (in a "
                         f"config file or TrainConfig: {', '.join(fields)})")
    accepted, open_ = parameters(factory, skip=skip, closed_by_return=closed_by_return)
    typed: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            checks.fail(where, f"{name} key", "a string", key)
        if key not in accepted and not open_:
            choices = [k for k in accepted if k not in reserved]
            close = difflib.get_close_matches(key, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            takes = f"it takes {', '.join(choices)}" if choices else "it takes no options"
            raise ValueError(f"{where}: {name} {key!r} is not a parameter of {owner}{hint}; {takes}")
        kinds = accepted.get(key)
        if kinds is None:
            typed[key] = literal(value) if isinstance(value, str) else value
            continue
        try:
            typed[key] = _coerce(value, kinds)
        except ValueError:
            raise ValueError(f"{where}: {name} {key}={value!r} is not valid: {key} of {owner} takes "
                             f"{_describe(kinds)}") from None
    return typed
