"""The README's "Changing autoprobe" recipes, checked: each adds a toy one through exactly the files its recipe
names, in a copy of the package, and shows that it works there and that skipping any one of those files breaks it.

A recipe is a list of edits (file, anchor, text): the copy is the package as it is with those edits applied, run
in a fresh interpreter (the edits are source edits, as a contributor makes them, not monkeypatches). An anchor
that is no longer in its file means the file changed shape: update the recipe and the README together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Edit(NamedTuple):
    """One change to one file of the package: ``text`` goes after ``anchor`` (at the end when ``anchor`` is ``""``;
    a new file when it is ``None``)."""

    path: str
    anchor: str | None
    text: str


def _package(tmp_path: Path, edits: list[Edit]) -> Path:
    """A copy of ``autoprobe`` (its rule packs in ``autoprobe/packs``, as installed) with ``edits`` applied."""
    root = tmp_path / "copy"
    shutil.copytree(ROOT / "autoprobe", root / "autoprobe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "rules", root / "autoprobe" / "packs", ignore=shutil.ignore_patterns("__pycache__"))
    for edit in edits:
        target = root / edit.path
        if edit.anchor is None:
            target.write_text(edit.text)
            continue
        source = target.read_text()
        if edit.anchor == "":
            target.write_text(source + edit.text)
            continue
        assert edit.anchor in source, f"{edit.path} no longer has {edit.anchor!r}: update this recipe and the README's"
        target.write_text(source.replace(edit.anchor, edit.anchor + edit.text, 1))
    return root


def _run(root: Path, script: str) -> object:
    """What ``script`` prints last, as JSON, run against the copy; ``{"crashed": <its last error line>}`` if it fails."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        return {"crashed": (done.stderr.strip().splitlines() or [""])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_recipe(tmp_path: Path, edits: list[Edit], script: str, want: object) -> None:
    """``want`` with every edit; something else with the edits of any one file left out (the copies run two at a
    time: each is a fresh interpreter)."""
    skipped = list(dict.fromkeys(e.path for e in edits))
    copies = [_package(tmp_path / "all", edits)] + [
        _package(tmp_path / path.replace("/", "_"), [e for e in edits if e.path != path]) for path in skipped]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda root: _run(root, script), copies))
    assert results[0] == want
    for path, got in zip(skipped, results[1:]):
        assert got != want, f"the recipe works without touching {path}: the README names a file it does not need"


# ------------------------------------------------------------------------------------------------ an op

OP = [Edit("autoprobe/ops.py", "OPS: Mapping[str, Op] = _index(\n", '    _ops("act", "elementwise", ("sinc",)),\n')]

OP_SCRIPT = """
    import json, torch
    from autoprobe.backends import trace_with_fallbacks

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)
        def forward(self, x):
            return self.b(torch.sinc(self.a(x)))

    seen = {}
    for backend in ("fx", "export"):
        graph = trace_with_fallbacks(Net(), (3, 12, 12), backends=(backend,)).graph
        seen[backend] = [(n.kind, n.act) for n in graph if n.name == "sinc"]
    print(json.dumps(seen))
"""


def test_a_new_op_takes_the_registry_alone(tmp_path: Path) -> None:
    _check_recipe(tmp_path, OP, OP_SCRIPT, {"fx": [["act", "sinc"]], "export": [["act", "sinc"]]})


# ------------------------------------------------------------------------------------------------ a detector

DETECTOR = [
    Edit("autoprobe/detectors/toy_marker.py", None, textwrap.dedent('''\
        """toy-marker: the output of any module named ``marker`` (a recipe's example)."""

        from __future__ import annotations

        from collections.abc import Mapping
        from typing import Any

        from ..graph import LayerGraph
        from . import Candidate, Option

        ID = "toy-marker"
        SUMMARY = "the output of a module named marker"
        OPTIONS = {"strength": Option(float, 1.0, "how strongly it fires")}


        def detect(graph: LayerGraph, options: Mapping[str, Any]) -> tuple[Candidate, ...]:
            return tuple(Candidate(n.name, ID, "a module named marker", options["strength"])
                         for n in graph if n.module_path.split(".")[-1] == "marker" and n.call is not None)
        ''')),
]
"""The toy detector's module: ``ID``, ``SUMMARY``, ``OPTIONS`` and a pure ``detect``."""


DETECTOR_SCRIPT = """
    import json, torch
    import autoprobe

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
            self.marker = torch.nn.Conv2d(8, 8, 3)
            self.tail = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
        def forward(self, x):
            return self.tail(self.marker(self.stem(x)))

    try:
        sel = autoprobe.inspect(Net(), input_size=(3, 16, 16))
        print(json.dumps(sorted(s.node for s in sel.candidates if any(f.detector == "toy-marker" for f in s.fired))))
    except autoprobe.AutoprobeError as exc:
        print(json.dumps(type(exc).__name__))
"""


DETECTOR_EDITS = [
    *DETECTOR,
    Edit("autoprobe/detectors/__init__.py",
         "from . import (  # noqa: E402  (Candidate and Option must exist before the detectors import them)\n",
         "    toy_marker,\n"),
    Edit("autoprobe/detectors/__init__.py", "DETECTORS: tuple[ModuleType, ...] = (\n", "    toy_marker,\n"),
    Edit("autoprobe/packs/default.toml", "", "\n[detectors.toy-marker]\nweight = 1.0\nstrength = 1.0\n"),
]
"""The detector recipe: its module, two lines in the registry, one table in the default pack."""


def test_a_new_detector_takes_its_module_the_registry_and_the_pack(tmp_path: Path) -> None:
    _check_recipe(tmp_path, DETECTOR_EDITS, DETECTOR_SCRIPT, ["marker"])


# ------------------------------------------------------------------------------------------------ a CLI flag

FLAG = [
    Edit("autoprobe/cli.py", '        help="further forward argument, fixed while tracing (repeatable), e.g. --forward-arg return_dict=False",\n    )\n',
         '    parser.add_argument("--trace-batch", type=int, metavar="N", help="the traced batch (default 2)")\n'),
    Edit("autoprobe/cli.py", "forward_kwargs=forward.to_dict(), allow_real_data=args.allow_real_data", ", batch_size=args.trace_batch or 2"),
    Edit("autoprobe/cli.py", "tuple(args.leaf), model_args or None, _input_name(args.input_name), forward or None,",
         " args.trace_batch,"),
    Edit("autoprobe/lockfile.py", '    forward_kwargs: Kwargs = field(default=Kwargs(where="forward_kwargs"), metadata={"only_when_given": True})\n',
         '    trace_batch: int | None = field(default=None, metadata={"only_when_given": True})\n'),
    Edit("autoprobe/lockfile.py", "    if name in _KWARG_SETTINGS:\n",
         "        return _kwargs(value, label, tail)\n    if name == \"trace_batch\":\n"
         "        if value is None or _positive_int(value):\n            return value\n"
         "        raise LockError(f\"{label} must be null or a positive integer, not {value!r}.{tail}\")\n"
         "    if name in _KWARG_SETTINGS:\n"),
    Edit("autoprobe/lockentry.py", "forward_kwargs=settings.forward_kwargs.to_dict()", ", batch_size=settings.trace_batch or 2"),
]
"""Exposing a ``TraceOptions`` field (``batch_size``, already there) as ``--trace-batch``, locked and replayed."""

FLAG_SCRIPT = """
    import contextlib, io, json, pathlib
    pathlib.Path("toymod.py").write_text(
        "import torch\\n"
        "def build():\\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),\\n"
        "                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))\\n")
    from autoprobe.cli import main

    common = ["--input-size", "3,16,16", "--trace-batch", "4"]
    with contextlib.redirect_stdout(io.StringIO()):
        locked = main(["lock", "toymod:build", *common, "-o", "x.lock"])
    entry = json.loads(pathlib.Path("x.lock").read_text())["models"]["toymod:build"]
    with contextlib.redirect_stdout(io.StringIO()):
        checked = main(["check", "x.lock"])
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        main(["inspect", "toymod:build", *common, "--format", "json"])
    print(json.dumps([locked, entry["settings"].get("trace_batch"), entry["input_shape"][0], checked,
                      json.loads(shown.getvalue())["input_shape"][0]]))
"""


def test_a_new_cli_flag_takes_the_cli_the_lock_settings_and_the_lock_entry(tmp_path: Path) -> None:
    _check_recipe(tmp_path, FLAG, FLAG_SCRIPT, [0, 4, 4, 0, 4])


# ------------------------------------------------------------------------------------------------ a backend

BACKEND = [
    Edit("autoprobe/backends.py", 'LADDER: tuple[Backend, ...] = ("fx", "export", ', '"toy", '),
    Edit("autoprobe/backends.py", '    "hooks": trace_hooks,\n',
         '    "toy": lambda model, size, options, **_: dataclasses.replace(trace_hooks(model, size, options), backend="toy"),\n'),
    Edit("autoprobe/inspect.schema.json", '"backend": {"enum": ["fx", "export", "hooks"', ', "toy"'),
]
"""A rung (here the hooks backend under another name) in the ladder before hooks, and its name in the JSON schema."""

BACKEND_SCRIPT = """
    import json, jsonschema, torch
    import autoprobe
    from autoprobe.report import json_schema, selection_to_dict

    class ValueBranch(torch.nn.Module):  # fx and export cannot trace it; a run on real values can
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)
            self.head = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                            torch.nn.Linear(8, 3))
        def forward(self, x):
            x = torch.relu(self.a(x))
            if x.sum() > 0:
                x = x * 0.5
            return self.head(self.b(x))

    model = ValueBranch()
    sel = autoprobe.inspect(model, input_size=(3, 16, 16), allow_real_data=True)
    try:
        jsonschema.validate(selection_to_dict(sel), json_schema())
        valid = True
    except jsonschema.ValidationError:
        valid = False
    probed = autoprobe.instrument(model, sel, input_size=(3, 16, 16), allow_real_data=True)
    heads = probed(torch.randn(2, 3, 16, 16)).heads
    print(json.dumps([sel.backend, valid, sorted(heads) == sorted(sel.names)]))
"""


def test_a_new_backend_takes_the_ladder_and_the_schema(tmp_path: Path) -> None:
    _check_recipe(tmp_path, BACKEND, BACKEND_SCRIPT, ["toy", True, True])


def test_the_schema_names_the_ladders_backends() -> None:
    from autoprobe.backends import LADDER
    from autoprobe.report import json_schema

    assert json_schema()["properties"]["backend"]["enum"] == list(LADDER)


# ------------------------------------------------------------------------------------------------ a loss term

LOSS = [
    Edit("autoprobe/losses/terms.py", "", textwrap.dedent('''


        class ToyLogitNorm(nn.Module):
            """The mean squared logit of each head (a recipe's example)."""

            def forward(self, heads: Mapping[str, Tensor]) -> dict[str, Tensor]:
                return {name: logits.float().pow(2).mean() for name, logits in heads.items()}
        ''')),
    Edit("autoprobe/losses/objectives.py", '"""The objectives ``make_objective`` builds, by name (``ObjectiveName``)."""\n', textwrap.dedent('''

        from .terms import ToyLogitNorm  # noqa: E402


        class Toy(Objective):
            """The output loss plus alpha times each head's mean squared logit."""

            def __init__(self, points, alpha=0.1, schedule="constant", ignore_index=-100, target_kind="multiclass",
                         regression_loss="mse", label_smoothing=0.0, class_weights=None, output_loss=None, gate=None):
                super().__init__(points, schedule=schedule, ignore_index=ignore_index, target_kind=target_kind,
                                 regression_loss=regression_loss, label_smoothing=label_smoothing,
                                 class_weights=class_weights, output_loss=output_loss, gate=gate)
                self.alpha = per_point("alpha", alpha, self.points)
                self.norm = ToyLogitNorm()

            def _terms(self, output, heads, features, matcher):
                found = self.norm({name: heads[name].logits for name in self.points})
                return [(f"toy/{name}", self.alpha[name], found[name]) for name in self.points]


        _OBJECTIVES["toy"] = Toy
        ''')),
]
"""A term module, and an objective over it with its options (the constructor's parameters) and its name."""

LOSS_SCRIPT = """
    import json, warnings, torch
    import autoprobe
    from autoprobe import LossOptions

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    try:
        probed = autoprobe.instrument(net, input_size=(3, 16, 16), loss="toy", loss_options=LossOptions(alpha=0.5))
    except autoprobe.AutoprobeError as exc:
        print(json.dumps(type(exc).__name__))
    else:
        total, parts = probed.loss(probed(torch.randn(2, 3, 16, 16)), torch.tensor([0, 2]))
        total.backward()
        print(json.dumps(sorted({name.split("/")[0] for name in parts})))
"""


def test_a_new_loss_term_takes_the_terms_and_an_objective(tmp_path: Path) -> None:
    _check_recipe(tmp_path, LOSS, LOSS_SCRIPT, ["ce", "toy"])


# ------------------------------------------------------------------------------------------------ a module class

MODULE = [Edit("autoprobe/ops.py", "_LIBRARY_CLASSES: Mapping[str, Mapping[str, ModuleClass]] = MappingProxyType({\n",
               '    "toylib": MappingProxyType({"Halve": ModuleClass("pool", rule="channels_first", windowed=True, '
               'leaf=True)}),\n')]
"""Another library's class the registry did not know, by type: its one entry (kind, axis rule, windowed, leaf)."""

MODULE_SCRIPT = """
    import json, pathlib
    pathlib.Path("toylib.py").write_text(
        "import torch\\n"
        "class Halve(torch.nn.Module):  # a library's 2x2 max pool\\n"
        "    def forward(self, x):\\n"
        "        return torch.nn.functional.max_pool2d(x, 2)\\n")
    import torch, toylib
    from autoprobe import ops
    from autoprobe.backends import trace_with_fallbacks

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.halve, self.b = torch.nn.Conv2d(3, 4, 3), toylib.Halve(), torch.nn.Conv2d(4, 4, 3)
        def forward(self, x):
            return self.b(self.halve(self.a(x)))

    seen = {b: [[n.op, n.kind, str(n.layout)] for n in trace_with_fallbacks(Net(), (3, 14, 14), backends=(b,)).graph
                if n.module_path == "halve" or n.name == "halve"] for b in ("fx", "hooks")}
    seen["windowed"] = ops.is_windowed(toylib.Halve())
    print(json.dumps(seen))
"""


def test_a_new_module_class_takes_the_registry_alone(tmp_path: Path) -> None:
    # Without its entry fx traces through the class (a max_pool2d call) and hooks read it as ``other``.
    _check_recipe(tmp_path, MODULE, MODULE_SCRIPT, {"fx": [["call_module", "pool", "NCHW"]],
                                                    "hooks": [["call_module", "pool", "NCHW"]], "windowed": True})


# ------------------------------------------------------------------------------------------------ the README

RECIPES = {"An op": OP, "A detector": DETECTOR_EDITS, "A backend": BACKEND, "A CLI flag": FLAG, "A loss term": LOSS,
           "A module class": MODULE}


def _readme_recipe(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n### Changing autoprobe\n"):]
    start = section.index(f"- **{title}**")
    end = section.find("\n- **", start + 1)
    return section[start:end if end != -1 else None]


def test_the_readme_names_every_file_each_recipe_touches() -> None:
    for title, edits in RECIPES.items():
        shown = _readme_recipe(title)
        # A new file is named by its place (``detectors/NAME.py``); the packs live in ``rules/`` in the repository.
        paths = (str(Path(e.path).with_stem("NAME")) if e.anchor is None else e.path for e in edits)
        for path in dict.fromkeys(p.replace("autoprobe/packs/", "rules/") for p in paths):
            assert f"`{path}`" in shown, f"README's recipe {title!r} does not name {path}"
