"""The verification report: versioned JSON, self-contained HTML, per-layer PNG; rendered in headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from amct_core.verify import REPORT_SCHEMA, REPORT_VERSION, verify
from tests import broken_models as bm

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _good(tmp_path):
    e = bm.export("cnn")
    return verify(deploy=e.deploy, fake_quant=e.fake_quant, torch_model=e.model, example_inputs=e.example,
                  report_dir=tmp_path)


def _bad(tmp_path):
    e = bm.export("cnn")
    bad = tmp_path / "bad_deploy_model.onnx"
    import onnx
    onnx.save(bm.corrupt_weight(bm.load(e.deploy), "dw", index=4), str(bad))
    fq = bm.perturb_fake_quant(bm.load(e.fake_quant), "pw.fakedequant.deq_scale", 1.1)  # pw is after dw
    return verify(deploy=bad, fake_quant=fq, torch_model=e.model, example_inputs=e.example, report_dir=tmp_path)


def test_json_report_is_versioned_and_machine_readable(tmp_path):
    report, paths = _good(tmp_path)
    data = json.loads(paths.json.read_text())
    assert data == report
    assert data["schema"] == REPORT_SCHEMA and data["version"] == REPORT_VERSION == 1
    assert data["verdict"] == "pass" and data["failures"] == []
    assert data["checks_run"] == ["preflight", "parity", "deploy_simulation"]
    assert set(data["tolerances"]) >= {"output_cosine_min", "layer_sqnr_min_db", "deploy_output_rtol"}
    layers = data["parity"]["layers"]
    assert [l["ok"] for l in layers] == [True] * 6
    # per-layer table sorted worst first
    local = [(l["local"] or l["figures"])["sqnr_db"] for l in layers]
    assert local == sorted(local)
    assert {"max_abs_error", "max_error_steps", "cosine", "sqnr_db", "argmax_agreement"} <= set(
        data["parity"]["outputs"][0]["figures"])


def test_failing_verdict_names_the_worst_layer_and_the_figure(tmp_path):
    report, paths = _bad(tmp_path)
    assert report["verdict"] == "fail"
    f = {x["check"]: x for x in report["failures"]}
    assert f["parity"]["layer"] == "pw" and "SQNR" in f["parity"]["figure"]
    assert f["deploy_simulation"]["layer"] == "dw" and f["deploy_simulation"]["figure"] == "int32_accumulator"
    assert "worst layer 'pw'" in report["summary"] and "'dw'" in report["summary"]
    html = paths.html.read_text()
    assert "worst layer &#x27;pw&#x27;" in html and 'class="verdict fail"' in html


class _FirstCells(HTMLParser):
    """The first cell of every row of the table that follows a heading starting with ``heading``."""

    def __init__(self, heading: str):
        super().__init__()
        self.heading, self.in_h3, self.active, self.in_td, self.cells, self.col = heading, False, False, False, [], 0
        self.title = ""

    def handle_starttag(self, tag, attrs):
        if tag == "h3":
            self.in_h3, self.title = True, ""
        elif tag == "tr":
            self.col = 0
        elif tag == "td":
            self.in_td = self.active and self.col == 0
            self.col += 1

    def handle_endtag(self, tag):
        if tag == "h3":
            self.in_h3 = False
            self.active = self.title.startswith(self.heading) and not self.cells
        elif tag == "table":
            self.active = False
        elif tag == "td":
            self.in_td = False

    def handle_data(self, data):
        if self.in_h3:
            self.title += data
        elif self.in_td:
            self.cells.append(data)


def test_headline_table_and_chart_list_the_parity_layers_in_one_order(tmp_path):
    from amct_core.verify.report import layer_chart_figure

    report, paths = _good(tmp_path)
    layers = report["parity"]["layers"]
    order = [l["name"] for l in layers]
    by_end_to_end = [l["name"] for l in sorted(layers, key=lambda l: l["figures"]["sqnr_db"])]
    assert order != by_end_to_end  # the model makes the two orders differ, so the test can tell them apart
    assert "local SQNR" in report["parity"]["layer_order"]
    assert f"worst layer {order[0]!r}: local SQNR" in report["summary"]
    table = _FirstCells("Per quantized layer (worst first: failing layers, then by local SQNR")
    table.feed(paths.html.read_text())
    assert table.cells == order
    fig = layer_chart_figure(report)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[::-1] == order  # worst at top
    assert "local SQNR" in fig.axes[0].get_title()


def test_the_chart_legend_covers_no_bar(tmp_path):
    from matplotlib.patches import Rectangle

    from amct_core.verify.report import layer_chart_figure

    report, _ = _good(tmp_path)
    fig = layer_chart_figure(report)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legends = fig.legends + [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert legends
    bars = [p.get_window_extent(r) for a in fig.axes for p in a.patches if isinstance(p, Rectangle)]
    assert len(bars) >= 3 * len(report["parity"]["layers"])
    for leg in legends:
        box = leg.get_window_extent(r)
        assert not [b for b in bars if box.overlaps(b)]


def test_a_passing_report_explains_its_end_to_end_max_error_in_steps(tmp_path):
    report, paths = _good(tmp_path)
    assert report["verdict"] == "pass"
    steps = [l["figures"]["max_error_steps"] for l in report["parity"]["layers"]]
    assert max(steps) > 100  # one flipped int8 input moves an output by its weight (up to 127 steps)
    html = paths.html.read_text()
    assert "end-to-end max error [steps] (not checked)" in html
    assert "about 127 steps is one flipped input element" in html
    assert "local max error &le; 4 steps" in html  # the figure the verdict uses, with its tolerance


def test_png_is_written_alongside_and_embedded(tmp_path):
    report, paths = _good(tmp_path)
    png = paths.png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    html = paths.html.read_text()
    import base64
    assert base64.b64encode(png).decode() in html
    assert oct(paths.html.stat().st_mode & 0o777) != oct(0o600)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.refs.append(v)


def test_html_is_self_contained(tmp_path):
    _, paths = _bad(tmp_path)
    p = _Refs()
    p.feed(paths.html.read_text())
    assert {"table", "img", "title"} <= p.tags
    assert p.refs and all(r.startswith("data:") for r in p.refs), p.refs
    assert "<script" not in paths.html.read_text()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium_without_errors(tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed but CI=true: .ci/run must `apt-get install -y chromium`")
        pytest.skip("chromium is not installed (apt-get install -y chromium); on CI (CI=true) this test must run")
    _, paths = _bad(tmp_path)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = paths.html.resolve().as_uri()
    r = subprocess.run([browser, *flags, "--window-size=1280,2000", f"--screenshot={shot}", url],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20000
    console = [l for l in r.stderr.splitlines() if "CONSOLE" in l or "Uncaught" in l or "Failed to load" in l]
    assert console == [], console
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0
    assert re.search(r'id="verdict"[^>]*>FAIL: ', dom.stdout) or 'class="verdict fail" id="verdict">FAIL' in dom.stdout
    assert dom.stdout.count("<tr") > 20


def test_a_check_that_cannot_run_fails_the_verdict_with_its_reason(tmp_path):
    e = bm.export("mlp")
    broken = bm.missing_dequant(bm.load(e.deploy), "fc2")
    report, paths = verify(deploy=broken, fake_quant=e.fake_quant, report_dir=tmp_path)
    assert report["verdict"] == "fail"
    checks = [f["check"] for f in report["failures"]]
    assert checks == ["preflight", "error"]
    assert "fc2" in report["failures"][1]["message"] and "deploy simulation could not run" in report["failures"][1]["message"]
    assert paths.html.exists() and paths.png is None  # no per-layer figures, still a readable page
