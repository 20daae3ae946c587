"""The explorer in a real browser: headless Chromium (Debian's chromium + chromedriver) driven by Selenium.

The app is served on 127.0.0.1 (a free port) with the tiny default backbone and a small shapes world; the test
uploads an image, enters two prompts, runs two explainers and checks the overlays are rendered, then checks that
each bad input shows its message and that boxes mode shows the ground truth and the per-item metrics. It writes
``docs/explorer.png`` (the README's screenshot) when ``MMEL_WRITE_SCREENSHOTS=1``. Runs in the default suite;
skipped only when Chromium, its driver, Selenium or Gradio are absent (``.ci/run`` installs them).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._browser import SKIP_NO_BROWSER, headless_chromium

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.program,
    # gradio 6.31's queue calls pandas options that pandas 3 deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
    SKIP_NO_BROWSER,
]
gr = pytest.importorskip("gradio", reason="needs the app extra: pip install -e '.[app]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the app extra)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

EXPLAINERS = ("grad_eclip", "game")
SAMPLE = 3  # a test image of the shapes world with three colours (the screenshot)
TIMEOUT = 180  # seconds for one request on a busy 2-core machine (the first one loads the tiny CLIP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmel.app.samples import ShapesSamples

    samples = ShapesSamples(tmp_path_factory.mktemp("shapes"), n_train=0, n_val=0, n_test=4)
    samples.ensure()
    return samples


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    from mmel.app.ui import build_app, serve

    tmp = tmp_path_factory.mktemp("app")
    demo = build_app(samples=world, logs=tmp / "logs", workdir=tmp / "work", max_side=512)
    port = _free_port()
    serve(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium(1500, 1400)
    yield driver
    driver.quit()


def _status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def _wait_status(driver, text: str, timeout: float = TIMEOUT) -> str:
    WebDriverWait(driver, timeout).until(lambda d: text in _status(d))
    return _status(driver)


def _upload(driver, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))


def _set_text(driver, elem_id: str, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    if text:
        box.send_keys(text)
    else:  # an explicit empty value: clear() alone does not always reach the app's state
        box.send_keys(" ", "\b")


def _click_label(driver, container: str, text: str) -> None:
    for label in driver.find_elements(By.CSS_SELECTOR, f"#{container} label"):
        if label.text.strip() == text:
            label.click()
            return
    raise AssertionError(f"no option {text!r} in #{container}")


def _run(driver) -> None:
    driver.find_element(By.CSS_SELECTOR, "#run").click()


def _rendered_gallery_images(driver) -> list:
    """Gallery <img> elements that have a source and were decoded (naturalWidth > 0)."""
    imgs = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
    return [i for i in imgs if i.get_attribute("src") and driver.execute_script("return arguments[0].naturalWidth", i)]


def _make_checkpoint(path: Path) -> Path:
    """An HSRM checkpoint of another backbone (the random micro CLIP), in train.py's format."""
    from mmel.backbone import load_clip
    from mmel.explainers import build_explainer

    torch.manual_seed(0)
    e = build_explainer("mmel", load_clip("mmel-micro"))
    config = {"backbone": "mmel-micro", "layers": e.layers, "scales": [1, 2, 4], "tau": 0.1}
    torch.save({"hsrm": e.hsrm.state_dict(), "config": config}, path)
    return path


def test_explorer_in_chromium(server, browser, world, tmp_path):
    d = browser
    d.get(server)
    WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#run"))

    # no image yet
    _run(d)
    _wait_status(d, "Image: none given")

    # a file that is not an image
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    _upload(d, junk)
    _wait_status(d, "'notes.txt' is not a readable image")

    # upload a real image, two prompts, two explainers -> 2 x 2 overlays rendered
    sample = world.sample("test", SAMPLE)
    img_path = tmp_path / "shapes.png"
    sample.image.save(img_path)
    _upload(d, img_path)
    _wait_status(d, "Loaded shapes.png")
    prompts = list(sample.boxes)[:2] if len(sample.boxes) > 1 else [*sample.boxes, "a photo of a green star."]
    _set_text(d, "prompts", "\n".join(prompts))
    for name in EXPLAINERS:
        if name != "grad_eclip":  # grad_eclip is ticked by default
            _click_label(d, "explainers", name)
    _run(d)
    status = _wait_status(d, "Explained shapes.png for 2 prompt(s) with 2 explainer(s)")
    assert "⚠️" not in status
    WebDriverWait(d, 60).until(lambda d: len(_rendered_gallery_images(d)) == 4)
    details = d.find_element(By.CSS_SELECTOR, "#details").text
    assert all(p in details for p in prompts) and "Token weights — grad_eclip" in details
    assert d.find_element(By.CSS_SELECTOR, "#download").is_enabled()

    # empty prompt list
    _set_text(d, "prompts", "")
    _run(d)
    _wait_status(d, "enter at least one prompt")

    # unknown checkpoint path, then a checkpoint of another backbone; the other explainers still run
    _set_text(d, "prompts", "\n".join(prompts))
    _set_text(d, "ckpts", str(tmp_path / "missing" / "hsrm.pt"))
    _run(d)
    status = _wait_status(d, "Checkpoint:")
    assert "not found" in status and "Explained" in status
    _set_text(d, "ckpts", str(_make_checkpoint(tmp_path / "hsrm.pt")))
    _run(d)
    status = _wait_status(d, "mmel-micro")
    assert "Checkpoint:" in status and "mmel-tiny" in status
    _set_text(d, "ckpts", "")

    # a huge image is downscaled (this server: longest side 512) with a note
    huge = tmp_path / "huge.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2400, 3), dtype=np.uint8)).save(huge)
    _upload(d, huge)
    _wait_status(d, "downscaled to 512×320")

    # boxes mode on a shapes-world sample: ground truth drawn, per-item metrics shown; the README's screenshot
    _set_text(d, "index", str(SAMPLE))
    d.find_element(By.CSS_SELECTOR, "#load-sample").click()
    _wait_status(d, f"Loaded test #{SAMPLE}")
    _click_label(d, "boxes", "Boxes mode: ground truth + per-item metrics")
    _run(d)
    _wait_status(d, f"Explained test #{SAMPLE}")
    n = len(sample.boxes) * len(EXPLAINERS)
    WebDriverWait(d, 60).until(lambda d: len(_rendered_gallery_images(d)) == n)
    WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#details #metrics"))
    rows = d.find_elements(By.CSS_SELECTOR, "#details #metrics tr")
    assert len(rows) == 1 + n and all(("hit" in r.text or "miss" in r.text) for r in rows[1:])
    # the whole page in one picture: grow the window to the page's height (headless shots are of the viewport)
    chrome = d.get_window_size()["height"] - d.execute_script("return window.innerHeight")
    d.set_window_size(1500, d.execute_script("return document.documentElement.scrollHeight") + chrome)
    d.execute_script("window.scrollTo(0, 0)")
    (ROOT / "docs").mkdir(exist_ok=True)
    # the README's screenshot is refreshed on request only (it shows timings: every run would dirty the tree)
    shot = ROOT / "docs" / "explorer.png" if os.environ.get("MMEL_WRITE_SCREENSHOTS") else tmp_path / "explorer.png"
    assert d.save_screenshot(str(shot))
