"""What the ``sphere-ar`` commands (and the demo) share: the user-error type, argument types, quiet library loading,
finding and loading the model, the device and the threads."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .options import DEFAULT_THREADS, MAX_SEED

if TYPE_CHECKING:
    from .pipeline_sphere_ar import SphereARPipeline

__all__ = ["CHECKPOINT_SUFFIXES", "CLIError", "DEFAULT_MODEL", "MODEL_HELP", "add_compile_argument",
           "add_threads_argument", "device_from_name", "finite_float", "guidance_option", "is_checkpoint",
           "load_pipeline", "make_current", "number_argument", "one_line", "positive_int", "quiet_libraries",
           "resolve_model", "seed_argument", "set_threads", "steps_argument", "threads_argument"]

# the embedded digits model (package data): the commands work offline with no --model
DEFAULT_MODEL: str | None = str(Path(__file__).parent / "pretrained" / "digits")


class CLIError(Exception):
    """A user error: printed as ``error: <message>``, exit status 2."""



def one_line(message: object) -> str:
    return " ".join(str(message).split()) or "unknown error"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def seed_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"the seed must be in [0, 2**64), got {value}")
    return value


def number_argument(text: str) -> float:
    """A number (a float; what it may be is for its owner to check, e.g. :func:`guidance_option`)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def finite_float(text: str) -> float:
    """A finite number."""
    value = number_argument(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def steps_argument(text: str) -> int:
    """``--steps``: sampler steps per token, checked by their owner, the scheduler
    (:func:`.scheduling_sphere_ar.check_num_inference_steps`)."""
    from .scheduling_sphere_ar import check_num_inference_steps

    try:
        return check_num_inference_steps(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def guidance_option(value: float | None) -> float | None:
    """``--guidance-scale`` (``None``: the model's recommended scale) checked by its owner, the config
    (:func:`.configuration_sphere_ar.check_guidance_scale`), before any weight loads; refused as a
    :class:`CLIError` naming the flag."""
    if value is None:
        return None
    from .configuration_sphere_ar import check_guidance_scale

    try:
        return check_guidance_scale(value)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--guidance-scale: {one_line(e)}") from None



@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Hide the libraries' loading / saving bars and warnings (the pipeline's token bar stays)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    state = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _, _ in state:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, verbosity, bar in state:
            m.set_verbosity(verbosity)
            (m.enable_progress_bar if bar else m.disable_progress_bar)()



CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
MODEL_HELP = ("pipeline folder (from `sphere-ar convert`), Hub repository id, or an official checkpoint: a .pt file or "
              "a Hub file (guolinke/SphereAR/SphereAR_B.pt or its URL), converted in memory")


def is_checkpoint(model: str) -> bool:
    """Whether ``--model`` names an official checkpoint (a ``.pt`` file, a Hub file URL or ``owner/repo/file``),
    which :func:`load_pipeline` converts in memory, rather than a pipeline folder or a Hub repository id."""
    return model.endswith(CHECKPOINT_SUFFIXES) or model.startswith(("https://", "http://"))


def resolve_model(model: str | None) -> str:
    """The pipeline folder, Hub id or official checkpoint (:func:`is_checkpoint`) to load: ``--model``, else
    :data:`DEFAULT_MODEL`."""
    model = model or DEFAULT_MODEL
    if not model:
        raise CLIError("no model given: pass --model DIR (a folder written by `sphere-ar convert`)")
    if is_checkpoint(model):
        return model  # a local file or a Hub file: from_single_file says which it cannot load
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"{model}: not a folder (--model takes a pipeline folder written by `sphere-ar convert`, "
                           f"or an official checkpoint: {', '.join(CHECKPOINT_SUFFIXES)})")
        if not (path / "model_index.json").is_file():
            found = sorted(p.name for p in path.iterdir() if p.name.endswith(CHECKPOINT_SUFFIXES))
            hint = f"; it holds {', '.join(found)}: pass --model {path / found[0]}" if found else ""
            raise CLIError(f"{model}: no model_index.json, so not a pipeline folder (write one with `sphere-ar "
                           f"convert`){hint}")
        return str(path)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not model.startswith("."):
        return model  # a Hugging Face Hub repository id
    raise CLIError(f"{model}: no such folder")


def make_current(device):
    """Makes ``device`` (``cuda:N``) the process's current CUDA device, returns it: what ``torch.cuda`` calls
    without a device use (streams, the fast sampler's CUDA graphs, the context that pinned memory creates), so that a
    process sampling on ``cuda:1`` makes nothing on ``cuda:0``. ``cuda:0`` is left alone: it is already current in a
    new process, and setting it would initialise CUDA, which ZeroGPU forbids in its main process."""
    if device.type == "cuda" and device.index:
        import torch

        torch.cuda.set_device(device)
    return device


def device_from_name(name: str | None):
    """``--device``: the named device (default: cuda, else mps, else cpu), checked, and made current
    (:func:`make_current`); a one-line error for a device this machine lacks."""
    import torch

    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"--device {name!r}: {one_line(e)}") from None
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise CLIError(f"--device {name}: expected cpu, cuda, cuda:N, mps or xpu (a device that computes)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= (count := torch.cuda.device_count()):
        raise CLIError(f"--device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                       f"(cuda:0 to cuda:{count - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CLIError(f"--device {name}: MPS is not available on this machine")
    if device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise CLIError(f"--device {name}: XPU is not available on this machine")
    return make_current(device)


def load_pipeline(model: str, dtype: str = "float32") -> SphereARPipeline:
    """``SphereARPipeline.from_pretrained`` with quiet loading; load failures become :class:`CLIError`."""
    import torch

    from .pipeline_sphere_ar import SphereARPipeline

    if is_checkpoint(model):
        from .single_file import resolve_checkpoint

        try:
            with quiet_libraries():
                path = resolve_checkpoint(model, "--model")  # a local file, or a Hub file fetched to the cache
                return SphereARPipeline.from_single_file(path, dtype=getattr(torch, dtype))
        except ValueError as e:  # ConversionError: the file, its download or its contents, in one line
            raise CLIError(one_line(e)) from None
    try:  # (SphereARPipeline.from_pretrained passes the dtype on under the name the installed diffusers takes)
        with quiet_libraries():
            pipe = SphereARPipeline.from_pretrained(model, dtype=getattr(torch, dtype))
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        where = model if Path(model).exists() else f"{model} (no such local folder; tried the Hugging Face Hub)"
        raise CLIError(f"cannot load the pipeline from {where}: {one_line(e)}") from None
    if not isinstance(pipe, SphereARPipeline):
        raise CLIError(f"{model} holds a {type(pipe).__name__}, not a SphereARPipeline")
    return pipe




def set_threads(threads: int | str) -> int:
    """``torch.set_num_threads`` for ``--threads`` (a count, or ``"auto"``: :func:`.utils.auto_threads`); returns
    the count."""
    import torch

    from .utils import auto_threads

    count = auto_threads() if threads == "auto" else int(threads)
    torch.set_num_threads(count)
    return count


MAX_THREADS = 4096


def threads_argument(text: str) -> int | str:
    """``--threads``: ``auto`` or an integer from 1 to :data:`MAX_THREADS`."""
    if text.strip().lower() == "auto":
        return "auto"
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer from 1 to {MAX_THREADS}, got {value}")
    return value




def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads (``generate``, ``sample`` and the demo)."""
    parser.add_argument("--threads", type=threads_argument, metavar="N", default=DEFAULT_THREADS,
                        help="CPU threads of torch's operations (torch.set_num_threads; the images do not depend on "
                             "it). 'auto' (default): the cores not busy with other processes (1-minute load "
                             "average), shared by the processes of a torchrun launch (measured on 2 cores: beside a "
                             "busy process 2 threads sample 2-3x slower than 1; on a quiet machine 1.2-1.7x faster "
                             "from batch 32 on)")


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """``--compile``: the fast sampler, ``pipe.enable_torch_compile()`` (``generate``, ``sample`` and the demo)."""
    parser.add_argument("--compile", action="store_true",
                        help="the fast sampler (pipe.enable_torch_compile(): compiled steps; on CUDA each token's "
                             "steps one CUDA graph): each new batch size compiles first (seconds to minutes), later "
                             "batches are faster; images equal to float rounding")
