"""``sphere-ar push``: upload a pipeline folder to the Hugging Face Hub with its model card and remote code
(library: :mod:`.hub`, :func:`.hub.push_pipeline` and :func:`.hub.build_push_folder`)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_common import one_line
from .hub import CARDS, HubError, build_push_folder, detect_card, pipeline_facts, push_pipeline

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["FLAGS", "add_push_parser", "flag_message", "run_push"]

#: the library's parameters (as :class:`.hub.HubError` messages name them, in backquotes) -> this command's flags
FLAGS = {"pipeline": "--pipeline", "repo_id": "--repo-id", "license": "--license", "license_name": "--license-name",
         "license_link": "--license-link", "card": "--card", "metrics": "--metrics", "model": "--model",
         "output": "--output"}
_PARAMETER = re.compile(r"`(\w+)(?:=(?:'([^'`]*)'|([^`]*)))?`")


def flag_message(error: object) -> str:
    """``error``'s message on one line, with the parameters it names as the command line's flags: `` `card` ``
    becomes ``--card`` and `` `card='b'` `` ``--card b`` (other backquoted text stays as it is)."""

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
        if name not in FLAGS:
            return match.group(0)
        return FLAGS[name] if value is None else f"{FLAGS[name]} {value}"

    return _PARAMETER.sub(flag, one_line(error))


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
    """Run ``sphere-ar push``; errors print one ``error: ...`` line (the library's, in flags) and return 2."""
    try:
        if args.license is None:
            raise HubError("`license` is required: the license of the weights as their owner states it, as a Hub "
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
        print(f"error: {'the upload failed: ' + one_line(e) if upload else flag_message(e)}", file=sys.stderr)
        return 2
    print(f"pushed {args.pipeline} to {url}{' (private)' if args.private else ''}")
    return 0
