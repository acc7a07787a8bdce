"""The Gradio demo (``sphere_ar_hf.demo`` and the Space's ``app.py``): a real browser picks classes
and generates, the named API endpoint returns images, requests beyond the server's bounds or of the wrong type
(checked before Gradio could round or coerce them) are refused with a one-line error naming the field, and image k
of seed S has its own generator from (S, k), so seeds S and S + 1 share no image.

One server (a tiny random pipeline folder passed with ``--model``, on 127.0.0.1 and a free port) serves the module;
the browser is Debian's Chromium driven by Playwright (no ``playwright install``). Nothing may reach beyond the
loopback interface: Python sockets are restricted for the module and the browser's requests are routed.

``SPHERE_AR_DEMO_MODEL=bundled`` (or a pipeline folder / Hub id) serves that model instead of the tiny one, and
``SPHERE_AR_UPDATE_SCREENSHOT=1`` copies the browser test's screenshot to ``docs/demo_screenshot.png``::

    SPHERE_AR_DEMO_MODEL=bundled SPHERE_AR_UPDATE_SCREENSHOT=1 python -m pytest tests/test_demo.py -k browser
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import math
import os
import shutil
import socket
import sys
import time
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import pytest
import torch

from conftest import build_tiny_pipeline, free_port, offline_browser  # noqa: E402
from sphere_ar_hf import imagenet_id2label  # noqa: E402
from sphere_ar_hf.demo import (  # noqa: E402
    API_NAME,
    MAX_SEED,
    build_demo,
    class_choices,
    create_demo,
    load_default_pipeline,
    main,
    short_label,
    validate_request,
)
from sphere_ar_hf.seeding import image_seeds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "demo_screenshot.png"
UPDATE_SCREENSHOT = os.environ.get("SPHERE_AR_UPDATE_SCREENSHOT") == "1"
DEMO_MODEL = os.environ.get("SPHERE_AR_DEMO_MODEL")  # None: the tiny random pipeline; "bundled": no --model
MAX_IMAGES, MAX_STEPS = 8, 8
TIMEOUT_S = 60  # any single wait: a page load, a generation, an API call

pytestmark = [  # pandas deprecations inside gradio's queue statistics, not ours
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


# ---- isolation: loopback only, no telemetry, one thread -------------------------------------------------------
def _is_loopback(host: object) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module", autouse=True)
def isolated(tmp_path_factory):
    """No telemetry or version checks, Gradio's files in a temporary folder, and Python sockets that refuse any
    address but the loopback (a phone-home attempt fails the module in ``test_nothing_left_loopback``)."""
    blocked: list[object] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            blocked.append(address)
            raise ConnectionRefusedError(f"test_demo: connection to {address!r} blocked (loopback only)")

    def connect(sock, address):
        guard(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        guard(sock, address)
        return real_connect_ex(sock, address)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a shared 2-core machine spin-wait badly
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                            "HF_HUB_OFFLINE": "1", "GRADIO_RUN_HISTORY": "False",
                            "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}.items():
            mp.setenv(name, value)
        mp.delenv("GRADIO_SERVER_NAME", raising=False)
        mp.delenv("GRADIO_SERVER_PORT", raising=False)
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        yield blocked
    torch.set_num_threads(threads)



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


# ---- the handler, without a server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from sphere_ar_hf.cli_common import load_pipeline

    pipe = load_pipeline(str(tiny_model_dir))
    return build_demo(pipe, max_images=MAX_IMAGES, max_steps=MAX_STEPS).runner


@pytest.mark.parametrize(("field", "value", "message"), [
    # the seed: an integer in [0, 2**64), nothing rounded or coerced
    ("seed", 1.5, "seed must be an integer, got 1.5"),
    ("seed", "abc", "seed must be an integer, got 'abc'"),
    ("seed", "3", "seed must be an integer, got '3'"),
    ("seed", math.nan, "seed must be an integer, got nan"),
    ("seed", math.inf, "seed must be an integer, got inf"),
    ("seed", -math.inf, "seed must be an integer, got -inf"),
    ("seed", True, "seed must be an integer, got True"),
    ("seed", False, "seed must be an integer, got False"),
    ("seed", None, "seed must be an integer, got None"),
    ("seed", [1], "seed must be an integer, got [1]"),
    ("seed", -1, "seed must be between 0 and 2**64 - 1, got -1"),
    ("seed", MAX_SEED + 1, f"seed must be between 0 and 2**64 - 1, got {2**64}"),
    ("seed", float(2**64), f"seed must be between 0 and 2**64 - 1, got {2**64}"),
    pytest.param("seed", 10**5000, "seed must be between 0 and 2**64 - 1, got an integer with more than 4300 digits",
                 id="seed-10**5000"),
    # steps: a positive integer within the server's bound
    ("steps", MAX_STEPS + 1, "steps must be between 1 and 8, got 9"),
    ("steps", 10**9, "steps must be between 1 and 8, got 1000000000"),
    ("steps", 0, "steps must be between 1 and 8, got 0"),
    ("steps", 2.5, "steps must be an integer, got 2.5"),
    ("steps", "4", "steps must be an integer, got '4'"),
    ("steps", "abc", "steps must be an integer, got 'abc'"),
    ("steps", math.nan, "steps must be an integer, got nan"),
    ("steps", True, "steps must be an integer, got True"),
    ("steps", None, "steps must be an integer, got None"),
    ("per_class", MAX_IMAGES + 1, "images per class must be between 1 and 8, got 9"),
    ("per_class", 1.5, "images per class must be an integer, got 1.5"),
    ("per_class", 5, "at most 8 images per request on this server, asked for 2 classes x 5 per class = 10"),
    # guidance: a finite number in [1, max_guidance]
    ("guidance", math.nan, "guidance scale must be a finite number between 1 and 10, got nan"),
    ("guidance", math.inf, "guidance scale must be a finite number between 1 and 10, got inf"),
    ("guidance", 10**400, "guidance scale must be a finite number between 1 and 10, got 1000000000000000000000"),
    ("guidance", 0.5, "guidance scale must be a finite number between 1 and 10, got 0.5"),
    ("guidance", 10.5, "guidance scale must be a finite number between 1 and 10, got 10.5"),
    ("guidance", "4", "guidance scale must be a number, got '4'"),
    ("guidance", "abc", "guidance scale must be a number, got 'abc'"),
    ("guidance", True, "guidance scale must be a number, got True"),
    ("guidance", None, "guidance scale must be a number, got None"),
    ("schedule", "cosine", "CFG schedule must be one of linear, constant, got 'cosine'"),
    ("schedule", ["linear"], "CFG schedule must be one of linear, constant, got ['linear']"),
    ("classes", None, "classes: pick at least one class"),
    ("classes", [str(i % 10) for i in range(MAX_IMAGES + 1)], "classes: at most 8 classes"),
    ("classes", ["x" * 10_000], "classes: class name too long"),
    ("classes", ["10"], "classes: labels[0]: class id 10 is out of range"),
    ("classes", [{"a": 1}], "classes: each class must be a name or an integer id, got {'a': 1}"),
    ("classes", ["3", 1.5], "classes: each class must be a name or an integer id, got 1.5"),
    ("classes", [True], "classes: each class must be a name or an integer id, got True"),
    ("classes", 3.5, "classes must be a list of class names or ids, got float"),
])
def test_handler_validates_every_field(runner, field, value, message):
    """``validate_request`` refuses each bad field with one line that names it (the start of the message)."""
    request = dict(classes=["3", "seven"], per_class=1, guidance=2.0, schedule="linear", steps=2, seed=0)
    request[field] = value
    with pytest.raises(gr.Error) as e:
        validate_request(runner.pipeline, request["classes"], request["per_class"], request["guidance"],
                         request["schedule"], request["steps"], request["seed"], max_images=MAX_IMAGES,
                         max_steps=MAX_STEPS, max_guidance=runner.max_guidance)
    assert e.value.message.startswith(message) and "\n" not in e.value.message
    assert len(e.value.message) < 200


def test_handler_accepts_what_the_ui_and_api_send(runner):
    assert runner.max_guidance == 10  # the messages above assume it
    labels, guidance, schedule, steps, seed = runner.validate(["3", "seven", 1], 2.0, 3, "constant", 4, 7.0)
    assert labels == [3, 3, 7, 7, 1, 1] and (guidance, schedule, steps, seed) == (3.0, "constant", 4, 7)
    assert type(steps) is int and type(seed) is int and type(guidance) is float
    assert runner.validate("three", 1, 1, "linear", 1, MAX_SEED)[0] == [3]
    assert MAX_SEED == 2**64 - 1 and runner.validate("3", 1.0, 10, "linear", 8.0, 0)[1:] == (10.0, "linear", 8, 0)
    assert runner.validate("3", np.int64(1), np.float32(2.5), "linear", np.int32(2), np.uint64(MAX_SEED))[1:] == (
        2.5, "linear", 2, MAX_SEED)


def _images(runner, seed: int, count: int = 4) -> list[np.ndarray]:
    gallery, info = runner.generate(["3"], count, 2.0, "linear", 1, seed, progress=_ProgressRecorder())
    assert [caption for _, caption in gallery] == [f"three · seed {seed}, image {k}" for k in range(count)]
    assert f"seed {seed} ·" in info
    return [np.asarray(image, dtype=np.float32) for image, _ in gallery]


def test_seeds_s_and_s_plus_1_share_no_image(runner):
    """Image k of seed S has its own generator, from a hash of (S, k): bumping the seed gives new images, not the
    old ones shifted by one (with ``seed + k`` image k + 1 of seed 0 would be image k of seed 1)."""
    first, second = _images(runner, 0), _images(runner, 1)
    for images in (first, second, first + second):  # no two images alike, within a request or across the two
        for i, a in enumerate(images):
            for b in images[i + 1:]:
                assert np.abs(a - b).mean() > 5  # not "equal up to float rounding" (at most 1 in a few pixels)
    again = _images(runner, 1, count=2)  # image k depends on (S, k) only, not on the request's size: same bits
    assert all(np.array_equal(a, b) for a, b in zip(again, second))


def test_generate_passes_one_generator_per_image_from_the_seeding_rule(runner, monkeypatch):
    pipe, seen = runner.pipeline, {}
    real_call = type(pipe).__call__

    def call(self, labels, **kwargs):
        seen["generator"] = kwargs["generator"]
        return real_call(self, labels, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    runner.generate(["3", "7"], 2, 2.0, "linear", 1, MAX_SEED, progress=_ProgressRecorder())
    generators = seen["generator"]
    assert isinstance(generators, list) and len(generators) == 8  # 4 images, padded to 8 (sphere_ar_hf.batching)
    # each generator's seed (initial_seed survives its draws) is the one image_seeds gives (S, k)
    expected = [torch.Generator().manual_seed(int(s)) for s in image_seeds(MAX_SEED, range(4))]
    assert [g.initial_seed() for g in generators[:4]] == [g.initial_seed() for g in expected]
    assert len({g.initial_seed() for g in generators[:4]}) == 4


class _ProgressRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, progress, desc=None, total=None, unit="steps"):
        self.calls.append((progress, desc))

    def tqdm(self, iterable, **kwargs):
        return iterable


def test_progress_follows_every_token(runner):
    pipe = runner.pipeline
    progress = _ProgressRecorder()
    gallery, info = runner.generate(["3"], 2, 2.0, "linear", 2, 0, progress=progress)
    tokens = pipe.transformer.config.num_image_tokens
    token_calls = [p for p, desc in progress.calls if desc == "Sampling tokens"]
    assert token_calls == [(k, tokens) for k in range(tokens + 1)]
    assert "progress_bar" not in vars(pipe)  # reported through the pipeline's callback, nothing patched
    assert len(gallery) == 2 and gallery[0][0].width == math.ceil(runner.display_size / 32) * 32
    assert "2 images of 32×32 px (shown ×8)" in info


# ---- choices, defaults, command line, app.py -----------------------------------------------------------------------
def test_class_choices_search_text_and_values():
    imagenet = SimpleNamespace(id2label=imagenet_id2label(), num_classes=1000)
    choices = dict((value, name) for name, value in class_choices(imagenet))
    assert len(choices) == 1000 and choices["207"] == "207: golden retriever"
    assert choices["0"] == "0: tench, Tinca tinca"  # every synonym is searchable
    digits = SimpleNamespace(id2label={i: str(i) for i in range(10)}, num_classes=10)
    assert class_choices(digits) == [(str(i), str(i)) for i in range(10)]
    assert class_choices(SimpleNamespace(id2label=None, num_classes=3)) == [("0", "0"), ("1", "1"), ("2", "2")]


def test_default_model_is_the_bundled_digits_model():
    """Without --model the demo serves the bundled digits model (offline)."""
    pipe = load_default_pipeline()
    demo = build_demo(pipe)
    try:
        runner = demo.runner
        names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
        assert [name for name, _ in class_choices(pipe)] == [f"{i}: {n}, {i}" for i, n in enumerate(names)]
        assert runner.recommended_guidance == pipe.transformer.config.guidance_scale
        gallery, info = runner.generate(["7"], 1, runner.recommended_guidance, "linear", 2, 0,
                                        progress=_ProgressRecorder())
        assert len(gallery) == 1 and gallery[0][1] == "seven · seed 0, image 0"
    finally:
        demo.close()


def test_command_line_errors_and_defaults(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no such folder" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["--port", "70000"])
    from sphere_ar_hf.demo import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model, args.max_images, args.max_steps) == ("127.0.0.1", 7860, None, 16, 200)


def test_compile_flag_serves_the_fast_sampler():
    """``--compile``: the same gallery as without it, to one uint8 level, with progress after every token."""
    import numpy as np

    galleries, progress = [], []
    for argv in ([], ["--compile"]):
        demo, _ = create_demo([*argv, "--port", str(free_port())])
        try:
            assert (demo.runner.pipeline._compiled_sampler is not None) == bool(argv)
            progress.append(_ProgressRecorder())
            gallery, _ = demo.runner.generate(["7", "3"], 1, 2.0, "linear", 4, 0, progress=progress[-1])
            galleries.append(np.stack([np.asarray(image, dtype=int) for image, _ in gallery]))
        finally:
            demo.close()
    assert np.abs(galleries[0] - galleries[1]).max() <= 1
    assert len(progress[1].calls) == len(progress[0].calls) > 0


def test_space_app_is_a_thin_wrapper(monkeypatch, tmp_path):
    """The ``app.py`` that ``sphere-ar space`` fills in from ``hub_cards/space/app.py`` (the whole Space, started
    with the package blocked: tests/test_space.py)."""
    from sphere_ar_hf.hub import build_space_folder

    app = build_space_folder(tmp_path / "space", model="someone/sphere-ar-b") / "app.py"
    spec = importlib.util.spec_from_file_location("space_app", app)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "space_app", module)
    monkeypatch.setattr(sys, "path", list(sys.path))  # app.py puts its folder first
    spec.loader.exec_module(module)  # runs nothing but imports: main() is behind __name__ == "__main__"
    assert module.main is main  # the package is imported already: its demo, not the Space's copy
    assert module.served_model() == "someone/sphere-ar-b"


def test_nothing_left_loopback(isolated):
    """Run last in the module: no Python socket tried to reach anything but 127.0.0.1."""
    assert isolated == []
