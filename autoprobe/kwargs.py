"""Keyword arguments a user types: ``KEY=VALUE`` on the command line, tables in a lockfile.

A model factory's arguments (``--model-arg encoder_weights=None``) and a forward's fixed
arguments (``--forward-arg return_dict=False``) are both recorded in a lockfile and replayed by
``autoprobe check``, so they are restricted to values that survive a JSON round trip:
``None``, booleans, integers, floats, strings, lists and tables of those. ``Kwargs`` holds them
frozen (lists become tuples, tables nested ``Kwargs``), sorted by key, hashable and picklable,
so a ``LockSettings`` holding them can cross into a worker process and compare equal there.

``parse_kwarg`` reads one ``KEY=VALUE``: VALUE is a Python literal (``ast.literal_eval``:
``None``, ``3``, ``0.5``, ``'imagenet'``, ``(256, 128)``, ``{'classes': 3}``); a bare word that is
no literal (``resnet34``) is taken as a string, so names need no quotes. A bare word that looks
like a misspelt literal (``none``, ``null``, ``true``, ``false``) is refused rather than silently
becoming the string ``"none"``, which a factory would take as a weights name to download.

Example:
    >>> Kwargs(dict([parse_kwarg("encoder_weights=None"), parse_kwarg("encoder_name=resnet34")]))
    Kwargs({'encoder_name': 'resnet34', 'encoder_weights': None})
"""

from __future__ import annotations

import ast
import keyword
from collections.abc import Iterator, Mapping
from typing import Any

from .errors import AutoprobeError, OptionError, UsageError

__all__ = ["Kwargs", "parse_kwarg", "freeze_value", "thaw_value"]

_MISSPELT = {"none": "None", "null": "None", "true": "True", "false": "False"}
# Each caller words its own next step (a Python call, a command-line option, a pyproject key) and picks the
# error its users expect; the hint carries its separator, since API messages put the hint on a line of its own.
_VALUE_HINT = "\nHint: give a literal value, or build the object inside a `module:factory` of your own."
_KEY_HINT = "\nHint: use the parameter's name, e.g. {'num_classes': 10}."


def freeze_value(value: Any, where: str, *, error: type[AutoprobeError] = UsageError, hint: str = _VALUE_HINT) -> Any:
    """A JSON-able value made immutable: lists and tuples -> tuples, mappings -> ``Kwargs``.

    Args:
        value: the value as given (Python, TOML or JSON).
        where: names the argument in a message (``"model_args['classes']"``).
        error, hint: the exception raised for a value that cannot be recorded, and the next step appended.

    Returns:
        The frozen value.

    Raises:
        UsageError: (or ``error``) a value a lockfile cannot record (a tensor, a set, bytes, a class).

    Example:
        >>> freeze_value([1, [2, 3]], "x")
        (1, (2, 3))
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(freeze_value(v, f"{where}[{i}]", error=error, hint=hint) for i, v in enumerate(value))
    if isinstance(value, Mapping):
        return Kwargs(value, where=where, error=error, hint=hint)
    raise error(
        f"{where} is a {type(value).__name__} ({value!r:.60}); only None, booleans, numbers, strings, lists and "
        f"tables can be recorded and replayed.{hint}"
    )


def thaw_value(value: Any) -> Any:
    """A frozen value as a plain one: ``Kwargs`` -> dict (tuples stay tuples).

    Example:
        >>> thaw_value(Kwargs({"a": Kwargs({"b": (1,)})}))
        {'a': {'b': (1,)}}
    """
    return value.to_dict() if isinstance(value, Kwargs) else tuple(map(thaw_value, value)) if isinstance(value, tuple) else value


def _json(value: Any) -> Any:
    if isinstance(value, Kwargs):
        return value.to_json()
    return [_json(v) for v in value] if isinstance(value, tuple) else value


class Kwargs(Mapping[str, Any]):
    """Frozen keyword arguments with JSON-able values, sorted by key.

    Args:
        values: name -> value (a mapping, or ``None`` for none).
        where: names the arguments in a message (``"model_args"``).
        error, hint: the exception raised for bad input, and the next step appended (default: a
            ``UsageError`` with a hint for a Python call).

    Raises:
        UsageError: (or ``error``) not a mapping, a key that is not a Python identifier, or a value a
            lockfile cannot record.

    Example:
        >>> args = Kwargs({"classes": 3, "decoder_channels": [64, 32]})
        >>> args["decoder_channels"], args.to_json()
        ((64, 32), {'classes': 3, 'decoder_channels': [64, 32]})
        >>> Kwargs({"not a name": 1})
        Traceback (most recent call last):
        ...
        autoprobe.errors.UsageError: model_args: key 'not a name' is not a Python identifier, so it cannot be a keyword argument.
        Hint: use the parameter's name, e.g. {'num_classes': 10}.
    """

    __slots__ = ("_items",)

    def __init__(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        where: str = "model_args",
        error: type[AutoprobeError] = UsageError,
        hint: str | None = None,
    ) -> None:
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise error(f"{where} must be a mapping of keyword arguments, not {values!r:.60}."
                        f"{_KEY_HINT if hint is None else hint}")
        items = []
        for key, value in values.items():
            if not (isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)):
                raise error(f"{where}: key {key!r} is not a Python identifier, so it cannot be a keyword argument."
                            f"{_KEY_HINT if hint is None else hint}")
            items.append((key, freeze_value(value, f"{where}[{key!r}]", error=error,
                                            hint=_VALUE_HINT if hint is None else hint)))
        self._items: tuple[tuple[str, Any], ...] = tuple(sorted(items))

    def __getitem__(self, key: str) -> Any:
        for name, value in self._items:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self) -> str:
        return f"Kwargs({dict(self._items)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Kwargs, (dict(self._items),))

    def to_dict(self) -> dict[str, Any]:
        """The arguments to call with: a plain dict (tables as dicts, lists as tuples)."""
        return {k: thaw_value(v) for k, v in self._items}

    def to_json(self) -> dict[str, Any]:
        """The arguments as JSON data (tuples as lists)."""
        return {k: _json(v) for k, v in self._items}


def parse_kwarg(
    text: str, option: str = "--model-arg", *, error: type[AutoprobeError] = OptionError, hint: str | None = None
) -> tuple[str, Any]:
    """One ``KEY=VALUE`` as typed on the command line or in ``[tool.autoprobe]``.

    Args:
        text: ``KEY=VALUE``; VALUE a Python literal, or a bare word taken as a string.
        option: the option (or pyproject key) it came from, for messages.
        error, hint: the exception raised for bad input, and the next step appended instead of the
            command line's (for a pyproject key: ``LockError`` and " Hint: fix the value in pyproject.toml.").

    Returns:
        ``(key, frozen value)``.

    Raises:
        OptionError: (or ``error``) no ``=``, a key that is no identifier, a misspelt literal (``none``),
            a value that is neither a literal nor a bare word, or one a lockfile cannot record.

    Example:
        >>> parse_kwarg("encoder_weights=None"), parse_kwarg("decoder_channels=[64, 32]"), parse_kwarg("name=resnet34")
        (('encoder_weights', None), ('decoder_channels', (64, 32)), ('name', 'resnet34'))
        >>> parse_kwarg("encoder_weights=none")
        Traceback (most recent call last):
        ...
        autoprobe.errors.OptionError: --model-arg encoder_weights=none: 'none' is not a Python literal. Hint: write encoder_weights=None (Python spelling), or encoder_weights="'none'" for the string.
    """
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key.isidentifier() or keyword.iskeyword(key):
        raise error(f"{option} {text!r}: expected KEY=VALUE with KEY a parameter name."
                    + (f" Hint: {option} encoder_weights=None (VALUE a Python literal or a bare word)." if hint is None else hint))
    if raw.lower() in _MISSPELT and raw != _MISSPELT[raw.lower()]:
        raise error(f"{option} {text}: {raw!r} is not a Python literal."
                    + (f" Hint: write {key}={_MISSPELT[raw.lower()]} (Python spelling), or {key}=\"'{raw}'\" for the string."
                       if hint is None else hint))
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # A name needs no quotes (encoder_name=resnet34); anything else unparsable is a typo.
        if not raw.replace("-", "_").replace(".", "_").isidentifier():
            raise error(f"{option} {text}: {raw!r} is neither a Python literal nor a bare word."
                        + (f" Hint: quote a string ({key}=\"'{raw}'\") or fix the literal." if hint is None else hint)) from None
        value = raw
    return key, freeze_value(value, f"{option} {key}", error=error, hint=" " + _VALUE_HINT.strip() if hint is None else hint)
