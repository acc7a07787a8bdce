"""Hugging Face Space folders (``sphere-ar space``): the Space README, the filled-in ``hub_cards/space/`` templates,
a copy of the package modules the demo needs (found by following their relative imports with
:func:`..remote_code.relative_imports`) and, for a local model, a copy of the pipeline folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..remote_code import relative_imports
from ..utils import FOLDER_KINDS, FolderKind, write_folder_atomically
from .cards import (
    ARXIV_ID,
    REPO_ID_PATTERN,
    HubError,
    check_license,
    check_repo_id,
    pipeline_facts,
    templates_folder,
    write_text,
)

if TYPE_CHECKING:
    from huggingface_hub import SpaceCard

__all__ = ["GRADIO_SDK_VERSION", "PACKAGE_LICENSE", "SPACE_MODEL", "SPACE_PACKAGE", "build_space_folder",
           "render_space_card", "space_folder_kind", "space_package_files"]

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the module files a Space copies
GRADIO_SDK_VERSION = "6.31.0"
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


def _module_file(root: Path, parts: tuple[str, ...]) -> Path | None:
    """The file of the module ``parts`` (``("cli",)``, ``("pretrained",)``, ``()`` the package) under ``root``."""
    path = root.joinpath(*parts)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if parts and path.with_suffix(".py").is_file() else None


def _module_closure(root: Path, entries: Iterable[tuple[str, ...]]) -> set[Path]:
    """The files of the modules ``entries`` (under the package folder ``root``) and of the package modules they
    import, in turn (:func:`..remote_code.relative_imports`: ``TYPE_CHECKING`` imports never run and are left out):
    a module of the package's top level also where a function imports it, a subpackage only where it is imported
    at import time; a module's packages come with it."""
    files: set[Path] = set()
    todo = list(entries)
    while todo:
        parts = todo.pop()
        path = _module_file(root, parts)
        if path is None or path in files:
            continue
        files.add(path)
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in relative_imports(path):
            if node.level - 1 > len(package):
                continue
            base = package[:len(package) - (node.level - 1)] + (tuple(node.module.split(".")) if node.module else ())
            for target in (base, *(base + (name,) for name in node.names)):
                file = _module_file(root, target)
                in_subpackage = len(target) > 1 or (bool(target) and file is not None and file.name == "__init__.py")
                if file is None or (in_subpackage and not node.at_import):
                    continue
                todo.extend(target[:i] for i in range(1, len(target) + 1))
    return files


def space_package_files(source: str | os.PathLike | None = None) -> list[str]:
    """The package files a Space carries in ``sphere_ar_hf/``, as paths relative to the package folder ``source``
    (default: this package's).

    The modules that the package's ``__init__`` and ``demo`` import and, in turn, those import (found in their
    source): a module of the package's top level also where a function imports it, a subpackage only where it is
    imported at import time (training and evaluation code, imported only by other commands, stays out); and the data
    folders at the package's top level (the ImageNet class names)."""
    root = Path(source or PACKAGE_DIR)
    files = _module_closure(root, _SPACE_ENTRIES)
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

    license = check_license(license, license_name, license_link)
    if not isinstance(title, str) or not title.strip() or "\n" in title:
        raise HubError(f"the Space title must be one non-empty line, got {title!r}")
    serves_repo = serves if serves is not None and REPO_ID_PATTERN.fullmatch(serves) else None
    models = list(dict.fromkeys(check_repo_id(m) for m in [*([serves_repo] if serves_repo else []), *models]))
    if sdk_version is None:
        try:
            sdk_version = _installed_version("gradio")
        except HubError:
            sdk_version = GRADIO_SDK_VERSION
    path = templates_folder(template_dir) / "space" / "README.md"
    text = jinja2.Template(path.read_text(encoding="utf-8"), keep_trailing_newline=True,
                           undefined=jinja2.StrictUndefined).render(
        license=license, models=models, title=title.strip(), sdk_version=sdk_version, license_name=license_name,
        license_link=license_link, arxiv_id=ARXIV_ID, serves_repo=serves_repo,
        serves_folder=None if serves_repo else serves, python_version="{}.{}".format(*sys.version_info[:2]))
    return SpaceCard(text)


def _space_model(model: str | os.PathLike | None) -> tuple[Path | None, str]:
    """``(local pipeline folder to copy or None, what the card says the Space serves)`` for ``--model``."""
    if model is None:
        from ..pretrained import bundled_model_path

        return bundled_model_path("digits"), "a copy of the digits model embedded in sphere-ar-hf"
    path = Path(model).expanduser()
    # an official checkpoint is converted on every start of the Space: convert it once, and serve the folder
    hint = (" (an official checkpoint: serve the folder `sphere-ar convert --checkpoint ... --output DIR` writes)"
            if str(model).endswith((".pt", ".pth", ".ckpt")) else "")
    if path.exists():
        if not path.is_dir():
            raise HubError(f"{model}: not a folder (`model` takes a pipeline folder or a Hub repository id){hint}")
        pipeline_facts(path)  # a SphereAR pipeline folder, with weights
        return path, f"a copy of `{path.resolve().name}`"
    if REPO_ID_PATTERN.fullmatch(str(model)) and not str(model).startswith("."):
        return None, check_repo_id(str(model))
    raise HubError(f"{model}: no such folder, and not a Hub repository id (owner/name){hint}")


def space_folder_kind(template_dir: str | os.PathLike | None = None) -> FolderKind:
    """What a Space folder holds: the template's files (``README.md``, ``app.py``, ``requirements.txt``) and
    sub-folders (their files), the package copy ``sphere_ar_hf/`` (modules and data files) and the model copy
    ``model/`` (a pipeline folder); ``overwrite`` replaces only such a folder, to any depth."""
    space = templates_folder(template_dir) / "space"
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
    space = templates_folder(template_dir) / "space"
    source = PACKAGE_DIR
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
            write_text(tmp / name, text)
        write_text(tmp / "README.md", str(card))
        for name in package_files:
            (tmp / SPACE_PACKAGE / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, tmp / SPACE_PACKAGE / name)
        if folder is not None:
            shutil.copytree(folder, tmp / SPACE_MODEL, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.pyc"))

    return write_folder_atomically(out, fill, overwrite=overwrite, kind=space_folder_kind(template_dir),
                                   inputs=[space, source, folder], option="`output`")


