"""benchmarks/fuzz_robustness.py's Python API cases: bad arguments to the pipeline's call, its loaders and helpers,
the config, scheduler and VAE constructors, and bad requests to the demo."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from fuzz_cases import CLEAN_TYPES, Case, classify_exception


def api_cases(model: Path) -> Iterator[Case]:
    """Every Python API case on the pipeline folder ``model`` (the pipeline loaded once, when a case first needs
    it)."""
    from sphere_ar_hf import SphereARPipeline

    @functools.cache
    def pipe() -> SphereARPipeline:
        loaded = SphereARPipeline.from_pretrained(model)
        loaded.set_progress_bar_config(disable=True)
        return loaded

    yield from call_cases(pipe)
    yield from object_cases(model, pipe)
    yield from demo_cases(model)


def call_cases(pipe: Callable[[], object]) -> Iterator[Case]:
    """Bad arguments to the pipeline's ``__call__``."""
    def call(needle: str, **kwargs) -> Case:
        def run() -> str:
            args = {"class_labels": [1], "num_inference_steps": 1, "output_type": "latent", **kwargs}
            try:
                pipe()(**args)
                return "works"
            except Exception as e:  # noqa: BLE001
                return classify_exception(e, needle)

        return Case("Python API", f"pipe({kwargs})", run)

    for labels in ([], [-1], [10], ["nope"], [1.5], None, "zzz", [[1]], torch.tensor([[1]]), np.array([1.5]), {1: 2}):
        yield call("label", class_labels=labels)
    for g in (math.nan, math.inf, -math.inf, "abc", None, True, 1e39, [2.0], torch.tensor(2.0)):
        yield call("guidance", guidance_scale=g)
    for steps in (0, -1, 1.5, "1", None, True, 10**12):
        yield call("steps", num_inference_steps=steps)
    for schedule in ("bogus", None, 1):
        yield call("cfg_schedule", cfg_schedule=schedule)
    for output in ("bogus", None, 1, "PIL"):
        yield call("output_type", output_type=output)
    for gen in ("x", 1, [torch.Generator()] * 3, [None], [1], [torch.Generator(), "x"]):
        yield call("generator", generator=gen)
    for cb in ("x", 1, lambda p, i, t, k: None, lambda p, i, t, k: {"token": 1}, lambda p, i, t, k: {"token":
               torch.zeros(1)}):
        yield call("callback_on_step_end", callback_on_step_end=cb)
    for inputs in (["bogus"], "token", [1]):
        yield call("callback_on_step_end_tensor_inputs", callback_on_step_end_tensor_inputs=inputs)


def other(name: str, fn: Callable[[], object], needle: str, clean: tuple[type, ...] = CLEAN_TYPES) -> Case:
    """A case that calls ``fn`` and judges its exception."""
    def run() -> str:
        try:
            fn()
            return "works"
        except Exception as e:  # noqa: BLE001
            return classify_exception(e, needle, clean)

    return Case("Python API", name, run)


def object_cases(model: Path, pipe: Callable[[], object]) -> Iterator[Case]:
    """Bad arguments to the loaders, helpers, constructors and methods around the call."""
    from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereVAE

    for source in (None, 123, "/nonexistent", "./missing", "a/b/c", "", str(model / "model_index.json"), [model]):
        yield other(f"from_pretrained({source!r})", lambda s=source: SphereARPipeline.from_pretrained(s),
                    "pretrained_model_name_or_path")
    for dtype in ("abc", "int8", torch.int8, 3):
        yield other(f"from_pretrained(dtype={dtype!r})", lambda d=dtype: SphereARPipeline.from_pretrained(model,
                                                                                                         dtype=d),
                    "dtype")
    for batch, steps in ((-1, 10), (0, 10), (2, 0), (2.5, 10), ("a", 1), (2, -5)):
        yield other(f"sampling_bytes({batch!r}, {steps!r})",
                    lambda b=batch, s=steps: pipe().sampling_bytes(b, s, guided=True), "batch_size" if steps == 10
                    or steps == 1 else "num_inference_steps")
    for labels in ("nope", -1, 99, None):
        yield other(f"get_label_ids({labels!r})", lambda x=labels: pipe().get_label_ids(x), "label")
    for kwargs in ({"hidden_size": 0}, {"rope_theta": -1}, {"dtype": "abc"}, {"num_hidden_layers": 2.5},
                   {"guidance_scale": "x"}):
        key = next(iter(kwargs))
        yield other(f"SphereARConfig({kwargs})", lambda k=kwargs: SphereARConfig(**k), key)
    for kwargs in ({"sampler": "x"}, {"time_shift": 0}, {"num_inference_steps": 0}, {"last_step_size": 2}):
        key = next(iter(kwargs))
        yield other(f"SphereARScheduler({kwargs})", lambda k=kwargs: SphereARScheduler(**k), key)
    scheduler = SphereARScheduler()
    for t in (2.0, -1, math.nan, torch.tensor([0.1, 0.2, 0.3])):
        yield other(f"scale_noise(t={t!r})", lambda t=t: scheduler.scale_noise(torch.zeros(2, 4), t,
                                                                                torch.zeros(2, 4)), "timestep")
    for steps in (0, -1, 1.5, "3"):
        yield other(f"set_timesteps({steps!r})", lambda s=steps: SphereARScheduler().set_timesteps(s),
                    "num_inference_steps")
    for index in (-1, 10**6, "x"):
        yield other(f"set_begin_index({index!r})", lambda i=index: SphereARScheduler().set_begin_index(i),
                    "begin_index")
    yield other("step at a time not in timesteps", lambda: SphereARScheduler().step(
        torch.zeros(1, 4), 0.123, torch.zeros(1, 4)), "timestep")
    for kwargs in ({"posterior": "x"}, {"patch_size": 3}, {"cnn_channels": "abc"}, {"rope_theta": 0},
                   {"normalize_decoder_input": "no"}):
        key = next(iter(kwargs))
        yield other(f"SphereVAE({kwargs})", lambda k=kwargs: SphereVAE(**k), key)
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):  # the machine, not an argument:
        yield other(f"{method}() without an accelerator", lambda m=method: getattr(pipe(), m)(), method,
                    (RuntimeError,))  # diffusers' kind of error for it
    yield other("enable_torch_compile(mode='reduce-overhead')",
                lambda: pipe().enable_torch_compile(mode="reduce-overhead"), "cuda_graph")
    yield other("enable_torch_compile(options='max-autotune')",
                lambda: pipe().enable_torch_compile(options="max-autotune"), "options", (TypeError,))
    yield other("enable_torch_compile(cuda_graph='yes')", lambda: pipe().enable_torch_compile(cuda_graph="yes"),
                "cuda_graph", (TypeError,))


def demo_cases(model: Path) -> Iterator[Case]:
    """Requests to the demo as its API receives them: each bad value a one-line ``gr.Error`` naming the input."""
    import gradio as gr

    from sphere_ar_hf import SphereARPipeline
    from sphere_ar_hf.demo import DemoRunner

    holder: dict = {}
    good = {"classes": ["1"], "images_per_class": 1, "guidance_scale": 2.0, "cfg_schedule": "linear", "steps": 2,
            "seed": 0}
    bad = {"classes": [None, [], "1", [1.5], ["nope"], list(range(100))],
           "images_per_class": [0, -1, 1.5, "2", None, 10**6],
           "guidance_scale": [math.nan, "x", None, 1e9],
           "cfg_schedule": ["x", None, 3],
           "steps": [0, -1, 2.5, "3", None, 10**6],
           "seed": [-1, 1.5, "x", None, 2**70]}
    for name, values in bad.items():
        for value in values:
            def run(name=name, value=value) -> str:
                if "runner" not in holder:
                    holder["runner"] = DemoRunner(SphereARPipeline.from_pretrained(model))
                try:
                    holder["runner"].validate(**{**good, name: value})
                    return "works"
                except gr.Error as e:  # the demo's clean error (shown in the UI, no server traceback)
                    text = str(e.message if hasattr(e, "message") else e)
                    return "clean error" if name.split("_")[0] in text.lower() or name.replace("_", " ") in \
                        text.lower() else "one line, not naming it"
                except Exception as e:  # noqa: BLE001
                    return classify_exception(e, name)

            yield Case("Python API", f"demo request {name}={value!r}", run)
