"""Model cards: a pipeline folder's (read from its configs and weight headers, rendered from ``hub_cards/``) and a
LoRA adapter folder's; the checks of the inputs every publishing function shares (license, repository id).

The card templates live in the source checkout's ``hub_cards/``. :mod:`.push` uploads what these cards describe and
:mod:`.space` writes a Space folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..remote_code import PIPELINE, package_model_index
from ..utils import atomic_write, format_millions

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

__all__ = ["ADAPTER_FILES", "ARXIV_ID", "CARDS", "CLASS_EMBEDDING", "HUB_CARDS_DIR", "REPO_ID_PATTERN",
           "TRAINING_INFO_FILE", "TRAINING_INFO_KEY", "HubError", "card_problem", "check_license", "check_repo_id",
           "detect_card", "latent_space_facts", "load_metrics", "load_style", "pipeline_facts", "public_model_name",
           "read_adapter_facts", "read_json", "render_lora_card", "render_model_card", "templates_folder",
           "training_rows", "write_text"]

HUB_CARDS_DIR = Path(__file__).resolve().parents[3] / "hub_cards"  # the source checkout's templates
ARXIV_ID = "2509.24335"
OFFICIAL_REPO = "guolinke/SphereAR"
CARDS = ("b", "l", "h", "digits", "generic")
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hub repository id, owner/name (``fullmatch``)


class HubError(ValueError):
    """A problem with the inputs of a card / push / Space function; the message says what to change. It names a
    parameter in backquotes (`` `card='b'` ``), which the command line shows as its flag (``--card b``)."""


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; anything else is a :class:`HubError`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: expected a JSON object")
    return data


def write_text(path: Path, text: str) -> None:
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
    return sum(_tensor_values(path) for path in files)


def _tensor_values(path: Path) -> int:
    """The values of the tensors in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        try:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        except (struct.error, ValueError, UnicodeDecodeError):
            raise HubError(f"{path}: not a safetensors file") from None
    return sum(math.prod(info["shape"]) for key, info in header.items() if key != "__metadata__")


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
    from ..pretrained import bundled_model_path

    try:
        return _same_weights(folder, bundled_model_path("digits"))
    except (OSError, ValueError):
        return False


def pipeline_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """What a model card says about a pipeline folder, read from its configs and weight headers.

    Besides the sizes: ``training`` (the trainers' record in ``transformer/config.json``, or None), ``bundled``
    (the weights are the bundled digits model's) and ``imagenet_labels`` (``id2label`` is ImageNet-1k's)."""
    from ..labels import imagenet_id2label

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise HubError(f"{folder}: no model_index.json, so not a pipeline folder (write one with `sphere-ar "
                       "convert` or SphereARPipeline.save_pretrained)")
    index = package_model_index(read_json(folder / "model_index.json"))
    if index.get("_class_name") != PIPELINE:
        raise HubError(f"{folder}: holds a {index.get('_class_name')!r}, not a {PIPELINE}")
    tf = read_json(folder / "transformer" / "config.json")
    vae = read_json(p) if (p := folder / "vae" / "config.json").is_file() else {}
    scheduler = read_json(p) if (p := folder / "scheduler" / "scheduler_config.json").is_file() else {}
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
    from ..configuration_sphere_ar import PRESETS

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
    data = dict(metrics) if isinstance(metrics, Mapping) else read_json(Path(metrics).expanduser())
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


def training_rows(training: Mapping[str, Any] | None) -> list[tuple[str, str]]:
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


def _hub_datasets(training: Mapping[str, Any]) -> list[str] | None:
    """The card's ``datasets:``: the training record's Hub dataset, if it names one."""
    dataset = training.get("hub_dataset")
    return [dataset] if isinstance(dataset, str) and REPO_ID_PATTERN.fullmatch(dataset) else None


def check_license(license: str | None, license_name: str | None, license_link: str | None) -> str:
    """``license`` as a Hub license id (lower case); required, never guessed: ``"other"`` needs ``license_name``
    and ``license_link``."""
    if license is None or not str(license).strip():
        raise HubError("a license is required: the license of the weights as their owner states it, as a Hub license "
                       "id (mit, apache-2.0, cc-by-nc-4.0, other with a license name and link...); it is never guessed")
    value = str(license).strip().lower()
    if not _LICENSE.fullmatch(value):
        raise HubError(f"license {license!r} is not a Hub license id (e.g. mit, apache-2.0, cc-by-nc-4.0, other)")
    if value == "other" and not (license_name and license_link):
        raise HubError("license 'other' needs a license name and a link to its text (`license_name`, "
                       "`license_link`)")
    return value


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub repository id (owner/name)."""
    if not isinstance(repo_id, str) or not REPO_ID_PATTERN.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"`repo_id` {repo_id!r} is not of the form owner/name")
    return repo_id


def templates_folder(template_dir: str | os.PathLike | None) -> Path:
    """The card templates' folder: ``template_dir``, by default the source checkout's ``hub_cards/``."""
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

    license = check_license(license, license_name, license_link)
    repo_id = check_repo_id(repo_id)
    facts = pipeline_facts(pipeline)
    measured = load_metrics(metrics)
    if card != "auto" and card not in CARDS:
        raise HubError(f"unknown card {card!r}; expected one of {', '.join(CARDS)} or auto")
    if card == "auto":
        card = detect_card(facts)
    elif (why := card_problem(facts, card)) is not None:
        what = "the bundled digits model" if card == "digits" else f"the converted official {_CARD_NAMES[card]} weights"
        raise HubError(f"`card={card!r}` describes {what}, but this model {why}; leave out `card` (or pass "
                       "`card='generic'`) for a card made of this model's own facts")
    templates = templates_folder(template_dir)
    extra = {"license_name": license_name, "license_link": license_link} if license == "other" else {}
    training = facts["training"] or {}
    common = dict(repo_id=repo_id, arxiv_id=ARXIV_ID, remote_code=remote_code, license_name=license_name,
                  license_link=license_link, metrics_table=_metrics_markdown(measured), **facts)
    base_tags = ["sphere-ar", "autoregressive", "class-conditional", "image-generation", f"arxiv:{ARXIV_ID}"]
    code_tags = ["custom_code"] if remote_code else []
    if card == "generic":
        data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation",
                             license=license, tags=[*base_tags, *code_tags], datasets=_hub_datasets(training),
                             **extra)
        summary, listed, unlisted = _class_rows(facts)
        return ModelCard.from_template(
            data, template_path=str(templates / "model_card_generic.md"), model_name=repo_id.split("/")[-1],
            classes_summary=summary, listed_classes=listed, unlisted_classes=unlisted,
            example_labels=json.dumps(_example_labels(facts)), training_rows=training_rows(facts["training"]),
            **common)
    imagenet = card != "digits"
    tags = [*base_tags, *(["imagenet"] if imagenet else ["digits", "toy-model"]), *code_tags]
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation", license=license,
                         tags=tags, datasets=["ILSVRC/imagenet-1k"] if imagenet else None, **extra)
    template = templates / ("model_card_imagenet.md" if imagenet else "model_card_digits.md")
    return ModelCard.from_template(data, template_path=str(template), model_name=_CARD_NAMES[card],
                                   checkpoint=f"SphereAR_{card.upper()}.pt", official_repo=OFFICIAL_REPO, **common)



# ---- LoRA adapter cards -------------------------------------------------------------------------------------------
# An adapter folder is PEFT's format (:func:`..lora.save_lora` writes it) plus our record of the run.
CLASS_EMBEDDING = "class_embedding"  # the transformer's module whose rows an adapter may train
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
TRAINING_INFO_FILE = "training_info.json"  # save_lora's record of the run (training facts, a style score)


def public_model_name(name: str | os.PathLike | None) -> str | None:
    """How a card and ``adapter_config.json`` name a base model: a Hub repo id as it is, a folder of the Hub cache
    (``models--owner--name/snapshots/...``) as its repo id, any other local folder by its name (never an absolute
    local path)."""
    if name is None:
        return None
    path = Path(str(name)).expanduser()
    if not (path.is_absolute() or path.exists()):
        return str(name)
    for part in path.resolve().parts[::-1]:
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    return path.resolve().name


def load_style(style: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The style score of a ``benchmarks/bench_lora.py --json`` result (file or object): the style's name and the
    score of the base model's, the adapter's and the training data's images."""
    data = dict(style) if isinstance(style, Mapping) else json.loads(Path(style).read_text(encoding="utf-8"))
    generated = data.get("generated") or {}
    out = {"style": data.get("style"), "base": (generated.get("base") or {}).get("style"),
           "adapted": (generated.get("adapted") or {}).get("style"), "data": data.get("real_restyled_style")}
    if not isinstance(out["style"], str) or not isinstance(out["adapted"], int | float):
        raise ValueError(f"{style if not isinstance(style, Mapping) else 'style'}: not a benchmarks/bench_lora.py "
                         "--json result (expected \"style\" and generated.adapted.style)")
    return out


def read_adapter_facts(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """An adapter folder's ``adapter_config.json`` and its record of the run (empty without one)."""
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no adapter_config.json, so not a LoRA adapter folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    info = folder / TRAINING_INFO_FILE
    return config, (json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {})


def render_lora_card(adapter_dir: str | os.PathLike, *, repo_id: str | None = None, license: str | None = None,
                     template_dir: str | os.PathLike | None = None) -> ModelCard:
    """The model card (``huggingface_hub.ModelCard``) of an adapter folder, from ``hub_cards/model_card_lora.md``:
    the base model (a repo id or a folder name), rank, alpha, target modules, trained class rows, the stored
    values, and what ``training_info.json`` records (data, steps, date; the style score if measured).
    ``repo_id``: where it is pushed (the usage snippet); ``license``: a Hub license id, if stated."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(adapter_dir)
    config, info = read_adapter_facts(folder)
    templates = Path(template_dir) if template_dir is not None else HUB_CARDS_DIR
    template = templates / "model_card_lora.md"
    if not template.is_file():
        raise FileNotFoundError(f"the card template {template} is missing (it lives in the source checkout's "
                                "hub_cards/)")
    license = check_license(license, None, None) if license is not None else None
    base = public_model_name(config.get("base_model_name_or_path")) or "unknown"
    values = _tensor_values(weights) if (weights := folder / ADAPTER_FILES[0]).is_file() else 0
    training = info.get("training") or {}
    data = ModelCardData(library_name="peft", license=license,
                         base_model=base if REPO_ID_PATTERN.fullmatch(base) else None,
                         tags=["sphere-ar", "lora", "class-conditional", "image-generation", f"arxiv:{ARXIV_ID}"],
                         datasets=_hub_datasets(training))
    rank, alpha = config.get("r"), config.get("lora_alpha")
    targets = config.get("target_modules")
    style = info.get("style") or {}
    style_rows = [(name, f"{style[key]:.4g}") for key, name in (("base", "base model"), ("adapted", "with the adapter"),
                                                                ("data", "training data")) if
                  isinstance(style.get(key), int | float)]
    rows = (config.get("trainable_token_indices") or {}).get(CLASS_EMBEDDING)
    return ModelCard.from_template(
        data, template_path=str(template), model_name=(repo_id or folder.resolve().name).split("/")[-1],
        base_model=base, adapter_ref=repo_id or folder.resolve().name, rank=rank, alpha=alpha,
        scale=f"{alpha / rank:g}" if rank and alpha else "?", dropout=config.get("lora_dropout", 0.0),
        targets=targets if isinstance(targets, str) else ", ".join(sorted(targets or [])),
        class_rows=", ".join(map(str, rows)) if rows else "", adapter_values=values,
        training_rows=training_rows(training), style_rows=style_rows,
        style_name=f"style {style.get('style')!r}" if style else "", license=license, arxiv_id=ARXIV_ID)
