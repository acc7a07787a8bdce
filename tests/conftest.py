"""Shared fixtures: the official-format tiny fixture (converted once per session) and tiny random models."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sphere_ar_hf
from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, SphereVAE

FIXTURE_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-tiny"

TINY_AR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64, head_num_layers=2,
               head_num_adaln=1, image_size=32, patch_size=16, num_classes=10, num_class_tokens=4)
TINY_VAE = dict(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
                decoder_layers=1)
VAE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_vae.py"
# a tiny S-VAE for the training script (CPU, fp32, no workers)
VAE_SCRIPT_ARGS = [
    "--latent_dim", "16", "--patch_size", "16", "--z_channels", "64", "--cnn_channels", "32", "32", "32", "32", "64",
    "--encoder_layers", "1", "--decoder_layers", "1", "--disc_channels", "16", "--resolution", "32", "--num_classes",
    "4", "--mixed_precision", "no", "--dataloader_num_workers", "0", "--lpips_random_backbone", "--report_to",
    "tensorboard"]
TINY_ID2LABEL = {0: "zero, nil", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                 8: "eight", 9: "nine"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for torchrun and the demo servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_env(*drop: str, **extra: str) -> dict[str, str]:
    """The environment for a script or ``torchrun`` launched by a test: this one without the variables of a
    distributed launch (and ``drop``), offline, one thread (``extra`` overrides or adds)."""
    env = {k: v for k, v in os.environ.items() if k not in (*DISTRIBUTED_VARIABLES, *drop)}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def torchrun_command(*args: str | Path, processes: int = 2) -> list[str]:
    """``torchrun --nproc_per_node processes`` on 127.0.0.1 and a free port, then ``args`` (a script and its
    arguments, or ``-m module ...``)."""
    return [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(processes), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (a running count: ``torch._dynamo.reset()`` keeps it)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@torch.no_grad()
def randomize_zero_params(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every all-zero parameter (the head's zero-initialised adaLN / output layers, biases) random values.

    A freshly initialised SphereAR head outputs exactly zero velocity, which would make the class, the guidance
    and the trunk invisible in the outputs; tests that need them to matter call this first.
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.numel() and bool((p == 0).all()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def sphere_tokens(batch: int, tokens: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Random latent tokens on the radius-sqrt(dim) sphere."""
    x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=-1) * dim**0.5


@pytest.fixture(scope="module")
def one_thread():
    """One torch (OpenMP) and BLAS thread for a module: tiny models run faster on one, two spin-wait badly on a
    busy shared 2-core machine (10x+ slower), and subprocesses started with one thread compute the same numerics.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency (test extra)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    assert (FIXTURE_DIR / "expected.safetensors").is_file(), f"missing shared fixture {FIXTURE_DIR}"
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def expected(fixture_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir / "expected.safetensors"))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """The tiny pipeline saved to a folder; tests must not modify it (copy it first)."""
    out = tmp_path_factory.mktemp("tiny-pipeline") / "tiny"
    build_tiny_pipeline().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, fixture_dir: Path) -> Path:
    """A pipeline folder written by `sphere-ar convert` from the tiny official fixture ('model' weights, so that a
    conversion with the default 'ema' weights is told apart)."""
    from sphere_ar_hf.cli import main

    out = tmp_path_factory.mktemp("earlier") / "pipe"
    with contextlib.redirect_stdout(None):
        assert main(["convert", "--checkpoint", str(fixture_dir / "ar.pt"), "--output", str(out), "--no-ema"]) == 0
    return out


@pytest.fixture(scope="session")
def converted_pipeline(fixture_dir: Path) -> SphereARPipeline:
    pipe = sphere_ar_hf.convert_official_checkpoint(fixture_dir / "ar.pt")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def make_transformer():
    """``make_transformer(seed=0, **overrides)``: a tiny random SphereARTransformer (float32, eval mode)."""

    def make(seed: int = 0, randomize: bool = True, **overrides) -> SphereARTransformer:
        torch.manual_seed(seed)
        model = SphereARTransformer(SphereARConfig(**{**TINY_AR, **overrides}))
        if randomize:
            randomize_zero_params(model, seed)
        return model.eval()

    return make


@pytest.fixture
def make_vae():
    """``make_vae(seed=0, **overrides)``: a tiny random SphereVAE (float32, eval mode)."""

    def make(seed: int = 0, **overrides) -> SphereVAE:
        torch.manual_seed(seed)
        return SphereVAE(**{**TINY_VAE, **overrides}).eval()

    return make


def build_tiny_pipeline(seed: int = 0) -> SphereARPipeline:
    torch.manual_seed(seed)
    transformer = randomize_zero_params(SphereARTransformer(SphereARConfig(**TINY_AR)), seed).eval()
    vae = SphereVAE(**TINY_VAE).eval()
    pipe = SphereARPipeline(transformer=transformer, vae=vae, scheduler=SphereARScheduler(num_inference_steps=4),
                            id2label=dict(TINY_ID2LABEL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def make_pipeline():
    """``make_pipeline(seed=0)``: a fresh tiny random pipeline that the test may modify."""
    return build_tiny_pipeline


@pytest.fixture
def make_tokens():
    """``make_tokens(batch, tokens, dim=16, seed=0)``: random tokens on the radius-sqrt(dim) sphere."""
    return sphere_tokens


@pytest.fixture(scope="session")
def tiny_id2label() -> dict[int, str]:
    return dict(TINY_ID2LABEL)


@pytest.fixture(scope="session")
def tiny_pipeline() -> SphereARPipeline:
    """A tiny random pipeline (4 tokens of 16 dims, 32 px, 10 classes); tests must not modify it."""
    return build_tiny_pipeline()


# ---- the browser tests: Debian's Chromium driven by Playwright (never `playwright install`) ------------------------
CHROMIUM = os.environ.get("SPHERE_AR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def require_browser() -> None:
    """Skip the calling test when there is no Chromium at ``CHROMIUM``, with the command that installs it; fail
    instead when ``SPHERE_AR_REQUIRE_BROWSER=1`` (``.ci/run`` sets it, so CI never skips a browser test)."""
    if os.access(CHROMIUM, os.X_OK):
        return
    reason = (f"no Chromium at {CHROMIUM}: install Debian's with `apt-get install -y chromium fonts-liberation` (or "
              "point SPHERE_AR_CHROMIUM at one)")
    if os.environ.get("SPHERE_AR_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + "; SPHERE_AR_REQUIRE_BROWSER=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def offline_browser(profile: Path, origin: str, timeout_s: float) -> Iterator[tuple[Any, Any, list[str]]]:
    """``(context, page, outside)``: a headless Chromium page that may load only from ``origin`` (and data / blob
    URLs); every other request is aborted and recorded in ``outside``."""
    import playwright.sync_api as sync_api

    require_browser()
    outside: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith((origin + "/", "data:", "blob:")) or r.request.url == origin:
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 860}, timeout=timeout_s * 1000)
        try:
            context.set_default_timeout(timeout_s * 1000)
            context.route("**/*", route)
            yield context, context.new_page(), outside
        finally:
            context.close()


def safetensors_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder``, keyed ``file/name``."""
    return {f"{f.name}/{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory) -> Path:
    """64 synthetic light 36px images (a linear gradient and a disc, 4 classes) saved with ``save_to_disk``."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    size = 36
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    images, labels = [], []
    for i in range(64):
        c0, c1, c2 = rng.uniform(140, 255, (3, 3))
        angle = rng.uniform(0, 2 * np.pi)
        t = ((np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2)[..., None]
        img = c0 * t + c1 * (1 - t)
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = c2
        images.append(Image.fromarray(img.astype(np.uint8)))
        labels.append(i % 4)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    path = tmp_path_factory.mktemp("data") / "images"
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(path))
    return path


# ---- the AR trainer's tests (test_train_sphere_ar*.py) -------------------------------------------------------------
TRAIN_AR_CLASS_NAMES = ["red", "green", "blue", "grey"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny S-VAE folder, a 16-image 4-class dataset (save_to_disk) and a tiny transformer config file."""
    import datasets
    from PIL import Image

    root = tmp_path_factory.mktemp("train_ar_assets")
    torch.manual_seed(0)
    SphereVAE(**TINY_VAE).save_pretrained(str(root / "vae"))
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(16):
        c = i % 4
        a = np.full((40, 44, 3), 40, np.uint8)
        a[..., c % 3] = 200
        a[: 8 * (c + 1)] = 90
        images.append(Image.fromarray(np.clip(a + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)))
        labels.append(c)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=TRAIN_AR_CLASS_NAMES)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(root / "data"))
    SphereARConfig(**{**TINY_AR, "num_classes": 4}).to_json_file(str(root / "config.json"))
    return {"root": root, "vae": root / "vae", "data": root / "data", "config": root / "config.json"}


# ---- the demo's tests (test_demo*.py): loopback only, no telemetry, one thread ---------------------------------
def _is_loopback(host: object) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    """No telemetry or version checks, Gradio's files in a temporary folder, and Python sockets that refuse any
    address but the loopback (a phone-home attempt fails; test_demo.py checks in ``test_nothing_left_loopback``
    that none was tried). The demo's modules opt in with ``pytest.mark.usefixtures("isolated")``, first."""
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


# ---- the LoRA tests (test_lora*.py) --------------------------------------------------------------------------------
@pytest.fixture
def adapter_dir(make_pipeline, tmp_path) -> Path:
    """An adapter with random (non-zero) LoRA matrices and class rows 1 and 10 (the null class), saved."""
    from sphere_ar_hf.lora import add_lora, build_lora_config, save_lora

    pipe = make_pipeline()
    peft_model = add_lora(pipe.transformer, build_lora_config(rank=4, alpha=8, lora_head=True, class_rows=[1, 10]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    out = save_lora(peft_model, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    return out


# ---- the sampler's tests (test_fast_sampling.py, test_gpu_benchmark.py) ---------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
