"""The names of the choices the library accepts, in a module that imports nothing: the command line lists them in
its ``--help`` without importing torch, diffusers or transformers, and the library modules take them from here."""

from __future__ import annotations

__all__ = ["CFG_SCHEDULES", "DTYPES", "FEATURE_SPACES", "LABEL_MODES", "MAX_SEED", "SAMPLERS", "DEFAULT_THREADS"]

SAMPLERS = ("euler_maruyama", "euler", "heun")  # SphereARScheduler(sampler=...)
CFG_SCHEDULES = ("linear", "constant")  # the guidance scale over the tokens: rising from 1 (official), or constant
LABEL_MODES = ("uniform", "balanced")  # the classes of `sphere-ar sample`: random per image (official), or equal counts
FEATURE_SPACES = ("inception", "digits")  # the feature networks of `sphere-ar evaluate`
DTYPES = ("float32", "bfloat16", "float16")  # the compute dtypes of the command line
MAX_SEED = 2**64 - 1  # seeds are unsigned 64-bit integers (see seeding.py)
POSTERIORS = ("power_spherical", "gaussian")  # SphereVAE(posterior=...): the S-VAE (SphereAR), or the Gaussian baseline
DEFAULT_THREADS = "auto"  # `--threads` of generate, sample and the demo (benchmarks/bench_threads.py)
