"""The demo's request handler, without a server: every field of a request is validated before Gradio could round or
coerce it (one line that names the field), image k of seed S has its own generator from (S, k), so seeds S and S + 1
share no image, and the progress follows every token; then the class choices, the default (bundled digits) model, the
command line, the --compile flag and the Space's ``app.py``. The running server, its API and the real browser are
tested in test_demo.py, whose bounds (``MAX_IMAGES``, ``MAX_STEPS``) these tests share."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch

from conftest import free_port
from sphere_ar_hf import imagenet_id2label
from sphere_ar_hf.demo import (
    MAX_SEED,
    build_demo,
    class_choices,
    create_demo,
    load_default_pipeline,
    main,
    validate_request,
)
from sphere_ar_hf.seeding import image_seeds
from test_demo import MAX_IMAGES, MAX_STEPS

pytestmark = [
    pytest.mark.usefixtures("isolated"),  # loopback only, no telemetry, one thread (conftest)
    # pandas deprecations inside gradio's queue statistics, not ours
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module")
def runner(tiny_pipeline_dir):
    from sphere_ar_hf.cli_common import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir))
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
