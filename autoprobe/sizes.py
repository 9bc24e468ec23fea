"""One parser for an input size, used by the CLI, the Python API, the lockfile and instrument.

An input size is the shape of one example without the batch: ``(3, 224, 224)`` for an image,
``(1, 16000)`` for a 1-D signal, ``(1, 32, 64, 64)`` for a volume. It is written as a sequence of
positive integers (Python, TOML, JSON) or as text (``"3,224,224"``, ``"3x224x224"``). A single
integer ``N`` (or the text ``"N"``) means a square RGB image, ``(3, N, N)``. Booleans are not
integers here (``True`` is refused), and neither are floats or strings inside a sequence.

Example:
    >>> parse_input_size([3, 32, 32]), parse_input_size("3x64x64"), parse_input_size(224)
    ((3, 32, 32), (3, 64, 64), (3, 224, 224))
    >>> parse_input_size((3, 0, 8), argument="input_size=")
    Traceback (most recent call last):
        ...
    autoprobe.errors.InputSizeError: input_size=(3, 0, 8) is not an input size: every entry must be a positive integer.
    Hint: pass the size of one example without the batch, like input_size=(3, 224, 224).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputSizeError, SizeErrorParts

__all__ = ["TRACE_BATCH", "parse_input_size", "format_input_size", "size_error", "reword_size_error"]

TRACE_BATCH = 2
"""The batch of the example input every trace runs: train-mode BatchNorm needs more than one value
per channel, and a batch of 2 tells the batch axis apart from an axis of size 1."""


def _hint(argument: str) -> str:
    if argument.startswith("--"):
        return f"Hint: write C,H,W such as `{argument} 3,224,224` (or just `{argument} 224`)."
    name = argument.rstrip("=")
    return f"Hint: pass the size of one example without the batch, like {name}=(3, 224, 224)."


def parse_input_size(value: object, *, argument: str = "input_size=") -> tuple[int, ...]:
    """The input size ``value`` denotes, as a tuple of positive integers.

    Args:
        value: a sequence of positive ints, one positive int ``N`` (read as ``(3, N, N)``), or text
            such as ``"3,224,224"``, ``"3x224x224"`` or ``"224"``.
        argument: how the caller names the value in messages (``"input_size="`` for the Python
            API, ``"--input-size"`` for the CLI, ``"settings.input_size"`` for a lockfile).

    Returns:
        The size without the batch, e.g. ``(3, 224, 224)``.

    Raises:
        InputSizeError: ``value`` is not a size; the message names ``argument`` and shows a valid one.
    """
    size: tuple[int, ...] | None = None
    if isinstance(value, str):
        try:
            parts = tuple(int(v) for v in value.strip().replace("x", ",").split(","))
        except ValueError:
            parts = ()
        size = parts
    elif isinstance(value, int) and not isinstance(value, bool):
        size = (value,)
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        size = tuple(value)
    if size is not None and len(size) == 1:
        size = (3, size[0], size[0])
    if not size or any(v <= 0 for v in size):
        raise InputSizeError(
            f"{argument.rstrip('=')}{'=' if argument.endswith('=') else ' '}{value!r} is not an input size: "
            "every entry must be a positive integer.\n" + _hint(argument)
        )
    return size


def format_input_size(size: Sequence[int], *, argument: str = "input_size=") -> str:
    """How a user writes ``size`` back for ``argument`` (``input_size=(3, 224, 224)`` or ``--input-size 3,224,224``).

    Example:
        >>> format_input_size((1, 28, 28)), format_input_size((1, 28, 28), argument="--input-size")
        ('input_size=(1, 28, 28)', '--input-size 1,28,28')
    """
    if argument.startswith("--"):
        return f"{argument} {','.join(str(s) for s in size)}"
    return f"{argument.rstrip('=')}={tuple(size)!r}"


def size_error(parts: SizeErrorParts, *, argument: str = "input_size=") -> InputSizeError:
    """The ``InputSizeError`` of ``parts``, its hint ending with the size as ``argument``'s caller writes it.

    Args:
        parts: the reason, the hint, the size that failed and the verdict on it.
        argument: how the caller names the size (``"input_size="``, ``"--input-size"``).

    Returns:
        The error, with ``parts`` kept on it for ``reword_size_error``.

    Example:
        >>> parts = SizeErrorParts("input size (3, 8, 8) is too small", "pass a larger size", (3, 8, 8), "is too small")
        >>> print(reword_size_error(size_error(parts), "--input-size"))
        input size (3, 8, 8) is too small
        Hint: pass a larger size (--input-size 3,8,8 is too small).
    """
    given = format_input_size(parts.size, argument=argument)
    return InputSizeError(f"{parts.reason}\nHint: {parts.hint} ({given} {parts.verdict}).", parts=parts)


def reword_size_error(error: InputSizeError, argument: str) -> InputSizeError:
    """``error`` worded for a caller that names the size ``argument``; an error without parts as it is.

    Args:
        error: an error from ``size_error``, or any other ``InputSizeError``.
        argument: how this caller names the size.

    Returns:
        A new error (chain it with ``from error``), or ``error`` itself when it has no parts.
    """
    return size_error(error.parts, argument=argument) if error.parts is not None else error
