"""The paper report is one self-contained HTML file that a real browser renders: every figure resolves, the console
stays clean, and the page is not blank."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from experiments.report import Provenance, Section, environment, write_report
from experiments.tables import Cell, Column, Table
from tests._browser import SKIP_NO_BROWSER, headless_chromium


def _figure(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


def _report(tmp_path):
    table = Table("Localisation", ["Grad-ECLIP", "MMEL <ours>"], [Column("PG")], [[Cell(0.6)], [Cell(0.8, std=0.01)]])
    figs = [(_figure(tmp_path / f"f{i}.png", i), f"figure {i}") for i in range(2)]
    sections = [Section("Table 1", "one seed & one world", [table], figs)]
    prov = [Provenance("mmel", "python train.py seed=0", "abc123")]
    return write_report(tmp_path / "out" / "report.html", "mmel paper tables", sections, prov)


def test_report_is_self_contained_and_escaped(tmp_path):
    path = _report(tmp_path)
    html = path.read_text()
    assert html.count("data:image/png;base64,") == 2 and "src='f0.png'" not in html  # embedded, not linked
    assert "MMEL &lt;ours&gt;" in html and "one seed &amp; one world" in html
    assert "<b>0.800 ± 0.010</b>" in html and "python train.py seed=0" in html
    assert "http://" not in html and "https://" not in html and "<script" not in html  # offline, nothing to run
    env = environment()
    assert env["torch"] != "not installed" and env["git commit"]


@SKIP_NO_BROWSER
def test_report_renders_in_chromium(tmp_path):
    path = _report(tmp_path)
    driver = headless_chromium(1200, 900, console=True)
    try:
        driver.get(path.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 2 and all(c and w == 90 and h == 60 for c, w, h in images), images
        assert driver.find_element("css selector", "h1").text == "mmel paper tables"
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=float)
    finally:
        driver.quit()
    assert shot.std() > 10, "the screenshot is blank"
    assert (shot < 100).mean() > 0.005  # text and tables are drawn, not just a white page
