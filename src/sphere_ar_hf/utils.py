"""Helpers shared across the package, one owner each."""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

__all__ = [
    "FOLDER_KINDS",
    "USER_ERRORS",
    "FolderKind",
    "HelpFormatter",
    "OutputFolderError",
    "ScriptHelpFormatter",
    "apply_umask",
    "atomic_write",
    "auto_threads",
    "check_output_folder",
    "current_umask",
    "format_millions",
    "is_stale",
    "new_folder",
    "plural",
    "one_line_error",
    "owner_tag",
    "recover_interrupted_write",
    "remove_stale_temporaries",
    "remove_staged_folders",
    "run_main",
    "shared_staging_path",
    "stage_folder",
    "swap_folder_into_place",
    "write_folder_atomically",
]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False,
                 encoding: str | None = None) -> Iterator[IO]:
    """Write ``path`` all or nothing: yields a new temporary file beside it, renamed over ``path`` when the block
    ends without an exception, removed otherwise (a crash leaves at most a hidden ``.tmp`` file). ``fsync``: the
    data reaches the disk before the rename (for files whose presence marks something complete). The temporary
    name carries :func:`owner_tag`, so :func:`remove_stale_temporaries` can tell a killed writer's file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{owner_tag()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def owner_tag() -> str:
    """``<host>-<pid>`` of this process: part of the names of its temporary files and folders, so that a later run
    can tell what a killed process left (:func:`is_stale`) from the work in progress of a live one."""
    return f"{re.sub(r'[^A-Za-z0-9]', '_', socket.gethostname()) or 'host'}-{os.getpid()}"


_OWNED = re.compile(r"([A-Za-z0-9_]+)-(\d+)-[0-9a-f]{8}(?:\.tmp)?$")


def is_stale(name: str) -> bool:
    """Whether the temporary file or folder ``name`` (ending in ``<host>-<pid>-<hex>``, see :func:`owner_tag`) was
    left by a process of this host that no longer runs. Anything else (a live process, another host, a name of
    another form) is not stale: it is never deleted."""
    match = _OWNED.search(name)
    if match is None or match.group(1) != owner_tag().rsplit("-", 1)[0]:
        return False
    pid = int(match.group(2))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the temporary files that killed writers left in ``folder`` (:func:`atomic_write`'s hidden ``.tmp``
    files whose owner no longer runs, :func:`is_stale`); not recursive."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False) \
                    and is_stale(entry.name):
                Path(entry.path).unlink(missing_ok=True)


def auto_threads() -> int:
    """CPU threads for torch's operations when none are asked for: the cores this process may use, less those busy
    with other processes (the 1-minute load average), shared by the processes of one launch (``LOCAL_WORLD_SIZE``),
    at least 1. On a quiet machine that is every core (torch's own default); beside a busy process it leaves that
    process its core, since threads that wait for a shared core lose 2-3x (docs/benchmarks.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, (cores - busy) // processes)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 image"``, ``"2 images"``, ``plural(3, "class", "classes")``: a count and its noun."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def format_millions(n: int) -> str:
    """A parameter count for people: ``204.5M``, ``81k``."""
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless it has no default, is required or already talks about
    its default (the ``sphere-ar`` commands and the demo)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if no_default or action.required or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class ScriptHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The example scripts' ``--help``: the description (the script's docstring, with its example command lines)
    as written, and each option's default."""


class OutputFolderError(FileExistsError):
    """An output folder that a tool refuses to write or replace; the message says why, in one line."""


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder a tool of ours writes, so that ``overwrite`` replaces only such a folder.

    ``name``: how messages call it (``"a pipeline folder"``); ``marker``: the file every such folder holds (None: a
    sub-folder of one, no marker); ``files`` / ``folders``: ``fnmatch`` patterns of the names it may hold at its
    top level (files, sub-folders); ``inside``: ``(pattern, kind)`` pairs, what a sub-folder of that name may hold
    (checked the same way, to any depth; a sub-folder matching none may hold anything); ``components``: its
    sub-folders are the components named in ``model_index.json`` (a diffusers pipeline), each of kind ``component``.
    """

    name: str
    marker: str | None
    files: tuple[str, ...] = ()
    folders: tuple[str, ...] = ()
    components: bool = False
    component: FolderKind | None = None
    inside: tuple[tuple[str, FolderKind], ...] = ()

    def problem(self, folder: str | os.PathLike) -> str | None:
        """Why ``folder`` is not of this kind (``"it holds ar.pt"``, ``"it holds transformer/keep.txt"``), or None
        if it is."""
        folder = Path(folder)
        if self.marker is not None and not (folder / self.marker).is_file():
            return f"it has no {self.marker}"
        components = self._components(folder)
        if isinstance(components, str):
            return f"its {self.marker} is {components}"
        foreign = self.foreign(folder)
        if foreign:
            return f"it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
        return None

    def foreign(self, folder: Path) -> list[str]:
        """The names under ``folder`` (to any depth) that a folder of this kind does not hold."""
        components = self._components(folder)
        if isinstance(components, str):
            return [f"{self.marker} ({components})"]
        foreign = []
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir() and not entry.is_symlink():
                ok = entry.name in components or any(fnmatch.fnmatchcase(entry.name, p) for p in self.folders)
                sub = self.component if entry.name in components else self._kind_inside(entry.name)
                if ok and sub is not None and sub.marker is not None and not (entry / sub.marker).is_file():
                    foreign.append(f"{entry.name}/ (no {sub.marker})")
                elif ok and sub is not None:
                    foreign += [f"{entry.name}/{name}" for name in sub.foreign(entry)]
            else:
                ok = entry.is_file() and any(fnmatch.fnmatchcase(entry.name, p) for p in self.files)
            if not ok:
                foreign.append(entry.name + ("/" if entry.is_dir() else ""))
        return foreign

    def _kind_inside(self, name: str) -> FolderKind | None:
        return next((kind for pattern, kind in self.inside if fnmatch.fnmatchcase(name, pattern)), None)

    def _components(self, folder: Path) -> set[str] | str:
        """The component sub-folders named in ``model_index.json`` (or why it cannot be read)."""
        if not self.components:
            return set()
        try:
            index = json.loads((folder / self.marker).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "not readable JSON"
        if not isinstance(index, dict):
            return "not a JSON object"
        return {k for k, v in index.items() if isinstance(k, str) and not k.startswith("_")
                and isinstance(v, list | tuple) and len(v) == 2}


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
# a pipeline component: a model's or a scheduler's config, its weights, its remote code (a pushed folder)
COMPONENT_FOLDER = FolderKind("a pipeline component folder", None,
                              files=("config.json", "scheduler_config.json", "README.md", "*.py", *_WEIGHTS))
FOLDER_KINDS: dict[str, FolderKind] = {
    # SphereARPipeline.save_pretrained / `sphere-ar convert`, and a push folder (model card, remote code)
    "pipeline": FolderKind("a pipeline folder", "model_index.json",
                           files=("model_index.json", "README.md", ".gitattributes", "*.py"), components=True,
                           component=COMPONENT_FOLDER),
    # ModelMixin / PreTrainedModel.save_pretrained (the trainers' vae/ and discriminator/)
    "model": FolderKind("a model folder", "config.json", files=("config.json", "README.md", "*.py", *_WEIGHTS)),
    # lora.save_lora
    "lora": FolderKind("a LoRA adapter folder", "adapter_config.json",
                       files=("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md",
                              "training_info.json")),
    # training.latent_cache.cache_latents: a datasets save_to_disk folder plus latent_cache.json
    "latent_cache": FolderKind("a latent cache", "latent_cache.json",
                               files=("latent_cache.json", "dataset_info.json", "state.json", "data-*.arrow")),
}


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_output_folder(output: str | os.PathLike, overwrite: bool = False, *, kind: str | FolderKind | None = None,
                        inputs: Iterable[str | os.PathLike | None] = (), option: str = "--output") -> Path:
    """Raise unless ``output`` can become a new folder; returns its resolved path.

    First, what a killed writer of ``output`` left is recovered (:func:`recover_interrupted_write`). ``output`` may
    be absent or empty. A non-empty folder needs ``overwrite``, and then it is replaced only if it is
    of ``kind`` (a :data:`FOLDER_KINDS` name or a :class:`FolderKind`; None: any folder) and holds none of
    ``inputs`` (the files and folders the run reads; names that do not exist, e.g. Hub ids, are skipped): otherwise
    :class:`OutputFolderError`, a one-line message that names ``option`` (the flag that chose ``output``).
    """
    out = _resolved(output)
    recover_interrupted_write(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{output} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise FileExistsError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    if out.parent == out:
        raise OutputFolderError(f"refusing to replace {output}: it is the root of the file system")
    for path in inputs:
        if path is None or not os.path.exists(path):
            continue
        p = _resolved(path)
        if p == out or out in p.parents:
            raise OutputFolderError(f"refusing to replace {output}: it holds {path}, an input of this run; choose "
                                    f"another {option}")
    kind = FOLDER_KINDS[kind] if isinstance(kind, str) else kind
    why = kind.problem(out) if kind is not None else None
    if why is not None:
        raise OutputFolderError(f"refusing to replace {output}: it is not {kind.name} ({why}); choose another "
                                f"{option} or remove it yourself")
    return out


def new_folder(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, empty folder ``parent/<prefix><host>-<pid>-<random>`` (:func:`owner_tag`), created with the process's
    umask (``tempfile.mkdtemp`` would make it private, 0700, and a folder renamed into place would keep that)."""
    while True:
        path = Path(parent) / f"{prefix}{owner_tag()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def shared_staging_path(output: str | os.PathLike) -> Path:
    """Where ``stage_folder(output, shared=True)`` stages: ``.<name>.tmp-shared`` beside ``output`` (the other
    processes of a distributed writer get the path from here)."""
    output = _resolved(output)
    return output.parent / f".{output.name}.tmp-shared"


def stage_folder(output: str | os.PathLike, shared: bool = False) -> Path:
    """A new, empty staging folder beside ``output`` (same file system, so :func:`swap_folder_into_place` is a
    rename), hidden as ``.<name>.tmp-<suffix>``.

    ``shared=False``: a unique random suffix. ``shared=True``: the fixed name ``.<name>.tmp-shared``, so that
    processes of a distributed run can all write into it (one process calls this, the others wait at a barrier);
    whatever an earlier, killed run left there is removed first.
    """
    output = _resolved(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not shared:
        return new_folder(output.parent, f".{output.name}.tmp-")
    staged = shared_staging_path(output)
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir()
    return staged


def current_umask() -> int:
    """The process's file-mode creation mask (read from ``/proc`` where it can be, so no thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: str | os.PathLike) -> None:
    """Give ``folder`` and everything below it the modes the umask gives new files and folders (0755 / 0644 under
    the usual 022; executables keep their execute bits): some writers create files private (safetensors writes
    0600 through a temporary file, ``tempfile`` folders are 0700), and a folder renamed into place keeps them."""
    mask = current_umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def swap_folder_into_place(staged: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Move the complete folder ``staged`` to ``output`` (a rename: ``staged`` must be on the same file system),
    its modes first set by the umask (:func:`apply_umask`).

    An existing ``output`` is first moved aside (``.<name>.old-*``), deleted once the new folder is in place, and
    put back if the rename fails; nothing is left beside ``output`` either way. ``output`` is resolved first, so
    ``"."`` works; a process whose working directory was (inside) ``output`` is moved into the new folder.
    """
    staged, output = Path(staged), _resolved(output)
    apply_umask(staged)
    if not output.exists():
        os.replace(staged, output)
        return output
    try:
        cwd = Path.cwd()
        in_output = cwd == output or output in cwd.parents
    except OSError:  # the working directory is gone
        in_output = False
    old = new_folder(output.parent, f".{output.name}.old-")
    try:
        os.replace(output, old / output.name)
        try:
            os.replace(staged, output)
        except BaseException:
            os.replace(old / output.name, output)
            raise
    finally:
        if not (old / output.name).exists() or output.exists():
            shutil.rmtree(old, ignore_errors=True)
        if in_output and output.is_dir():
            os.chdir(output)
    return output


def recover_interrupted_write(output: str | os.PathLike) -> None:
    """Undo what a killed writer of ``output`` left beside it (only what processes of this host that no longer run
    left, :func:`is_stale`): a folder that :func:`swap_folder_into_place` had moved aside (``.<name>.old-*``) but
    not yet replaced is moved back to ``output``; its staging folders (``.<name>.tmp-*``) and the copies a
    completed swap had not yet deleted are removed. Every writer calls it first (:func:`check_output_folder`)."""
    output = _resolved(output)
    if not output.parent.is_dir():
        return
    for kind in ("old", "tmp"):  # restore first
        for path in sorted(output.parent.glob(f".{glob.escape(output.name)}.{kind}-*")):
            if not path.is_dir() or path.is_symlink() or not is_stale(path.name):
                continue
            moved = path / output.name
            if kind == "old" and moved.is_dir() and not output.exists():
                os.replace(moved, output)
            shutil.rmtree(path, ignore_errors=True)


def remove_staged_folders(parent: str | os.PathLike, name_pattern: str = "*") -> None:
    """Delete what :func:`stage_folder` / :func:`swap_folder_into_place` leave when a process is killed mid-write:
    ``.<name>.tmp-*`` and ``.<name>.old-*`` folders in ``parent`` whose ``<name>`` matches ``name_pattern``."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{name_pattern}.{kind}-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def write_folder_atomically(output: str | os.PathLike, write: Callable[[Path], object],
                            overwrite: bool = False, *, kind: str | FolderKind | None = None,
                            inputs: Iterable[str | os.PathLike | None] = (), option: str = "--output") -> Path:
    """Call ``write(tmp_dir)`` and move the folder into place only once it is complete; returns ``output``.

    The temporary folder (:func:`stage_folder`) sits beside ``output`` and is removed on any failure or
    interruption; an existing ``output`` is replaced by :func:`swap_folder_into_place` only if
    :func:`check_output_folder` allows it (``overwrite``, ``kind``, ``inputs``, ``option``). Writers on several
    processes use the two steps directly (``stage_folder(output, shared=True)`` on one process, every process
    writes, one swaps).
    """
    output = Path(output)
    resolved = check_output_folder(output, overwrite, kind=kind, inputs=inputs, option=option)
    staged = stage_folder(resolved)
    try:
        write(staged)
        swap_folder_into_place(staged, resolved)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return output


# ---- one-line errors for the example scripts --------------------------------------------------------------------
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, FileExistsError, NotADirectoryError,
                                                FileNotFoundError, IsADirectoryError, PermissionError)
"""What :func:`run_main` reports as ``error: <message>`` (the library's own errors, ``ConversionError``,
``HubError``, :class:`OutputFolderError`, derive from these)."""


def one_line_error(e: BaseException) -> str:
    """An exception as one line: an ``OSError`` as ``<file>: <reason>``, anything else as its message."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def run_main(main: Callable[..., Any], *args: Any, **kwargs: Any) -> NoReturn:
    """Run a script's ``main(*args, **kwargs)`` and exit: status 0, or, for a user error (:data:`USER_ERRORS`),
    ``error: <one line>`` on stderr and status 2. Other exceptions (programming errors) keep their traceback, and
    so does every exception when the environment sets ``SPHERE_AR_TRACEBACK=1``."""
    try:
        main(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("SPHERE_AR_TRACEBACK") == "1":
            raise
        print(f"error: {one_line_error(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(0)
