"""Models shipped inside the package (package data), loadable offline:

    SphereARPipeline.from_pretrained(bundled_model_path("digits"))

``digits``: 16 px class-conditional digits (classes "0".."9"), trained on CPU by ``examples/train_digits.py`` on
scikit-learn's 8x8 digits; ``benchmarks/eval_digits.py`` measures it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["BUNDLED_MODELS", "bundled_model_path"]

BUNDLED_MODELS = ("digits",)


def bundled_model_path(name: str = "digits") -> Path:
    """The folder of the bundled pipeline ``name`` (a normal pipeline folder: model_index.json, transformer/, vae/,
    scheduler/)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; expected one of {list(BUNDLED_MODELS)}")
    path = Path(str(files(__name__) / name))
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the bundled model {name!r} is missing from this installation ({path}); reinstall "
                                "sphere-ar-hf")
    return path
