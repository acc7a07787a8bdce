"""An estimate, not a measurement: GPU time to sample 50,000 images with SphereAR-B / L / H at 256 px.

    PYTHONPATH=src python benchmarks/estimate_eval_time.py                    # B, L, H; official settings
    PYTHONPATH=src python benchmarks/estimate_eval_time.py --presets SphereAR-B --utilization 0.2 0.4

No GPU was available where this project's numbers were taken, so the time per 50k samples is derived from counted
work: ``torch.utils.flop_counter.FlopCounterMode`` counts the matrix FLOPs of one pipeline call per image (random
weights of the preset's exact sizes, classifier-free guidance, the linear schedule) at 1 and at 2 sampler steps;
the count is linear in the head evaluations per token, so it extrapolates exactly to ``--steps`` (default 100, the
official Euler–Maruyama setting: 101 evaluations). Two bounds: compute, FLOPs x 50,000 / (utilization x
``--peak-tflops``), the peak being the bf16 matrix throughput seen on an H200 (about 790 TFLOP/s; the per-token
head multiplies matrices of 2 x batch rows, so utilization is well below 1: the range spans ``--utilization``);
and kernel launches, the torch calls of one batch (counted with a ``TorchFunctionMode``; they do not grow with the
batch) x batches x ``--seconds-per-call`` of host time each in eager mode. CUDA graphs / ``torch.compile`` of the
head's step loop (``pipe.enable_torch_compile()``) would cut the second.
The Inception features of the evaluation (ADM: 50,000 samples at 299 px) are counted the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, SphereVAE  # noqa: E402


class OpCounter(TorchFunctionMode):
    """Counts torch function calls: about one kernel launch each on a GPU (eager mode)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count(fn) -> tuple[int, int]:
    """(matrix FLOPs, torch calls) of ``fn()``."""
    with FlopCounterMode(display=False) as flops, OpCounter() as ops:
        fn()
    return flops.get_total_flops(), ops.calls


@torch.no_grad()
def work_per_image(preset: str, image_size: int, guidance: float, steps: int) -> tuple[float, float, float]:
    """(FLOPs per image, of which the head's, torch calls per batch) at ``steps``, extrapolated from 1 and 2 steps.
    The calls of a batch do not depend on its size: the same operations on larger tensors."""
    torch.manual_seed(0)
    tf = SphereARTransformer(SphereARConfig.from_preset(preset, image_size=image_size)).eval()
    pipe = SphereARPipeline(transformer=tf, vae=SphereVAE(image_size=image_size).eval(),
                            scheduler=SphereARScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(k: int) -> tuple[int, int]:
        return count(lambda: pipe([1], guidance_scale=guidance, num_inference_steps=k,
                                  generator=torch.Generator().manual_seed(0), output_type="pt"))

    (f1, c1), (f2, c2) = run(1), run(2)  # 2 and 3 head evaluations per token
    extra = len(SphereARScheduler(num_inference_steps=steps)) - 2
    head = (f2 - f1) * (extra + 2)
    return float(f1 + (f2 - f1) * extra), float(head), float(c1 + (c2 - c1) * extra)


def inception_flops() -> float:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return float("nan")
    import io

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    net = Unloaded("count", ["2048", "logits_unbiased"], feature_extractor_weights_path=buf)
    x = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    with torch.no_grad():
        return float(count(lambda: net(x))[0])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["SphereAR-B", "SphereAR-L", "SphereAR-H"])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--guidance-scale", type=float, default=4.5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--num-images", type=int, default=50_000)
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matrix TFLOP/s of the GPU (H200: ~790)")
    ap.add_argument("--utilization", type=float, nargs=2, default=[0.15, 0.45], metavar=("LOW", "HIGH"))
    ap.add_argument("--batch-size", type=int, default=256, help="images per batch and GPU (official: 256)")
    ap.add_argument("--seconds-per-call", type=float, default=10e-6,
                    help="host time per eager torch call / kernel launch")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lo, hi = args.utilization
    print(f"ESTIMATE (counted FLOPs, assumed utilization {lo:.0%}-{hi:.0%} of {args.peak_tflops:g} TFLOP/s): "
          f"{args.num_images} images at {args.image_size} px, {args.steps} steps, CFG {args.guidance_scale:g}\n")
    print("| model | TFLOP / image | head share | torch calls / batch | compute-bound h / 50k | launch-bound h / 50k |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for preset in args.presets:
        total, head, calls = work_per_image(preset, args.image_size, args.guidance_scale, args.steps)
        compute = [total * args.num_images / (u * args.peak_tflops * 1e12) / 3600 for u in (hi, lo)]
        launch = args.num_images / args.batch_size * calls * args.seconds_per_call / 3600
        print(f"| {preset} | {total / 1e12:.2f} | {100 * head / total:.0f}% | {calls / 1e6:.2f}M | "
              f"{compute[0]:.2f}-{compute[1]:.2f} | {launch:.2f} |", flush=True)
    print(f"\n(compute-bound: utilization {lo:.0%}-{hi:.0%}; launch-bound: batches of {args.batch_size}, "
          f"{1e6 * args.seconds_per_call:g} us per eager torch call; the time is about the larger of the two)")
    inc = inception_flops()
    if inc == inc:
        t = [inc * args.num_images / (u * args.peak_tflops * 1e12) for u in (hi, lo)]
        print(f"\nInception features (torch-fidelity, 299 px): {inc / 1e9:.1f} GFLOP / image, "
              f"{t[0]:.0f}-{t[1]:.0f} s per {args.num_images} images on one GPU")


if __name__ == "__main__":
    main()
