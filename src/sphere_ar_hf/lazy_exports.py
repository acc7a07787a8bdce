"""Names a package loads on first use (PEP 562's module ``__getattr__``), as diffusers' and transformers' do."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package named ``package`` (called from its ``__init__``): a name of
    ``exports`` (public name -> the package's module that defines it) is imported from its module on first access
    and kept in the package's namespace, so that later lookups are plain attribute reads."""
    namespace = sys.modules[package].__dict__

    def load(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def names() -> list[str]:
        return sorted({*namespace, *exports})

    return load, names
