"""Remote code: a pipeline folder that loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
where this package is not installed, and the way back to the package's classes where it is.

:func:`write_remote_code` copies this package's module files, unchanged, into a pipeline folder:

- at the root, :mod:`.remote_pipeline` (``model_index.json``'s ``_class_name`` names it) and every module it imports:
  diffusers copies beside the module it loads only the modules that one imports itself, and
  :mod:`.remote_pipeline` imports every module the pipeline needs;
- in each component folder, a copy of this file (``model_index.json``: ``"transformer": ["remote_code",
  "SphereARTransformer"]``, ...): from a Hub repository diffusers downloads only that one file of a component folder
  that holds weights, so it must import nothing relatively; its module ``__getattr__`` hands diffusers the class that
  the root modules defined (in diffusers' module cache all of a repository's files share one package);
- ``transformer/config.json`` gets an ``auto_map`` for transformers'
  ``AutoModel.from_pretrained(folder, subfolder="transformer", trust_remote_code=True)``.

With the package installed, ``SphereARPipeline.load_config`` maps such a folder's entries back to the package
(:func:`package_model_index`) and ``SphereARPipeline.download`` fetches no code (:func:`download_pipeline`), so its
code is never run. This module imports nothing from the package (see above); its reader of relative imports
(:func:`relative_imports`) also serves :mod:`.hub.space`, which walks the modules a Space needs.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["COMPONENTS", "ENTRY", "PIPELINE", "RelativeImport", "download_pipeline", "package_model_index",
           "relative_imports", "remote_modules", "write_remote_code"]

ENTRY = "remote_pipeline"  # the module model_index.json names for the pipeline
PIPELINE = "SphereARPipeline"
# component -> (module that defines its class, class)
COMPONENTS: dict[str, tuple[str, str]] = {
    "transformer": ("modeling_sphere_ar", "SphereARTransformer"),
    "vae": ("vae", "SphereVAE"),
    "scheduler": ("scheduling_sphere_ar", "SphereARScheduler"),
}
_THIS = __name__.rpartition(".")[2]


def __getattr__(name: str) -> type:
    """A component class (``SphereARTransformer``, ...), from the module beside this one that defines it."""
    module = next((m for m, c in COMPONENTS.values() if c == name), None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    except ModuleNotFoundError as e:
        raise ImportError(f"{name} comes from {module}.py at the root of the repository: load the whole pipeline "
                          "with DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)") from e


class RelativeImport(NamedTuple):
    """One relative ``from`` statement: ``from ..x.y import a, b`` is ``(2, "x.y", ("a", "b"), at_import)``."""

    level: int  # the leading dots
    module: str | None  # None for ``from . import a``
    names: tuple[str, ...]
    at_import: bool  # runs when the module is imported (not inside a function)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(tree: ast.AST, in_function: bool, type_checking: bool) -> Iterator[RelativeImport]:
    for node in ast.iter_child_nodes(tree):
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _walk_imports(ast.Module(body=[child], type_ignores=[]), in_function, type_checking)
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            yield RelativeImport(node.level, node.module, tuple(a.name for a in node.names), not in_function)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _walk_imports(node, inner, type_checking)


def relative_imports(path: str | os.PathLike, *, type_checking: bool = False) -> list[RelativeImport]:
    """The relative imports of the module file ``path``, at module level or lazy (in a function), in source order.
    Those under ``if TYPE_CHECKING:`` never run and are left out, unless ``type_checking`` (diffusers, which reads
    the source as text, copies them too)."""
    path = Path(path)
    return list(_walk_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)), False, type_checking))


def remote_modules(source: str | os.PathLike | None = None) -> list[str]:
    """The modules a remote-code folder carries at its root: :data:`ENTRY` and the modules it imports.

    Those are what diffusers copies beside the loaded file: the modules of its ``from .x import`` lines (one dot,
    one name; module level, lazy or under ``TYPE_CHECKING``), not the modules those import in turn."""
    found = relative_imports(Path(source or Path(__file__).parent) / f"{ENTRY}.py", type_checking=True)
    return [ENTRY, *sorted({i.module for i in found if i.level == 1 and i.module and "." not in i.module})]


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: dict) -> None:
    path.unlink(missing_ok=True)  # a new file: a hard-linked original (as a push stages them) stays untouched
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_remote_code(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> list[str]:
    """Copy the remote code into the pipeline folder ``folder`` and point its configs at it (see the module
    docstring); returns the written files. ``source``: the folder of the module files (default: beside this one,
    that is the package, or the module cache of a pipeline loaded as remote code)."""
    folder, source = Path(folder), Path(source or Path(__file__).parent)
    index = _read_json(folder / "model_index.json")
    for component, (_, class_name) in COMPONENTS.items():
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == class_name):
            raise ValueError(f"{folder}/model_index.json: expected {component} to be a {class_name}, got {entry!r}")
        if not (folder / component).is_dir():
            raise ValueError(f"{folder} has no {component}/ folder")
    written = [f"{m}.py" for m in remote_modules(source)]
    written += [f"{component}/{_THIS}.py" for component in COMPONENTS]
    for name in written:
        (folder / name).unlink(missing_ok=True)  # as in _write_json
        shutil.copyfile(source / Path(name).name, folder / name)
    index["_class_name"] = [ENTRY, PIPELINE]
    index.update({component: [_THIS, class_name] for component, (_, class_name) in COMPONENTS.items()})
    _write_json(folder / "model_index.json", index)
    config = _read_json(folder / "transformer" / "config.json")
    config["auto_map"] = {"AutoConfig": "configuration_sphere_ar.SphereARConfig",
                          "AutoModel": "modeling_sphere_ar.SphereARTransformer"}
    _write_json(folder / "transformer" / "config.json", config)
    return written


def package_model_index(config: Any) -> Any:
    """``model_index.json`` (as ``load_config`` returns it, tuples too) with the pipeline and component entries that
    name other modules (remote code, a module cache) mapped to the modules of this package, which defines them:
    ``["sphere_ar_hf.modeling_sphere_ar", "SphereARTransformer"]``, ... Anything else is returned unchanged."""
    if isinstance(config, tuple):
        return (package_model_index(config[0]), *config[1:])
    if not isinstance(config, dict) or config.get("_class_name") not in (PIPELINE, [ENTRY, PIPELINE]):
        return config
    config = {**config, "_class_name": PIPELINE}
    for component, (module, class_name) in COMPONENTS.items():
        entry = config.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] == class_name:
            config[component] = [f"{__package__}.{module}", class_name]
    return config


def download_pipeline(pretrained_model_name: str, *, cache_dir: str | os.PathLike | None = None,
                      revision: str | None = None, token: str | bool | None = None, local_files_only: bool = False,
                      force_download: bool = False, proxies: dict | None = None, use_safetensors: bool | None = None,
                      **_ignored: Any) -> str:
    """Fetch a pipeline repository's configs and weights, never its ``*.py`` files; returns the local folder.

    ``SphereARPipeline.download``: diffusers' own download imports a repository's custom pipeline module to find its
    components, which needs ``trust_remote_code`` although the package does not use that code.
    """
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.safetensors", *(["*/*.bin"] if use_safetensors is False else [])]
    return snapshot_download(pretrained_model_name, cache_dir=cache_dir, revision=revision, token=token,
                             local_files_only=local_files_only, force_download=force_download,
                             allow_patterns=patterns, **({"proxies": proxies} if proxies else {}))
