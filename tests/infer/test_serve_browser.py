"""The web page end to end in headless Chromium: upload an image, wait for its caption, screenshot.

Drives Debian's /usr/bin/chromium with Playwright (the ``playwright`` package from PyPI, whose
browsers are NOT downloaded: ``executable_path`` points at the system Chromium). The service runs on
a real uvicorn server on 127.0.0.1 with the tiny model. Skips, saying why, when Chromium or
Playwright is missing (``bash scripts/install-system-deps.sh`` installs Chromium).

Set ``MEDCAP_SCREENSHOTS=DIR`` to keep the screenshots for a person to look at.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tests.fixtures import skip_missing

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags this machine's closed network needs (no background connections, no QUIC, no sandbox as root).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module", autouse=True)
def _chromium_installed() -> None:
    """Before the module's servers and browser start: skip without Chromium (fail in CI)."""
    if CHROMIUM is None:
        skip_missing("chromium is not installed (bash scripts/install-system-deps.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny():
    """The tiny model as ``medcap serve --model tiny`` loads it."""
    from medcap.infer.serve.loading import load_for_serving

    model, processor, _, prompt, info = load_for_serving(model="tiny", device="cpu")
    return model, processor, prompt, info


def _run_server(app):
    """Start ``app`` on a real uvicorn (127.0.0.1, a free port) in a thread; returns (url, stop)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 60 s")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server_url(tiny):
    """``medcap serve --model tiny`` on a real uvicorn in a background thread."""
    from medcap.config.generate import GenerateConfig
    from medcap.infer.serve.app import create_app

    model, processor, prompt, info = tiny
    app = create_app(
        model, processor, gen_defaults=GenerateConfig(max_new_tokens=12), prompt=prompt, info=info
    )
    url, stop = _run_server(app)
    yield url
    stop()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    try:
        from playwright import sync_api
    except ImportError:
        skip_missing("playwright is not installed (pip install -e .[test])")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 820},
        )
        page = context.new_page()
        yield page
        context.close()


def _screenshot_dir(tmp_path: Path) -> Path:
    keep = os.environ.get("MEDCAP_SCREENSHOTS")
    out = Path(keep) if keep else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def _phantom_png(path: Path) -> Path:
    """A radiograph-like grey image: dark field, a bright oval and a lesion, so a person can tell it."""
    im = Image.new("L", (256, 256), 12)
    d = ImageDraw.Draw(im)
    d.ellipse((40, 30, 216, 226), fill=110)
    d.ellipse((70, 60, 120, 190), fill=60)
    d.ellipse((136, 60, 186, 190), fill=60)
    d.ellipse((150, 100, 170, 120), fill=230)
    im.convert("RGB").save(path)
    return path


def _caption_via_api(url: str, data: bytes, name: str, fields: dict[str, str] | None = None) -> dict:
    import httpx

    r = httpx.post(f"{url}/v1/captions", files={"files": (name, data)}, data=fields or {}, timeout=60)
    r.raise_for_status()
    return r.json()["results"][0]


def test_upload_png_shows_image_and_caption(server_url, browser_page, tmp_path):
    page = browser_page
    shots = _screenshot_dir(tmp_path)
    image = _phantom_png(tmp_path / "chest.png")
    expected = _caption_via_api(server_url, image.read_bytes(), "chest.png")["caption"]

    page.goto(server_url + "/")
    page.wait_for_selector("#model-info:has-text('tiny')", timeout=30_000)
    # The server's defaults show as placeholders of the option fields.
    assert page.get_attribute("input[name=max_new_tokens]", "placeholder") == "12"
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector(".result[data-state=done]", timeout=60_000)
    caption = page.inner_text(".result .caption")
    assert caption == expected and caption.strip()
    assert page.inner_text(".result .filename") == "chest.png"
    # The browser drew the uploaded image itself (an object URL), at its real size.
    natural = page.eval_on_selector(".result img", "img => [img.naturalWidth, img.naturalHeight, img.src]")
    assert natural[:2] == [256, 256] and natural[2].startswith("blob:")
    assert "batch of" in page.inner_text(".result .meta")
    # A long caption wraps: the page never scrolls sideways.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(shots / "serve_png.png"), full_page=True)


def test_options_change_the_request(server_url, browser_page, tmp_path):
    page = browser_page
    image = _phantom_png(tmp_path / "chest.png")
    expected = _caption_via_api(
        server_url, image.read_bytes(), "chest.png", {"num_beams": "3", "max_new_tokens": "5"}
    )
    page.goto(server_url + "/")
    page.wait_for_selector("#model-info:has-text('tiny')", timeout=30_000)
    page.fill("input[name=num_beams]", "3")
    page.fill("input[name=max_new_tokens]", "5")
    page.set_input_files("#file-input", str(image))
    page.wait_for_selector(".result[data-state=done]", timeout=60_000)
    assert page.inner_text(".result .caption") == expected["caption"]


def test_dicom_shows_the_server_preview(server_url, browser_page, tmp_path):
    from pydicom.data import get_testdata_file

    page = browser_page
    shots = _screenshot_dir(tmp_path)
    dcm = tmp_path / "ct_small.dcm"
    dcm.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    expected = _caption_via_api(server_url, dcm.read_bytes(), "ct_small.dcm")["caption"]

    page.goto(server_url + "/")
    page.wait_for_selector("#model-info:has-text('tiny')", timeout=30_000)
    page.set_input_files("#file-input", str(dcm))
    page.wait_for_selector(".result[data-state=done]", timeout=60_000)
    assert page.inner_text(".result .caption") == expected
    # Browsers cannot draw DICOM: the page shows the PNG preview the API rendered, and it loaded.
    src, width, height = page.eval_on_selector(
        ".result img", "img => [img.src.slice(0, 22), img.naturalWidth, img.naturalHeight]"
    )
    assert src == "data:image/png;base64," and (width, height) == (128, 128)
    assert "DICOM 128" in page.inner_text(".result .meta")
    page.screenshot(path=str(shots / "serve_dicom.png"), full_page=True)
    # The screenshot really shows the CT slice: the image area holds a wide range of grey levels.
    box = page.locator(".result img").bounding_box()
    shot = Image.open(io.BytesIO(page.screenshot(clip=box))).convert("L")
    lo, hi = shot.getextrema()
    assert hi - lo > 100


def test_a_bad_file_shows_a_clear_error(server_url, browser_page, tmp_path):
    page = browser_page
    shots = _screenshot_dir(tmp_path)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    page.goto(server_url + "/")
    page.wait_for_selector("#model-info:has-text('tiny')", timeout=30_000)
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector(".result[data-state=failed]", timeout=30_000)
    assert "not a JPEG, PNG, TIFF, BMP, WebP or DICOM file" in page.inner_text("#error")
    page.screenshot(path=str(shots / "serve_error.png"), full_page=True)


def test_dropping_two_images_captions_both(server_url, browser_page, tmp_path):
    """Drag and drop: a real DataTransfer with two files, dropped on the drop zone."""
    import base64

    page = browser_page
    first = _phantom_png(tmp_path / "first.png").read_bytes()
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (30, 30, 30)).save(buf, format="JPEG")
    second = buf.getvalue()
    expected = [
        _caption_via_api(server_url, first, "first.png")["caption"],
        _caption_via_api(server_url, second, "second.jpg")["caption"],
    ]
    page.goto(server_url + "/")
    page.wait_for_selector("#model-info:has-text('tiny')", timeout=30_000)
    transfer = page.evaluate_handle(
        """([a, b]) => {
            const dt = new DataTransfer();
            const bytes = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
            dt.items.add(new File([bytes(a)], "first.png", {type: "image/png"}));
            dt.items.add(new File([bytes(b)], "second.jpg", {type: "image/jpeg"}));
            return dt;
        }""",
        [base64.b64encode(first).decode(), base64.b64encode(second).decode()],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    page.wait_for_function(
        "document.querySelectorAll('.result[data-state=done]').length === 2", timeout=60_000
    )
    assert page.locator(".result .filename").all_inner_texts() == ["first.png", "second.jpg"]
    assert page.locator(".result .caption").all_inner_texts() == expected
    assert page.inner_text("#status") == "2 of 2 captioned"


def test_token_protected_service_asks_for_the_token(tiny, browser_page, tmp_path):
    from medcap.config.generate import GenerateConfig
    from medcap.infer.serve.app import create_app

    model, processor, prompt, info = tiny
    app = create_app(
        model,
        processor,
        gen_defaults=GenerateConfig(max_new_tokens=6),
        prompt=prompt,
        info=info,
        token="open-sesame",
    )
    url, stop = _run_server(app)
    try:
        page = browser_page
        image = _phantom_png(tmp_path / "chest.png")
        page.goto(url + "/")
        page.wait_for_selector("#token-row:not([hidden])", timeout=30_000)
        assert "needs an access token" in page.inner_text("#model-info")
        page.fill("#token-input", "open-sesame")
        page.dispatch_event("#token-input", "change")
        page.wait_for_selector("#model-info:has-text('tiny')", timeout=30_000)
        page.set_input_files("#file-input", str(image))
        page.wait_for_selector(".result[data-state=done]", timeout=60_000)
        assert page.inner_text(".result .caption").strip()
    finally:
        page.evaluate("sessionStorage.clear()")
        stop()


def test_api_docs_render_offline(server_url, browser_page, tmp_path):
    """/docs renders Swagger UI with our operations on a machine with no internet."""
    page = browser_page
    page.goto(server_url + "/docs")
    page.wait_for_selector(".opblock-summary-path:has-text('/v1/captions')", timeout=30_000)
    assert page.locator(".opblock").count() >= 3
    page.screenshot(path=str(_screenshot_dir(tmp_path) / "docs.png"), full_page=True)
