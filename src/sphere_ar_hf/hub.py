"""Publishing SphereAR pipelines on the Hugging Face Hub: model cards, the Space README and ``sphere-ar push``.

A pushed repository is the pipeline folder plus a ``README.md`` model card rendered from ``hub_cards/`` and, by
default, the remote code of :mod:`.remote_code`: this package's module files, copied unchanged, so that
``DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`` loads it without the package.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .remote_code import COMPONENTS, PIPELINE, package_model_index, write_remote_code
from .utils import FOLDER_KINDS, FolderKind, atomic_write, format_millions, write_folder_atomically

if TYPE_CHECKING:
    from huggingface_hub import HfApi, ModelCard, SpaceCard

__all__ = ["CARDS", "TRAINING_INFO_KEY", "HubError", "add_push_parser", "build_push_folder", "build_space_folder",
           "card_problem", "detect_card", "load_metrics", "pipeline_facts", "push_pipeline", "render_model_card",
           "render_space_card", "run_push", "space_folder_kind", "space_package_files"]

HUB_CARDS_DIR = Path(__file__).resolve().parents[2] / "hub_cards"  # the source checkout's templates
ARXIV_ID = "2509.24335"
OFFICIAL_REPO = "guolinke/SphereAR"
GRADIO_SDK_VERSION = "6.31.0"
CARDS = ("b", "l", "h", "digits", "generic")
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class HubError(ValueError):
    """A problem with the inputs of a card / push function; the message says what to change."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: expected a JSON object")
    return data


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename (a new file: hard-linked originals stay untouched)."""
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


# ---- model cards --------------------------------------------------------------------------------------------------
TRAINING_INFO_KEY = "training_info"
"""The key of ``transformer/config.json`` under which our trainers record how the weights were trained (a JSON
object: dataset, steps, epochs, date, ...); a transformers config keeps unknown keys, so the record survives
``save_pretrained`` / ``from_pretrained`` round trips and strict loading."""
MAX_LISTED_CLASSES = 20
_METRICS = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "Precision",
            "recall": "Recall", "frechet_distance": "Fréchet distance (digits-classifier features)",
            "accuracy": "Accuracy (digits classifier)"}
_CARD_NAMES = {"b": "SphereAR-B", "l": "SphereAR-L", "h": "SphereAR-H", "digits": "SphereAR digits"}


def _count_parameters(folder: Path) -> int:
    """Parameters in a folder's safetensors files (no variants such as x.fp16.y), from their headers alone."""
    files = _weight_files(folder)
    if not files:
        raise HubError(f"{folder}: no safetensors weights")
    total = 0
    for path in files:
        with open(path, "rb") as f:
            try:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            except (struct.error, ValueError, UnicodeDecodeError):
                raise HubError(f"{path}: not a safetensors file") from None
        total += sum(math.prod(info["shape"]) for key, info in header.items() if key != "__metadata__")
    return total


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)


def _same_weights(folder: Path, reference: Path) -> bool:
    """Whether two pipeline folders hold the same transformer and VAE weight files (sizes first, then sha256)."""
    for component in ("transformer", "vae"):
        ours, theirs = _weight_files(folder / component), _weight_files(reference / component)
        if [p.name for p in ours] != [p.name for p in theirs] or any(
                a.stat().st_size != b.stat().st_size for a, b in zip(ours, theirs)):
            return False
        for a, b in zip(ours, theirs):
            if a.resolve() != b.resolve() and _sha256(a) != _sha256(b):
                return False
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_bundled_digits(folder: Path) -> bool:
    """Whether ``folder`` holds the bundled digits model's weights (``sphere_ar_hf/pretrained/digits``)."""
    from .pretrained import bundled_model_path

    try:
        return _same_weights(folder, bundled_model_path("digits"))
    except (OSError, ValueError):
        return False


def pipeline_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """What a model card says about a pipeline folder, read from its configs and weight headers.

    Besides the sizes: ``training`` (the trainers' record in ``transformer/config.json``, or None), ``bundled``
    (the weights are the bundled digits model's) and ``imagenet_labels`` (``id2label`` is ImageNet-1k's)."""
    from .labels import imagenet_id2label

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder}: no model_index.json, so not a pipeline folder (write one with `sphere-ar "
                       "convert` or SphereARPipeline.save_pretrained)")
    index = package_model_index(_read_json(folder / "model_index.json"))
    if index.get("_class_name") != PIPELINE:
        raise HubError(f"{folder}: holds a {index.get('_class_name')!r}, not a {PIPELINE}")
    tf = _read_json(folder / "transformer" / "config.json")
    vae = _read_json(p) if (p := folder / "vae" / "config.json").is_file() else {}
    scheduler = _read_json(p) if (p := folder / "scheduler" / "scheduler_config.json").is_file() else {}
    id2label = {int(k): str(v) for k, v in (index.get("id2label") or {}).items()}
    n_tf, n_vae = _count_parameters(folder / "transformer"), _count_parameters(folder / "vae")
    training = tf.get(TRAINING_INFO_KEY)
    return {
        "num_classes": int(tf["num_classes"]), "num_labels": len(id2label), "id2label": id2label,
        "image_size": int(tf["image_size"]), "patch_size": int(tf["patch_size"]),
        "num_tokens": (tf["image_size"] // tf["patch_size"]) ** 2,
        "latent_dim": int(tf["latent_dim"]), "hidden_size": int(tf["hidden_size"]),
        "num_hidden_layers": int(tf["num_hidden_layers"]), "num_attention_heads": tf.get("num_attention_heads"),
        "head_hidden_size": tf.get("head_hidden_size"), "head_num_layers": tf.get("head_num_layers"),
        "guidance_scale": float(tf["guidance_scale"]),
        "vae_encoder_layers": vae.get("encoder_layers"), "vae_decoder_layers": vae.get("decoder_layers"),
        "vae_cnn_channels": vae.get("cnn_channels"), "vae_z_channels": vae.get("z_channels"),
        "num_inference_steps": int(scheduler.get("num_inference_steps", 100)), "transformer_params": n_tf,
        "vae_params": n_vae, "transformer_params_str": format_millions(n_tf), "vae_params_str": format_millions(n_vae),
        "training": training if isinstance(training, dict) else None,
        **latent_space_facts(vae, tf),
        "bundled": _is_bundled_digits(folder),
        "imagenet_labels": int(tf["num_classes"]) == 1000 and id2label == imagenet_id2label(),
    }


def latent_space_facts(vae: Mapping[str, Any], tf: Mapping[str, Any]) -> dict[str, Any]:
    """What a card may say of the latent space: ``sphere`` (SphereAR's: a Power Spherical posterior and every token
    projected) or an ablation baseline, ``vae_kind`` and a ``latents_summary`` sentence."""
    posterior = vae.get("posterior", "power_spherical")
    decoder_projects = bool(vae.get("normalize_decoder_input", True))
    tokens_projected = bool(tf.get("normalize_tokens", True))
    d = int(tf["latent_dim"])
    radius = f"the sphere of radius √{d}"
    if posterior == "power_spherical" and tokens_projected:
        summary = f"on {radius}"
    elif tokens_projected:
        summary = f"a diagonal-Gaussian VAE's, projected onto {radius} (as SphereAR projects its tokens)"
    else:
        what = "a diagonal-Gaussian VAE's" if posterior == "gaussian" else "the Power Spherical S-VAE's"
        summary = f"{what}, not projected when sampled" + \
            (f" (the decoder projects its input onto {radius})" if decoder_projects else " (nor by the decoder)")
    return {"posterior": posterior, "sphere": posterior == "power_spherical" and tokens_projected,
            "vae_kind": "S-VAE" if posterior == "power_spherical" else "VAE (diagonal Gaussian)",
            "latents_summary": summary}


def card_problem(facts: Mapping[str, Any], card: str, explicit: bool = True) -> str | None:
    """Why ``card`` would say something untrue of the model that ``facts`` (:func:`pipeline_facts`) describe, or
    None if it fits. ``explicit=False`` (auto): the ImageNet cards also need ImageNet-1k's class names."""
    from .configuration_sphere_ar import PRESETS

    if card == "generic":
        return None
    if card == "digits":
        return None if facts.get("bundled") else "does not hold the bundled digits model's weights"
    if not facts.get("sphere", True):
        return f"is an ablation baseline, not SphereAR: its tokens are {facts['latents_summary']}"
    preset = PRESETS[_CARD_NAMES[card]]
    size = (facts["num_classes"], facts["hidden_size"], facts["num_hidden_layers"])
    if size != (1000, preset["hidden_size"], preset["num_hidden_layers"]):
        return (f"has {facts['num_classes']} classes, width {facts['hidden_size']} and {facts['num_hidden_layers']} "
                f"layers, not {_CARD_NAMES[card]}'s 1000, {preset['hidden_size']} and {preset['num_hidden_layers']}")
    if facts.get("training"):
        return "was trained by sphere-ar-hf's trainers (transformer/config.json records it), not converted"
    if not facts.get("imagenet_labels") and (facts.get("id2label") or not explicit):
        return "does not name ImageNet-1k's classes in model_index.json"
    return None


def detect_card(facts: Mapping[str, Any]) -> str:
    """The card that fits: ``"b"`` / ``"l"`` / ``"h"`` for converted official weights (1000 ImageNet-1k classes,
    an official size, no training record), ``"digits"`` for the bundled digits model's weights, else
    ``"generic"`` (a card made of the folder's own facts)."""
    for card in ("b", "l", "h", "digits"):
        if card_problem(facts, card, explicit=False) is None:
            return card
    return "generic"


def load_metrics(metrics: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A ``sphere-ar evaluate --json`` result (a file or its parsed object), checked; None stays None."""
    if metrics is None:
        return None
    data = dict(metrics) if isinstance(metrics, Mapping) else _read_json(Path(metrics).expanduser())
    values = {k: data[k] for k in _METRICS if k in data}
    if data.get("features") not in ("inception", "digits") or not values or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
        raise HubError(f"{metrics if not isinstance(metrics, Mapping) else 'metrics'}: not a `sphere-ar evaluate "
                       "--json` result (expected \"features\" and finite metrics such as \"fid\")")
    return data


def _metrics_markdown(metrics: Mapping[str, Any] | None) -> str:
    """The evaluation section's table (empty without metrics); paths are shown by their last part only."""
    if not metrics:
        return ""
    features = {"inception": "InceptionV3 features (OpenAI's evaluation suite's network)",
                "digits": "the features of a small digits classifier"}[metrics["features"]]
    ref = Path(str(metrics.get("ref", "?"))).name or str(metrics.get("ref"))
    rows = "\n".join(f"| {name} | {metrics[key]:.4g} |" for key, name in _METRICS.items() if key in metrics)
    return (f"Measured by the uploader with `sphere-ar evaluate` ({features}): {metrics.get('num_gen', '?')} "
            f"generated images against {metrics.get('num_ref', '?')} reference images (`{ref}`). Not re-measured "
            f"when this card was made.\n\n| Metric | Value |\n| --- | :---: |\n{rows}\n")


def _class_rows(facts: Mapping[str, Any]) -> tuple[str, list[tuple[int, str]], int]:
    """(summary, the listed (id, name) rows, how many named classes are not listed)."""
    n, names = facts["num_classes"], facts["id2label"]
    if not names:
        return f"{n} (ids 0 to {n - 1}; model_index.json names none)", [], 0
    listed = [(i, names[i]) for i in sorted(names)[:MAX_LISTED_CLASSES]]
    return f"{n}, named in `model_index.json`", listed, len(names) - len(listed)


def _example_labels(facts: Mapping[str, Any]) -> list[str | int]:
    """Two class labels for the usage snippet: names (their first synonym) when the model has them, else ids."""
    ids = list(range(min(2, facts["num_classes"])))
    names = facts["id2label"]
    return [names[i].split(",")[0].strip() if names.get(i) else i for i in ids]


def _training_rows(training: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The training record as (what, value) rows, in a fixed order; unknown keys are left out."""
    if not training:
        return []
    fields = [("dataset", "Dataset"), ("split", "Split"), ("num_examples", "Training examples"),
              ("num_classes", "Classes in the data"), ("global_step", "Optimizer steps"), ("epochs", "Epochs"),
              ("effective_batch_size", "Batch size (effective)"), ("learning_rate", "Peak learning rate"),
              ("init", "Initialised from"), ("date", "Finished (UTC)"), ("trainer", "Trainer")]
    rows = []
    for key, name in fields:
        value = training.get(key)
        if value is None or isinstance(value, dict | list):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        rows.append((name, str(value).replace("|", "\\|")))
    return rows


def _check_license(license: str | None, license_name: str | None, license_link: str | None) -> str:
    if license is None or not str(license).strip():
        raise HubError("a license is required: the license of the weights as their owner states it, as a Hub license "
                       "id (mit, apache-2.0, cc-by-nc-4.0, other with a license name and link...); it is never guessed")
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
                      template_dir: str | os.PathLike | None = None,
                      metrics: str | os.PathLike | Mapping[str, Any] | None = None) -> ModelCard:
    """The model card of a pipeline folder, from ``hub_cards/model_card_{imagenet,digits,generic}.md``.

    ``license``: the license of the weights as their owner states it (a Hub license id; required, never guessed;
    ``"other"`` needs ``license_name`` and ``license_link``). ``card``: ``"auto"`` (:func:`detect_card`: the card
    that fits), or ``"b"`` / ``"l"`` / ``"h"`` (converted official ImageNet weights), ``"digits"`` (the bundled
    digits model), ``"generic"`` (any model: only the facts read from the folder); an explicit card that does not
    fit the folder (:func:`card_problem`) is a :class:`HubError`. ``remote_code``: whether the repository carries
    remote code (the card then shows the ``trust_remote_code=True`` snippet). ``metrics``: a ``sphere-ar evaluate
    --json`` result (file or object) shown as the uploader's measurement."""
    from huggingface_hub import ModelCard, ModelCardData

    license = _check_license(license, license_name, license_link)
    repo_id = _check_repo_id(repo_id)
    facts = pipeline_facts(pipeline)
    measured = load_metrics(metrics)
    if card != "auto" and card not in CARDS:
        raise HubError(f"unknown card {card!r}; expected one of {', '.join(CARDS)} or auto")
    if card == "auto":
        card = detect_card(facts)
    elif (why := card_problem(facts, card)) is not None:
        what = "the bundled digits model" if card == "digits" else f"the converted official {_CARD_NAMES[card]} weights"
        raise HubError(f"--card {card} describes {what}, but this model {why}; leave out --card (or pass --card "
                       "generic) for a card made of this model's own facts")
    templates = _template_dir(template_dir)
    extra = {"license_name": license_name, "license_link": license_link} if license == "other" else {}
    training = facts["training"] or {}
    common = dict(repo_id=repo_id, arxiv_id=ARXIV_ID, remote_code=remote_code, license_name=license_name,
                  license_link=license_link, metrics_table=_metrics_markdown(measured), **facts)
    base_tags = ["sphere-ar", "autoregressive", "class-conditional", "image-generation", f"arxiv:{ARXIV_ID}"]
    code_tags = ["custom_code"] if remote_code else []
    if card == "generic":
        dataset = training.get("hub_dataset")
        data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation",
                             license=license, tags=[*base_tags, *code_tags],
                             datasets=[dataset] if isinstance(dataset, str) and _REPO_ID.fullmatch(dataset) else None,
                             **extra)
        summary, listed, unlisted = _class_rows(facts)
        return ModelCard.from_template(
            data, template_path=str(templates / "model_card_generic.md"), model_name=repo_id.split("/")[-1],
            classes_summary=summary, listed_classes=listed, unlisted_classes=unlisted,
            example_labels=json.dumps(_example_labels(facts)), training_rows=_training_rows(facts["training"]),
            **common)
    imagenet = card != "digits"
    tags = [*base_tags, *(["imagenet"] if imagenet else ["digits", "toy-model"]), *code_tags]
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
                         tags=tags, datasets=["ILSVRC/imagenet-1k"] if imagenet else None, **extra)
    template = templates / ("model_card_imagenet.md" if imagenet else "model_card_digits.md")
    return ModelCard.from_template(data, template_path=str(template), model_name=_CARD_NAMES[card],
                                   checkpoint=f"SphereAR_{card.upper()}.pt", official_repo=OFFICIAL_REPO, **common)


# ---- the Space ----------------------------------------------------------------------------------------------------
SPACE_PACKAGE = "sphere_ar_hf"  # the Space's copy of this package's module files
SPACE_MODEL = "model"  # the Space's copy of a local pipeline folder
PACKAGE_LICENSE = "mit"  # this package's license (setup.py): its code and its embedded digits model
_SPACE_ENTRIES = ((), ("demo",), ("remote_pipeline",))  # the package, the demo, every module of the pipeline


def _installed_version(name: str) -> str:
    """The installed version of the distribution ``name``, without a local label (``2.5.1+cpu`` -> ``2.5.1``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name).split("+", 1)[0]
    except PackageNotFoundError:
        raise HubError(f"{name} is not installed here, and a Space folder pins the versions installed where it is "
                       "written: pip install \"sphere-ar-hf[demo]\"") from None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _relative_imports(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[ast.ImportFrom, bool]]:
    """The relative ``from . import`` statements under ``tree`` and whether each runs at import time (not in a
    function); ``if TYPE_CHECKING:`` blocks never run."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _relative_imports(ast.Module(body=[child], type_ignores=[]), in_function)
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            yield node, not in_function
        yield from _relative_imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                            ast.Lambda)))


def _module_file(root: Path, parts: tuple[str, ...]) -> Path | None:
    """The file of the module ``parts`` (``("cli",)``, ``("pretrained",)``, ``()`` the package) under ``root``."""
    path = root.joinpath(*parts)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if parts and path.with_suffix(".py").is_file() else None


def space_package_files(source: str | os.PathLike | None = None) -> list[str]:
    """The package files a Space carries in ``sphere_ar_hf/``, as paths relative to the package folder ``source``
    (default: this package's).

    The modules that the package's ``__init__`` and ``demo`` import and, in turn, those import (found in their
    source): a module of the package's top level also where a function imports it, a subpackage only where it is
    imported at import time (training and evaluation code, imported only by other commands, stays out); and the data
    folders at the package's top level (the ImageNet class names)."""
    root = Path(source or Path(__file__).parent)
    files: set[Path] = set()
    todo = list(_SPACE_ENTRIES)
    while todo:
        parts = todo.pop()
        path = _module_file(root, parts)
        if path is None or path in files:
            continue
        files.add(path)
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node, at_import in _relative_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if node.level - 1 > len(package):
                continue
            base = package[:len(package) - (node.level - 1)] + (tuple(node.module.split(".")) if node.module else ())
            for target in (base, *(base + (alias.name,) for alias in node.names)):
                file = _module_file(root, target)
                in_subpackage = len(target) > 1 or (bool(target) and file is not None and file.name == "__init__.py")
                if file is None or (in_subpackage and not at_import):
                    continue
                todo.extend(target[:i] for i in range(1, len(target) + 1))
    data = [p for d in sorted(root.iterdir()) if d.is_dir() and not (d / "__init__.py").exists()
            and not d.name.startswith((".", "__")) for p in sorted(d.rglob("*")) if p.is_file()
            and "__pycache__" not in p.parts]
    return sorted(p.relative_to(root).as_posix() for p in [*files, *data])


def render_space_card(*, license: str | None, models: Iterable[str] = (), title: str = "SphereAR",
                      serves: str | None = None, license_name: str | None = None, license_link: str | None = None,
                      sdk_version: str | None = None, template_dir: str | os.PathLike | None = None) -> SpaceCard:
    """The Space README (``hub_cards/space/README.md``): gradio SDK, ``app.py``, the given license and models.

    ``serves``: the model the Space serves, a Hub repository id (it then leads ``models:``) or a description of the
    pipeline copied into ``model/`` (``"a copy of `my-model`"``). ``sdk_version``: default the installed gradio's
    version (:data:`GRADIO_SDK_VERSION` if gradio is not installed); the Python version is this interpreter's."""
    import jinja2
    from huggingface_hub import SpaceCard

    license = _check_license(license, license_name, license_link)
    if not isinstance(title, str) or not title.strip() or "\n" in title:
        raise HubError(f"the Space title must be one non-empty line, got {title!r}")
    serves_repo = serves if serves is not None and _REPO_ID.fullmatch(serves) else None
    models = list(dict.fromkeys(_check_repo_id(m) for m in [*([serves_repo] if serves_repo else []), *models]))
    if sdk_version is None:
        try:
            sdk_version = _installed_version("gradio")
        except HubError:
            sdk_version = GRADIO_SDK_VERSION
    path = _template_dir(template_dir) / "space" / "README.md"
    text = jinja2.Template(path.read_text(encoding="utf-8"), keep_trailing_newline=True,
                           undefined=jinja2.StrictUndefined).render(
        license=license, models=models, title=title.strip(), sdk_version=sdk_version, license_name=license_name,
        license_link=license_link, arxiv_id=ARXIV_ID, serves_repo=serves_repo,
        serves_folder=None if serves_repo else serves, python_version="{}.{}".format(*sys.version_info[:2]))
    return SpaceCard(text)


def _space_model(model: str | os.PathLike | None) -> tuple[Path | None, str]:
    """``(local pipeline folder to copy or None, what the card says the Space serves)`` for ``--model``."""
    if model is None:
        from .pretrained import bundled_model_path

        return bundled_model_path("digits"), "a copy of the digits model embedded in sphere-ar-hf"
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{model}: not a folder (--model takes a pipeline folder or a Hub repository id)")
        pipeline_facts(path)  # a SphereAR pipeline folder, with weights
        return path, f"a copy of `{path.resolve().name}`"
    if _REPO_ID.fullmatch(str(model)) and not str(model).startswith("."):
        return None, _check_repo_id(str(model))
    raise HubError(f"{model}: no such folder, and not a Hub repository id (owner/name)")


def space_folder_kind(template_dir: str | os.PathLike | None = None) -> FolderKind:
    """What a Space folder holds: the template's files (``README.md``, ``app.py``, ``requirements.txt``) and
    sub-folders (their files), the package copy ``sphere_ar_hf/`` (modules and data files) and the model copy
    ``model/`` (a pipeline folder); ``overwrite`` replaces only such a folder, to any depth."""
    space = _template_dir(template_dir) / "space"
    names = {p.name for p in space.iterdir() if not p.name.startswith(".")}
    code = FolderKind("the package copy", None, files=("*.py", "*.pyc", "*.json"))
    inside = [(SPACE_PACKAGE, FolderKind("the package copy", None, files=code.files, folders=("*",),
                                         inside=(("*", code),))),
              (SPACE_MODEL, FOLDER_KINDS["pipeline"])]
    inside += [(n, _tree_kind(space / n)) for n in sorted(names) if (space / n).is_dir()]
    return FolderKind("a Space folder", "app.py",
                      files=tuple(sorted({n for n in names if not (space / n).is_dir()} | {"README.md", "app.py"})),
                      folders=tuple(sorted({n for n in names if (space / n).is_dir()} | {SPACE_PACKAGE, SPACE_MODEL})),
                      inside=tuple(inside))


def _tree_kind(folder: Path) -> FolderKind:
    """A :class:`FolderKind` that holds exactly the files and sub-folders of ``folder`` (a template sub-folder)."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return FolderKind(folder.name, None, files=tuple(p.name for p in entries if p.is_file()),
                      folders=tuple(p.name for p in entries if p.is_dir()),
                      inside=tuple((p.name, _tree_kind(p)) for p in entries if p.is_dir()))


def build_space_folder(output: str | os.PathLike, *, license: str | None = None,
                       model: str | os.PathLike | None = None, models: Iterable[str] = (), title: str = "SphereAR",
                       overwrite: bool = False, license_name: str | None = None, license_link: str | None = None,
                       template_dir: str | os.PathLike | None = None) -> Path:
    """Write a complete Space folder to ``output`` (atomically) that serves ``model``; returns ``output``.

    It holds ``hub_cards/space/``'s templates, filled in: ``README.md`` (:func:`render_space_card`),
    ``requirements.txt`` (the installed versions of what ``app.py`` needs; not this package) and ``app.py``; the
    package files of :func:`space_package_files`, copied unchanged into ``sphere_ar_hf/`` (``app.py`` imports that
    copy, so the package need not be installable); and, for a local ``model``, the pipeline copied into ``model/``.
    Upload it with ``hf upload OWNER/NAME DIR . --repo-type space``.

    ``model``: a pipeline folder, a Hub repository id (downloaded when the Space starts; not checked here) or None,
    the embedded digits model. ``models``: more repositories for the card's ``models:``. ``license``: the license of
    the Space's files; None means this package's (MIT), which holds only without a pipeline folder of your own, which
    needs its license stated. ``overwrite`` replaces only a Space folder (:func:`space_folder_kind`)."""
    import jinja2

    folder, serves = _space_model(model)
    out = Path(output).expanduser()
    if folder is not None and (out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents):
        raise HubError(f"the output folder {output} must not be (inside) the model folder {model}")
    if license is None:
        if model is not None and folder is not None:
            raise HubError("a license is required for a Space that carries your pipeline folder: the license of its "
                           "weights as their owner states it (--license mit, apache-2.0, other, ...); never guessed")
        license = PACKAGE_LICENSE
    card = render_space_card(license=license, models=models, title=title, serves=serves, license_name=license_name,
                             license_link=license_link, template_dir=template_dir)
    space = _template_dir(template_dir) / "space"
    source = Path(__file__).resolve().parent
    package_files = space_package_files(source)
    context = {"model": serves if folder is None else SPACE_MODEL, "version": _installed_version,
               "python_version": "{}.{}".format(*sys.version_info[:2]), "sdk_version": card.data.sdk_version}
    templates = [p for p in sorted(space.iterdir()) if p.is_file() and not p.name.startswith(".")
                 and p.name != "README.md"]
    rendered = {p.name: jinja2.Template(p.read_text(encoding="utf-8"), keep_trailing_newline=True,
                                        undefined=jinja2.StrictUndefined).render(**context) for p in templates}

    def fill(tmp: Path) -> None:
        for sub in sorted(space.iterdir()):  # the template's sub-folders, if any, as they are
            if sub.is_dir() and not sub.name.startswith("."):
                shutil.copytree(sub, tmp / sub.name, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.pyc"))
        for name, text in rendered.items():
            _write_text(tmp / name, text)
        _write_text(tmp / "README.md", str(card))
        for name in package_files:
            (tmp / SPACE_PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, tmp / SPACE_PACKAGE / name)
        if folder is not None:
            shutil.copytree(folder, tmp / SPACE_MODEL, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.pyc"))

    return write_folder_atomically(out, fill, overwrite=overwrite, kind=space_folder_kind(template_dir),
                                   inputs=[space, source, folder], option="--output")


# ---- push ---------------------------------------------------------------------------------------------------------
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
    """The folder to upload: the pipeline's files, the model card (``card``: :func:`render_model_card`'s keyword
    arguments) and, with ``remote_code``, the remote code."""
    model_card = render_model_card(pipeline, **card)
    _copy_folder(pipeline, dst, link)
    if card["remote_code"]:
        write_remote_code(dst)
    else:  # plain package entries (a pushed folder given back: without its remote code's configs)
        index = package_model_index(_read_json(dst / "model_index.json"))
        _write_text(dst / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = _read_json(dst / "transformer" / "config.json")
        if config.pop("auto_map", None) is not None:
            _write_text(dst / "transformer" / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_text(dst / "README.md", str(model_card))


def _check_pipeline(pipeline: str | os.PathLike) -> Path:
    path = Path(pipeline).expanduser()
    if not path.is_dir():
        raise HubError(f"{pipeline}: no such folder (--pipeline takes a pipeline folder)")
    pipeline_facts(path)  # a SphereAR pipeline folder, with weights
    return path


def build_push_folder(pipeline: str | os.PathLike, output: str | os.PathLike, *, repo_id: str, license: str | None,
                      card: str = "auto", remote_code: bool = True, license_name: str | None = None,
                      license_link: str | None = None, overwrite: bool = False,
                      template_dir: str | os.PathLike | None = None,
                      metrics: str | os.PathLike | Mapping[str, Any] | None = None) -> Path:
    """Write the folder that :func:`push_pipeline` would upload to ``output`` (atomically; files are copied).

    It holds the pipeline's files, the rendered ``README.md`` and, with ``remote_code``, the remote code
    (:func:`.remote_code.write_remote_code`). An existing non-empty ``output`` needs ``overwrite``, and is replaced
    only if it is a pipeline folder (e.g. an earlier push folder) that does not hold ``pipeline``. ``card`` and
    ``metrics``: as for :func:`render_model_card`.
    """
    src, out = _check_pipeline(pipeline), Path(output).expanduser()
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise HubError(f"the output folder {output} must not be (inside) the pipeline folder {pipeline}")
    card_args = dict(repo_id=repo_id, license=license, card=card, remote_code=remote_code, license_name=license_name,
                     license_link=license_link, template_dir=template_dir, metrics=metrics)
    inputs = [src, template_dir, metrics if not isinstance(metrics, Mapping) else None]
    return write_folder_atomically(out, lambda tmp: _fill_folder(src, tmp, False, **card_args), overwrite=overwrite,
                                   kind="pipeline", inputs=inputs, option="--dry-run folder")


def _hf_api(token: str | None = None) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def push_pipeline(pipeline: str | os.PathLike, repo_id: str, *, license: str | None, private: bool = False,
                  card: str = "auto", remote_code: bool = True, license_name: str | None = None,
                  license_link: str | None = None, commit_message: str | None = None, api: HfApi | None = None,
                  template_dir: str | os.PathLike | None = None,
                  metrics: str | os.PathLike | Mapping[str, Any] | None = None, revision: str | None = None,
                  token: str | None = None) -> str:
    """Upload a pipeline folder to the Hub model repository ``repo_id`` (created if needed); returns its URL.

    Uploads exactly what :func:`build_push_folder` writes (staged in a temporary folder, hard-linked where
    possible). Files of the repository's component folders that are not in the new folder are deleted in the same
    commit; other files of the repository are kept. ``card`` / ``metrics``: as for :func:`render_model_card`;
    ``revision``: the branch to commit to (default: main); ``token``: for the default client (``api`` unset). The
    trainers' ``--push_to_hub`` calls this too.
    """
    src = _check_pipeline(pipeline)
    repo_id = _check_repo_id(repo_id)
    _check_license(license, license_name, license_link)
    metrics = load_metrics(metrics)  # a bad file is an error before anything is staged
    api = api if api is not None else _hf_api(token)
    try:  # beside the pipeline (same file system: hard links) if we may write there
        staging = tempfile.TemporaryDirectory(prefix=f".{src.name}.push-", dir=src.parent, ignore_cleanup_errors=True)
    except OSError:
        staging = tempfile.TemporaryDirectory(prefix="sphere-ar-push-", ignore_cleanup_errors=True)
    with staging as stage_parent:
        stage = Path(stage_parent) / "repo"
        _fill_folder(src, stage, True, repo_id=repo_id, license=license, card=card, remote_code=remote_code,
                     license_name=license_name, license_link=license_link, template_dir=template_dir,
                     metrics=metrics)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(stage),
                          commit_message=commit_message or "Upload SphereAR pipeline (sphere-ar push)",
                          delete_patterns=[f"{c}/*" for c in COMPONENTS],
                          **({"revision": revision} if revision else {}))
    return f"https://huggingface.co/{repo_id}"


# ---- command line -------------------------------------------------------------------------------------------------
def add_push_parser(subparsers: Any, formatter_class: type[argparse.HelpFormatter] | None = None
                    ) -> argparse.ArgumentParser:
    """Add ``sphere-ar push`` to the ``sphere-ar`` subparsers (``args.func`` is :func:`run_push`)."""
    push = subparsers.add_parser(
        "push", help="upload a pipeline folder to the Hugging Face Hub with a model card and remote code",
        description="Upload a pipeline folder to a Hugging Face Hub model repository (created if needed), with a "
                    "model card (README.md) and the remote code that lets DiffusionPipeline.from_pretrained(repo, "
                    "trust_remote_code=True) load it without sphere-ar-hf. --dry-run DIR writes the exact folder "
                    "that would be uploaded and uploads nothing. Log in first (`hf auth login` or HF_TOKEN).",
        epilog="example: sphere-ar push --pipeline sphere-ar-b --repo-id you/SphereAR-B --license LICENSE --dry-run "
               "out/ (then look at out/, and push without --dry-run)",
        **({"formatter_class": formatter_class} if formatter_class is not None else {}))
    add = push.add_argument
    add("--pipeline", required=True, metavar="DIR", help="pipeline folder (e.g. from sphere-ar convert)")
    add("--repo-id", required=True, metavar="ID", help="Hub model repository, owner/name")
    add("--license", metavar="LICENSE", default=None,
        help="license of the weights as their owner states it, as a Hub license id (mit, apache-2.0, cc-by-nc-4.0, "
             "other, ...); required, never guessed")
    add("--license-name", metavar="NAME", default=None, help="name of the license, with --license other")
    add("--license-link", metavar="URL", default=None, help="link to its text, with --license other")
    add("--card", choices=(*CARDS, "auto"), default="auto",
        help="model card: auto (the card that fits: converted official SphereAR-B / -L / -H weights get the ImageNet "
             "card, the bundled digits model its own, any other model a generic card of the facts in its folder), "
             "or one of them by name (refused if it contradicts the folder's facts)")
    add("--metrics", metavar="FILE", type=Path, default=None,
        help="a `sphere-ar evaluate --json` result to show on the card as the uploader's measurement")
    add("--private", action="store_true",
        help="create the repository as private (an existing repository keeps its visibility)")
    add("--no-remote-code", dest="remote_code", action="store_false",
        help="leave out the remote code (default: included; without it, loading needs sphere-ar-hf installed)")
    add("--commit-message", metavar="TEXT", default=None, help="commit message of the upload")
    add("--dry-run", metavar="DIR", type=Path, default=None,
        help="write the folder that would be uploaded to DIR and upload nothing")
    add("--overwrite", action="store_true", help="with --dry-run: replace DIR if it is not empty")
    push.set_defaults(func=run_push)
    return push


def run_push(args: argparse.Namespace, api: HfApi | None = None) -> int:
    """Run ``sphere-ar push``; errors print one ``error: ...`` line and return 2."""
    try:
        if args.license is None:
            raise HubError("--license is required: the license of the weights as their owner states it, as a Hub "
                           "license id (mit, apache-2.0, cc-by-nc-4.0, other, ...); it is never guessed")
        common = dict(license=args.license, card=args.card, remote_code=args.remote_code,
                      license_name=args.license_name, license_link=args.license_link,
                      metrics=getattr(args, "metrics", None))
        if args.dry_run is not None:
            out = build_push_folder(args.pipeline, args.dry_run, repo_id=args.repo_id, overwrite=args.overwrite,
                                    **common)
            files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
            card = args.card if args.card != "auto" else detect_card(pipeline_facts(out))
            print(f"wrote {out} ({len(files)} files: {', '.join(files)}; model card: {card}); nothing was uploaded")
            return 0
        url = push_pipeline(args.pipeline, args.repo_id, private=args.private, commit_message=args.commit_message,
                            api=api, **common)
    except Exception as e:  # bad inputs (HubError and the remote code's are ValueErrors), the Hub client's errors
        upload = type(e).__module__.split(".")[0] in ("huggingface_hub", "httpx", "requests")
        if not (upload or isinstance(e, (ValueError, OSError))):
            raise
        print(f"error: {'the upload failed: ' * upload}{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"pushed {args.pipeline} to {url}{' (private)' if args.private else ''}")
    return 0
