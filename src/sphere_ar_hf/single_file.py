"""Official SphereAR checkpoints as pipelines in one call: :meth:`.SphereARPipeline.from_single_file`, diffusers'
convention for weights in their original format.

A checkpoint is a local ``.pt`` file or a file on the Hub, given as its URL
(``https://huggingface.co/guolinke/SphereAR/blob/main/SphereAR_B.pt``) or as ``owner/repo/path`` (``guolinke/
SphereAR/SphereAR_B.pt``), which ``huggingface_hub`` downloads once into its cache (offline: read from the cache).
The pipeline is built in memory from :func:`.official_checkpoint.official_components`, as ``sphere-ar convert``
builds it: weights-only unpickling, every size inferred from the tensors, the EMA weights by default.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

from .loading import resolve_dtype
from .official_checkpoint import ConversionError, official_components
from .scheduling_sphere_ar import SphereARScheduler

__all__ = ["HUB_FILE_URL", "load_single_file", "resolve_checkpoint"]

HUB_FILE_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/"
                          r"(?P<revision>[^/]+)/(?P<filename>[^?#]+)$")
"""A file's page or download URL on the Hub: ``https://huggingface.co/<owner>/<repo>/{blob,resolve}/<rev>/<path>``."""
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def _hub_file(text: str) -> tuple[str, str | None, str] | None:
    """``(repo_id, revision, filename)`` of a Hub file URL or of ``owner/repo/path``; ``None`` for anything else."""
    match = HUB_FILE_URL.match(text)
    if match:
        return match["repo"], urllib.parse.unquote(match["revision"]), urllib.parse.unquote(match["filename"])
    parts = text.split("/")
    if "://" in text or "\\" in text or os.path.isabs(text) or text.startswith((".", "~")) or len(parts) < 3 or (
            not all(parts)):
        return None
    return "/".join(parts[:2]), None, "/".join(parts[2:])


def resolve_checkpoint(link: str | os.PathLike, field: str, **hub_kwargs: Any) -> Path:
    """The local path of a checkpoint given as a file, a Hub file URL or ``owner/repo/path`` (downloaded with
    ``hf_hub_download`` and ``hub_kwargs``: :data:`HUB_KWARGS`). Raises :class:`.ConversionError` (one line, naming
    ``field``) for anything that is neither an existing file nor a Hub file that can be fetched."""
    if not isinstance(link, str | os.PathLike):
        raise TypeError(f"{field}={link!r}: expected a checkpoint file, a Hub file URL or owner/repo/file (a str)")
    text = os.fspath(link)
    if os.path.exists(os.path.expanduser(text)):
        return Path(text).expanduser()
    hub = _hub_file(text)
    if hub is None:
        raise ConversionError(f"{field}: no such file {text!r} (nor a Hub file: "
                              "https://huggingface.co/owner/repo/blob/main/file.pt or owner/repo/file.pt)")
    repo_id, revision, filename = hub
    if revision is not None and hub_kwargs.get("revision") not in (None, revision):
        raise ConversionError(f"revision={hub_kwargs['revision']!r}: {field} {text!r} names revision {revision!r}")
    if revision is not None:
        hub_kwargs["revision"] = revision
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))
    except (OSError, ValueError, EntryNotFoundError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise ConversionError(f"{field}: {text!r} is no local file, and {filename} could not be fetched from the "
                              f"Hub repository {repo_id} ({type(e).__name__}: {why[:300]})") from None


def load_single_file(pipeline_class: type, checkpoint: str | os.PathLike, *,
                     vae_checkpoint: str | os.PathLike | None = None, use_ema: bool = True, dtype: Any = None,
                     torch_dtype: Any = None, **hub_kwargs: Any) -> Any:
    """:meth:`.SphereARPipeline.from_single_file` (``pipeline_class`` is the class it is called on)."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"from_single_file() got unexpected keyword arguments {unknown}; it takes vae_checkpoint, "
                        f"use_ema, dtype and the Hub's {', '.join(HUB_KWARGS)}")
    if not isinstance(use_ema, bool):
        raise TypeError(f"use_ema={use_ema!r}: expected True or False")
    dtype = resolve_dtype(dtype, torch_dtype)
    path = resolve_checkpoint(checkpoint, "checkpoint", **hub_kwargs)
    vae_path = None if vae_checkpoint is None else resolve_checkpoint(vae_checkpoint, "vae_checkpoint", **hub_kwargs)
    transformer, vae, id2label = official_components(path, vae_path, use_ema)
    pipe = pipeline_class(transformer=transformer, vae=vae, scheduler=SphereARScheduler(), id2label=id2label)
    if dtype not in (None, "auto"):  # "auto": as stored (official checkpoints are float32)
        pipe = pipe.to(dtype=dtype)
    return pipe
