"""`sphere-ar space`: a complete Hugging Face Space folder that runs without the package being installable.

The folder built from the embedded digits model is started as a Space starts it (``python app.py`` in its folder)
with the installed ``sphere_ar_hf`` blocked from import (an import hook placed by a ``sitecustomize`` on
``PYTHONPATH`` refuses any ``sphere_ar_hf`` module from outside the Space folder and logs where each one came from)
and offline, then driven in headless Chromium (Debian's, via Playwright's ``executable_path``; never
``playwright install``): generate, and an image is served.
"""

from __future__ import annotations

import filecmp
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import sphere_ar_hf
from conftest import free_port, offline_browser
from sphere_ar_hf import hub
from sphere_ar_hf.cli import main
from sphere_ar_hf.pretrained import bundled_model_path

PACKAGE = Path(sphere_ar_hf.__file__).resolve().parent
START_TIMEOUT_S = 240  # importing torch, diffusers and gradio on a busy machine
TIMEOUT_S = 90  # any single wait in the browser
APP_NEEDS = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy", "pillow",
             "gradio")

# refuses every sphere_ar_hf module that does not come from $SPACE_DIR, and logs "name origin" of each one found
BLOCKER = textwrap.dedent('''
    import importlib.abc
    import os
    import sys

    SPACE = os.path.realpath(os.environ["SPHERE_AR_SPACE_DIR"])
    LOG = os.environ["SPHERE_AR_IMPORT_LOG"]


    class OnlyTheSpacesCopy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "sphere_ar_hf" and not name.startswith("sphere_ar_hf."):
                return None
            spec = None
            for finder in sys.meta_path:
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        break
            origin = os.path.realpath(spec.origin) if spec is not None and spec.origin else ""
            with open(LOG, "a", encoding="utf-8") as f:
                f.write(f"{name} {origin}\\n")
            if spec is not None and not origin.startswith(SPACE + os.sep):
                raise ImportError(f"blocked by test_space: {name} from {origin} (only the Space's copy may load)")
            return spec


    sys.meta_path.insert(0, OnlyTheSpacesCopy())
''')


# a stand-in for the `spaces` package of ZeroGPU hardware: logs whether torch was imported before it, the handlers
# it wraps (with their duration) and each call of one
FAKE_SPACES = textwrap.dedent('''
    import functools
    import os
    import sys

    LOG = os.environ["SPHERE_AR_SPACES_LOG"]


    def _log(line):
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(line + "\\n")


    _log(f"imported torch_before={'torch' in sys.modules}")


    def GPU(task, duration=None):
        _log(f"wrapped {task.__name__} duration={duration}")

        @functools.wraps(task)
        def on_gpu(*args, **kwargs):
            _log(f"called {task.__name__}")
            return task(*args, **kwargs)

        return on_gpu
''')


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def requirements(folder: Path) -> dict[str, str]:
    lines = [ln.strip() for ln in (folder / "requirements.txt").read_text().splitlines()]
    pins = [ln.split("==") for ln in lines if ln and not ln.startswith("#")]
    assert all(len(p) == 2 and p[1] for p in pins), pins  # every requirement pinned
    return dict(pins)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spaces") / "digits-space"
    assert main(["space", "--output", str(out)]) == 0
    return out


def test_space_folder_from_the_embedded_model(space, capsys):
    assert sorted(p.name for p in space.iterdir()) == ["README.md", "app.py", "model", "requirements.txt",
                                                       "sphere_ar_hf"]
    meta = front_matter(space / "README.md")
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    assert str(meta["sdk_version"]) == importlib.metadata.version("gradio")
    assert str(meta["python_version"]) == "{}.{}".format(*sys.version_info[:2])
    assert meta["title"] == "SphereAR" and meta["license"] == "mit" and "models" not in meta
    assert meta["emoji"] and meta["colorFrom"] and meta["colorTo"]
    pins = requirements(space)
    assert set(APP_NEEDS) <= set(pins) and not any("sphere" in name.lower() for name in pins)
    assert pins["torch"] == importlib.metadata.version("torch").split("+")[0]
    for name in ("README.md", "app.py", "requirements.txt"):  # the templates are all filled in
        text = (space / name).read_text()
        assert "{{" not in text and "{%" not in text and "{#" not in text
    assert 'MODEL = "model"' in (space / "app.py").read_text()
    # the package's module files, copied unchanged; the embedded model in model/
    copied = files_under(space / "sphere_ar_hf")
    assert {"__init__.py", "demo.py", "cli_common.py", "pipeline_sphere_ar.py", "remote_code.py",
            "data/imagenet_labels.json"} <= set(copied)
    assert not any(n.startswith(("training/", "evaluation/", "pretrained/")) for n in copied)
    assert not {"cli.py", "cli_sampling.py"} & set(copied)  # the demo needs none of the other commands
    assert all(filecmp.cmp(space / "sphere_ar_hf" / n, PACKAGE / n, shallow=False) for n in copied)
    model = bundled_model_path("digits")
    assert files_under(space / "model") == files_under(model)
    assert all(filecmp.cmp(space / "model" / n, model / n, shallow=False) for n in files_under(model))
    # an existing folder: only with --overwrite, and only a Space folder
    capsys.readouterr()
    assert main(["space", "--output", str(space)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["space", "--output", str(space), "--overwrite"]) == 0
    (space / "notes.txt").write_text("mine")
    try:
        assert main(["space", "--output", str(space), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "not a Space folder" in err and len(err.splitlines()) == 1
    finally:
        (space / "notes.txt").unlink()


def test_space_for_a_hub_repository(tmp_path, capsys):
    out = tmp_path / "space"
    assert main(["space", "--model", "someone/sphere-ar-b", "--output", str(out), "--title", "SphereAR-B: demo",
                 "--license", "apache-2.0"]) == 0
    assert "someone/sphere-ar-b" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py", "requirements.txt", "sphere_ar_hf"]
    meta = front_matter(out / "README.md")
    assert meta["models"] == ["someone/sphere-ar-b"] and meta["title"] == "SphereAR-B: demo"
    assert meta["license"] == "apache-2.0"
    assert 'MODEL = "someone/sphere-ar-b"' in (out / "app.py").read_text()
    assert "https://huggingface.co/someone/sphere-ar-b" in (out / "README.md").read_text()


def test_space_for_a_pipeline_folder(tmp_path, capsys):
    mine = tmp_path / "my-digits"
    shutil.copytree(bundled_model_path("digits"), mine)
    out = tmp_path / "space"
    assert main(["space", "--model", str(mine), "--output", str(out)]) == 2  # its weights' license: never guessed
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "license" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(["space", "--model", str(mine), "--output", str(out), "--license", "cc-by-4.0"]) == 0
    assert files_under(out / "model") == files_under(mine)
    readme = (out / "README.md").read_text()
    assert "`my-digits`" in readme and str(tmp_path) not in readme  # named, without the local path
    assert front_matter(out / "README.md")["license"] == "cc-by-4.0"
    assert main(["space", "--model", str(mine), "--output", str(mine / "space"), "--license", "mit"]) == 2
    assert "must not be (inside) the model folder" in capsys.readouterr().err
    for bad in (str(tmp_path / "missing"), str(tmp_path)):  # no such folder; not a pipeline folder
        assert main(["space", "--model", bad, "--output", str(tmp_path / "other")]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_zero_gpu_wraps_the_handler_with_the_real_spaces_package(monkeypatch, tiny_pipeline):
    """``on_zero_gpu`` calls the ``spaces`` package as it is published (off ZeroGPU hardware its ``GPU`` returns the
    handler unchanged); without ``spaces`` imported, the handler is left alone."""
    import spaces

    from sphere_ar_hf.demo import build_demo, build_parser, on_zero_gpu, zero_gpu_hardware

    def handler(x):
        return x

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert on_zero_gpu(handler, 45) is handler and not zero_gpu_hardware()
    monkeypatch.setattr(spaces.config.Config, "zero_gpu", True)
    assert zero_gpu_hardware()  # read from the package's own settings
    monkeypatch.delitem(sys.modules, "spaces")
    assert on_zero_gpu(handler) is handler and not zero_gpu_hardware()
    seen = []
    monkeypatch.setitem(sys.modules, "spaces", SimpleNamespace(GPU=lambda task, duration: seen.append(duration)
                                                                   or (lambda *a, **k: task(*a, **k))))
    assert on_zero_gpu(handler, 45)(3) == 3 and seen == [45]
    demo = build_demo(tiny_pipeline, gpu_duration=90)
    assert seen == [45, 90] and "spaces" in sys.modules and spaces.GPU
    demo.close()
    assert build_parser().parse_args([]).gpu_duration == 60
    monkeypatch.setenv("SPHERE_AR_GPU_DURATION", "120")  # a Space variable
    assert build_parser().parse_args([]).gpu_duration == 120


ZERO_GPU_STARTUP = textwrap.dedent('''
    import sys

    import app  # the Space's app.py: imports spaces (here in its ZeroGPU mode), then the demo
    from sphere_ar_hf.cli_common import CLIError
    from sphere_ar_hf.demo import create_demo, zero_gpu_hardware

    try:
        create_demo(["--model", app.served_model(), "--compile"])
    except CLIError as e:
        print("refused", e)
    print("zero_gpu_hardware", zero_gpu_hardware())
    demo, _ = create_demo(["--model", app.served_model(), "--steps", "2"])
    pipe, (event,) = demo.runner.pipeline, list(demo.fns.values()) if isinstance(demo.fns, dict) else demo.fns
    print("devices", pipe.device, next(pipe.vae.parameters()).device)
    print("zerogpu", hasattr(event.fn, "zerogpu"), event.fn.__wrapped__ == demo.runner.generate)
    demo, _ = create_demo(["--model", app.served_model(), "--steps", "2", "--device", "cuda:0"])
    print("named device", demo.runner.pipeline.device)  # made current would initialise CUDA: not for cuda:0
''')


def test_space_starts_as_on_zero_gpu_hardware(space, tmp_path):
    """The real ``spaces`` package in its ZeroGPU mode (``SPACES_ZERO_GPU=true``: it patches torch so that CUDA
    looks available and moves to it are deferred): the Space's start-up touches no real CUDA, the pipeline is on
    ``cuda`` as ZeroGPU reports it, the Generate handler is ZeroGPU's wrapper of the demo's handler, and
    ``--compile`` (unsupported there) is refused. (A request
    would need ZeroGPU's device service, which is not here.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "SPACES_", "ZEROGPU_"))}
    env.update(SPACES_ZERO_GPU="true", SPACES_ZERO_DEVICE_API_URL="http://127.0.0.1:9", HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", PYTHONPATH=str(space))
    done = subprocess.run([sys.executable, "-c", ZERO_GPU_STARTUP], cwd=space, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "devices cuda:0 cuda:0" in done.stdout and "zerogpu True True" in done.stdout, done.stdout
    assert "named device cuda:0" in done.stdout, done.stdout
    # torch.compile does not work on ZeroGPU: --compile is refused in one line, before the model loads
    assert "zero_gpu_hardware True" in done.stdout
    assert "refused --compile: ZeroGPU hardware does not support torch.compile" in done.stdout, done.stdout


def test_python_api_keeps_working(tmp_path):
    out = hub.build_space_folder(tmp_path / "space", license="mit", models=["someone/sphere-ar-digits"])
    assert front_matter(out / "README.md")["models"] == ["someone/sphere-ar-digits"]
    assert (out / "model" / "model_index.json").is_file()


# ---- the Space, started with the package blocked, in a browser -----------------------------------------------------

def _blocked_env(space: Path, hooks: Path, log: Path, port: int | None = None) -> dict[str, str]:
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(BLOCKER)
    (hooks / "spaces.py").write_text(FAKE_SPACES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "PYTHON"))}
    env.update({"PYTHONPATH": str(hooks), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "SPHERE_AR_SPACE_DIR": str(space), "SPHERE_AR_IMPORT_LOG": str(log), "HF_HUB_OFFLINE": "1",
                "SPHERE_AR_SPACES_LOG": str(hooks / "spaces.log"),
                "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_TEMP_DIR": str(hooks / "gradio"), "OMP_NUM_THREADS": "1"})
    if port is not None:
        env["GRADIO_SERVER_PORT"] = str(port)
    return env


def test_the_installed_package_is_blocked(space, tmp_path):
    """The control: with the hook, the installed package does not import from outside the Space folder."""
    log = tmp_path / "imports.log"
    env = _blocked_env(space, tmp_path / "hooks", log)
    done = subprocess.run([sys.executable, "-c", "import sphere_ar_hf"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "blocked by test_space" in done.stderr
    assert str(PACKAGE) in log.read_text()


def test_space_app_serves_images_with_the_package_blocked(space, tmp_path):
    """The Space as it starts on ZeroGPU hardware too (``spaces`` a stand-in that logs): ``spaces`` is imported
    before torch, the handler is wrapped with the default duration, and the request runs through the wrapper."""
    from PIL import Image

    port, log, output = free_port(), tmp_path / "imports.log", tmp_path / "app.log"
    env = _blocked_env(space, tmp_path / "hooks", log, port)
    origin = f"http://127.0.0.1:{port}"
    with open(output, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--steps", "2", "--max-steps", "4"], cwd=space, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{output.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(origin + "/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"app.py did not start:\n{output.read_text()[-3000:]}"
            time.sleep(1)
        # every sphere_ar_hf module came from the Space's own copy
        loaded = dict(line.split(" ", 1) for line in log.read_text().splitlines())
        assert {"sphere_ar_hf", "sphere_ar_hf.demo", "sphere_ar_hf.pipeline_sphere_ar"} <= set(loaded)
        assert loaded["sphere_ar_hf"] == str((space / "sphere_ar_hf" / "__init__.py").resolve())
        assert all(Path(o).is_relative_to(space.resolve() / "sphere_ar_hf") for o in loaded.values()), loaded

        with offline_browser(tmp_path / "profile", origin, TIMEOUT_S) as (context, page, outside):
            page.goto(origin + "/")
            page.click("#generate")  # the default selection: the ten digits, one image each
            page.locator("#info").get_by_text("10 images of").wait_for()
            page.wait_for_function(
                "n => { const im = [...document.querySelectorAll('#gallery img')];"
                " return im.length === n && im.every(e => e.complete && e.naturalWidth > 0); }", arg=10)
            first = page.locator("#gallery img").first
            assert first.get_attribute("alt").endswith("seed 0, image 0")
            response = context.request.get(first.get_attribute("src"))
            assert response.ok
            path = tmp_path / "first.png"
            path.write_bytes(response.body())
            with Image.open(path) as image:
                assert image.width >= 16 and image.width % 16 == 0
                lo, hi = image.convert("L").getextrema()
                assert hi > lo  # not a blank image
        assert outside == []  # the page loads nothing from beyond the Space's server
        spaces_log = (tmp_path / "hooks" / "spaces.log").read_text().splitlines()
        assert spaces_log == ["imported torch_before=False", "wrapped generate duration=60", "called generate"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
