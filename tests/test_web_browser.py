"""The web app in a real browser: `layout-retouch serve` on the toy world, driven in headless Chromium.

Chromium is Debian's (`apt-get install chromium`, which .ci/run does); Playwright drives it through
`executable_path` and never downloads a browser of its own. Without Chromium the test is skipped, saying so.
Set LAYOUT_RETOUCH_WEB_SCREENSHOT=path.png to keep the screenshot (docs/web_app.png is made this way).
"""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from layout_retouch.cli.demo import TOY_MODELS

# Debian's Chromium, or the browser named by LAYOUT_RETOUCH_CHROMIUM (a Chromium elsewhere).
CHROMIUM = os.environ.get("LAYOUT_RETOUCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    CHROMIUM = None
# What lets Chromium start as root on a machine without network: no sandbox, no GPU, no calls home.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
BAR_SECONDS = 60  # issue 16: one toy-world generation from the page (V, 20 steps, 1 image)

if CHROMIUM is None:
    pytest.skip("no Chromium installed (apt-get install chromium, or LAYOUT_RETOUCH_CHROMIUM=path)",
                allow_module_level=True)
pytest.importorskip("gradio", reason="the web extra is not installed: pip install -e '.[web]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`layout-retouch serve` with no model flag (the toy world), on a free local port."""
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(root / "serve.log", "w")  # noqa: SIM115 (closed below, after the server)
    command = [sys.executable, "-m", "layout_retouch.cli", "serve", "--port", str(port), "--threads", "1",
               "--out", str(root / "images"), "--inversion-cache-dir", str(root / "cache")]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{(root / 'serve.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not answer in 180 s:\n{(root / 'serve.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, root
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Debian's Chromium with a fresh profile."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def open_page(browser, url: str):
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#generate", timeout=60_000)
    return page


@pytest.fixture(scope="module")
def page(server, browser):
    return open_page(browser, server[0])


def status(page) -> str:
    return page.locator("#status").inner_text().strip()


# Every text the status line shows, in order (a run can start and end between two polls of the page).
WATCH_STATUS = """() => {
    window.statuses = [];
    const read = () => (document.querySelector('#status')?.innerText || '').trim();
    new MutationObserver(() => {
        const text = read();
        if (text !== window.statuses[window.statuses.length - 1]) window.statuses.push(text);
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def press(page, button: str, start: str, timeout_s: float = 180) -> str:
    """Click and wait for this press's outcome: a status starting with `start` after the page took the press."""
    page.evaluate(WATCH_STATUS)
    page.click(button)
    page.wait_for_function("s => { const i = window.statuses.findIndex(t => t.startsWith('Starting')); "
                           "return i >= 0 && window.statuses.slice(i).some(t => t.startsWith(s)); }", arg=start,
                           timeout=timeout_s * 1000)
    return next(t for t in reversed(page.evaluate("window.statuses")) if t.startswith(start))


def set_number(page, selector: str, value) -> None:
    box = page.locator(selector)
    box.fill(str(value))
    box.press("Tab")


def upload_reference(page, path: Path) -> None:
    clear_reference(page)
    page.locator("#reference input[type=file]").set_input_files(str(path))
    page.wait_for_function("n => [...document.querySelectorAll('#reference img')].some(i => i.src.includes(n))",
                           arg=path.name, timeout=30_000)


def clear_reference(page) -> None:
    remove = page.locator("#reference button[aria-label='Remove Image']")
    if remove.count():
        remove.click()


def gallery_sources(page) -> list[str]:
    return page.eval_on_selector_all("#gallery img", "images => images.map(i => i.src)")


def png_parameters(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        image = Image.open(io.BytesIO(answer.read()))
    return json.loads(image.text["parameters"])


def test_generate_in_the_browser(page, server, tmp_path):
    # A photo of the subject that is not one of the page's own: the toy world's, mirrored.
    photo = tmp_path / "my_star.png"
    ImageOps.mirror(Image.open(TOY_MODELS / "references" / "sks_star_03.png")).save(photo)
    upload_reference(page, photo)
    prompt = "a photo of a sks star on the beach"
    page.locator("#prompts textarea").fill(prompt)
    page.locator("#method").get_by_label("V: + adaptive mask (full method)").check()
    set_number(page, "#steps input[type=number]", 20)

    start = time.perf_counter()
    message = press(page, "#generate", "Done", timeout_s=BAR_SECONDS * 3)
    seconds = time.perf_counter() - start
    print(f"\ntoy world, method V, 20 steps, 1 image: {seconds:.1f} s from the click to the gallery ({message})")
    assert seconds < BAR_SECONDS
    sources = gallery_sources(page)
    assert len(sources) == 2 and any(s.endswith("_V_layout.png") for s in sources)
    final = next(s for s in sources if s.endswith("_V_final.png"))
    parameters = png_parameters(final)  # the PNG the page hands out carries its parameters
    assert (parameters["prompt"], parameters["seed"], parameters["reference"]) == (prompt, 42, photo.name)
    assert parameters["config"]["method"] == "V" and parameters["config"]["num_inference_steps"] == 20
    links = page.eval_on_selector_all("#downloads a[download]", "links => links.map(a => a.href)")
    assert sorted(Path(link).name for link in links) == ["seed42_0_V_final.png", "seed42_0_V_layout.png"]
    assert png_parameters(next(link for link in links if link.endswith("final.png"))) == parameters
    assert len(list((server[1] / "images").rglob("*_V_final.png"))) == 1

    # Compare rows with the masks: I, II and V side by side, then V's masks and the reconstruction.
    page.locator("#compare input[type=checkbox]").check()
    page.wait_for_function("() => document.querySelector('#method input').disabled")  # compare picks the rows
    page.locator("#show_masks input[type=checkbox]").check()
    set_number(page, "#steps input[type=number]", 10)
    press(page, "#generate", "Done")
    captions = page.locator("#gallery").inner_text()
    for word in ("I ·", "II: layout", "V ·", "mask m_ca", "mask final", "reference reconstruction"):
        assert word in captions
    assert len(gallery_sources(page)) == 3 + 4 + 1
    shot = tmp_path / "web_app.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("LAYOUT_RETOUCH_WEB_SCREENSHOT"):
        shutil.copy(shot, os.environ["LAYOUT_RETOUCH_WEB_SCREENSHOT"])
    print(f"screenshot: {shot}")
    assert Image.open(shot).size[0] >= 1000


def test_errors_show_as_one_message(page, tmp_path):
    page.locator("#compare input[type=checkbox]").uncheck()
    page.wait_for_function("() => !document.querySelector('#method input').disabled")
    page.locator("#prompts textarea").fill("a photo of a star in the snow")
    message = press(page, "#generate", "Error")
    assert "does not contain the personal token 'sks'" in message and "\n" not in message
    assert "error" in page.locator("#status").get_attribute("class").split()  # shown in the error's colour
    assert "Traceback" not in page.locator("body").inner_text()

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    upload_reference(page, broken)
    page.locator("#prompts textarea").fill("a photo of a sks star in the snow")
    message = press(page, "#generate", "Error")
    assert message.startswith("Error: reference image") and "cannot be read as an image" in message
    assert "Traceback" not in page.locator("body").inner_text()


def test_stop_ends_a_long_generation(page):
    clear_reference(page)
    page.locator("#method").get_by_label("I: plain personalized").check()  # needs no reference
    page.locator("#seeds input, #seeds textarea").first.fill("1, 2, 3, 4, 5, 6, 7, 8")
    set_number(page, "#steps input[type=number]", 100)
    start = time.perf_counter()
    page.evaluate(WATCH_STATUS)
    page.click("#generate")
    page.wait_for_function("() => /step \\d+\\/100 - /.test(document.body.innerText)", timeout=60_000)  # the bar
    page.click("#stop")
    page.wait_for_function("() => document.body.innerText.includes('Stopping after the current step')",
                           timeout=30_000)  # the page says at once that it took the press (a toast)
    page.wait_for_function("() => window.statuses.some(t => t.startsWith('Stopped'))", timeout=60_000)
    message = status(page)
    assert message.startswith("Stopped during run") and time.perf_counter() - start < 60
    page.locator("#seeds input, #seeds textarea").first.fill("42")
    set_number(page, "#steps input[type=number]", 5)
    assert press(page, "#generate", "Done").startswith("Done: 1 image(s)")  # the next run is not stopped


def test_one_generation_at_a_time_across_pages(page, server, browser):
    """A second page's press waits in the queue while the first page's generation runs, then runs."""
    other = open_page(browser, server[0])
    try:
        for p, steps in ((page, 100), (other, 5)):
            clear_reference(p)
            p.locator("#method").get_by_label("I: plain personalized").check()
            p.locator("#seeds input, #seeds textarea").first.fill("3")
            set_number(p, "#steps input[type=number]", steps)
            p.evaluate(WATCH_STATUS)
        page.click("#generate")
        page.wait_for_function("() => /step \\d+\\/100 - /.test(document.body.innerText)", timeout=60_000)
        other.click("#generate")
        other.wait_for_function("() => window.statuses.some(t => t.startsWith('Done'))", timeout=120_000)
        page.wait_for_function("() => window.statuses.some(t => t.startsWith('Done'))", timeout=120_000)
        second = [t for t in other.evaluate("window.statuses") if not t[:1].isdigit()]
        assert second[0].startswith("Waiting for the generation before it")  # the first was still running
        assert page.evaluate("window.statuses").count(status(page)) == 1 and status(page).startswith("Done")
    finally:
        other.close()
