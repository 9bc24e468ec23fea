"""The evidence's grids and its render agree on names: every arm a grid trains lands in the table
or the summary row meant for it, no grid trains a cell twice, and runs scored on validation never
enter a test-scored row."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def evidence(monkeypatch):
    """(compare, evidence_plots), imported as the ``examples`` namespace package; sys.path restored after."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("examples.compare"), importlib.import_module("examples.evidence_plots")


def _record(spec, value: float, *, pilot: bool | None = None) -> dict:
    """A results-file record of ``spec`` whose final validation and test score are both ``value``."""
    metric = "mIoU" if spec.task == "seg" else "accuracy"
    return {"task": spec.task, "model": spec.model, "method": spec.method, "setting": spec.setting,
            "seed": spec.seed, "steps": spec.steps, "batch": spec.batch,
            "pilot": spec.pilot if pilot is None else pilot, "quick": False, "metrics": {metric: value},
            "canvas": spec.canvas if spec.task == "seg" else None,  # as compare.py writes it
            "curve": {"val_step": [spec.steps], "val": [value]}}


def test_the_placement_grids_train_each_cell_once_and_keep_the_automatic_arm(evidence):
    compare, _ = evidence
    placement, position = compare.grid_specs(["placement"]), compare.grid_specs(["position"])
    keys = [s.key() for s in placement + position]
    assert len(keys) == len(set(keys))
    seed0 = [s.setting for s in placement + position if s.seed == 0]
    # the automatic arm is spelled with its M, so it is not mistaken for the primary grid's `auto` runs
    assert "auto/M=3" in seed0 and "auto" not in seed0
    assert {"hand", "last", "random/M=3/draw=2", "auto/M=1", "auto/M=5", "spaced/M=3/d=1/centre",
            "spaced/M=1/d=2/input", "spaced/M=3/d=2/output"} <= set(seed0)
    assert len(seed0) == 6 + 4 + 3 + 8
    assert {s.seed for s in placement + position} == {0, 1, 2}
    assert all(s.method == "imachsr" and not s.pilot and not s.options for s in placement + position)


def test_the_second_family_has_every_main_arm_on_five_seeds(evidence):
    compare, _ = evidence
    unet = compare.grid_specs(["seg-unet"])
    assert {s.model for s in unet} == {"unet"}
    arms = {(s.method, s.setting) for s in unet}
    assert arms == {("baseline", "none"), ("dsn", "auto"), ("imachsr", "auto"), ("imachsr", "auto/lam=0.0")}
    assert all(sorted(s.seed for s in unet if (s.method, s.setting) == arm) == [0, 1, 2, 3, 4] for arm in arms)


def test_the_shipped_default_is_its_own_summary_row_and_pilots_stay_out(evidence):
    compare, plots = evidence
    base = [compare.RunSpec("cls", "vit", "baseline", s, 10, 4) for s in (0, 1)]
    shipped = compare.grid_specs(["vit-shipped"])[:2]
    records = ([_record(s, v) for s, v in zip(base, (0.80, 0.82))]
               + [_record(s, v) for s, v in zip(shipped, (0.81, 0.84))]
               + [_record(shipped[0], 0.99, pilot=True)])  # the same setting on validation: not a result
    records = [{**r, "steps": 10, "batch": 4} for r in records]
    rows = {r["method"]: r for r in plots.summary_rows(records)}
    assert set(rows) == {"baseline", "imachsr-mi"}
    assert rows["imachsr-mi"]["seeds"] == [0, 1]
    assert rows["imachsr-mi"]["delta"] == pytest.approx(0.015)
    assert rows["imachsr-mi"]["mean"] == pytest.approx(0.825)


def test_every_alpha_lambda_cell_the_grid_trains_lands_in_the_table(evidence):
    compare, plots = evidence
    specs = [s for s in compare.grid_specs(["diagnose-more", "candidates-seg"]) + compare.grid_specs(["primary"])
             if s.task == "seg" and s.seed == 0]
    specs += [s for s in compare._candidates("seg", (0,))]  # seed 0 of the candidates ran in the diagnosis grid
    records = [_record(s, 0.30) for s in specs if s.method != "baseline"]
    records.append(_record(compare.RunSpec("seg", "deeplabv3plus", "baseline", 0, compare.SEG_STEPS,
                                           compare.SEG_BATCH), 0.28))
    table = plots._alpha_lambda_table(records)
    assert "not run" not in table
    assert table.count("+2.00") == len(plots._ALPHAS) * len(plots._LAMBDAS)
    # one cell missing shows as such, not as another cell's number
    fewer = [r for r in records if r["setting"] != "auto/alpha=0.2/lam=0.1"]
    assert plots._alpha_lambda_table(fewer).count("not run") == 1


def test_the_tune_table_shows_the_choice_its_validation_score_and_both_test_scores(evidence):
    compare, plots = evidence
    base = _record(compare.RunSpec("seg", "unet", "baseline", 3, 10, 4), 0.20)
    tuned = {**_record(compare.RunSpec("seg", "unet", "tuned", 3, 10, 4), 0.25),
             "tune": {"chosen": "dsn/alpha=0.5/M=auto/auto", "cost_steps": 25, "output_only_val_score": 0.21,
                      "table": [{"candidate": "output", "scores": [0.1, 0.21]},
                                {"candidate": "dsn/alpha=0.5/M=auto/auto", "scores": [0.12, 0.24]}]}}
    table = plots._tune_table([base, tuned], "seg", "unet")
    assert "| 3 | dsn/alpha=0.5/M=auto/auto | 24.00 | 21.00 | 25.00 | 20.00 | 2.50 |" in table
    assert plots._tune_table([base], "seg", "unet") == ""


def test_the_returned_model_arm_is_its_own_row_with_its_measured_cost(evidence):
    compare, plots = evidence
    specs = compare.grid_specs(["tuned-returned"])
    assert {(s.model, s.seed) for s in specs} == {(m, s) for m in ("deeplabv3plus", "unet", "resnet18n", "vit")
                                                  for s in range(5)}
    # its key is not the old arm's, so the grid's skip-finished does not take an old row for a new one
    old = {s.key() for s in compare.grid_specs(["primary-tuned", "seg-unet-tuned", "cls-resnet-tuned", "cls-vit-tuned"])}
    assert not old & {s.key() for s in specs}
    spec = next(s for s in specs if s.model == "unet" and s.seed == 3)
    base = {**_record(compare.RunSpec("seg", "unet", "baseline", 3, spec.steps, spec.batch), 0.20), "data": {}}
    tuned = {**_record(spec, 0.25), "data": {},
             "tune": {"chosen": "output", "cost_steps": 2 * spec.steps, "output_only_val_score": 0.21,
                      "cost": {"runs": 3.12, "cpu_s": 410.4, "wall_s": 222.2},
                      "table": [{"candidate": "output", "scores": [0.1, 0.21]}]}}
    table = plots._tune_table([base, tuned], "seg", "unet")
    assert "the model tune returns" in table and "the choice retrained" not in table
    assert "| 3 | output | 21.00 | 21.00 | 25.00 | 20.00 | 2.00 | 3.12 | 410 | 222 |" in table
    # summary.json's row: the arm is named by its setting, so the old and new tuned rows stay apart
    assert ("tuned-returned", "tuned", spec.setting) in plots.ARMS


def test_the_default_rule_reads_the_settings_the_grids_train_and_chooses_by_its_registered_rule(evidence):
    compare, _ = evidence
    rule = importlib.import_module("examples.default_rule")
    trained = {(s.method, s.setting) for s in compare.grid_specs(["default-gated", "default-heads"])}
    read = {(method, setting) for name, method, setting in rule.CANDIDATES if name in compare.DEFAULT_CANDIDATES}
    assert read == trained - {("dsn", compare.DSN_TODAY.label)}
    assert {name for name, _, _ in rule.CANDIDATES} >= set(compare.DEFAULT_CANDIDATES) | {rule.CURRENT}

    # Known answers: every candidate +0.5 points over output-only on every model, but dsn-gated +1.0
    # (largest S, and its W above the current default's): it is chosen; with one run missing, nothing is.
    def record(task, model, method, setting, seed, value):
        return {"task": task, "model": model, "method": method, "setting": setting, "seed": seed, "steps": 10,
                "batch": 2, "pilot": True, "quick": False, "curve": {"val": [value]}}

    records = []
    for task, model in rule.MODELS:
        for seed in rule.SEEDS:
            records.append(record(task, model, "baseline", "none", seed, 0.5))
            for name, method, setting in rule.CANDIDATES[1:]:
                if task == "cls" and name in rule.DENSE_ONLY:
                    continue  # RMI runs on the segmentation models only
                if (model, name) == ("deeplabv3plus", "dsn"):
                    setting = rule.DSN_TODAY
                gain = {"dsn-gated": 0.010, rule.CURRENT: -0.01}.get(name, 0.005)
                records.append(record(task, model, method, setting, seed, 0.5 + gain))
    outcome = rule.apply_rule(records)
    assert outcome.applied and outcome.chosen == "dsn-gated"
    assert outcome.s("dsn-gated") == pytest.approx(1.0) and outcome.w(rule.CURRENT) == pytest.approx(-1.0)
    assert not rule.apply_rule(records[:-1]).applied
    # A dense-only candidate far ahead on segmentation is reported, not chosen.
    boosted = [{**r, "curve": {"val": [0.9]}} if r["setting"].endswith("mi_estimator=region") else r for r in records]
    assert rule.apply_rule(boosted).chosen == "dsn-gated"
    assert not any(s.task == "cls" and ("mi_estimator", "region") in s.options
                   for s in compare.grid_specs(["default-heads"]))
    rows = rule.validation_rows(records)
    assert {r["method"] for r in rows} == {name for name, _, _ in rule.CANDIDATES}
    assert all((r["delta"] is None) == (r["method"] == "output-only") for r in rows)


def test_the_confirmation_has_rows_of_its_own_and_stays_out_of_the_main_tables(evidence):
    compare, plots = evidence
    rule = importlib.import_module("examples.default_rule")
    base = compare.grid_specs(["confirm-baseline"])
    chosen = compare.grid_specs(["confirm-dsn-gated"])
    assert sorted({s.seed for s in base + chosen}) == [5, 6, 7, 8, 9]
    assert all(not s.pilot for s in base + chosen) and {s.model for s in chosen} == {m for _, m in rule.MODELS}
    records = [{**_record(s, 0.50 if s.method == "baseline" else 0.51 + 0.001 * s.seed), "steps": 10, "batch": 4}
               for s in base + chosen]
    assert plots.summary_rows(records) == []  # seeds 5-9 never enter the main tables' rows
    rows = {(r["model"], r["method"]): r for r in rule.confirmation_rows(records)}
    vit = rows[("vit", "dsn-gated")]
    assert vit["seeds"] == [5, 6, 7, 8, 9] and vit["delta"] == pytest.approx(0.017)
    assert vit["ci95"][0] < 0.017 < vit["ci95"][1]
    assert rows[("vit", "output-only")]["delta"] is None


def test_the_64x64_regime_has_rows_of_its_own_and_its_pilots_stay_out_of_the_rule(evidence):
    compare, plots = evidence
    rule = importlib.import_module("examples.default_rule")
    pilots = compare.grid_specs(["pilot-seg64"])
    base, chosen = compare.grid_specs(["confirm64-baseline"]), compare.grid_specs(["confirm64-dsn-conv"])
    assert {s.canvas for s in pilots + base + chosen} == {64} and all(s.pilot for s in pilots)
    assert {s.model for s in base + chosen} == {"deeplabv3plus", "unet"}  # segmentation only
    # Same cell at 32 and at 64: two keys, so neither run is skipped as the other's.
    assert base[0].key() != compare.grid_specs(["confirm-baseline"])[0].key()
    at32 = [_record(s, 0.40) for s in compare.grid_specs(["confirm-baseline"])]
    records = ([_record(s, 0.30 if s.method == "baseline" else 0.33) for s in base + chosen] + at32
               + [_record(s, 0.99) for s in pilots])
    assert plots.summary_rows(records) == []
    rows = {(r["model"], r["canvas"], r["method"]): r for r in rule.confirmation_rows(records)}
    assert rows[("unet", 64, "dsn-conv")]["delta"] == pytest.approx(0.03)
    assert rows[("unet", 32, "output-only")]["mean"] == pytest.approx(0.40)  # the 32x32 rows are untouched
    assert ("unet", 32, "dsn-conv") not in rows
    # A 64x64 pilot at seed 0 is not the rule's output-only run at seed 0.
    seed0 = rule._arm_runs(records + [_record(compare.RunSpec("seg", "unet", "baseline", 0, 1500, 16, pilot=True), 0.2)],
                           "seg", "unet", "baseline", "none")
    assert seed0[0]["metrics"]["mIoU"] == pytest.approx(0.2)
