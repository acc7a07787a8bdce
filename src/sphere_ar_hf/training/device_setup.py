"""What the trainers decide from the hardware and the launcher: native bf16, the process-group timeout, whether
the launched processes form one job, and whether parameters are sharded (FSDP, DeepSpeed ZeRO-3), which the EMA
does not support.

Each is a GPU- or cluster-only condition that a CPU test reaches by monkeypatching ``torch.cuda`` or the
environment, so they live here, small and separate from the training loops.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch

__all__ = ["DEFAULT_DDP_TIMEOUT", "check_ema_supported", "check_one_job", "native_bf16_gpu", "process_group_kwargs",
           "resolve_mixed_precision"]

# Seconds a collective may wait before the process group gives up: long enough for the main process to write a
# pipeline or checkpoint (several GB) while the others wait at a barrier. torch's NCCL default is 10 minutes and
# TrainingArguments' is 30 minutes.
DEFAULT_DDP_TIMEOUT = 7200


def native_bf16_gpu() -> bool:
    """Whether a CUDA GPU computes bf16 natively (compute capability >= 8, Ampere and newer). V100 and T4 only
    emulate bf16, which ``torch.cuda.is_bf16_supported()`` counts, and run it slower than float32."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument
        return torch.cuda.get_device_capability()[0] >= 8


def resolve_mixed_precision(value: str) -> str:
    """An ``Accelerator`` ``mixed_precision`` from a flag value: ``"auto"`` is ``"bf16"`` on a CUDA GPU with native
    bf16 (unless ``ACCELERATE_USE_CPU`` runs the job on the CPU), else ``"no"``; other values pass through."""
    if value != "auto":
        return value
    return "bf16" if native_bf16_gpu() and not _env_flag("ACCELERATE_USE_CPU") else "no"


def process_group_kwargs(timeout_s: int) -> list[Any]:
    """``Accelerator(kwargs_handlers=...)`` that give the process group a timeout of ``timeout_s`` seconds."""
    from accelerate import InitProcessGroupKwargs

    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s <= 0:
        raise ValueError(f"--ddp_timeout {timeout_s!r}: expected a positive number of seconds")
    return [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]


def check_one_job(distributed: bool, cpu_option: str) -> None:
    """Refuse a launch of several processes (``WORLD_SIZE`` > 1) that do not form one distributed job
    (``distributed``: what accelerate or the Trainer set up). On a machine without GPUs, accelerate and the Trainer
    run each process of a ``torchrun`` launch alone unless told to use the CPU: every process would then train on
    all the data and write the same files. ``cpu_option`` is the script's way to say so."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and not distributed:
        raise ValueError(f"WORLD_SIZE={launched}: the {launched} launched processes would each run alone (no GPU "
                         f"found) and overwrite each other's files; on a machine without GPUs pass {cpu_option} "
                         "(or set ACCELERATE_USE_CPU=true)")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _deepspeed_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a ``--deepspeed`` config (a dict or a JSON file), None when unknown."""
    import json

    if isinstance(deepspeed, str) and os.path.isfile(deepspeed):
        with open(deepspeed, encoding="utf-8") as f:
            deepspeed = json.load(f)
    if isinstance(deepspeed, dict):
        stage = deepspeed.get("zero_optimization", {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    return None


def check_ema_supported(args: Any, ema_decay: float) -> None:
    """Refuse an EMA (``ema_decay > 0``) when the parameters are sharded: under FSDP or DeepSpeed ZeRO-3 each
    process holds a shard, so the average would cover only that shard and only the main process's would be
    saved. Reads ``args.fsdp`` / ``args.deepspeed`` and what ``accelerate launch`` sets in the environment."""
    if ema_decay <= 0:
        return
    if getattr(args, "fsdp", None) or _env_flag("ACCELERATE_USE_FSDP"):
        raise ValueError(f"--ema_decay {ema_decay} with FSDP: the EMA needs whole parameters and FSDP shards them; "
                         "pass --ema_decay 0, or use DDP or DeepSpeed ZeRO-2")
    stage = _deepspeed_stage(getattr(args, "deepspeed", None))
    if stage is None and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    if stage == 3:
        raise ValueError(f"--ema_decay {ema_decay} with DeepSpeed ZeRO-3: the EMA needs whole parameters and "
                         "ZeRO-3 shards them; pass --ema_decay 0, or use ZeRO stage 2 or DDP")
