"""Publishing SphereAR pipelines on the Hugging Face Hub: model cards, remote code and ``sphere-ar push``.

A pushed repository is a normal pipeline folder plus

- ``README.md``: a model card rendered from ``hub_cards/`` (metadata, usage, results, citation);
- remote code, so that diffusers loads it without this package:
  ``DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)``. ``model_index.json`` names module files
  of the repository (``"_class_name": ["pipeline_sphere_ar", "SphereARPipeline"]``,
  ``"transformer": ["modeling_sphere_ar", "SphereARTransformer"]``, ...) and each of those files is generated at
  push time from this package's sources by :func:`bundle_module`: the module and everything it imports relatively,
  inlined into one file without relative imports (diffusers downloads only the named file of a component folder
  that holds weights, so a file that imports a sibling would not load from the Hub). ``transformer/config.json``
  also gets an ``auto_map`` for ``AutoModel.from_pretrained(repo_id, subfolder="transformer",
  trust_remote_code=True)``.

With this package installed, ``SphereARPipeline.from_pretrained`` loads such a repository with this package's own
classes, without running its code, when its ``load_config`` and ``download`` go through :func:`package_model_index`
and :func:`download_pipeline`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .utils import atomic_write, format_millions

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelCard, SpaceCard

__all__ = [
    "CARDS",
    "HubError",
    "REMOTE_COMPONENTS",
    "REMOTE_PIPELINE",
    "add_push_parser",
    "build_push_folder",
    "build_space_folder",
    "bundle_module",
    "detect_card",
    "download_pipeline",
    "package_model_index",
    "pipeline_facts",
    "push_pipeline",
    "render_model_card",
    "render_space_card",
    "run_push",
    "write_remote_code",
]

PACKAGE = __package__ or "sphere_ar_hf"
PACKAGE_DIR = Path(__file__).resolve().parent
HUB_CARDS_DIR = PACKAGE_DIR.parents[1] / "hub_cards"  # the source checkout's templates
ARXIV_ID = "2509.24335"
OFFICIAL_REPO = "guolinke/SphereAR"
GRADIO_SDK_VERSION = "6.31.0"
CARDS = ("b", "l", "h", "digits")
# remote code: component -> (module file in the component folder, package module, class)
REMOTE_PIPELINE = ("pipeline_sphere_ar", "pipeline_sphere_ar", "SphereARPipeline")
REMOTE_COMPONENTS: dict[str, tuple[str, str, str]] = {
    "transformer": ("modeling_sphere_ar", "modeling_sphere_ar", "SphereARTransformer"),
    "vae": ("modeling_sphere_vae", "vae", "SphereVAE"),
    "scheduler": ("scheduling_sphere_ar", "scheduling_sphere_ar", "SphereARScheduler"),
}
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(ValueError):
    """A problem with the inputs of a card / push function; the message says what to change."""


# ---- remote code ------------------------------------------------------------------------------------------------
def _package_module(name: str):
    return importlib.import_module(f"{PACKAGE}.{name}")


def _relative_imports(tree: ast.Module) -> list[tuple[ast.ImportFrom, bool]]:
    """Every ``from .x import ...`` of a module, with whether it is a statement of the module body itself."""
    top = {id(node) for node in tree.body}
    return [(node, id(node) in top) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]


def _read_module(name: str) -> tuple[str, ast.Module]:
    path = PACKAGE_DIR / f"{name}.py"
    if not path.is_file():
        raise HubError(f"cannot bundle {PACKAGE}.{name}: {path} does not exist")
    source = path.read_text(encoding="utf-8")
    return source, ast.parse(source, filename=str(path))


def _closure(main: str) -> list[str]:
    """``main`` and the modules it imports relatively at module level, each after its own dependencies."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise HubError(f"cannot bundle {PACKAGE}.{main}: import cycle through {PACKAGE}.{name}")
        visiting.add(name)
        _, tree = _read_module(name)
        for node, top_level in _relative_imports(tree):
            if node.level != 1 or not node.module:
                raise HubError(f"cannot bundle {PACKAGE}.{name} (line {node.lineno}): only `from .module import "
                               "name` relative imports can be inlined")
            if top_level:
                visit(node.module)
        visiting.discard(name)
        order.append(name)

    visit(main)
    return order


def _function_body_names(tree: ast.Module) -> set[str]:
    """Names read when functions run (not where they are defined; annotations are never evaluated here)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bodies: list[ast.AST] = list(node.body)
        elif isinstance(node, ast.Lambda):
            bodies = [node.body]
        else:
            continue
        for body in bodies:
            names.update(n.id for n in ast.walk(body) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load))
    return names


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names bound by the module body's statements (``__all__`` excluded)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            names.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
    names.discard("__all__")
    return names


def _check_shared_names(modules: list[str], trees: dict[str, ast.Module]) -> None:
    """One namespace for all ``modules``: a name bound to different objects by two of them must not be read by a
    function of any module whose own value is not the last one bound."""
    values: dict[str, list[tuple[str, Any]]] = {}
    for name in modules:
        module = _package_module(name)
        for attr in _top_level_names(trees[name]):
            if hasattr(module, attr):
                values.setdefault(attr, []).append((name, getattr(module, attr)))
    for attr, bound in values.items():
        final = bound[-1][1]
        if all(value is final for _, value in bound):
            continue
        for name in modules:
            module = _package_module(name)
            if hasattr(module, attr) and getattr(module, attr) is not final and attr in _function_body_names(
                    trees[name]):
                others = ", ".join(f"{PACKAGE}.{m}" for m, v in bound if v is not getattr(module, attr))
                raise HubError(f"cannot bundle {', '.join(modules)} into one file: {PACKAGE}.{name} and {others} "
                               f"bind `{attr}` to different objects; rename one of them")


def _statement_span(lines: list[str], node: ast.stmt, where: str) -> tuple[int, int, str]:
    """0-based first and last line of a statement alone on its lines, and its indentation."""
    first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
    indent = lines[first][:node.col_offset]
    tail = lines[last][node.end_col_offset:].strip() if node.end_col_offset is not None else ""
    if indent.strip() or (tail and not tail.startswith("#")):
        raise HubError(f"cannot bundle {where} (line {node.lineno}): put the import on its own line")
    return first, last, indent


def bundle_module(main: str, footer: str = "") -> str:
    """One self-contained module: ``PACKAGE.main`` and every module it imports relatively, inlined in order.

    Relative imports of inlined modules are dropped (``as`` names become assignments); a relative import inside a
    function of a module that is not inlined (an optional, lazily imported feature) becomes ``raise ImportError``.
    ``from __future__`` imports move to the top; only ``main`` keeps its ``__all__``. The package modules are
    imported to check that no name means different things in two of them (:class:`HubError` otherwise).
    """
    from . import __version__

    modules = _closure(main)
    sources = {m: _read_module(m) for m in modules}
    trees = {m: tree for m, (_, tree) in sources.items()}
    _check_shared_names(modules, trees)
    futures: set[str] = set()
    sections = []
    for name in modules:
        source, tree = sources[name]
        lines = source.splitlines()
        where = f"{PACKAGE}.{name}"
        edits: list[tuple[int, int, list[str]]] = []
        for node in tree.body:
            drop = (isinstance(node, ast.ImportFrom) and node.module == "__future__") or (
                name != main and isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                and any(isinstance(t, ast.Name) and t.id == "__all__"
                        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])))
            if drop:
                if isinstance(node, ast.ImportFrom):
                    futures.update(a.name for a in node.names)
                first, last, _ = _statement_span(lines, node, where)
                edits.append((first, last, []))
        for node, top_level in _relative_imports(tree):
            first, last, indent = _statement_span(lines, node, where)
            if node.module in modules:
                dep = _package_module(node.module)
                for alias in node.names:
                    if alias.name == "*" or not hasattr(dep, alias.name):
                        raise HubError(f"cannot bundle {where} (line {node.lineno}): {PACKAGE}.{node.module} has no "
                                       f"name {alias.name!r}")
                new = [f"{indent}{a.asname} = {a.name}" for a in node.names if a.asname and a.asname != a.name]
                if not new and not top_level:
                    new = [f"{indent}pass"]
            elif top_level:
                raise HubError(f"cannot bundle {where}: {PACKAGE}.{node.module} is not inlined")
            else:
                message = (f"{PACKAGE}.{node.module} is not part of this repository's bundled code; install "
                           f"sphere-ar-hf to use it")
                new = [f"{indent}raise ImportError({message!r})"]
            edits.append((first, last, new))
        for first, last, new in sorted(edits, reverse=True):
            lines[first:last + 1] = new
        body = "\n".join(lines).strip("\n")
        sections.append(f"# {'-' * 32} {PACKAGE}/{name}.py {'-' * 32}\n{body}\n")
    header = (
        f"# Generated by `sphere-ar push` from sphere-ar-hf {__version__}: do not edit, regenerate.\n"
        f"# Inlined: {', '.join(f'{PACKAGE}/{m}.py' for m in modules)}.\n"
        "# diffusers runs this file for DiffusionPipeline.from_pretrained(repo, trust_remote_code=True); with\n"
        "# sphere-ar-hf installed, SphereARPipeline.from_pretrained(repo) uses the package and does not run it.\n"
        f'"""SphereAR remote code: {PACKAGE}.{main}, self-contained (no relative imports)."""\n\n'
    )
    if futures:
        header += f"from __future__ import {', '.join(sorted(futures))}\n\n"
    text = header + "\n\n".join(sections) + (f"\n\n{footer.strip()}\n" if footer.strip() else "")
    compile(text, f"{main}.py", "exec")  # a bundling mistake fails here, not on the Hub
    return text


# the bundled pipeline defines its own copies of the component classes, while diffusers loads each component from
# its folder's module: check the components against their base classes instead (diffusers only warns on mismatch)
_PIPELINE_FOOTER = """
# -------------------------------- remote code --------------------------------
from diffusers.models.modeling_utils import ModelMixin as _ModelMixin  # noqa: E402
from diffusers.schedulers.scheduling_utils import SchedulerMixin as _SchedulerMixin  # noqa: E402
from transformers import PreTrainedModel as _PreTrainedModel  # noqa: E402

SphereARPipeline.__init__.__annotations__.update(transformer=_PreTrainedModel, vae=_ModelMixin,
                                                 scheduler=_SchedulerMixin)
"""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: expected a JSON object")
    return data


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (a new file: hard-linked originals stay untouched)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_json(path: Path, data: Mapping) -> None:
    _write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _class_of(entry: Any) -> str | None:
    return entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None


def write_remote_code(folder: str | os.PathLike) -> list[str]:
    """Add the remote code to a pipeline folder in place; returns the written files (relative paths).

    Writes ``pipeline_sphere_ar.py`` and one module per component (see :data:`REMOTE_COMPONENTS`), points
    ``model_index.json`` at them and adds an ``auto_map`` to ``transformer/config.json``.
    """
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    written = []
    module, package_module, class_name = REMOTE_PIPELINE
    _write_text(folder / f"{module}.py", bundle_module(package_module, footer=_PIPELINE_FOOTER))
    written.append(f"{module}.py")
    index["_class_name"] = [module, class_name]
    for component, (module, package_module, class_name) in REMOTE_COMPONENTS.items():
        if _class_of(index.get(component)) != class_name:
            raise HubError(f"{folder}/model_index.json: expected {component} to be a {class_name}, got "
                           f"{index.get(component)!r}")
        if not (folder / component).is_dir():
            raise HubError(f"{folder} has no {component}/ folder")
        _write_text(folder / component / f"{module}.py", bundle_module(package_module))
        written.append(f"{component}/{module}.py")
        index[component] = [module, class_name]
    _write_json(folder / "model_index.json", index)
    # relative to the repository root: transformers looks the module file up there, even with subfolder="transformer"
    module = f"transformer/{REMOTE_COMPONENTS['transformer'][0]}"
    config = _read_json(folder / "transformer" / "config.json")
    config["auto_map"] = {"AutoConfig": f"{module}.SphereARConfig", "AutoModel": f"{module}.SphereARTransformer"}
    _write_json(folder / "transformer" / "config.json", config)
    return written


def package_model_index(config: Any) -> Any:
    """``model_index.json`` (as ``load_config`` returns it) with remote-code entries mapped to this package.

    A folder written by :func:`write_remote_code` names its own module files; this turns them back into
    ``"SphereARPipeline"`` and ``["sphere_ar_hf.modeling_sphere_ar", "SphereARTransformer"]``, ..., so that
    ``SphereARPipeline.from_pretrained`` loads it with the installed package without running the bundled code.
    Anything else is returned unchanged. Accepts ``load_config``'s tuple results too.
    """
    if isinstance(config, tuple):
        return (package_model_index(config[0]), *config[1:])
    if not isinstance(config, dict) or config.get("_class_name") != [REMOTE_PIPELINE[0], REMOTE_PIPELINE[2]]:
        return config
    config = {**config, "_class_name": REMOTE_PIPELINE[2]}
    for component, (module, package_module, class_name) in REMOTE_COMPONENTS.items():
        if config.get(component) == [module, class_name]:
            config[component] = [f"{PACKAGE}.{package_module}", class_name]
    return config


def download_pipeline(pretrained_model_name: str, *, cache_dir: str | os.PathLike | None = None,
                      revision: str | None = None, token: str | bool | None = None, local_files_only: bool = False,
                      force_download: bool = False, proxies: dict | None = None, use_safetensors: bool | None = None,
                      **_ignored: Any) -> str:
    """Fetch a pipeline repository's configs and weights (never its ``*.py`` files); returns the local folder.

    ``SphereARPipeline.download``: diffusers' own download would import a repository's custom pipeline module to
    find its components, which needs ``trust_remote_code`` although this package does not use that code.
    """
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.safetensors"]
    if use_safetensors is False:
        patterns.append("*/*.bin")
    kwargs = {"proxies": proxies} if proxies else {}
    return snapshot_download(pretrained_model_name, cache_dir=cache_dir, revision=revision, token=token,
                             local_files_only=local_files_only, force_download=force_download,
                             allow_patterns=patterns, **kwargs)


# ---- model cards --------------------------------------------------------------------------------------------------
def _safetensors_numel(path: Path) -> int:
    """Number of parameters in a safetensors file, from its header (the tensors are not read)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise HubError(f"{path}: not a safetensors file")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError):
            raise HubError(f"{path}: not a safetensors file") from None
    total = 0
    for key, info in header.items():
        if key != "__metadata__":
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


def _count_parameters(folder: Path) -> int:
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)  # no variants (x.fp16.y)
    if not files:
        raise HubError(f"{folder}: no safetensors weights")
    return sum(_safetensors_numel(p) for p in files)


def pipeline_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """What a model card says about a pipeline folder, read from its configs and weight headers."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder}: no model_index.json, so not a pipeline folder (write one with `sphere-ar "
                       "convert` or SphereARPipeline.save_pretrained)")
    index = package_model_index(_read_json(folder / "model_index.json"))
    if index.get("_class_name") != REMOTE_PIPELINE[2]:
        raise HubError(f"{folder}: holds a {index.get('_class_name')!r}, not a SphereARPipeline")
    tf = _read_json(folder / "transformer" / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    id2label = {int(k): str(v) for k, v in (index.get("id2label") or {}).items()}
    n_tf = _count_parameters(folder / "transformer")
    n_vae = _count_parameters(folder / "vae")
    grid = tf["image_size"] // tf["patch_size"]
    return {
        "num_classes": int(tf["num_classes"]),
        "num_labels": len(id2label),
        "id2label": id2label,
        "image_size": int(tf["image_size"]),
        "num_tokens": grid * grid,
        "latent_dim": int(tf["latent_dim"]),
        "hidden_size": int(tf["hidden_size"]),
        "num_hidden_layers": int(tf["num_hidden_layers"]),
        "guidance_scale": float(tf["guidance_scale"]),
        "num_inference_steps": int(scheduler.get("num_inference_steps", 100)),
        "sampler": scheduler.get("sampler", "euler_maruyama"),
        "transformer_params": n_tf,
        "vae_params": n_vae,
        "total_params": n_tf + n_vae,
        "transformer_params_str": format_millions(n_tf),
        "vae_params_str": format_millions(n_vae),
        "total_params_str": format_millions(n_tf + n_vae),
    }


def detect_card(facts: Mapping[str, Any]) -> str:
    """``"b"`` / ``"l"`` / ``"h"`` for the official ImageNet sizes, ``"digits"`` for 10 classes named "0".."9"."""
    from .configuration_sphere_ar import PRESETS

    if facts["num_classes"] == 10 and [facts["id2label"].get(i) for i in range(10)] == [str(i) for i in range(10)]:
        return "digits"
    if facts["num_classes"] == 1000:
        for name, preset in PRESETS.items():
            if (preset["hidden_size"], preset["num_hidden_layers"]) == (facts["hidden_size"],
                                                                        facts["num_hidden_layers"]):
                return name[-1].lower()
    raise HubError(f"cannot tell which model card fits this model ({facts['num_classes']} classes, width "
                   f"{facts['hidden_size']}, {facts['num_hidden_layers']} layers): pass card= / --card "
                   f"{'|'.join(CARDS)}")


def _check_license(license: str | None, license_name: str | None, license_link: str | None) -> str:
    if license is None or not str(license).strip():
        raise HubError("a license is required: the license of the weights as their owner states it, as a Hub license "
                       "id (e.g. mit, apache-2.0, cc-by-nc-4.0, or other with a license name and link); it is never "
                       "guessed")
    value = str(license).strip().lower()
    if not _LICENSE.fullmatch(value):
        raise HubError(f"license {license!r} is not a Hub license id (e.g. mit, apache-2.0, cc-by-nc-4.0, other)")
    if value == "other" and not (license_name and license_link):
        raise HubError("license 'other' needs a license name and a link to its text (license_name, license_link / "
                       "--license-name, --license-link)")
    return value


def _check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"repo id {repo_id!r} is not of the form owner/name")
    return repo_id


def _template_dir(template_dir: str | os.PathLike | None) -> Path:
    path = Path(template_dir) if template_dir is not None else HUB_CARDS_DIR
    if not path.is_dir():
        raise HubError(f"the card templates are not in {path} (they live in the source checkout's hub_cards/); pass "
                       "template_dir")
    return path


def render_model_card(pipeline: str | os.PathLike, *, repo_id: str, license: str | None, card: str = "auto",
                      remote_code: bool = True, license_name: str | None = None, license_link: str | None = None,
                      template_dir: str | os.PathLike | None = None) -> ModelCard:
    """The model card of a pipeline folder, from ``hub_cards/model_card_{imagenet,digits}.md``.

    ``license``: the license of the weights as their owner states it (a Hub license id; required, never
    guessed; ``"other"`` needs ``license_name`` and ``license_link``). ``card``: ``"b"``, ``"l"``, ``"h"``
    (converted official ImageNet weights), ``"digits"`` (the bundled digits model) or ``"auto"``
    (:func:`detect_card`). ``remote_code``: whether the repository carries remote code (the card then shows the
    ``trust_remote_code=True`` snippet).
    """
    from huggingface_hub import ModelCard, ModelCardData

    license = _check_license(license, license_name, license_link)
    repo_id = _check_repo_id(repo_id)
    facts = pipeline_facts(pipeline)
    card = detect_card(facts) if card == "auto" else card
    if card not in CARDS:
        raise HubError(f"unknown card {card!r}; expected one of {', '.join(CARDS)} or auto")
    templates = _template_dir(template_dir)
    imagenet = card != "digits"
    tags = ["sphere-ar", "autoregressive", "class-conditional", "image-generation", f"arxiv:{ARXIV_ID}"]
    tags += ["imagenet"] if imagenet else ["digits", "toy-model"]
    if remote_code:
        tags.append("custom_code")
    extra = {"license_name": license_name, "license_link": license_link} if license == "other" else {}
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
                         tags=tags, datasets=["ILSVRC/imagenet-1k"] if imagenet else None, **extra)
    variant = {"b": "SphereAR-B", "l": "SphereAR-L", "h": "SphereAR-H", "digits": "SphereAR digits"}[card]
    template = templates / ("model_card_imagenet.md" if imagenet else "model_card_digits.md")
    return ModelCard.from_template(
        data, template_path=str(template), repo_id=repo_id, model_name=variant, variant=card,
        checkpoint=f"SphereAR_{card.upper()}.pt", official_repo=OFFICIAL_REPO, arxiv_id=ARXIV_ID,
        remote_code=remote_code, license_name=license_name, license_link=license_link, **facts)


def render_space_card(*, license: str | None, models: Iterable[str] = (), title: str = "SphereAR",
                      license_name: str | None = None, license_link: str | None = None,
                      template_dir: str | os.PathLike | None = None) -> SpaceCard:
    """The Space README (``hub_cards/space/README.md``): gradio SDK, ``app.py``, the given license and models."""
    from huggingface_hub import SpaceCard

    license = _check_license(license, license_name, license_link)
    models = [_check_repo_id(m) for m in models]
    path = _template_dir(template_dir) / "space" / "README.md"
    text = _render_jinja(path, license=license, models=models, title=title, sdk_version=GRADIO_SDK_VERSION,
                         license_name=license_name, license_link=license_link, arxiv_id=ARXIV_ID)
    return SpaceCard(text)


def build_space_folder(output: str | os.PathLike, *, license: str | None, models: Iterable[str] = (),
                       title: str = "SphereAR", overwrite: bool = False, license_name: str | None = None,
                       license_link: str | None = None, template_dir: str | os.PathLike | None = None) -> Path:
    """Write a Space folder to ``output`` (atomically): ``hub_cards/space/``'s files (``app.py``, ...) and its
    rendered ``README.md`` (:func:`render_space_card`). Upload it with ``HfApi().upload_folder(...,
    repo_type="space")``."""
    from .utils import write_folder_atomically

    card = render_space_card(license=license, models=models, title=title, license_name=license_name,
                             license_link=license_link, template_dir=template_dir)
    space = _template_dir(template_dir) / "space"

    def fill(tmp: Path) -> None:
        _copy_folder(space, tmp, link=False)  # everything but dotfiles, caches and the README template
        _write_text(tmp / "README.md", str(card))

    return write_folder_atomically(Path(output).expanduser(), fill, overwrite=overwrite)


def _render_jinja(path: Path, **variables: Any) -> str:
    import jinja2

    return jinja2.Template(path.read_text(encoding="utf-8"), keep_trailing_newline=True).render(**variables)


# ---- push ---------------------------------------------------------------------------------------------------------
_SKIPPED = ("README.md",)


def _copy_folder(src: Path, dst: Path, link: bool) -> None:
    """Copy a folder's files (not dotfiles, caches, bytecode or a top-level README.md); hard links if ``link``."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == src
        return {n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith(".pyc")
                or (top and n in _SKIPPED)}

    def copy(a: str, b: str) -> str:
        if link:
            try:
                os.link(a, b)
                return b
            except OSError:
                pass
        return shutil.copy2(a, b)

    shutil.copytree(src, dst, ignore=ignore, copy_function=copy, dirs_exist_ok=True)


def _fill_folder(pipeline: Path, dst: Path, *, repo_id: str, license: str | None, card: str, remote_code: bool,
                 license_name: str | None, license_link: str | None, template_dir: str | os.PathLike | None,
                 link: bool) -> None:
    card_obj = render_model_card(pipeline, repo_id=repo_id, license=license, card=card, remote_code=remote_code,
                                 license_name=license_name, license_link=license_link, template_dir=template_dir)
    _copy_folder(pipeline, dst, link)
    if remote_code:
        write_remote_code(dst)
    else:  # a pushed folder given back: plain package entries again, without the old remote code
        index = _read_json(dst / "model_index.json")
        _write_json(dst / "model_index.json", package_model_index(index))
        (dst / f"{REMOTE_PIPELINE[0]}.py").unlink(missing_ok=True)
        for component, (module, _, _) in REMOTE_COMPONENTS.items():
            (dst / component / f"{module}.py").unlink(missing_ok=True)
        config = _read_json(dst / "transformer" / "config.json")
        if config.pop("auto_map", None) is not None:
            _write_json(dst / "transformer" / "config.json", config)
    _write_text(dst / "README.md", str(card_obj))


def _check_pipeline(pipeline: str | os.PathLike) -> Path:
    path = Path(pipeline).expanduser()
    if not path.is_dir():
        raise HubError(f"{pipeline}: no such folder (--pipeline takes a pipeline folder)")
    pipeline_facts(path)  # a SphereAR pipeline folder, with weights
    return path


def build_push_folder(pipeline: str | os.PathLike, output: str | os.PathLike, *, repo_id: str, license: str | None,
                      card: str = "auto", remote_code: bool = True, license_name: str | None = None,
                      license_link: str | None = None, overwrite: bool = False,
                      template_dir: str | os.PathLike | None = None) -> Path:
    """Write the folder that :func:`push_pipeline` would upload to ``output`` (atomically; files are copied).

    It holds the pipeline's files, the rendered ``README.md`` and, with ``remote_code``, the remote code
    (:func:`write_remote_code`). An existing non-empty ``output`` needs ``overwrite``.
    """
    from .utils import write_folder_atomically

    src = _check_pipeline(pipeline)
    out = Path(output).expanduser()
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise HubError(f"the output folder {output} must not be (inside) the pipeline folder {pipeline}")

    def fill(tmp: Path) -> None:
        _fill_folder(src, tmp, repo_id=repo_id, license=license, card=card, remote_code=remote_code,
                     license_name=license_name, license_link=license_link, template_dir=template_dir, link=False)

    return write_folder_atomically(out, fill, overwrite=overwrite)


def _hf_api() -> HfApi:
    from huggingface_hub import HfApi

    return HfApi()


def push_pipeline(pipeline: str | os.PathLike, repo_id: str, *, license: str | None, private: bool = False,
                  card: str = "auto", remote_code: bool = True, license_name: str | None = None,
                  license_link: str | None = None, commit_message: str | None = None, api: HfApi | None = None,
                  template_dir: str | os.PathLike | None = None) -> str:
    """Upload a pipeline folder to the Hub model repository ``repo_id`` (created if needed); returns its URL.

    Uploads exactly what :func:`build_push_folder` writes (staged in a temporary folder, hard-linked where
    possible). Files of the repository's component folders that are not in the new folder are deleted in the same
    commit; other files of the repository are kept.
    """
    src = _check_pipeline(pipeline)
    repo_id = _check_repo_id(repo_id)
    _check_license(license, license_name, license_link)
    api = api if api is not None else _hf_api()
    components = [c for c, v in _read_json(src / "model_index.json").items() if isinstance(v, list)
                  and not c.startswith("_")]
    try:  # beside the pipeline (same file system: hard links) if we may write there
        stage_parent = tempfile.mkdtemp(prefix=f".{src.name}.push-", dir=src.parent)
    except OSError:
        stage_parent = tempfile.mkdtemp(prefix="sphere-ar-push-")
    try:
        stage = Path(stage_parent) / "repo"
        _fill_folder(src, stage, repo_id=repo_id, license=license, card=card, remote_code=remote_code,
                     license_name=license_name, license_link=license_link, template_dir=template_dir, link=True)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(stage),
                          commit_message=commit_message or "Upload SphereAR pipeline (sphere-ar push)",
                          delete_patterns=[f"{c}/*" for c in components])
    finally:
        shutil.rmtree(stage_parent, ignore_errors=True)
    return f"https://huggingface.co/{repo_id}"


# ---- command line -------------------------------------------------------------------------------------------------
def add_push_parser(subparsers: Any, formatter_class: type[argparse.HelpFormatter] | None = None
                    ) -> argparse.ArgumentParser:
    """Add ``sphere-ar push`` to the ``sphere-ar`` subparsers (``args.func`` is :func:`run_push`)."""
    kwargs = {"formatter_class": formatter_class} if formatter_class is not None else {}
    push = subparsers.add_parser(
        "push", help="upload a pipeline folder to the Hugging Face Hub with a model card and remote code",
        description="Upload a pipeline folder to a Hugging Face Hub model repository (created if needed), with a "
                    "model card (README.md) and the remote code that lets DiffusionPipeline.from_pretrained(repo, "
                    "trust_remote_code=True) load it without sphere-ar-hf. --dry-run DIR writes the exact folder "
                    "that would be uploaded and uploads nothing. Log in first (`hf auth login` or HF_TOKEN).",
        epilog="example: sphere-ar push --pipeline sphere-ar-b --repo-id you/SphereAR-B --license LICENSE --dry-run "
               "out/ (then look at out/, and push without --dry-run)",
        **kwargs)
    push.add_argument("--pipeline", required=True, metavar="DIR", help="pipeline folder (e.g. from sphere-ar convert)")
    push.add_argument("--repo-id", required=True, metavar="ID", help="Hub model repository, owner/name")
    push.add_argument("--license", metavar="LICENSE", default=None,
                      help="license of the weights as their owner states it, as a Hub license id (mit, apache-2.0, "
                           "cc-by-nc-4.0, other, ...); required, never guessed")
    push.add_argument("--license-name", metavar="NAME", default=None, help="name of the license, with --license other")
    push.add_argument("--license-link", metavar="URL", default=None, help="link to its text, with --license other")
    push.add_argument("--card", choices=(*CARDS, "auto"), default="auto",
                      help="model card: converted SphereAR-B / -L / -H, the digits model, or auto (from the config)")
    push.add_argument("--private", action="store_true",
                      help="create the repository as private (an existing repository keeps its visibility)")
    push.add_argument("--no-remote-code", dest="remote_code", action="store_false",
                      help="leave out the remote code (default: included; without it, loading needs sphere-ar-hf "
                           "installed)")
    push.add_argument("--commit-message", metavar="TEXT", default=None, help="commit message of the upload")
    push.add_argument("--dry-run", metavar="DIR", type=Path, default=None,
                      help="write the folder that would be uploaded to DIR and upload nothing")
    push.add_argument("--overwrite", action="store_true", help="with --dry-run: replace DIR if it is not empty")
    push.set_defaults(func=run_push)
    return push


def run_push(args: argparse.Namespace, api: HfApi | None = None) -> int:
    """Run ``sphere-ar push``; errors print one ``error: ...`` line and return 2."""
    from .convert import ConversionError

    try:
        if args.license is None:
            raise HubError("--license is required: the license of the weights as their owner states it (a Hub "
                           "license id such as mit, apache-2.0, cc-by-nc-4.0, or other with --license-name and "
                           "--license-link); it is never guessed")
        common = dict(license=args.license, card=args.card, remote_code=args.remote_code,
                      license_name=args.license_name, license_link=args.license_link)
        if args.dry_run is not None:
            out = build_push_folder(args.pipeline, args.dry_run, repo_id=args.repo_id, overwrite=args.overwrite,
                                    **common)
            files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
            print(f"wrote {out} ({len(files)} files: {', '.join(files)}); nothing was uploaded")
            return 0
        url = push_pipeline(args.pipeline, args.repo_id, private=args.private, commit_message=args.commit_message,
                            api=api, **common)
    except (HubError, ConversionError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # the Hub client's errors (authentication, permissions, network)
        if type(e).__module__.split(".")[0] not in ("huggingface_hub", "httpx", "requests"):
            raise
        print(f"error: the upload failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"pushed {args.pipeline} to {url}{' (private)' if args.private else ''}")
    return 0

