"""The README's "what to expect" table is the evidence's summary.json, cell for cell.

A number a user decides on must not drift from the runs it came from: every cell of the table under
``<!-- what-to-expect -->`` is recomputed from ``examples/evidence/summary.json`` (itself rendered from
``runs.jsonl`` by ``python examples/compare.py --render``) and must read the same, interval included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- what-to-expect -->"
MODELS = {"DeepLabV3+ (mIoU)": "deeplabv3plus", "U-Net (mIoU)": "unet", "ResNet-18n (accuracy)": "resnet18n",
          "small ViT (accuracy)": "vit"}
DENSE = ("deeplabv3plus", "unet")  # the 64x64 regime is segmentation's


def _cell(row: dict | None) -> str:
    """A summary row as the table writes it: the paired difference in points and its 95% interval."""
    if row is None or row["delta"] is None:
        return "not run"
    text = f"{100 * row['delta']:+.2f}"
    if row["ci95"] is not None:
        text += f" [{100 * row['ci95'][0]:+.2f}, {100 * row['ci95'][1]:+.2f}]"
    return text + f" (seeds {row['seeds'][0]}-{row['seeds'][-1]})"


def expected_table(summary: dict) -> dict[str, list[str]]:
    """Model label -> the four cells: the default at the main size and at 64x64 (seeds 5-9; segmentation
    only), iMacHSR as it shipped until 2026-12-07 and DSN with linear heads (the main tables, seeds 0-4)."""
    def find(rows, **want):
        return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)

    confirm, main = summary["confirmation_rows"], summary["rows"]
    return {label: [_cell(find(confirm, model=m, method="dsn-conv", canvas=32)),
                    _cell(find(confirm, model=m, method="dsn-conv", canvas=64)) if m in DENSE else "-",
                    _cell(find(main, model=m, method="imachsr-mi")),
                    _cell(find(main, model=m, method="dsn"))]
            for label, m in MODELS.items()}


def readme_table(text: str) -> dict[str, list[str]]:
    """The table after the marker: model label -> its cells, bold marks removed."""
    lines = text[text.index(MARKER):].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"\*\*", "", c).strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_readme_shows_the_evidence_as_rendered() -> None:
    summary = json.loads((ROOT / "examples" / "evidence" / "summary.json").read_text())
    assert readme_table((ROOT / "README.md").read_text(encoding="utf-8")) == expected_table(summary)


def test_a_changed_number_is_caught() -> None:
    summary = json.loads((ROOT / "examples" / "evidence" / "summary.json").read_text())
    shown = readme_table((ROOT / "README.md").read_text(encoding="utf-8"))
    row = next(r for r in summary["confirmation_rows"] if r["method"] == "dsn-conv" and r["canvas"] == 32)
    row["delta"] += 0.0001  # one hundredth of a point
    assert shown != expected_table(summary)


@pytest.mark.parametrize("label", list(MODELS))
def test_every_model_has_its_row(label: str) -> None:
    assert label in readme_table((ROOT / "README.md").read_text(encoding="utf-8"))
