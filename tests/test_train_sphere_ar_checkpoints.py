"""AR-model training checkpoints: a resume with a larger max_steps follows the new schedule, the default run keeps a
bounded number of checkpoints, the completion marker and the resolver that skips what a crash left half written,
rotation, and a run killed with SIGKILL while checkpointing that resumes to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from sphere_ar_hf.training.checkpoints import (
    CHECKPOINT_MARKER,
    is_complete_checkpoint,
    mark_checkpoint_complete,
    resolve_resume_checkpoint,
)
from sphere_ar_hf.training.ema import EMA_WEIGHTS_NAME
from sphere_ar_hf.training.schedules import official_learning_rate
from sphere_ar_hf.training.trainer import SphereARTrainer
from test_train_sphere_ar import (
    EXAMPLE,
    PROBE,
    TIMEOUT,
    LatentsDataset,
    example_cli,
    load_example,
    max_abs_diff,
    subprocess_env,
    tiny_args,
    tiny_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class LRRecorder(TrainerCallback):
    """The learning rate each optimizer step used, read from the optimizer right after the step."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]  # global_step counts finished steps


def test_resume_with_a_larger_max_steps_follows_the_new_schedule(tmp_path, capsys):
    """Train 8 steps of an 8-step schedule, resume with max_steps 20: every step after the resume uses the lr of
    a fresh 20-step schedule (not the checkpointed 8-step one), never above the peak; the Trainer's progress bar
    and the startup summary show."""
    lr, min_lr = 1e-3, 1e-5
    kw = dict(per_device_train_batch_size=8, learning_rate=lr, min_lr=min_lr, warmup_steps=3, decay_start=3,
              save_strategy="steps", save_steps=4, ema_decay=0.0)
    first = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path, max_steps=8, **kw),
                            train_dataset=LatentsDataset())
    first.train()
    assert first.optimizer.param_groups[0]["lr"] == pytest.approx(min_lr)  # the end of the 8-step schedule
    recorder = LRRecorder()
    resumed = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path, max_steps=20, disable_tqdm=False, **kw),
                              train_dataset=LatentsDataset(), callbacks=[recorder])
    capsys.readouterr()
    resumed.train(resume_from_checkpoint="latest")
    err = capsys.readouterr().err
    assert sorted(recorder.lrs) == list(range(9, 21))
    fresh = {s: official_learning_rate(s - 1, 20, lr, min_lr, 3, 3) for s in range(1, 21)}
    for step, used in recorder.lrs.items():
        assert used == pytest.approx(fresh[step], rel=1e-9, abs=1e-12), step
        assert used <= lr
    logged = {h["step"]: h["learning_rate"] for h in resumed.state.log_history if "loss" in h}
    for step, value in logged.items():
        if step > 8:
            assert value == pytest.approx(fresh[step], rel=1e-6, abs=1e-12), step
    # the same as a run that started with max_steps 20
    recorder_fresh = LRRecorder()
    SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path / "fresh", max_steps=20, **kw),
                    train_dataset=LatentsDataset(), callbacks=[recorder_fresh]).train()
    assert all(recorder.lrs[s] == pytest.approx(recorder_fresh.lrs[s], rel=1e-9, abs=1e-12) for s in recorder.lrs)
    # the progress bar (with ETA) and the startup summary, printed once
    assert "20/20 [" in err and err.count("SphereAR training") == 1
    assert "resuming at step 8" in err and "8 per device x 1 process x 1 accumulation = 8 per step" in err
    assert f"parameters: {resumed.model.num_parameters():,}" in err and "8 examples, 4 classes" in err


def test_default_run_keeps_a_bounded_number_of_checkpoints(tmp_path):
    """Default save_total_limit 3; --keep_checkpoints_every N keeps every N-th for good; resume uses the newest."""
    kw = dict(per_device_train_batch_size=8, save_strategy="steps", save_steps=1, ema_decay=0.9)
    args = tiny_args(tmp_path, max_steps=6, **kw)  # save_total_limit left at its default
    assert args.save_total_limit == 3 and args.keep_checkpoints_every is None
    SphereARTrainer(model=tiny_model(), args=args, train_dataset=LatentsDataset()).train()
    out = tmp_path / "out"
    names = lambda: sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))  # noqa: E731
    assert names() == [4, 5, 6]
    recorder = LRRecorder()
    resumed = SphereARTrainer(model=tiny_model(), train_dataset=LatentsDataset(), callbacks=[recorder],
                              args=tiny_args(tmp_path, max_steps=10, keep_checkpoints_every=4, **kw))
    resumed.train(resume_from_checkpoint="latest")
    assert sorted(recorder.lrs) == [7, 8, 9, 10]  # resumed from checkpoint-6
    assert names() == [4, 7, 8, 9, 10]  # the newest 3, and every 4th step
    assert all(is_complete_checkpoint(out / f"checkpoint-{s}") for s in names())


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        mark_checkpoint_complete(folder, step)
    return folder


def test_resolver_skips_checkpoints_a_crash_left_half_written(tmp_path):
    assert resolve_resume_checkpoint(tmp_path, "latest") is None  # nothing yet: start fresh
    good = _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 10, complete=False)  # killed before the marker
    truncated = _fake_checkpoint(tmp_path, 15)
    (truncated / "model.safetensors").write_bytes(b"x" * 10)  # a file shorter than recorded
    corrupt = _fake_checkpoint(tmp_path, 20)
    (corrupt / CHECKPOINT_MARKER).write_text('{"global_step": 20, "fil')  # torn marker
    (tmp_path / "checkpoint-25").mkdir()  # an empty folder
    assert is_complete_checkpoint(good) and not is_complete_checkpoint(truncated)
    assert resolve_resume_checkpoint(tmp_path, "latest") == str(good)
    assert resolve_resume_checkpoint(tmp_path, True) == str(good)
    assert resolve_resume_checkpoint(tmp_path, None) is None
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-10"))
    with pytest.raises(ValueError, match="no such folder"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-99"))
    assert json.loads((good / CHECKPOINT_MARKER).read_text())["files"]["model.safetensors"] == 100


def test_checkpoints_are_marked_rotated_and_never_written_into(tmp_path):
    """Every checkpoint gets its marker (with the loss generator's state in it); save_total_limit keeps the
    newest complete ones, counted after the marker; a folder an earlier run left at a step is replaced."""
    out = tmp_path / "out"
    stale = out / "checkpoint-3"
    stale.mkdir(parents=True)
    (stale / "left_by_a_killed_run.bin").write_bytes(b"x")
    _fake_checkpoint(out, 1)  # a complete checkpoint of an earlier run: replaced at step 1, then rotated away
    _fake_checkpoint(out, 9, complete=False)  # incomplete: deleted by the rotation
    args = tiny_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2, ema_decay=0.9)
    trainer = SphereARTrainer(model=tiny_model(), args=args, train_dataset=LatentsDataset())
    assert trainer.save_total_limit == 2 and trainer.args.save_total_limit is None and args.save_total_limit == 2
    seen = []
    trainer.on_checkpoint_written = lambda folder: seen.append((folder.name, is_complete_checkpoint(folder)))
    trainer.train()
    assert seen == [(f"checkpoint-{i}", False) for i in (1, 2, 3, 4)]  # the hook runs before the marker
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3",
                                                                                          "checkpoint-4"]
    for step in (3, 4):
        folder = out / f"checkpoint-{step}"
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        assert is_complete_checkpoint(folder) and marker["global_step"] == step
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                EMA_WEIGHTS_NAME, "loss_generator_0.safetensors"} <= set(marker["files"])
    assert not (out / "checkpoint-3" / "left_by_a_killed_run.bin").exists()
    saved = load_file(str(out / "checkpoint-4" / "loss_generator_0.safetensors"))["state"]
    assert torch.equal(saved, trainer.generator.get_state())
    # resuming restores the loss generator: the state right after step 3, not a fresh seed
    resumed = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path, max_steps=4, ema_decay=0.9),
                              train_dataset=LatentsDataset())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert torch.equal(resumed.generator.get_state(), trainer.generator.get_state())
    assert max_abs_diff(dict(resumed.model.named_parameters()), dict(trainer.model.named_parameters())) <= 1e-6


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = TIMEOUT) -> None:
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path} appeared:\n"
                                 + log.read_text()[-4000:])
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.2)


def test_kill9_while_checkpointing_then_resume_latest_equals_uninterrupted(assets, tmp_path):
    flags = dict(max_steps=30, save_strategy="steps", save_steps=10, seed=3)
    # reference: the same example script, uninterrupted (in this process)
    load_example().main(example_cli(assets, tmp_path / "ref", **flags, report_to="tensorboard"))
    ref = tmp_path / "ref"
    # TensorBoard logs go to <output_dir>/logs, as the S-VAE trainer's
    assert list((ref / "logs").glob("events.out.tfevents*")), "no tensorboard events in <output_dir>/logs"
    assert not (ref / "runs").exists()

    # run 2: killed with SIGKILL while writing checkpoint-20 (every file written, completion marker not yet)
    out, signal_file, log = tmp_path / "run", tmp_path / "hanging", tmp_path / "killed.log"
    env = subprocess_env(SPHERE_AR_PROBE_HANG_AT_STEP="20", SPHERE_AR_PROBE_SIGNAL=str(signal_file))
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(PROBE), *example_cli(assets, out, **flags)], env=env,
                                stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            _wait_for(signal_file, proc, log)
            assert is_complete_checkpoint(out / "checkpoint-10")
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    half = out / "checkpoint-20"
    assert (half / "model.safetensors").is_file() and (half / EMA_WEIGHTS_NAME).is_file()
    assert not is_complete_checkpoint(half) and not (out / "pipeline").exists()

    # resume with the example script: `latest` must skip the half-written checkpoint-20 and use checkpoint-10
    res = subprocess.run([sys.executable, str(EXAMPLE), *example_cli(assets, out, **flags,
                                                                     resume_from_checkpoint="latest")],
                         env=subprocess_env(), capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-10'}" in res.stderr
    assert "skipping" in res.stderr and is_complete_checkpoint(half)

    for name in ("model.safetensors", EMA_WEIGHTS_NAME):
        a, b = load_file(str(ref / "checkpoint-30" / name)), load_file(str(out / "checkpoint-30" / name))
        assert max_abs_diff(a, b) <= 1e-6, name
    pipe_ref = load_file(str(ref / "pipeline" / "transformer" / "model.safetensors"))
    pipe_run = load_file(str(out / "pipeline" / "transformer" / "model.safetensors"))
    assert max_abs_diff(pipe_ref, pipe_run) <= 1e-6
    # the pipeline holds the EMA weights, which differ from the raw ones
    ema = load_file(str(ref / "checkpoint-30" / EMA_WEIGHTS_NAME))
    assert max_abs_diff(pipe_ref, ema) == 0
    assert max_abs_diff(pipe_ref, load_file(str(ref / "checkpoint-30" / "model.safetensors"))) > 1e-4
