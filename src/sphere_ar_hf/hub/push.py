"""Uploads to the Hugging Face Hub: a pipeline folder (``sphere-ar push``, the trainers' ``--push_to_hub``) and a
LoRA adapter folder, each with its model card (:mod:`.cards`), through one staged upload (:func:`upload_staged`).

A pushed pipeline repository is the pipeline folder plus its ``README.md`` card and, by default, the remote code of
:mod:`..remote_code`: this package's module files, copied unchanged, so that
``DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`` loads it without the package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..remote_code import COMPONENTS, package_model_index, write_remote_code
from ..utils import write_folder_atomically
from .cards import (
    HubError,
    check_license,
    check_repo_id,
    load_metrics,
    pipeline_facts,
    read_adapter_facts,
    read_json,
    render_lora_card,
    render_model_card,
    write_text,
)

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["build_push_folder", "hf_api", "push_lora", "push_pipeline", "upload_staged"]


def _copy_folder(src: Path, dst: Path, link: bool, skip_code: bool = True) -> None:
    """Copy a folder's files but dotfiles, caches, a top-level README.md and (``skip_code``) ``*.py`` files, which
    are the remote code of a pushed folder given back; hard links if ``link``."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith(".pyc")
                or (skip_code and n.endswith(".py")) or (Path(directory) == src and n == "README.md")}

    def copy(a: str, b: str) -> str:
        try:
            return os.link(a, b) or b if link else shutil.copy2(a, b)
        except OSError:  # another file system
            return shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=ignore, copy_function=copy, dirs_exist_ok=True)


def _fill_folder(pipeline: Path, dst: Path, link: bool, **card: Any) -> None:
    """The folder to upload: the pipeline's files, the model card (``card``: :func:`.render_model_card`'s keyword
    arguments) and, with ``remote_code``, the remote code."""
    model_card = render_model_card(pipeline, **card)
    _copy_folder(pipeline, dst, link)
    if card["remote_code"]:
        write_remote_code(dst)
    else:  # plain package entries (a pushed folder given back: without its remote code's configs)
        index = package_model_index(read_json(dst / "model_index.json"))
        write_text(dst / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = read_json(dst / "transformer" / "config.json")
        if config.pop("auto_map", None) is not None:
            write_text(dst / "transformer" / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text(dst / "README.md", str(model_card))


def _check_pipeline(pipeline: str | os.PathLike) -> Path:
    path = Path(pipeline).expanduser()
    if not path.is_dir():
        raise HubError(f"{pipeline}: no such folder (`pipeline` takes a pipeline folder)")
    pipeline_facts(path)  # a SphereAR pipeline folder, with weights
    return path


def build_push_folder(pipeline: str | os.PathLike, output: str | os.PathLike, *, repo_id: str, license: str | None,
                      card: str = "auto", remote_code: bool = True, license_name: str | None = None,
                      license_link: str | None = None, overwrite: bool = False,
                      template_dir: str | os.PathLike | None = None,
                      metrics: str | os.PathLike | Mapping[str, Any] | None = None) -> Path:
    """Write the folder that :func:`push_pipeline` would upload to ``output`` (atomically; files are copied).

    It holds the pipeline's files, the rendered ``README.md`` and, with ``remote_code``, the remote code
    (:func:`..remote_code.write_remote_code`). An existing non-empty ``output`` needs ``overwrite``, and is replaced
    only if it is a pipeline folder (e.g. an earlier push folder) that does not hold ``pipeline``. ``card`` and
    ``metrics``: as for :func:`.render_model_card`.
    """
    src, out = _check_pipeline(pipeline), Path(output).expanduser()
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise HubError(f"the output folder {output} must not be (inside) the pipeline folder {pipeline}")
    card_args = dict(repo_id=repo_id, license=license, card=card, remote_code=remote_code, license_name=license_name,
                     license_link=license_link, template_dir=template_dir, metrics=metrics)
    inputs = [src, template_dir, metrics if not isinstance(metrics, Mapping) else None]
    return write_folder_atomically(out, lambda tmp: _fill_folder(src, tmp, False, **card_args), overwrite=overwrite,
                                   kind="pipeline", inputs=inputs, option="--dry-run folder")


def hf_api(token: str | None = None) -> HfApi:
    """The Hub client the uploads use when they are given none (``token``: its token; default: the login's)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def upload_staged(source: Path, fill: Callable[[Path], None], repo_id: str, *, api: HfApi, private: bool = False,
                  commit_message: str, revision: str | None = None, delete_patterns: list[str] | None = None) -> str:
    """The one way this package uploads: ``fill(stage)`` writes the repository's files into a new folder ``stage``
    inside a temporary folder beside ``source`` (same file system, so ``fill`` may hard-link; elsewhere if ``source``'s
    folder is not writable); then ``create_repo`` (if needed) and one ``upload_folder`` of ``stage`` to the model
    repository ``repo_id`` (branch ``revision``, default main; ``delete_patterns``: repository files to delete in
    the same commit). The temporary folder is removed in any case. Returns the repository's URL."""
    source = source.resolve()
    try:  # beside the source (same file system: hard links) if we may write there
        staging = tempfile.TemporaryDirectory(prefix=f".{source.name}.push-", dir=source.parent,
                                              ignore_cleanup_errors=True)
    except OSError:
        staging = tempfile.TemporaryDirectory(prefix="sphere-ar-push-", ignore_cleanup_errors=True)
    with staging as stage_parent:
        stage = Path(stage_parent) / "repo"
        fill(stage)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(stage), commit_message=commit_message,
                          **({"delete_patterns": delete_patterns} if delete_patterns else {}),
                          **({"revision": revision} if revision else {}))
    return f"https://huggingface.co/{repo_id}"


def push_pipeline(pipeline: str | os.PathLike, repo_id: str, *, license: str | None, private: bool = False,
                  card: str = "auto", remote_code: bool = True, license_name: str | None = None,
                  license_link: str | None = None, commit_message: str | None = None, api: HfApi | None = None,
                  template_dir: str | os.PathLike | None = None,
                  metrics: str | os.PathLike | Mapping[str, Any] | None = None, revision: str | None = None,
                  token: str | None = None) -> str:
    """Upload a pipeline folder to the Hub model repository ``repo_id`` (created if needed); returns its URL.

    Uploads exactly what :func:`build_push_folder` writes (staged by :func:`upload_staged`, hard-linked where
    possible). Files of the repository's component folders that are not in the new folder are deleted in the same
    commit; other files of the repository are kept. ``card`` / ``metrics``: as for :func:`.render_model_card`;
    ``revision``: the branch to commit to (default: main); ``token``: for the default client (``api`` unset). The
    trainers' ``--push_to_hub`` calls this too.
    """
    src = _check_pipeline(pipeline)
    repo_id = check_repo_id(repo_id)
    check_license(license, license_name, license_link)
    metrics = load_metrics(metrics)  # a bad file is an error before anything is staged
    card_args = dict(repo_id=repo_id, license=license, card=card, remote_code=remote_code, license_name=license_name,
                     license_link=license_link, template_dir=template_dir, metrics=metrics)
    return upload_staged(src, lambda stage: _fill_folder(src, stage, True, **card_args), repo_id,
                         api=api if api is not None else hf_api(token), private=private,
                         commit_message=commit_message or "Upload SphereAR pipeline (sphere-ar push)",
                         revision=revision, delete_patterns=[f"{c}/*" for c in COMPONENTS])


def push_lora(adapter_dir: str | os.PathLike, repo_id: str, *, license: str | None, private: bool = False,
              commit_message: str | None = None, api: HfApi | None = None, token: str | None = None,
              revision: str | None = None) -> str:
    """Upload an adapter folder to the Hub model repository ``repo_id`` (created if needed) with its card rendered
    for that repository and ``license`` (required, a Hub license id); returns its URL. Staged and uploaded as
    :func:`push_pipeline` does (:func:`upload_staged`); the LoRA trainer's ``--push_to_hub`` calls this."""
    folder = Path(adapter_dir)
    read_adapter_facts(folder)
    repo_id, license = check_repo_id(repo_id), check_license(license, None, None)
    card = render_lora_card(folder, repo_id=repo_id, license=license)

    def fill(stage: Path) -> None:
        _copy_folder(folder, stage, link=True, skip_code=False)
        write_text(stage / "README.md", str(card))

    return upload_staged(folder, fill, repo_id, api=api if api is not None else hf_api(token), private=private,
                         commit_message=commit_message or "Upload SphereAR LoRA adapter", revision=revision)
