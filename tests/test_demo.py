"""The Gradio demo (``sphere_ar_hf.demo``) on a running server: a real browser picks classes and generates, the named
API endpoint returns images, and requests beyond the server's bounds, of the wrong type, with non-finite numbers or
with missing inputs are refused with a one-line error naming the field. The handler without a server (validation,
seeds, progress), the command line and the Space's ``app.py`` are tested in test_demo_handler.py.

One server (a tiny random pipeline folder passed with ``--model``, on 127.0.0.1 and a free port) serves the module;
the browser is Debian's Chromium driven by Playwright (no ``playwright install``). Nothing may reach beyond the
loopback interface: Python sockets are restricted for the module (conftest's ``isolated``) and the browser's requests
are routed.

``SPHERE_AR_DEMO_MODEL=bundled`` (or a pipeline folder / Hub id) serves that model instead of the tiny one, and
``SPHERE_AR_UPDATE_SCREENSHOT=1`` copies the browser test's screenshot to ``docs/demo_screenshot.png``::

    SPHERE_AR_DEMO_MODEL=bundled SPHERE_AR_UPDATE_SCREENSHOT=1 python -m pytest tests/test_demo.py -k browser
"""

from __future__ import annotations

import json
import os
import shutil
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import build_tiny_pipeline, free_port, offline_browser  # noqa: E402
from sphere_ar_hf.demo import (  # noqa: E402
    API_NAME,
    class_choices,
    create_demo,
    short_label,
)

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "demo_screenshot.png"
UPDATE_SCREENSHOT = os.environ.get("SPHERE_AR_UPDATE_SCREENSHOT") == "1"
DEMO_MODEL = os.environ.get("SPHERE_AR_DEMO_MODEL")  # None: the tiny random pipeline; "bundled": no --model
MAX_IMAGES, MAX_STEPS = 8, 8
TIMEOUT_S = 60  # any single wait: a page load, a generation, an API call

pytestmark = [
    pytest.mark.usefixtures("isolated"),  # loopback only, no telemetry, one thread (conftest)
    # pandas deprecations inside gradio's queue statistics, not ours
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    build_tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """The demo, launched from its command line (``--model``), on 127.0.0.1; closed after the module."""
    if DEMO_MODEL is None:
        model = ["--model", str(tiny_model_dir), "--max-images", str(MAX_IMAGES), "--max-steps", str(MAX_STEPS)]
    else:
        model = [] if DEMO_MODEL == "bundled" else ["--model", DEMO_MODEL]
    for attempt in range(3):  # another process may take the free port between the probe and the bind
        demo, launch_kwargs = create_demo([*model, "--port", str(free_port())])
        assert launch_kwargs["server_name"] == "127.0.0.1"
        try:
            demo.launch(**launch_kwargs, prevent_thread_lock=True, quiet=True)
            break
        except OSError:
            demo.close()
            if attempt == 2:
                raise
    try:
        yield SimpleNamespace(demo=demo, url=demo.local_url, runner=demo.runner, pipe=demo.runner.pipeline)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    c = Client(server.url, verbose=False, analytics_enabled=False, download_files=False,
               httpx_kwargs={"timeout": TIMEOUT_S})
    try:
        yield c
    finally:
        c.close()


def _predict(client, classes, per_class=1, guidance=2.0, schedule="linear", steps=2, seed=0):
    job = client.submit(classes, per_class, guidance, schedule, steps, seed, api_name=f"/{API_NAME}")
    return job.result(timeout=TIMEOUT_S)


# ---- the real browser -----------------------------------------------------------------------------------------------
def test_browser_pick_classes_generate_and_show_images(server, tmp_path):
    from PIL import Image

    pipe, origin = server.pipe, server.url.rstrip("/")
    wanted = [3, 7]
    names = dict(class_choices(pipe))
    shown = {v: k for k, v in names.items()}  # value -> shown name
    with offline_browser(tmp_path / "profile", origin, TIMEOUT_S) as (context, page, outside):
        page.goto(origin + "/")
        classes = page.locator("#classes")
        classes.get_by_title("Clear").click()  # drop the default selection
        for class_id in wanted:  # search by name, pick the option
            page.click("#classes input")
            page.keyboard.type(short_label(pipe, class_id))
            page.get_by_role("option", name=shown[str(class_id)], exact=True).click()
        page.keyboard.press("Escape")
        assert classes.locator(".token").all_inner_texts() == [shown[str(c)] for c in wanted]
        per_class = page.locator("#per-class input[type=number]")
        per_class.fill("4")
        per_class.press("Enter")
        page.click("#generate")

        page.locator("#info").get_by_text("8 images of").wait_for()
        page.wait_for_function(  # every image of the gallery decoded, none broken
            "n => { const im = [...document.querySelectorAll('#gallery img')];"
            " return im.length === n && im.every(e => e.complete && e.naturalWidth > 0); }", arg=8)
        first = page.locator("#gallery img").first
        assert first.get_attribute("alt").startswith(short_label(pipe, 3))
        # each caption sits below its image, whole: it covers no pixel of it and is not cut off
        for k in range(8):
            image_box = page.locator("#gallery .thumbnail-lg img").nth(k).bounding_box()
            caption = page.locator("#gallery .thumbnail-lg .caption-label").nth(k)
            caption_box = caption.bounding_box()
            assert caption_box["y"] >= image_box["y"] + image_box["height"] - 1, (k, image_box, caption_box)
            assert image_box["width"] > 0 and abs(image_box["width"] - image_box["height"]) <= 1  # square
            assert caption.evaluate("e => e.scrollWidth <= e.clientWidth && e.scrollHeight <= e.clientHeight")
        response = context.request.get(first.get_attribute("src"))
        assert response.ok
        path = tmp_path / "first.png"
        path.write_bytes(response.body())
        with Image.open(path) as image:
            size = pipe.transformer.config.image_size
            assert image.width >= size and image.width % size == 0 and image.getbbox() is not None
            lo, hi = image.convert("L").getextrema()
            assert hi > lo  # not a blank image
        shot = tmp_path / "demo_screenshot.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
    assert outside == []  # the page loads nothing from beyond the server (fonts, scripts, telemetry)
    if UPDATE_SCREENSHOT:
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


# ---- the API ------------------------------------------------------------------------------------------------------
def test_api_generate_returns_images(server, client):
    import httpx
    from PIL import Image

    pipe = server.pipe
    assert f"/{API_NAME}" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    gallery, info = _predict(client, ["3", short_label(pipe, 7)], per_class=2, steps=2, seed=5)
    assert [item["caption"] for item in gallery] == [
        f"{short_label(pipe, c)} · seed 5, image {k}" for k, c in enumerate((3, 3, 7, 7))]
    assert "4 images" in info and "2 steps" in info and "seed 5 ·" in info
    response = httpx.get(gallery[0]["image"]["url"], timeout=TIMEOUT_S)
    assert response.status_code == 200
    with Image.open(BytesIO(response.content)) as image:
        assert image.format == "PNG" and image.width >= pipe.transformer.config.image_size
        lo, hi = image.convert("L").getextrema()
        assert hi > lo

    # the same seed and settings give the same image in another request, bit for bit (each image has its own
    # generator, and each request is one call padded to a multiple of 8 images: sphere_ar_hf.batching)
    again, _ = _predict(client, ["3"], per_class=1, steps=2, seed=5)
    with Image.open(BytesIO(httpx.get(again[0]["image"]["url"], timeout=TIMEOUT_S).content)) as a, \
            Image.open(BytesIO(response.content)) as b:
        assert a.tobytes() == b.tobytes()


def test_api_refuses_requests_beyond_the_bounds(server, client):
    from gradio_client.exceptions import AppError

    runner = server.runner
    too_many = runner.max_images // 2 + 1
    bad = {
        "images": dict(classes=["3", "7"], per_class=too_many),  # each is allowed, the product is not
        "classes": dict(classes=[str(i % 10) for i in range(runner.max_images + 1)]),
        "steps": dict(classes=["3"], steps=runner.max_steps + 1),
        "zero steps": dict(classes=["3"], steps=0),
        "guidance": dict(classes=["3"], guidance=runner.max_guidance + 1),
        "schedule": dict(classes=["3"], schedule="cosine"),
        "seed": dict(classes=["3"], seed=-1),
        "no class": dict(classes=[]),
        "unknown class": dict(classes=["no such class"]),
    }
    start = time.perf_counter()
    for kwargs in bad.values():
        with pytest.raises(AppError):
            _predict(client, **kwargs)
    assert time.perf_counter() - start < TIMEOUT_S  # refused before any work
    with pytest.raises(AppError, match=f"at most {runner.max_images} images"):
        _predict(client, **bad["images"])


# the raw values an API call sends, each with the whole one-line message it must get back (not Gradio's generic
# "upstream app raised an exception", and never a silently rounded seed: Gradio's preprocessing is skipped)
BAD_API_VALUES = [
    ("seed", 1.5, "seed must be an integer, got 1.5"),
    ("seed", "abc", "seed must be an integer, got 'abc'"),
    ("seed", True, "seed must be an integer, got True"),
    ("seed", -1, "seed must be between 0 and 2**64 - 1, got -1"),
    ("seed", 2**64, f"seed must be between 0 and 2**64 - 1, got {2**64}"),
    ("steps", "abc", "steps must be an integer, got 'abc'"),
    ("steps", 1.5, "steps must be an integer, got 1.5"),
    ("steps", None, "steps must be an integer, got None"),
    ("guidance", "abc", "guidance scale must be a number, got 'abc'"),
    ("guidance", False, "guidance scale must be a number, got False"),
    ("per_class", "2", "images per class must be an integer, got '2'"),
    ("schedule", 3, "CFG schedule must be one of linear, constant, got 3"),
]


def test_api_refuses_wrong_types_with_the_fields_message(client):
    from gradio_client.exceptions import AppError

    for field, value, message in BAD_API_VALUES:
        request: dict[str, Any] = dict(classes=["3"], steps=1, seed=0)
        request[field] = value
        with pytest.raises(AppError) as e:
            _predict(client, **request)
        assert str(e.value) == message, field
    gallery, info = _predict(client, ["3"], steps=1, seed=3.0)  # an integral float is that integer
    assert gallery[0]["caption"].endswith("seed 3, image 0") and "1 image of" in info


@pytest.mark.parametrize(("field", "literal", "message"), [
    ("seed", "NaN", "seed must be an integer, got nan"),
    ("seed", "Infinity", "seed must be an integer, got inf"),
    ("seed", "1e400", "seed must be an integer, got inf"),
    ("steps", "NaN", "steps must be an integer, got nan"),
    ("guidance", "NaN", "guidance scale must be a finite number between 1 and"),
    ("guidance", "-Infinity", "guidance scale must be a finite number between 1 and"),
])
def test_http_api_refuses_non_finite_numbers(server, field, literal, message):
    """NaN and the infinities cannot be sent by gradio_client (strict JSON), but a raw HTTP call can send them."""
    import httpx

    values = dict(classes='["3"]', per_class="1", guidance="2.0", schedule='"linear"', steps="1", seed="0")
    values[field] = literal
    body = '{"data": [' + ", ".join(values.values()) + "]}"
    url = f"{server.url.rstrip('/')}/gradio_api/call/{API_NAME}"
    posted = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    assert posted.status_code == 200, posted.text
    events = httpx.get(f"{url}/{posted.json()['event_id']}", timeout=TIMEOUT_S).text.splitlines()
    assert "event: error" in events
    error = json.loads(events[events.index("event: error") + 1].removeprefix("data: "))["error"]
    assert error.startswith(message) and "\n" not in error


@pytest.mark.parametrize("count", [0, 3, 5])
def test_http_api_refuses_a_request_with_missing_inputs(server, count, capfd):
    """gradio's own count check answered ``{"error": null}`` and logged a traceback; now one line naming the inputs."""
    import httpx

    values = ['["3"]', "1", "2.0", '"linear"', "1", "0"][:count]
    url = f"{server.url.rstrip('/')}/gradio_api/call/{API_NAME}"
    posted = httpx.post(url, content='{"data": [' + ", ".join(values) + "]}",
                        headers={"content-type": "application/json"}, timeout=TIMEOUT_S)
    assert posted.status_code == 200, posted.text
    events = httpx.get(f"{url}/{posted.json()['event_id']}", timeout=TIMEOUT_S).text.splitlines()
    error = json.loads(events[events.index("event: error") + 1].removeprefix("data: "))["error"]
    assert error == (f"the request holds {count} of the 6 inputs; send all of them, in this order: Classes, Images "
                     "per class, Guidance scale, CFG schedule, Steps per token, Seed")
    assert "Traceback" not in capfd.readouterr().err


def test_nothing_left_loopback(isolated):
    """Run last in the module: no Python socket tried to reach anything but 127.0.0.1."""
    assert isolated == []
