"""The S-VAE training script with two processes (``torchrun``, gloo, CPU): a run interrupted and resumed trains the
same weights as one that was not, bit for bit, from a map-style dataset and from a stream whose shards differ in
size between the processes (each process resumes at its own data position)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import VAE_SCRIPT, VAE_SCRIPT_ARGS, launch_env, safetensors_weights, torchrun_command
from sphere_ar_hf import SphereVAE
from sphere_ar_hf.training.checkpoints import CHECKPOINT_MARKER, mark_checkpoint_complete
from sphere_ar_hf.training.vae_checkpoints import TrainState

COMMON = ["--global_batch_size", "8", "--gradient_accumulation_steps", "2", "--disc_start", "2", "--learning_rate",
          "1e-3", "--checkpointing_steps", "2", "--logging_steps", "1", "--validation_steps", "100",
          "--num_validation_images", "0", "--report_to", "none"]


def torchrun(cwd: Path, out: Path, *args: str) -> str:
    """Run the training script with 2 processes into ``out``; returns its stderr (it must succeed)."""
    cmd = torchrun_command(VAE_SCRIPT, "--output_dir", out, *VAE_SCRIPT_ARGS, *COMMON, *args)
    res = subprocess.run(cmd, env=launch_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stderr


def assert_same_weights(a: Path, b: Path, names: tuple[str, ...] = ("vae", "discriminator")) -> None:
    for name in names:
        x, y = safetensors_weights(a / name), safetensors_weights(b / name)
        assert x.keys() == y.keys() and x and all(torch.equal(x[k], y[k]) for k in x), name


def test_two_processes_train_and_resume_as_one_run(image_dataset, tmp_path):
    """4 steps straight equal 2 steps, then a resume to 4, bit for bit (every rank's RNG state saved and restored);
    the final S-VAE loads and reconstructs."""
    data = ["--dataset_path", str(image_dataset)]
    full, split = tmp_path / "full", tmp_path / "split"
    stderr = torchrun(tmp_path, full, *data, "--max_train_steps", "4")
    assert "2 per device x 2 processes x 2 accumulation = 8 per step" in stderr
    torchrun(tmp_path, split, *data, "--max_train_steps", "2")
    assert {p.name for p in (split / "checkpoint-2").glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                      "random_states_1.pkl"}
    assert "resuming at step 2" in torchrun(tmp_path, split, *data, "--max_train_steps", "4",
                                            "--resume_from_checkpoint", "latest")
    assert_same_weights(full, split, ("vae", "discriminator", "checkpoint-4"))
    vae = SphereVAE.from_pretrained(str(split / "vae"))
    with torch.no_grad():
        out = vae(torch.zeros(1, 3, 32, 32), sample_posterior=False).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_stream_with_uneven_shares_resumes_each_process_where_it_was(image_dataset, tmp_path):
    """A stream of two parquet files of 24 and 12 images: each process streams one, so at step 4 process 0 is 8
    micro-batches into its first epoch and process 1 2 micro-batches into its second. Each process's own position
    is saved and restored: 4 steps plus a resume to 6 equal 6 steps straight."""
    import datasets

    images = datasets.load_from_disk(str(image_dataset))
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for i, rows in enumerate((range(0, 24), range(24, 36))):
        images.select(rows).to_parquet(str(repo / "data" / f"train-{i:05d}-of-00002.parquet"))
    data = ["--dataset_name", str(repo), "--streaming", "--shuffle_buffer_size", "0", "--cache_dir",
            str(tmp_path / "hf-cache")]
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(tmp_path, full, *data, "--max_train_steps", "6")
    torchrun(tmp_path, split, *data, "--max_train_steps", "4")
    marker = json.loads((split / "checkpoint-4" / CHECKPOINT_MARKER).read_text())
    assert marker["train_state"]["epoch"] == 0 and marker["train_state"]["micro_batches_in_epoch"] == 8
    assert marker["process_positions"] == [[0, 8], [1, 2]]
    torchrun(tmp_path, split, *data, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert_same_weights(full, split)


def _checkpoint(folder: Path, **extra) -> Path:
    folder.mkdir()
    train_state = dict(global_step=4, epoch=0, micro_batches_in_epoch=8, global_batch_size=8, num_processes=2,
                       gradient_accumulation_steps=2)
    mark_checkpoint_complete(folder, 4, {"train_state": train_state, **extra})
    return folder


def test_each_process_reads_its_own_position(tmp_path):
    """Each process takes its own ``[epoch, micro_batches_in_epoch]``; a checkpoint without them, or one resumed by
    another number of processes, gives every process process 0's; a malformed list is refused in one line."""
    folder = _checkpoint(tmp_path / "c", process_positions=[[0, 8], [1, 2]])
    positions = []
    for rank in range(2):
        state = TrainState()
        state.load_checkpoint(folder, rank, 2)
        positions.append((state.global_step, state.epoch, state.micro_batches_in_epoch))
    assert positions == [(4, 0, 8), (4, 1, 2)]
    for checkpoint, rank, world in ((folder, 1, 4), (_checkpoint(tmp_path / "old"), 1, 2)):
        state = TrainState()
        state.load_checkpoint(checkpoint, rank, world)
        assert (state.epoch, state.micro_batches_in_epoch) == (0, 8)
    for i, bad in enumerate(([[0, 8]], [[0, 8], [1, -2]], [[0, 8], [1, "2"]], [[0, 8], [1, 2, 3]], {"0": [0, 8]})):
        with pytest.raises(ValueError, match=r"process_positions .*: expected 2 pairs \[epoch, micro_batches_in"):
            TrainState().load_checkpoint(_checkpoint(tmp_path / f"bad{i}", process_positions=bad), 0, 2)
