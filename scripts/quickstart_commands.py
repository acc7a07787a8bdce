#!/usr/bin/env python3
"""Print the README's quick-start command lines, one per line, exactly as written.

    python3 scripts/quickstart_commands.py [README.md]

They are the non-empty lines of the fenced block between ``<!-- quickstart -->`` and ``<!-- /quickstart -->``.
``.ci/run`` runs what this prints, so CI proves the very lines a newcomer copies; ``make_doc_images.py`` takes the
grid's ``sphere-ar generate`` arguments from here. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
PATTERN = re.compile(r"<!-- quickstart -->\s*```[a-z]*\n(.*?)```\s*<!-- /quickstart -->", re.DOTALL)


def quickstart_commands(readme: str | Path = README) -> list[str]:
    """The quick-start command lines of ``readme``; a ``ValueError`` unless there is exactly one marked block."""
    blocks = PATTERN.findall(Path(readme).read_text(encoding="utf-8"))
    if len(blocks) != 1:
        raise ValueError(f"{readme}: expected one fenced block between <!-- quickstart --> and <!-- /quickstart -->, "
                         f"found {len(blocks)}")
    return [line.strip() for line in blocks[0].splitlines() if line.strip()]


if __name__ == "__main__":
    print("\n".join(quickstart_commands(sys.argv[1] if len(sys.argv) > 1 else README)))
