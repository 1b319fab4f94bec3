"""The page in a real browser (Debian's Chromium, headless, driven by Playwright): type a prompt, Generate,
watch progress move, see the image in the gallery, download it, drop it back to refill the form."""
import base64
import io
import os
from pathlib import Path

import PIL.Image
import pytest

from serving import PROMPT, start

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENSHOT = os.environ.get("CASCADE_SCREENSHOT")  # where to keep a picture of the page, if anywhere


@pytest.fixture(scope="module")
def page():
    server = start()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 820})
        page = context.new_page()
        page.goto(server.url)
        yield page
        browser.close()
    server.stop()


def drop(page, data: bytes, name: str):
    """Drop a file on the page as a user dragging it from the desktop would."""
    page.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        document.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true }));
        document.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
    }""", [base64.b64encode(data).decode(), name])


def test_generate_watch_download_and_drop_back(page, tmp_path):
    page.wait_for_function("document.getElementById('model').options.length > 0")
    assert page.input_value("#model") == "demo"
    assert page.eval_on_selector_all("#task option", "os => os.map(o => o.value)") == ["text2img", "img2img",
                                                                                       "inpaint"]
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "60")
    page.fill("#prior_steps", "2")
    page.click("#generate")
    # Progress moves: a step count between the first and the last, with an ETA.
    page.wait_for_function("""() => {
        const m = document.getElementById('status').textContent.match(/step (\\d+)\\/(\\d+) · ETA/);
        const value = document.getElementById('progress').value;
        return m && +m[1] > 2 && +m[1] < +m[2] && value > 0 && value < 1;
    }""", timeout=60000)
    assert page.is_enabled("#cancel")
    page.wait_for_selector(".card img", timeout=60000)
    page.wait_for_function("document.querySelector('.card img').naturalWidth === 64")
    seed = page.text_content("#seed-used").removeprefix("seed used: ")
    assert seed.isdigit() and page.is_enabled("#generate")
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)
    with page.expect_download() as info:
        page.click(".card a")
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    assert path.name == f"text2img-{seed}.png"
    made = PIL.Image.open(io.BytesIO(path.read_bytes()))
    recorded = (made.size, made.text["prompt"], made.text["seed"], made.text["steps"])
    assert recorded == ((64, 64), PROMPT, seed, "60")
    # Empty the form, then drop the downloaded PNG on the page: its recipe comes back.
    for field in ("#prompt", "#steps", "#prior_steps"):
        page.fill(field, "")
    page.check("#random")
    drop(page, path.read_bytes(), path.name)
    page.wait_for_function(f"document.getElementById('prompt').value === {PROMPT!r}")
    assert (page.input_value("#steps"), page.input_value("#prior_steps"), page.input_value("#seed")) == \
        ("60", "2", seed)
    assert not page.is_checked("#random") and page.input_value("#width") == "64"
    assert page.input_value("#scheduler") == "dpm++sde"  # the demo's default


def test_cancel_from_the_page(page):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "400")
    page.click("#generate")
    page.wait_for_function("/step [1-9]/.test(document.getElementById('status').textContent)", timeout=60000)
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('cancelled')",
                           timeout=30000)
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_inpainting_with_a_painted_mask(page, tmp_path):
    source = tmp_path / "source.png"
    PIL.Image.new("RGB", (64, 64), (0, 0, 255)).save(source)
    page.select_option("#task", "inpaint")
    assert page.is_visible("#image-file") and not page.is_visible("[data-setting=strength]")
    page.set_input_files("#image-file", str(source))
    page.wait_for_function("document.getElementById('mask-canvas').width === 64")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT.replace(".png", "-inpaint.png"), full_page=True)
    cards = page.locator(".card").count()
    page.fill("#prompt", "a red square on a blue background")
    page.fill("#steps", "2")
    page.fill("#prior_steps", "2")
    page.click("#generate")
    page.wait_for_function(f"document.querySelectorAll('.card').length === {cards + 1}", timeout=60000)
    with page.expect_download() as info:
        page.click(".card a")  # the newest card comes first
    made = PIL.Image.open(info.value.path())
    assert (made.text["task"], made.text["image"], made.text["mask"]) == ("inpaint", "(uploaded image)",
                                                                          "(uploaded mask)")
