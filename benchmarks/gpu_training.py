"""Part 4 of ``bench_gpu.py``: the trainer's step of SphereAR-B at 256 px from cached latents, eager and
``torch.compile``d, at each ``--train-batch`` (median step time, images/s, first step, peak memory, losses; out of
memory is a result line). What each number is: benchmarks/README.md."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_report import attempt, log, sync

from sphere_ar_hf import SphereARConfig, SphereARTransformer

__all__ = ["training", "train_run"]


def cached_latents(config: SphereARConfig, batch: int, count: int, device: torch.device,
                   seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches as the latent cache yields them: tokens on the radius-sqrt(d) sphere, class labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.num_image_tokens, config.latent_dim)
    out = []
    for _ in range(count):
        x = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1) * config.latent_dim ** 0.5
        labels = torch.randint(0, config.num_classes, (batch,), generator=g)
        out.append((x.to(device), labels.to(device)))
    return out


class StepTimer:
    """Per-step times without synchronising inside the timed region: CUDA events on a GPU, the clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each step's time; call after the closing ``torch.cuda.synchronize``."""
        pairs = zip(self.marks, self.marks[1:])
        return [s.elapsed_time(e) / 1000 if self.cuda else e - s for s, e in pairs]


def train_run(a: argparse.Namespace, config: SphereARConfig, device: torch.device, batch: int,
              compiled: bool) -> dict:
    """The trainer's step (``draw_training_inputs`` outside the model, then ``model(latents=, class_labels=,
    **draws)``, as ``SphereARTrainer.compute_loss`` makes it, under bf16 autocast; backward, clipping at 1.0, AdamW
    with the official groups, the EMA update) on a fresh model: the first step, ``--train-warmup`` steps, then
    ``--train-steps`` timed steps."""
    from sphere_ar_hf.training.ema import ParameterEMA
    from sphere_ar_hf.training.optimization import official_param_groups

    torch.manual_seed(a.seed)
    model = SphereARTransformer(config).to(device).train()
    optimizer = torch.optim.AdamW(official_param_groups(model, 0.05), lr=3e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    ema = ParameterEMA(model, 0.9999)
    forward = torch.compile(model, backend=a.compile_backend) if compiled else model
    generator = torch.Generator(device=device).manual_seed(a.seed)  # as the trainer's: one per process, on device
    batches = cached_latents(model.config, batch, 4, device, a.seed)
    autocast = dict(device_type=device.type, dtype=getattr(torch, a.train_dtype), enabled=a.train_dtype != "float32")
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        latents, labels = batches[i % len(batches)]
        with torch.autocast(**autocast):  # the draws outside the model, as compute_loss makes them (one graph)
            draws = model.draw_training_inputs(latents, labels, generator)
            outputs = forward(latents=latents, class_labels=labels, **draws)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    step(0)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, 1 + a.train_warmup):
        step(i)
    timer = StepTimer(device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(1 + a.train_warmup, 1 + a.train_warmup + a.train_steps):
        timer.mark()
        step(i)
    timer.mark()
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(times=timer.seconds(), wall=wall, first=first, peak=peak, losses=torch.stack(losses).float().cpu())


def training(a: argparse.Namespace, config: SphereARConfig, device: torch.device) -> None:
    """Eager and ``torch.compile``d training steps at each ``--train-batch``; out of memory is a result line, any
    other failure a ``FAILED`` line (the next run goes on)."""
    from torch._dynamo.utils import counters

    fused = "fused" if device.type == "cuda" else "not fused"
    log(f"training {'tiny' if a.tiny else 'SphereAR-B'} at {config.image_size} px from cached latents "
        f"({config.num_image_tokens} tokens of {config.latent_dim} dims on the radius-{config.latent_dim ** 0.5:g} "
        f"sphere, random labels): {a.train_dtype} autocast, AdamW ({fused}, official groups, lr 3e-4), clipping "
        f"1.0, EMA 0.9999; {a.train_warmup} warm-up + {a.train_steps} timed steps")
    eager_losses: dict[int, torch.Tensor] = {}
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        for b in a.train_batch:
            torch.compiler.reset()  # each compiled run compiles its own static shapes, as a training run would
            graphs = counters["stats"]["unique_graphs"]
            with attempt(f"training {tag} batch {b}"):
                try:
                    r = train_run(a, config, device, b, compiled)
                except torch.cuda.OutOfMemoryError as e:
                    log(f"training {tag:8s} batch {b:3d}: out of memory ({str(e).splitlines()[0][:120]})")
                    continue
                r["graphs"] = counters["stats"]["unique_graphs"] - graphs
                log(training_line(a, tag, b, r, eager_losses.get(b)))
                eager_losses.setdefault(b, r["losses"])


def training_line(a: argparse.Namespace, tag: str, b: int, r: dict, eager: torch.Tensor | None) -> str:
    """One run's result line: step time, images/s, first step, peak memory, the losses."""
    median, losses = statistics.median(r["times"]), r["losses"]
    peak = "n/a" if r["peak"] != r["peak"] else f"{r['peak']:.2f} GiB"
    extra = ""
    if tag == "compiled":
        extra = f"; {r['graphs']} graphs compiled (graph breaks + 1)"
        if eager is not None:
            extra += f", max |loss - eager loss| over the steps {(losses - eager).abs().max():.2e}"
    return (f"training {tag:8s} batch {b:3d}: step {1000 * median:8.2f} ms (median of {len(r['times'])}; mean "
            f"{1000 * r['wall'] / a.train_steps:.2f}), {b / median:8.1f} images/s, first step {r['first']:6.1f} s, "
            f"peak GPU memory {peak}; loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {a.train_steps}: "
            f"{losses[-a.train_steps:].mean():.4f}, finite: {bool(losses.isfinite().all())}){extra}")


