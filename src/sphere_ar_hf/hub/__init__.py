"""Publishing on the Hugging Face Hub: model cards (:mod:`.cards`), uploads of pipelines and LoRA adapters
(:mod:`.push`) and Space folders (:mod:`.space`). The ``sphere-ar push`` command is :mod:`..cli_push`.

The names below are the ones callers use; the modules hold the rest.
"""

from __future__ import annotations

from .cards import (
    CARDS,
    HUB_CARDS_DIR,
    TRAINING_INFO_KEY,
    HubError,
    card_problem,
    check_license,
    detect_card,
    load_metrics,
    pipeline_facts,
    render_lora_card,
    render_model_card,
)
from .push import build_push_folder, push_lora, push_pipeline
from .space import build_space_folder, render_space_card, space_folder_kind, space_package_files

__all__ = ["CARDS", "HUB_CARDS_DIR", "TRAINING_INFO_KEY", "HubError", "build_push_folder", "build_space_folder",
           "card_problem", "check_license", "detect_card", "load_metrics", "pipeline_facts", "push_lora",
           "push_pipeline", "render_lora_card", "render_model_card", "render_space_card", "space_folder_kind",
           "space_package_files"]
