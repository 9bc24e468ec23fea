"""``autoprobe inspect`` and ``autoprobe rules``: outputs that parse, and bad input that exits 2 with one message."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from autoprobe.cli import main
from autoprobe.detectors import DETECTORS
from autoprobe.report import json_schema
from autoprobe.rules import load_rules
from autoprobe.select import select_points
from conftest import TESTS, Analysed, assert_user_error, graph_of, inspect_cli, run_autoprobe, write_module
from toy_models import SHAPE_BRANCH_SOURCE, VALUE_BRANCH_SOURCE, ToyUNet

SVG = "{http://www.w3.org/2000/svg}"
UNET = ("toy_models:ToyUNet", "--input-size", "3,16,16")  # toy_models is importable: tests/ is on sys.path

Capsys = pytest.CaptureFixture[str]


# ----------------------------------------------------------------------------- outputs


def test_table_for_resnet50(capsys: Capsys, analysed: Analysed) -> None:
    code, out, _ = inspect_cli(capsys, "resnet50")
    assert code == 0
    assert "D=50" in out and "M=4" in out
    names = analysed("resnet50").selection.names
    assert len(names) == 4
    for i, name in enumerate(names, 1):
        row = next(line for line in out.splitlines() if f" P{i} " in line)
        assert f" {name} " in row
    # The default conv head at K=1000, H = min(C, 128): act1 (64 ch) 64*64 + 64 + 128 + 64*1000 + 1000 = 69,288.
    assert " 69,288 " in next(line for line in out.splitlines() if " P1 " in line)
    assert "adapters: 686,816 parameters in all (conv heads" in out
    # --head linear counts C*K + K per adapter: act1 (64 ch) 65,000 ... layer3 (1024 ch) 1,025,000.
    code, out, _ = inspect_cli(capsys, "resnet50", "--head", "linear")
    assert code == 0 and " 65,000 " in next(line for line in out.splitlines() if " P1 " in line)
    assert "adapters: 1,860,000 parameters in all (C*K + K each, K=1000)" in out


def test_json_and_svg_for_resnet50(capsys: Capsys, tmp_path: Path, analysed: Analysed) -> None:
    picture = tmp_path / "resnet50.svg"
    code, out, _ = inspect_cli(capsys, "resnet50", "--format", "json", "--graph", str(picture))
    assert code == 0
    data = json.loads(out)
    jsonschema.validate(data, json_schema())
    names = [p["name"] for p in data["points"]]
    assert (data["depth"], data["num_points"], names) == (50, 4, list(analysed("resnet50").selection.names))
    assert {c["name"] for c in data["candidates"] if c["chosen"]} == set(names)
    assert data["adapter_head"] == "conv"
    assert [p["adapter_params"] for p in data["points"]] == [69_288, 162_152, 194_920, 260_456]

    root = ET.parse(picture).getroot()
    assert root.tag == f"{SVG}svg"
    boxes = {g.find(f"{SVG}title").text.splitlines()[0]: g for g in root.iter(f"{SVG}g")}
    for i, name in enumerate(names, 1):
        assert boxes[name].find(f"{SVG}text").text.startswith(f"P{i} ")


def test_json_schema_rejects_a_broken_document(capsys: Capsys) -> None:
    code, out, _ = inspect_cli(capsys, *UNET, "--format", "json")
    assert code == 0
    data = json.loads(out)
    jsonschema.validate(data, json_schema())
    del data["points"][0]["depth"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, json_schema())


def test_all_candidates_lists_every_candidate(capsys: Capsys) -> None:
    candidates = select_points(graph_of(ToyUNet()), load_rules()).candidates
    code, out, _ = inspect_cli(capsys, *UNET, "--all-candidates")
    assert code == 0 and "D=14" in out
    assert len(candidates) > 3  # more than the 3 points
    for c in candidates:
        assert f" {c.node} " in out


def test_points_rules_and_square_input_size(capsys: Capsys) -> None:
    args = ("--input-size", "16", "--points", "1", "--rules", "dense", "--format", "json")
    code, out, _ = inspect_cli(capsys, "toy_models:ToyUNet", *args)
    assert code == 0
    data = json.loads(out)
    assert (data["num_points"], data["rules"]["name"], data["input_shape"]) == (1, "dense", [2, 3, 16, 16])


TRAIN_BRANCH_SOURCE = """\
from torch import nn


class Net(nn.Module):
    \"\"\"An auxiliary branch that runs only in training: the train graph has 4 more weight layers.\"\"\"

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.aux = nn.Sequential(*(m for _ in range(4) for m in (nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())))
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.stem(x)
        if self.training:
            x = x + self.aux(x)
        return self.head(self.body(x))


def build():
    return Net()
"""


def test_mode_selects_the_graph_that_is_traced(capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--mode train traces the training graph (here with its extra branch), as the Python API's
    options=TraceOptions(mode="train") does."""
    from autoprobe.api import analyze
    from autoprobe.trace import TraceOptions

    write_module(tmp_path, "train_branch_net", TRAIN_BRANCH_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    documents = {}
    for mode in ("eval", "train"):
        code, out, _ = inspect_cli(capsys, "train_branch_net:build", "--input-size", "3,16,16", "--mode", mode,
                                   "--format", "json")
        assert code == 0
        documents[mode] = json.loads(out)
        api = analyze("train_branch_net:build", input_size=(3, 16, 16), options=TraceOptions(mode=mode)).selection
        assert documents[mode]["mode"] == mode
        assert (documents[mode]["depth"], [p["name"] for p in documents[mode]["points"]]) == (api.depth, list(api.names))
    assert (documents["eval"]["depth"], documents["train"]["depth"]) == (4, 8)


NAMED_INPUT_SOURCE = """\
from torch import nn


class Net(nn.Module):
    \"\"\"Called as model(pixel_values=x): the first forward parameter is not the input.\"\"\"

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, scale=None, pixel_values=None):
        return self.head(self.body(pixel_values))


def build():
    return Net()
"""


def test_input_name_feeds_the_named_forward_parameter(capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoprobe.api import inspect
    from autoprobe.trace import TraceOptions

    write_module(tmp_path, "named_input_net", NAMED_INPUT_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ("named_input_net:build", "--input-size", "3,16,16", "--format", "json")
    code, _, err = inspect_cli(capsys, *args)  # fed to `scale`, the first parameter: the convs get None
    assert code == 2 and err.startswith("autoprobe: error: ")
    code, out, _ = inspect_cli(capsys, *args, "--input-name", "pixel_values")
    assert code == 0
    data = json.loads(out)
    api = inspect("named_input_net:build", input_size=(3, 16, 16), options=TraceOptions(input_name="pixel_values"))
    assert (data["depth"], [p["name"] for p in data["points"]]) == (api.depth, list(api.names)) == (4, ["body.1"])
    code, _, err = inspect_cli(capsys, *args, "--input-name", "nope")
    assert code == 2 and "input_name='nope' is not a parameter of Net.forward" in err


def test_rules_lists_packs_and_detectors(capsys: Capsys) -> None:
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    for word in ("default", "dense", *(d.ID for d in DETECTORS), "min_span"):
        assert word in out


def test_leaf_lets_a_shape_branch_through_fx(capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "shape_branch_net", SHAPE_BRANCH_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = inspect_cli(capsys, "shape_branch_net:build", "--input-size", "3,16,16", "--leaf", "gate")
    assert code == 0 and "backend=fx" in out
    row = next(line for line in out.splitlines() if " P1 " in line)  # no detector fires: a spine node, listed
    assert " conv " in row


# ----------------------------------------------------------------------------- bad input


def test_unknown_model_suggests_close_names(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "resnet5")
    assert_user_error(code, err, "unknown model 'resnet5'", "Did you mean", "resnet50")


def test_unknown_torchvision_model(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "tv:resnet")
    assert_user_error(code, err, "'resnet'", "resnet18")


def test_module_that_does_not_import(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "no_such_pkg.models:build")
    assert_user_error(code, err, "'no_such_pkg.models'", "ModuleNotFoundError")


def test_factory_that_does_not_exist(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "toy_models:NoSuchNet")
    assert_user_error(code, err, "'NoSuchNet'")


def test_factory_that_returns_no_module(capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "not_a_model", "def build():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = inspect_cli(capsys, "not_a_model:build")
    assert_user_error(code, err, "not an nn.Module")


def test_input_size_that_does_not_fit(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "vit_base_patch16_224", "--input-size", "3,100,100")
    assert_user_error(code, err, "(3, 100, 100)", "does not fit", "(--input-size 3,100,100 failed)")
    assert "input_size=" not in err  # the error's parts reworded for the flag, not the Python keyword
    assert "Proxy(" not in err and "export" not in err  # no tracing internals, no other backend's retry


@pytest.mark.parametrize("size", ["abc", "3,0,16", "-4"])
def test_input_size_that_is_not_a_size(capsys: Capsys, size: str) -> None:
    code, _, err = inspect_cli(capsys, "toy_models:ToyUNet", "--input-size", size)
    assert_user_error(code, err, repr(size))


def test_points_below_one(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, *UNET, "--points", "0")
    assert_user_error(code, err, "--points 0")


def test_invalid_rules_file(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, *UNET, "--rules", str(TESTS / "rule_cases" / "unknown_key.toml"))
    assert_user_error(code, err, "unknown_key.toml", "selection.min_distanse")


def test_missing_rules_file(capsys: Capsys, tmp_path: Path) -> None:
    code, _, err = inspect_cli(capsys, *UNET, "--rules", str(tmp_path / "nope.toml"))
    assert_user_error(code, err, "nope.toml", "does not exist")


def test_unwritable_graph_file(capsys: Capsys, tmp_path: Path) -> None:
    code, _, err = inspect_cli(capsys, *UNET, "--graph", str(tmp_path / "missing-folder" / "g.svg"))
    assert_user_error(code, err, "--graph", "missing-folder")


def test_bad_option_value_is_a_usage_error(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["inspect", "resnet50", "--format", "xml"])
    assert caught.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_untraceable_model_names_module_and_line(tmp_path: Path) -> None:
    """In a fresh process, as a user runs it: the model's file sits in the working directory."""
    path = write_module(tmp_path, "value_branch_net", VALUE_BRANCH_SOURCE)
    args = ["inspect", "value_branch_net:build", "--input-size", "3,16,16"]
    result = run_autoprobe(args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(result.returncode, result.stderr, "'gate'", f"{path}:6", "`if x.sum() > 0:`", "--leaf",
                      "Rerun with `--allow-real-data`")
    assert "allow_real_data=True" not in result.stderr  # the CLI names its flag, not the Python keyword
    assert result.stdout == ""


def test_allow_real_data_runs_a_value_branching_model_once_and_says_so(tmp_path: Path) -> None:
    write_module(tmp_path, "value_branch_net", VALUE_BRANCH_SOURCE)
    args = ["inspect", "value_branch_net:build", "--input-size", "3,16,16", "--format", "json", "--allow-real-data"]
    result = run_autoprobe(args, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["backend"] == "hooks" and data["depth"] == 2
    assert any("ran the model once on real values" in note for note in data["notes"])


# ----------------------------------------------------------------------------- version, names, arguments (issue 17)


def test_version_from_the_script_and_python_m(capsys: Capsys) -> None:
    import subprocess
    import sys

    from autoprobe import __version__

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out == f"autoprobe {__version__}\n"
    result = subprocess.run([sys.executable, "-m", "autoprobe", "--version"], capture_output=True, text=True, check=False,
                            timeout=120)
    assert (result.returncode, result.stdout) == (0, f"autoprobe {__version__}\n")


def test_a_tagged_timm_name_takes_its_variants_config(capsys: Capsys) -> None:
    from autoprobe.models import resolve_model

    code, out, _ = inspect_cli(capsys, "convnext_atto.d2_in1k", "--format", "json")
    assert code == 0 and json.loads(out)["model"] == "convnext_atto.d2_in1k"
    tagged = resolve_model("vit_tiny_patch16_384.augreg_in21k_ft_in1k")
    assert tagged.input_size == (3, 384, 384) and tagged.module.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"


@pytest.mark.parametrize(
    ("spec", "instead"),
    [
        ("hf-hub:timm/resnet50.a1_in1k", "use the timm name `resnet50.a1_in1k`"),
        ("hf_hub:someone/private-net", "use the architecture's timm name"),
        ("tv:resnet50.IMAGENET1K_V2", "use `tv:resnet50`"),
        ("ResNet50_Weights.IMAGENET1K_V2", "use `tv:resnet50`"),
        ("tv:ResNet50_Weights.DEFAULT", "use `tv:resnet50`"),
    ],
)
def test_names_that_mean_a_download_are_refused_offline(capsys: Capsys, spec: str, instead: str) -> None:
    code, _, err = inspect_cli(capsys, spec)
    assert_user_error(code, err, repr(spec), "never downloads", f"Hint: {instead}")


@pytest.mark.parametrize("spec", ["resnet18", "tv:resnet18"])
def test_num_classes_sets_the_classifier_width(capsys: Capsys, spec: str) -> None:
    code, out, _ = inspect_cli(capsys, spec, "--num-classes", "10", "--format", "json", "--head", "linear")
    assert code == 0
    data = json.loads(out)
    # A linear adapter is C*K + K with K=10: the width reached the builder.
    assert [p["adapter_params"] for p in data["points"]] == [p["shape"][1] * 10 + 10 for p in data["points"]]


def test_num_classes_and_model_args_in_python() -> None:
    from autoprobe.errors import ModelSpecError, UsageError
    from autoprobe.models import resolve_model

    assert resolve_model("resnet18", num_classes=10).module.fc.out_features == 10
    assert resolve_model("tv:resnet18", model_args={"num_classes": 7}).module.fc.out_features == 7
    with pytest.raises(UsageError, match="num_classes=3 and model_args num_classes=4 disagree"):
        resolve_model("resnet18", num_classes=3, model_args={"num_classes": 4})
    with pytest.raises(UsageError, match="num_classes must be a positive integer"):
        resolve_model("resnet18", num_classes=0)
    with pytest.raises(ModelSpecError, match="weights='DEFAULT' for tv:resnet18 would download"):
        resolve_model("tv:resnet18", model_args={"weights": "DEFAULT"})


FACTORY_SOURCE = """\
from torch import nn


def build(width, blocks=2, head=None, name="plain", weights="download-me"):
    if weights is not None:
        raise RuntimeError("this factory would download weights; pass weights=None")
    assert isinstance(name, str) and isinstance(head, dict) and isinstance(head["pool"], tuple)
    layers, channels = [], 3
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.ReLU()]
        channels = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(head["pool"]), nn.Flatten(), nn.Linear(width, 10))


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x, deep=False):
        x = self.a(x)
        return self.head(self.b(x) if deep else x)
"""


def test_model_args_reach_the_factory_as_python_literals(capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "arg_factory", FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ("arg_factory:build", "--input-size", "3,32,32", "--format", "json")
    code, _, err = inspect_cli(capsys, *args, "--model-arg", "width=8")
    assert_user_error(code, err, "would download weights", "weights=None")
    code, out, _ = inspect_cli(capsys, *args, "--model-arg", "width=8", "--model-arg", "blocks=3", "--model-arg",
                               "weights=None", "--model-arg", "name=resnet34", "--model-arg", "head={'pool': (1, 1)}")
    assert code == 0
    assert json.loads(out)["depth"] == 4  # three convs and the linear: blocks=3 reached the factory


def test_smp_unet_inspects_offline_with_its_weights_argument(capsys: Capsys) -> None:
    code, out, _ = inspect_cli(capsys, "segmentation_models_pytorch:Unet", "--model-arg", "encoder_weights=None",
                               "--model-arg", "encoder_name=resnet18", "--model-arg", "classes=3", "--format", "json",
                               "--head", "linear")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "segmentation_models_pytorch:Unet"
    # Linear adapters are C*K + K with K=3: classes=3 reached the factory.
    assert [p["adapter_params"] for p in data["points"]] == [p["shape"][1] * 3 + 3 for p in data["points"]]


KWARGS_FACTORY_SOURCE = """\
import socket
import urllib.request

from torch import nn


def build(width=8, classes=1, weights="imagenet", **kwargs):
    # Like smp: the width is `classes`, a download is on by default, and **kwargs takes anything.
    if weights is not None:
        urllib.request.urlopen("http://192.0.2.1/weights.pth", timeout=20)
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def dial(host="192.0.2.1"):
    socket.create_connection((host, 443), timeout=20)
    return nn.Linear(2, 2)
"""


@pytest.fixture()
def kwargs_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    write_module(tmp_path, "kwargs_factory", KWARGS_FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return ("kwargs_factory:build", "--input-size", "3,16,16", "--format", "json")


def test_num_classes_a_builder_ignores_is_refused_with_its_own_parameter(capsys: Capsys,
                                                                         kwargs_factory: tuple[str, ...]) -> None:
    code, _, err = inspect_cli(capsys, *kwargs_factory, "--model-arg", "weights=None", "--num-classes", "5")
    assert_user_error(code, err, "--num-classes 5", "output of K=1", "`classes`", "Hint:", "--model-arg classes=5")
    code, out, _ = inspect_cli(capsys, *kwargs_factory, "--model-arg", "weights=None", "--model-arg", "classes=5",
                               "--head", "linear")
    assert code == 0 and json.loads(out)["points"][0]["adapter_params"] == 8 * 5 + 5


def test_smp_fpn_num_classes_is_refused_with_classes(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "segmentation_models_pytorch:FPN", "--model-arg", "encoder_weights=None",
                               "--model-arg", "encoder_name=resnet18", "--num-classes", "5")
    assert_user_error(code, err, "--num-classes 5", "K=1", "Hint:", "--model-arg classes=5")


def test_a_model_arg_that_only_reaches_kwargs_is_warned_with_close_names(capsys: Capsys,
                                                                         kwargs_factory: tuple[str, ...]) -> None:
    code, out, err = inspect_cli(capsys, *kwargs_factory, "--model-arg", "weights=None", "--model-arg", "clases=5")
    assert code == 0 and json.loads(out)["model"] == "kwargs_factory:build"
    assert "autoprobe: warning: model argument clases=5 is not a parameter of kwargs_factory:build: it only " \
           "reaches its **kwargs" in err
    assert "Did you mean: classes?" in err
    code, _, err = inspect_cli(capsys, *kwargs_factory, "--model-arg", "weights=None", "--model-arg", "width=4")
    assert code == 0 and "warning" not in err  # a named parameter is no warning


def test_a_factory_that_downloads_fails_at_once_naming_its_offline_argument(capsys: Capsys,
                                                                            kwargs_factory: tuple[str, ...]) -> None:
    import socket

    from autoprobe.errors import ModelSpecError
    from autoprobe.models import resolve_model

    code, _, err = inspect_cli(capsys, *kwargs_factory)
    assert_user_error(code, err, "building kwargs_factory:build tried to download (a connection to 192.0.2.1:80)",
                      "never downloads", "Hint: pass its offline argument: `--model-arg weights=None`")
    with pytest.raises(ModelSpecError, match=r"a connection to 192.0.2.1:443.*\nHint: pass the builder's argument"):
        resolve_model("kwargs_factory:dial", device="cpu")
    # The block lived only while the builder ran: socket is as it was.
    assert "connect" not in vars(socket.socket) and socket.getaddrinfo.__module__ == "socket"
    # This machine stays reachable: a refused loopback connection is the socket's own error, not the block.
    with pytest.raises(ModelSpecError, match=r"failed: ConnectionRefusedError"):
        resolve_model("kwargs_factory:dial", model_args={"host": "127.0.0.1"}, device="cpu")


def test_the_network_block_is_scoped_and_nests() -> None:
    import socket

    from autoprobe.models import NetworkBlocked, offline

    before = (vars(socket.socket).get("connect"), socket.getaddrinfo)
    with pytest.raises(ValueError, match="the builder's own error"):
        with offline():
            with offline():
                pass
            with pytest.raises(NetworkBlocked, match="a name lookup of example.org"):
                socket.getaddrinfo("example.org", 80)  # still closed after the inner block left
            raise ValueError("the builder's own error")
    assert (vars(socket.socket).get("connect"), socket.getaddrinfo) == before  # as it was, after an error too
    assert socket.getaddrinfo("127.0.0.1", 80)


def test_smp_without_its_weights_argument_fails_at_once(capsys: Capsys) -> None:
    code, _, err = inspect_cli(capsys, "segmentation_models_pytorch:FPN", "--model-arg", "encoder_name=resnet18")
    assert_user_error(code, err, "tried to download", "Hint: pass its offline argument: `--model-arg encoder_weights=None`")


def test_torchvision_detection_builders_get_no_backbone_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autoprobe.errors import ModelSpecError
    from autoprobe.models import resolve_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached backbone to fall back on
    model = resolve_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn").module
    assert next(model.backbone.parameters()).device.type == "meta"
    with pytest.raises(ModelSpecError, match="weights_backbone='DEFAULT' .* would download"):
        resolve_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn", model_args={"weights_backbone": "DEFAULT"})


def test_a_one_logit_model_shows_its_adapters_as_instrument_builds_them(capsys: Capsys,
                                                                         kwargs_factory: tuple[str, ...]) -> None:
    import autoprobe

    from kwargs_factory import build

    # The default conv head: Linear(8, 8) + LayerNorm(8) + Linear(8, 1) = 72 + 16 + 9 = 97.
    code, out, _ = inspect_cli(capsys, *kwargs_factory[:3], "--model-arg", "weights=None")
    assert code == 0
    assert "adapters: 97 parameters in all (conv heads, K=1, H = min(C, 128)" in out
    assert " 97 " in next(line for line in out.splitlines() if " P1 " in line)
    probed = autoprobe.instrument(build(weights=None), input_size=(3, 16, 16))
    assert sum(p.numel() for p in probed.autoprobe_adapters.parameters()) == 97
    # The linear head: 8 channels x 1 logit + 1.
    code, out, _ = inspect_cli(capsys, *kwargs_factory[:3], "--model-arg", "weights=None", "--head", "linear")
    assert code == 0
    assert "adapters: 9 parameters in all (C*K + K each, K=1)" in out
    assert " 9 " in next(line for line in out.splitlines() if " P1 " in line)
    probed = autoprobe.instrument(build(weights=None), input_size=(3, 16, 16),
                                  loss_options=autoprobe.LossOptions(head="linear"))
    assert sum(p.numel() for p in probed.autoprobe_adapters.parameters()) == 9


def test_check_counts_in_the_singular(capsys: Capsys, tmp_path: Path) -> None:
    lock = tmp_path / "one.lock"
    assert main(["lock", *UNET, "-o", str(lock)]) == 0
    assert "1 of 1 model in" in capsys.readouterr().out
    assert main(["check", str(lock)]) == 0
    assert "checked 1 model in" in capsys.readouterr().out


def test_forward_args_are_fixed_while_tracing(capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "deep_flag", FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    depths = []
    for extra in ((), ("--forward-arg", "deep=True")):
        code, out, _ = inspect_cli(capsys, "deep_flag:Deep", "--input-size", "3,16,16", "--format", "json", *extra)
        assert code == 0
        depths.append(json.loads(out)["depth"])
    assert depths == [3, 5]


@pytest.mark.parametrize(
    ("option", "fragments"),
    [
        (("--model-arg", "encoder_weights"), ("--model-arg 'encoder_weights': expected KEY=VALUE", "Hint:")),
        (("--model-arg", "encoder_weights=none"), ("'none' is not a Python literal", "encoder_weights=None")),
        (("--model-arg", "x=a b"), ("--model-arg x=a b", "neither a Python literal nor a bare word", "Hint:")),
        (("--model-arg", "1x=2"), ("--model-arg '1x=2'", "Hint:")),
        (("--model-arg", "x={1, 2}"), ("--model-arg x", "is a set", "Hint:")),
        (("--model-arg", "x=1", "--model-arg", "x=2"), ("--model-arg x is given twice", "Hint:")),
        (("--model-arg", "pretrained=True"), ("pretrained=True", "would download", "Hint: leave pretrained out")),
        (("--model-arg", "no_such_arg=1"), ("no_such_arg", "--model-arg KEY=VALUE")),
        (("--num-classes", "0"), ("--num-classes 0", "Hint:")),
        (("--num-classes", "3", "--model-arg", "num_classes=4"), ("--num-classes 3", "num_classes=4", "Hint:")),
        (("--forward-arg", "deep"), ("--forward-arg 'deep': expected KEY=VALUE", "Hint:")),
        (("--input-name", "pixel values"), ("--input-name 'pixel values': not a parameter name", "Hint:")),
    ],
)
def test_bad_model_and_forward_arguments_exit_2_naming_the_option(capsys: Capsys, option: tuple[str, ...],
                                                                  fragments: tuple[str, ...]) -> None:
    code, _, err = inspect_cli(capsys, "resnet18", *option)
    assert_user_error(code, err, *fragments)
    if "--model-arg" in fragments[0] or "--num-classes" in fragments[0] or "--input-name" in fragments[0]:
        # `lock` takes the same options and refuses the same values, before computing anything.
        code = main(["lock", "resnet18", *option, "-o", str(TESTS / "never-written.lock")])
        assert_user_error(code, capsys.readouterr().err, *fragments)


# ----------------------------------------------------------------------------- the README runs


def _readme_block(after: str) -> str:
    """The fenced block that follows the line ``after`` in the README (the line itself excluded)."""
    text = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    start = text.index(after + "\n") + len(after) + 1
    return text[start:text.index("```", start)]


def test_readme_example_table_is_what_inspect_prints(capsys: Capsys) -> None:
    shown = _readme_block("$ autoprobe inspect resnet50")
    code, out, _ = inspect_cli(capsys, "resnet50")
    assert code == 0
    assert [line.rstrip() for line in out.splitlines()] == [line.rstrip() for line in shown.splitlines()]


@pytest.mark.parametrize("section", ["naming its offline argument; pass it:", "### HTML view"])
def test_readme_commands_run(capsys: Capsys, section: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    monkeypatch.chdir(tmp_path)
    text = (TESTS.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("```bash\n", text.index(section)) + len("```bash\n")
    (command,) = text[start:text.index("```", start)].strip().splitlines()
    words = shlex.split(command)
    assert words[:2] == ["autoprobe", "inspect"]
    assert main(words[1:]) == 0
    capsys.readouterr()
    html = [w for i, w in enumerate(words) if i and words[i - 1] == "--html"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in html)


def test_analyzing_a_plain_torch_model_does_not_import_timm():
    # timm's no-trace registries are read only when timm is loaded: a model without timm layers
    # must not pay its import (seconds at the CLI).
    code = ("import sys, torch, autoprobe\n"
            "net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),"
            " torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10))\n"
            "assert autoprobe.inspect(net, input_size=(3, 16, 16)).names\n"
            "print(sorted(m for m in sys.modules if m == 'timm' or m.startswith('timm.')))\n")
    import subprocess
    import sys as _sys

    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
