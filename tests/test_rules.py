"""Rule packs, data-driven: each ``rule_cases/*.toml`` is a pack plus its expected outcome.

The expectation sits in the case file's leading ``#>`` lines, themselves TOML:

* ``#> error = "KEY"``: loading raises ``RuleError`` naming the case file and ``KEY``;
* ``#> weights = {ID = W, ...}``: the pack loads with exactly these detectors and weights;
* ``#> options = {ID = {OPTION = VALUE}}`` and ``#> policy = {KEY = VALUE}``: resolved values
  (``"auto"`` is the automatic ``None``).

Files in sub-folders (``parents/``) are not cases; packs extend them.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from autoprobe.errors import RuleError
from autoprobe.rules import RulePack, builtin_packs, load_rules
from conftest import TESTS

CASES = sorted((TESTS / "rule_cases").glob("*.toml"))


def expectation(path: Path) -> dict[str, Any]:
    lines = [line[2:] for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#>")]
    return tomllib.loads("\n".join(lines))


def weights(pack: RulePack) -> dict[str, float]:
    return {detector_id: rule.weight for detector_id, rule in pack.detectors.items()}


def test_every_case_states_one_outcome() -> None:
    assert len(CASES) >= 15
    for path in CASES:
        expected = expectation(path)
        assert ("error" in expected) != ("weights" in expected), path.name


@pytest.mark.parametrize("path", [p for p in CASES if "error" in expectation(p)], ids=lambda p: p.stem)
def test_broken_pack_is_a_rule_error_naming_file_and_key(path: Path) -> None:
    with pytest.raises(RuleError) as caught:
        load_rules(str(path))
    message = str(caught.value)
    assert path.name in message
    assert expectation(path)["error"] in message
    assert len(message.splitlines()) <= 3  # short, not a dump


@pytest.mark.parametrize("path", [p for p in CASES if "weights" in expectation(p)], ids=lambda p: p.stem)
def test_valid_pack_loads_with_expected_values(path: Path) -> None:
    expected = expectation(path)
    pack = load_rules(str(path))
    assert (pack.name, pack.source) == (path.stem, str(path))
    assert weights(pack) == expected["weights"]
    for detector_id, options in expected.get("options", {}).items():
        assert {k: pack.detectors[detector_id].options[k] for k in options} == options
    for key, value in expected.get("policy", {}).items():
        assert getattr(pack.policy, key) == (None if value == "auto" else value), key


def test_extends_resolves_next_to_the_pack_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # parents/base.toml exists only beside the case file
    assert weights(load_rules(str(TESTS / "rule_cases" / "extends_relative.toml")))["skip"] == 3.0


# ----------------------------------------------------------------------------- built-in packs


def test_builtin_packs_are_listed() -> None:
    packs = builtin_packs()
    assert {"default", "dense"} <= set(packs)
    assert all(packs.values())  # every pack describes itself


def test_default_pack_weights() -> None:
    assert weights(load_rules("default")) == {
        "downsampling": 1.0,
        "stage-boundary": 1.0,
        "bottleneck": 0.5,
        "attention": 1.0,
        "skip": 1.0,
        "norm-act-change": 0.75,
        "fusion": 1.0,
    }


def test_dense_pack_overrides_default() -> None:
    dense, default = load_rules("dense"), load_rules("default")
    assert weights(dense) == weights(default) | {"skip": 2.0, "fusion": 1.5, "bottleneck": 0.25}
    assert dense.detectors["downsampling"].options["position"] == "both"
    assert dense.detectors["downsampling"].options["min_factor"] == 2.0  # inherited
    assert (dense.policy.position, dense.policy.exclude_output) == ("centre", 0.05)
    assert dense.sha256 != default.sha256


def test_unknown_builtin_pack_lists_the_builtins() -> None:
    with pytest.raises(RuleError, match="dense"):
        load_rules("desne")


# ----------------------------------------------------------------------------- hash


def test_hash_follows_the_parent(tmp_path: Path) -> None:
    shutil.copy(TESTS / "rule_cases" / "extends_relative.toml", tmp_path / "child.toml")
    (tmp_path / "parents").mkdir()
    parent = tmp_path / "parents" / "base.toml"
    parent.write_text((TESTS / "rule_cases" / "parents" / "base.toml").read_text(encoding="utf-8"), encoding="utf-8")
    first = load_rules(str(tmp_path / "child.toml")).sha256
    assert load_rules(str(tmp_path / "child.toml")).sha256 == first  # stable
    parent.write_text(parent.read_text(encoding="utf-8").replace("min_span = 4", "min_span = 5"), encoding="utf-8")
    assert load_rules(str(tmp_path / "child.toml")).sha256 != first


def test_hash_ignores_comments_and_descriptions(tmp_path: Path) -> None:
    text = (TESTS / "rule_cases" / "int_weight.toml").read_text(encoding="utf-8")
    (tmp_path / "a.toml").write_text(text, encoding="utf-8")
    (tmp_path / "b.toml").write_text("# another comment\n[pack]\ndescription = 'x'\n" + text, encoding="utf-8")
    assert load_rules(str(tmp_path / "a.toml")).sha256 == load_rules(str(tmp_path / "b.toml")).sha256


def test_the_default_pack_and_the_code_defaults_cannot_disagree() -> None:
    # rules/default.toml is what users get; the dataclass and each detector's OPTIONS are what the
    # code falls back to. Every value must be the same, so neither can change alone.
    from dataclasses import fields

    from autoprobe.detectors import DETECTORS
    from autoprobe.rules import _POLICY_SCHEMA, Policy

    pack = load_rules("default")
    assert pack.policy == Policy()
    assert {f.name for f in fields(Policy)} == set(_POLICY_SCHEMA)
    assert {d.ID for d in DETECTORS} == set(pack.detectors)
    for module in DETECTORS:
        assert pack.detectors[module.ID].options == {k: o.default for k, o in module.OPTIONS.items()}, module.ID
