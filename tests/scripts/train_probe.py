"""Test-only launcher: runs examples/train_sphere_ar.py with probes switched on by environment variables.

SPHERE_AR_PROBE_INDEX_DIR: every process appends "epoch index label" of each example it reads to
    rank<RANK>.txt there (needs dataloader_num_workers=0).
SPHERE_AR_PROBE_HANG_AT_STEP: when writing that step's checkpoint, after all of its files are written but before
    it is marked complete, touch SPHERE_AR_PROBE_SIGNAL and sleep (the test then kills the process).
"""

from __future__ import annotations

import os
import runpy
import time
from pathlib import Path

from sphere_ar_hf.training import data, trainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_sphere_ar.py"

index_dir = os.environ.get("SPHERE_AR_PROBE_INDEX_DIR")
if index_dir:
    _getitem = data.ImageDataset.__getitem__
    _log = Path(index_dir) / f"rank{os.environ.get('RANK', '0')}.txt"

    def _logged_getitem(self, index):
        item = _getitem(self, index)
        with open(_log, "a") as f:
            f.write(f"{self.epoch} {int(index)} {int(item['class_labels'])}\n")
        return item

    data.ImageDataset.__getitem__ = _logged_getitem

hang_at = os.environ.get("SPHERE_AR_PROBE_HANG_AT_STEP")
if hang_at:

    def _hang(self, folder):
        if self.state.global_step == int(hang_at):
            Path(os.environ["SPHERE_AR_PROBE_SIGNAL"]).write_text(str(folder))
            time.sleep(600)

    trainer.SphereARTrainer.on_checkpoint_written = _hang

runpy.run_path(str(EXAMPLE), run_name="__main__")
