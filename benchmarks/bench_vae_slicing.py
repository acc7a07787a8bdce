"""The decoder's memory with and without ``vae.enable_slicing()``, on the CPU, against ``decode_bytes_per_image``.

Each case runs in its own process: the official-size S-VAE (random weights) at 256 px decodes one image (warm-up),
then a batch; the growth of the process's peak resident memory over the warm-up's peak is the batch's extra
activation memory. Float32, one thread::

    python benchmarks/bench_vae_slicing.py              # batches 1 and 8, plain and sliced
    python benchmarks/bench_vae_slicing.py --batch 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(batch: int, sliced: bool) -> dict:
    """Peak-memory growth (MiB) of decoding ``batch`` images after a one-image warm-up, in this process."""
    import torch

    from sphere_ar_hf import SphereVAE

    torch.set_num_threads(1)
    vae = SphereVAE(image_size=256).eval()
    if sliced:
        vae.enable_slicing()
    tokens = torch.randn(batch, vae.num_tokens, vae.config.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decode(tokens[:1])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        vae.decode(tokens)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"batch": batch, "sliced": sliced, "growth_mib": (after - before) / 1024,
            "estimate_mib_per_image": vae.decode_bytes_per_image() / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="the batch decoded after the one-image warm-up")
    parser.add_argument("--one", nargs=2, metavar=("BATCH", "SLICED"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1] == "1")))
        return
    print(f"{'batch':>5} {'slicing':>7} {'peak growth':>12} {'estimate':>9}")
    for batch, sliced in ((1, False), (args.batch, False), (args.batch, True)):
        out = subprocess.run([sys.executable, __file__, "--one", str(batch), str(int(sliced))], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        extra = (0 if sliced else batch - 1) * r["estimate_mib_per_image"]
        print(f"{batch:>5} {'on' if sliced else 'off':>7} {r['growth_mib']:>8.0f} MiB {extra:>5.0f} MiB")


if __name__ == "__main__":
    main()
