"""The README's code blocks, by the section they stand under, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(heading: str) -> str:
    """The first ```python block after the line ``heading`` (e.g. ``### Lightning``) in README.md."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    if match is None:
        raise AssertionError(f"README.md has no python block under {heading!r}")
    return match.group(1)
