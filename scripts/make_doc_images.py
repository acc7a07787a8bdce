#!/usr/bin/env python3
"""Regenerate the README's two pictures from the current code.

    python scripts/make_doc_images.py            # docs/digits_grid.png and docs/demo_screenshot.png
    python scripts/make_doc_images.py --grid     # only the grid (no browser needed)

``docs/digits_grid.png``: the ``sphere-ar generate`` command of the README's first quick-start line, run with its
own arguments (read from the README, so the picture is what that line writes), only ``--output`` pointed here.
``docs/demo_screenshot.png``: the demo's browser test (``tests/test_demo.py``) serving the embedded digits model,
which copies its screenshot here (``SPHERE_AR_DEMO_MODEL=bundled SPHERE_AR_UPDATE_SCREENSHOT=1``); it needs
Debian's Chromium (``apt-get install -y chromium fonts-liberation``) and the test extra.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from quickstart_commands import quickstart_commands  # noqa: E402


def generate_arguments(readme: Path = ROOT / "README.md") -> list[str]:
    """The arguments of the ``sphere-ar generate`` command in the README's first quick-start line."""
    for part in quickstart_commands(readme)[0].split("&&"):
        words = shlex.split(part)
        if words[:2] == ["sphere-ar", "generate"]:
            return words[2:]
    raise ValueError(f"{readme}: the first quick-start line runs no `sphere-ar generate`")


def make_grid(out: Path) -> None:
    from sphere_ar_hf.cli import main as cli

    args = generate_arguments()
    i = args.index("--output")
    args[i + 1] = str(out)
    if cli(["generate", *args]):
        raise SystemExit("sphere-ar generate failed")


def make_screenshot() -> None:
    env = {**os.environ, "SPHERE_AR_DEMO_MODEL": "bundled", "SPHERE_AR_UPDATE_SCREENSHOT": "1",
           "SPHERE_AR_REQUIRE_BROWSER": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_demo.py", "-k", "browser"]
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
        raise SystemExit("the demo's browser test failed; docs/demo_screenshot.png is unchanged")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", action="store_true", help="only docs/digits_grid.png")
    args = p.parse_args(argv)
    make_grid(ROOT / "docs" / "digits_grid.png")
    print("wrote docs/digits_grid.png")
    if not args.grid:
        make_screenshot()
        print("wrote docs/demo_screenshot.png")


if __name__ == "__main__":
    main()
