"""The page (GET /) in a real headless Chromium: the form, a live x̂0 preview while it denoises, the result with
its parameters, the history, and the guidance × seed sweep, the same images and sheet `sdcli generate` makes;
behind the server's credentials (the browser's login prompt, here given the API key as the password)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import requests
from conftest import pixels
from serve.browser import Browser, find_chromium
from serve.fixtures import KEY, PASSWORD, USER

STEP_SECONDS = 0.2
FORM = {"prompt": "a red circle", "negative": "blue", "guidance": "5", "steps": "4", "seed": "7", "width": "32",
        "height": "32", "sampler": "Euler", "sweep-guidance": "1, 5", "sweep-seeds": "7, 8"}


@pytest.fixture(scope="module")
def page_url(tiny_models):
    pytest.importorskip("fastapi", reason="sdcli serve needs the serve extra: pip install 'sdcli[serve]'")
    from sdcli.serve.app import running
    from sdcli.serve.config import ServeConfig

    config = ServeConfig(models=[tiny_models["sd1"]], port=0, users={USER: PASSWORD}, api_key=KEY,
                         max_pixels=64 * 64, max_steps=10, max_batch=4, threads=1)
    with running(config, log=lambda line: None) as (url, server):
        # The tiny model takes milliseconds a step, less than one of the page's 200 ms polls of /progress:
        # slowed to a real model's pace, its denoising has a preview to show.
        on_step = server.worker.on_step

        def slowly(*args):
            time.sleep(STEP_SECONDS)
            on_step(*args)

        server.worker.on_step = slowly
        yield url


@pytest.fixture
def browser(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium to test the page in: apt-get install chromium (.ci/run does, as root)")
    browser = Browser(binary, str(tmp_path / "profile"), login=("anyone", KEY))
    yield browser
    browser.close()


def _history(browser):
    return browser.evaluate("[...document.querySelectorAll('#history li')].map(li => "
                            "({src: li.querySelector('img').src, label: li.textContent}))")


def _rgb(data_url) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"),
                      dtype=np.int16)


def test_the_page_generates_with_a_live_preview_and_sweeps(page_url, browser, tiny_models, cli, tmp_path):
    browser.open(page_url + "/")
    browser.wait_for("document.querySelectorAll('#sampler option').length > 1")  # /samplers' list, behind the login
    browser.evaluate(f"for (const [id, value] of Object.entries({json.dumps(FORM)})) "
                     "{ $(id).value = value; $(id).dispatchEvent(new Event('input')); }")
    assert browser.evaluate("$('guidance-value').textContent") == "5"

    # 1. Generate: while it denoises, x̂0 so far with its step and σ; then the result with its parameters.
    browser.evaluate("$('generate').click()")
    caption = browser.wait_for("!$('live').hidden && $('preview').src.startsWith('data:image/png') "
                               "&& $('preview-at').textContent")
    assert re.fullmatch(r"x̂0 at step [1-4]/4, σ \d+(\.\d+)?", caption)
    browser.wait_for("$('history').children.length === 1 && !$('generate').disabled")
    assert browser.evaluate("$('live').hidden") is True
    parameters = browser.evaluate("$('result-parameters').textContent")
    assert "Steps: 4, Sampler: Euler" in parameters and "CFG scale: 5" in parameters and "Seed: 7," in parameters
    frames = browser.evaluate("[...document.querySelectorAll('#frames figcaption')].map(c => c.textContent)")
    assert frames and all(re.fullmatch(r"x̂0 at step [1-4]/4, σ .+", f) for f in frames)

    # 2. Another seed, then the sweep: each a new entry on top of this session's history.
    browser.evaluate("$('seed').value = '8'; $('generate').click()")
    browser.wait_for("$('history').children.length === 2 && !$('generate').disabled")
    browser.evaluate("$('sweep').click()")
    browser.wait_for("$('history').children.length === 3 && !$('generate').disabled")
    history = _history(browser)
    assert [h["label"] for h in history] == ["sweep", "seed 8, g 5", "seed 7, g 5"]
    assert "guidance 1, 5 × seeds 7, 8: 4 images" in browser.evaluate("$('result-parameters').textContent")

    # 3. The same images, and the same contact sheet, as `sdcli generate` with these settings.
    result = cli("generate", "--threads", "1", "a red circle", "-n", "blue", "--model", tiny_models["sd1"], "-g", "1,5",
                 "--seed", "7,8", "--steps", "4", "-W", "32", "-H", "32", "--scheduler", "euler", "--json",
                 "--out", tmp_path / "cli")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    image = {(r["guidance"], r["seed"]): r["path"] for r in records if "seed" in r}
    (sheet,) = [r["path"] for r in records if r.get("kind") == "contact_sheet"]
    assert np.array_equal(_rgb(history[0]["src"]), pixels(sheet))
    assert np.array_equal(_rgb(history[1]["src"]), pixels(image[(5.0, 8)]))
    assert np.array_equal(_rgb(history[2]["src"]), pixels(image[(5.0, 7)]))

    # 4. An entry of the history shows its image and parameters again.
    browser.evaluate("document.querySelectorAll('#history li')[2].click()")
    assert browser.evaluate("$('result-image').src") == history[2]["src"]
    assert "Seed: 7," in browser.evaluate("$('result-parameters').textContent")


def test_the_page_is_one_file_that_needs_nothing_from_elsewhere(page_url):
    refused = requests.get(page_url + "/", timeout=10)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
    for login in [(USER, PASSWORD), ("anyone", KEY)]:
        page = requests.get(page_url + "/", auth=login, timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<script>" in html and "<style>" in html
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|@import|url\(|://", html)  # offline: nothing fetched elsewhere


SWEEP = dict(prompt="a red circle", steps=1, width=32, height=32)


@pytest.mark.parametrize("fields, detail", [
    (dict(cfg_scales=[]), "cfg_scales and seeds: a sweep needs at least one of each"),
    (dict(cfg_scales=[1, 3, 7.5], seeds=[1, 2]), "cfg_scales x seeds 6: over this server's limit of 4 images"),
    (dict(cfg_scales=[1, "lots"]), "cfg_scales.1: Input should be a valid number"),
])
def test_a_sweep_it_cannot_make_gets_one_line(page_url, fields, detail):
    answer = requests.post(page_url + "/sdcli/sweep", json=SWEEP | fields, auth=(USER, PASSWORD), timeout=10)
    assert answer.status_code in (400, 422) and answer.json()["detail"].startswith(detail)
