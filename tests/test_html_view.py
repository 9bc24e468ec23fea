"""``autoprobe inspect MODEL --html FILE``: one self-contained page, browsed in headless Chromium.

The browser test drives Debian's ``chromium`` through ``chromedriver`` (Selenium, from the test
extra); Debian's packages are ``chromium`` and ``chromium-driver``. Without them it is skipped, saying which is
missing.
"""

from __future__ import annotations

import re
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprobe.html_view import GroupRecord, NodeRecord, model_view, render_html
from conftest import Analysed, inspect_cli

Capsys = pytest.CaptureFixture[str]

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
# The flags the issue asks for: nothing may reach the network or need a display.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000")


def _page(analysed: Analysed, spec: str) -> str:
    analysis = analysed(spec)
    return render_html(model_view(analysis.selection, analysis.graph))


def test_view_holds_every_node_once_in_a_module_tree(analysed: Analysed) -> None:
    analysis = analysed("resnet50")
    view = model_view(analysis.selection, analysis.graph)

    def walk(items: tuple[GroupRecord | NodeRecord, ...], parent: str) -> list[NodeRecord]:
        found = []
        for item in items:
            if isinstance(item, GroupRecord):
                assert item.path.startswith(parent) and item.layers == len(walk(item.children, item.path + "."))
                found.extend(walk(item.children, item.path + "."))
            else:
                found.append(item)
        return found

    nodes = walk(view.groups, "")
    assert sorted(n.name for n in nodes) == sorted(i.name for i in analysis.graph)
    assert [n.order for n in nodes] == sorted(n.order for n in nodes)  # the tree reads in execution order
    stages = [g for g in view.groups if isinstance(g, GroupRecord)]
    assert [g.label for g in stages] == ["layer1", "layer2", "layer3", "layer4", "global_pool"]
    assert [b.path for b in stages[0].children if isinstance(b, GroupRecord)] == ["layer1.0", "layer1.1", "layer1.2"]
    assert [(p.point, p.name) for p in view.points] == list(enumerate(analysis.selection.names, 1))
    # The default conv head at K=1000 (H = min(C, 128)); head="linear" counts C*K + K.
    assert [p.adapter_params for p in view.points] == [69_288, 162_152, 194_920, 260_456]
    linear = model_view(analysis.selection, analysis.graph, head="linear")
    assert [p.adapter_params for p in linear.points] == [65_000, 257_000, 513_000, 1_025_000]
    assert stages[1].points == (3,) and stages[0].points == (2,)
    candidates = {s.node for s in analysis.selection.candidates}
    assert {n.name for n in nodes if n.candidate} == candidates


def test_page_is_self_contained_small_and_deterministic(analysed: Analysed) -> None:
    page = _page(analysed, "resnet50")
    assert len(page.encode("utf-8")) < 3_000_000
    assert page == _page(analysed, "resnet50")
    # Nothing is fetched: no URL, no external script, stylesheet, image or font.
    assert not re.search(r"https?://|<link|\bsrc=|@import|url\(", page)
    for name in analysed("resnet50").selection.names:
        assert f'class="point-link" data-node="{name}"' in page
        assert re.search(rf'<div class="node point" data-node="{re.escape(name)}"', page)


def test_cli_writes_the_page(capsys: Capsys, tmp_path: Path) -> None:
    path = tmp_path / "resnet18.html"
    code, out, _ = inspect_cli(capsys, "resnet18", "--html", str(path))
    assert code == 0 and f"HTML view written to {path}" in out
    assert 'data-node="layer1.1.act2"' in path.read_text(encoding="utf-8")


def test_cli_refuses_an_unwritable_page(capsys: Capsys, tmp_path: Path) -> None:
    code, _, err = inspect_cli(capsys, "resnet18", "--html", str(tmp_path / "missing" / "x.html"))
    assert code == 2 and "cannot write --html" in err and "Hint:" in err


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_in_headless_chromium(browser, analysed: Analysed, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    page = tmp_path / "resnet50.html"
    page.write_text(_page(analysed, "resnet50"), encoding="utf-8")
    browser.get(page.as_uri())
    names = list(analysed("resnet50").selection.names)

    # Every point is listed, numbered, at the top.
    listed = [a.get_attribute("data-node") for a in browser.find_elements(By.CSS_SELECTOR, "#points .point-link")]
    assert listed == names

    # Stages start collapsed; expanding one shows its blocks, and no layer of another stage.
    def block(path: str):  # noqa: ANN202
        return browser.find_element(By.CSS_SELECTOR, f'details[data-path="{path}"] > summary')

    assert not block("layer2.0").is_displayed()
    block("layer2").click()
    assert all(block(f"layer2.{i}").is_displayed() for i in range(4))
    assert not block("layer3.0").is_displayed()

    # Clicking a point's layer shows its record: shape, layout, depth, rules, reason, adapter size.
    block("layer2.3").click()
    browser.find_element(By.CSS_SELECTOR, '.node[data-node="layer2.3.act3"]').click()
    record = browser.find_element(By.ID, "record").text
    for fragment in ("layer2.3.act3", "chosen point P3", "2 x 512 x 28 x 28", "NCHW", "22", "downsampling",
                     "stage-boundary", "before downsampling 28x28 -> 14x14", "194,920 parameters"):
        assert fragment in record, record

    # A layer no rule flagged still says whether it can be chosen by hand, and its adapter's size.
    browser.find_element(By.CSS_SELECTOR, '.node[data-node="layer2.3.conv1"]').click()
    record = browser.find_element(By.ID, "record").text
    assert "not a candidate" in record and "yes: Analysis.choose takes it" in record
    assert "145,768 parameters" in record  # conv head: 128*128 + 128 + 2*128 + 128*1000 + 1000
    browser.find_element(By.CSS_SELECTOR, '.node[data-node="x"]').click()
    assert "no (the model's input)" in browser.find_element(By.ID, "record").text

    # The point list jumps to a layer in a collapsed stage and opens it.
    browser.find_element(By.CSS_SELECTOR, f'.point-link[data-node="{names[-1]}"]').click()
    assert browser.find_element(By.CSS_SELECTOR, f'.node[data-node="{names[-1]}"]').is_displayed()
    assert names[-1] in browser.find_element(By.ID, "record").text

    # The search box keeps the matching layers and opens their groups.
    browser.find_element(By.ID, "collapse").click()
    browser.find_element(By.ID, "search").send_keys("layer4.1.conv")
    shown = [e.get_attribute("data-node") for e in browser.find_elements(By.CSS_SELECTOR, "#tree .node") if e.is_displayed()]
    assert shown == ["layer4.1.conv1", "layer4.1.conv2", "layer4.1.conv3"]
    assert browser.find_element(By.ID, "count").text == "3 layers match"
    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys("layer4.1.conv1")
    assert browser.find_element(By.ID, "count").text == "1 layer matches"

    shot = tmp_path / "resnet50.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


LONG = "a_module_whose_name_is_far_too_long_for_the_record_panel_of_the_page_at_1400_pixels"


class _LongNames(nn.Module):
    """Module paths longer than the record panel is wide (SegFormer's are)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(LONG, nn.Sequential(OrderedDict([(f"{LONG}_conv", nn.Conv2d(3, 8, 3, stride=2, padding=1)),
                                                         (f"{LONG}_act", nn.ReLU())])))
        self.tail = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(getattr(self, LONG)(x))


def test_long_names_stay_inside_the_record_panel(browser, tmp_path: Path) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    from autoprobe.api import analyze

    analysis = analyze(_LongNames(), input_size=(3, 16, 16))
    page = tmp_path / "long.html"
    page.write_text(render_html(model_view(analysis.selection, analysis.graph)), encoding="utf-8")
    browser.get(page.as_uri())
    browser.find_element(By.ID, "expand").click()
    browser.find_element(By.CSS_SELECTOR, f'.node[data-node="{LONG}.{LONG}_act"]').click()
    panel = browser.find_element(By.ID, "record")
    assert f"{LONG}.{LONG}_act" in panel.text
    # Nothing in the panel is wider than the panel: long names wrap instead of running off it.
    width, inner = browser.execute_script(
        "var p = document.getElementById('record'); return [p.clientWidth, p.scrollWidth];")
    assert inner <= width, (inner, width)
