"""Compare a converted official-format SphereAR checkpoint against what the official code computed.

Usage:
    python benchmarks/check_official_parity.py FIXTURE_DIR [--model CONVERTED_DIR]

``FIXTURE_DIR`` holds ``ar.pt`` and ``expected.safetensors`` as written by ``shared/tools/make_official_fixture.py``
(e.g. ``../shared/fixtures/official-tiny``). ``ar.pt`` is converted in memory (EMA weights, as the expected tensors
use); ``--model`` instead loads an already converted pipeline folder. Everything runs on CPU in float32.

Prints the max / mean absolute difference of every checked tensor and PASS or FAIL against the fixture's
tolerances: single forward passes (``vae_*``, ``decoded``, ``head_cond``, ``head_v``) max <= 1e-4; seeded samples,
compared as images in [0, 1], max <= 1e-2 and mean <= 1e-3. Exit status 0 when everything passes, 1 otherwise.

Seeded samples are compared too, also on the b256 fixture (full SphereAR-B at 256 px, 256 tokens, random weights),
where sampling is chaotic: a 1e-7 rounding difference in one token grows ~1.4x per token and saturates after ~35
tokens (the official code against itself, with SDPA instead of its naive attention in the KV-cache path, moves its
own ``sample_cfg`` by max 0.95 / mean 0.13). It passes because on the CPU the pipeline issues the official float32
products with the official shapes (see ``SphereARPipeline``): run it with the thread count the fixture was made
with (MKL splits few-row products across threads differently), e.g. torch's default on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

FORWARD_MAX = 1e-4
SAMPLE_MAX, SAMPLE_MEAN = 1e-2, 1e-3
# sample tag -> guidance schedule the official sampler used (see the fixture README)
SCHEDULES = {"cfg": "linear", "nocfg": "linear", "const": "constant"}


def _report(name: str, got: torch.Tensor, want: torch.Tensor, max_tol: float, mean_tol: float | None = None) -> bool:
    if got.shape != want.shape:
        print(f"{name:<16} shape {tuple(got.shape)} != expected {tuple(want.shape)}  FAIL")
        return False
    diff = (got.double() - want.double()).abs()
    mx, mean = diff.max().item(), diff.mean().item()
    ok = mx <= max_tol and (mean_tol is None or mean <= mean_tol)
    tol = f"max<={max_tol:g}" + (f", mean<={mean_tol:g}" if mean_tol is not None else "")
    print(f"{name:<16} max {mx:.3e}  mean {mean:.3e}  ({tol})  {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fixture", type=Path, help="folder with ar.pt and expected.safetensors")
    ap.add_argument("--model", type=Path, default=None, help="a converted pipeline folder to check instead of ar.pt")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from sphere_ar_hf import SphereARPipeline, convert_official_checkpoint

    for lib in (diffusers_logging, transformers_logging):  # no loading bars in the report
        lib.disable_progress_bar()

    t0 = time.perf_counter()
    if args.model is not None:
        pipe = SphereARPipeline.from_pretrained(args.model)
    else:
        pipe = convert_official_checkpoint(args.fixture / "ar.pt", use_ema=True)
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    vae, tf = pipe.vae.eval(), pipe.transformer.eval()
    exp = load_file(str(args.fixture / "expected.safetensors"))
    print(f"fixture {args.fixture}: {tf.config.image_size}px, width {tf.config.hidden_size}, "
          f"{tf.config.num_hidden_layers} layers (loaded in {time.perf_counter() - t0:.1f}s)")

    ok = True
    with torch.no_grad():
        dist = vae.encode(exp["images"]).latent_dist
        ok &= _report("vae_mu", dist.mu, exp["vae_mu"], FORWARD_MAX)
        ok &= _report("vae_kappa", dist.kappa, exp["vae_kappa"], FORWARD_MAX)
        ok &= _report("vae_kl", dist.kl(), exp["vae_kl"], FORWARD_MAX)
        ok &= _report("vae_entropy", dist.entropy(), exp["vae_entropy"], FORWARD_MAX)
        ok &= _report("decoded", vae.decode(exp["latents"]).sample, exp["decoded"], FORWARD_MAX)
        cond = tf.compute_head_condition(exp["latents"], exp["labels"])
        ok &= _report("head_cond", cond, exp["head_cond"], FORWARD_MAX)
        # the head alone, from the official condition (so that its error is not the trunk's)
        v = tf.head(exp["head_xt"], exp["head_t"], exp["head_cond"].reshape(-1, exp["head_cond"].shape[-1]))
        ok &= _report("head_v", v, exp["head_v"], FORWARD_MAX)

    tags = sorted(k[len("sample_"):-len("_meta")] for k in exp if k.startswith("sample_") and k.endswith("_meta"))
    for tag in tags:
        seed, cfg, steps = exp[f"sample_{tag}_meta"].tolist()
        labels = exp[f"sample_{tag}_labels"].tolist()
        schedule = SCHEDULES.get(tag, "linear")
        t1 = time.perf_counter()
        images = pipe(labels, guidance_scale=float(cfg), cfg_schedule=schedule, num_inference_steps=int(steps),
                      generator=torch.Generator().manual_seed(int(seed)), output_type="pt").images
        want = ((exp[f"sample_{tag}"] + 1) / 2).clamp(0, 1)
        print(f"sample_{tag}: seed {int(seed)}, cfg {cfg:g} ({schedule}), {int(steps)} steps, labels {labels} "
              f"({time.perf_counter() - t1:.1f}s)")
        ok &= _report(f"sample_{tag}", images, want, SAMPLE_MAX, SAMPLE_MEAN)

    print("ALL PASS" if ok else "SOME FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
