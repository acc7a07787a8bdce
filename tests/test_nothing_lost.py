"""Nothing lost, round two: `--overwrite` refuses a folder with the user's files anywhere inside it (component
sub-folders, a Space's `model/` and `sphere_ar_hf/`); a writer killed between its two renames, or while staging, is
recovered by the next run of the same command (the old folder restored, the leftovers removed); a killed
`atomic_write` leaves a temporary that the next `sample` run removes; a refused `sample` records nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sphere_ar_hf import hub, utils
from sphere_ar_hf.evaluation.sampling import SamplingSettings, run_sampling
from sphere_ar_hf.utils import OutputFolderError
from test_convert import assert_one_line_error, run
from test_output_folders import AR, debris, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


# ---- foreign files inside the folder -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", ["transformer/keep.txt", "vae/notes/keep.txt", "scheduler/sub/"])
def test_convert_overwrite_refuses_user_files_in_component_folders(extra, pipeline_dir, tmp_path) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    target = w / extra
    target.parent.mkdir(parents=True, exist_ok=True)
    target.mkdir() if extra.endswith("/") else target.write_text("mine")
    before = snapshot(w)
    code, _, err = run("convert", "--checkpoint", AR, "--output", w, "--overwrite")
    shown = extra if extra.count("/") == 1 or extra.endswith("/") else extra.rsplit("/", 1)[0] + "/"
    assert_one_line_error(code, err, "refusing to replace", "not a pipeline folder", f"it holds {shown}")
    assert snapshot(w) == before and target.exists() and debris(tmp_path) == []


def test_push_dry_run_overwrite_refuses_user_files_in_component_folders(pipeline_dir, tmp_path) -> None:
    out = tmp_path / "push"
    hub.build_push_folder(pipeline_dir, out, repo_id="me/tiny", license="mit")
    for extra in ("transformer/keep.txt", "vae/notes/keep.txt"):
        (out / extra).parent.mkdir(exist_ok=True)
        (out / extra).write_text("mine")
        shown = "transformer/keep.txt|vae/notes/"
        with pytest.raises(OutputFolderError, match=f"not a pipeline folder .it holds ({shown})"):
            hub.build_push_folder(pipeline_dir, out, repo_id="me/tiny", license="mit", overwrite=True)
        assert (out / extra).read_text() == "mine"
        shutil.rmtree(out / "vae" / "notes") if "notes" in extra else (out / extra).unlink()
    hub.build_push_folder(pipeline_dir, out, repo_id="me/tiny", license="apache-2.0", overwrite=True)  # clean: ok
    assert debris(tmp_path) == []


@pytest.mark.parametrize("extra", ["model/transformer/keep.txt", "model/notes.txt", "sphere_ar_hf/keep.txt",
                                   "sphere_ar_hf/data/keep.txt"])
def test_space_overwrite_refuses_user_files_in_model_and_package(extra, pipeline_dir, tmp_path) -> None:
    space = tmp_path / "space"
    hub.build_space_folder(space, license="mit", model=pipeline_dir)
    (space / "sphere_ar_hf" / "__pycache__").mkdir()  # what running app.py locally leaves: allowed
    (space / "sphere_ar_hf" / "__pycache__" / "demo.cpython-311.pyc").write_bytes(b"x")
    hub.build_space_folder(space, license="mit", model=pipeline_dir, overwrite=True)
    (space / extra).write_text("mine")
    with pytest.raises(OutputFolderError, match=f"not a Space folder .it holds {extra}"):
        hub.build_space_folder(space, license="mit", model=pipeline_dir, overwrite=True)
    assert (space / extra).read_text() == "mine" and debris(tmp_path) == []


# ---- killed writers ----------------------------------------------------------------------------------------------
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sphere_ar_hf import utils
    from sphere_ar_hf.cli import main

    moment, argv = sys.argv[1], sys.argv[2:]
    real_replace = os.replace

    def replace(src, dst):  # kill -9 right before the staged folder is renamed into place
        if moment == "between-renames" and ".tmp-" in Path(src).name:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)

    real_stage = utils.stage_folder

    def stage(output, shared=False):  # kill -9 while the new folder is being written
        staged = real_stage(output, shared)
        (staged / "half-written").write_text("x")
        if moment == "while-staging":
            os.kill(os.getpid(), signal.SIGKILL)
        return staged

    utils.os.replace = replace
    utils.stage_folder = stage
    sys.exit(main(argv))
""")


def killed(moment: str, *argv: str | Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", KILLER, moment, *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr


def test_convert_killed_between_its_renames_is_recovered_by_the_next_run(pipeline_dir, tmp_path) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    before = snapshot(w)
    killed("between-renames", "convert", "--checkpoint", AR, "--output", w, "--overwrite")
    assert not w.exists() and len(debris(tmp_path)) == 2  # the old folder set aside, the new one staged
    # the next run restores the old folder first: without --overwrite it is refused, and nothing is lost
    code, _, err = run("convert", "--checkpoint", AR, "--output", w)
    assert_one_line_error(code, err, "not empty", "--overwrite")
    assert snapshot(w) == before and debris(tmp_path) == []
    killed("between-renames", "convert", "--checkpoint", AR, "--output", w, "--overwrite")
    code, _, err = run("convert", "--checkpoint", AR, "--output", w, "--overwrite")  # completes the job
    assert code == 0, err
    assert snapshot(w) != before and (w / "model_index.json").is_file() and debris(tmp_path) == []


@pytest.mark.parametrize("command", ["convert", "push"])
def test_a_writer_killed_while_staging_leaves_what_its_next_run_removes(command, pipeline_dir, tmp_path) -> None:
    out = tmp_path / "out"
    argv = (["convert", "--checkpoint", AR, "--output", out] if command == "convert" else
            ["push", "--pipeline", pipeline_dir, "--repo-id", "me/tiny", "--license", "mit", "--dry-run", out])
    killed("while-staging", *argv)
    assert not out.exists() and [n.split(".tmp-")[0] for n in debris(tmp_path)] == [".out"]
    code, _, err = run(*argv)
    assert code == 0, err
    assert debris(tmp_path) == [] and (out / "model_index.json").is_file()


def test_leftovers_of_live_or_foreign_processes_are_kept(tmp_path) -> None:
    """Only what a dead process of this host left is removed: never the work of a live writer."""
    live = tmp_path / f".out.tmp-{utils.owner_tag()}-0123abcd"  # this process: alive
    other_host = tmp_path / f".out.tmp-elsewhere-{os.getpid()}-0123abcd"
    legacy = tmp_path / ".out.tmp-0123abcd"
    for path in (live, other_host, legacy):
        path.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = utils.owner_tag().rsplit("-", 1)[0]
    gone = tmp_path / f".out.tmp-{host}-{int(dead.stdout)}-0123abcd"
    gone.mkdir()
    utils.recover_interrupted_write(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, legacy))


# ---- sample ------------------------------------------------------------------------------------------------------
def settings(guidance: float, n: int = 2) -> SamplingSettings:
    return SamplingSettings(model="tiny", num_images=n, seed=0, guidance_scale=guidance, cfg_schedule="linear",
                            labels="uniform",
                            sampler="euler_maruyama", time_shift=0.0, num_inference_steps=2, dtype="float32",
                            shard_size=2, num_classes=10, image_size=32)


def test_a_refused_sample_records_nothing_and_the_retry_runs(tiny_pipeline, tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="guidance_scale=1e.38 made the guided velocity non-finite"):
        run_sampling(tiny_pipeline, out, settings(1e38), batch_size=2, show_progress=False)
    assert not (out / "sampling.json").exists()
    final = run_sampling(tiny_pipeline, out, settings(2.0), batch_size=2, show_progress=False)
    assert final.is_file() and json.loads((out / "sampling.json").read_text())["guidance_scale"] == 2.0


def test_sample_removes_the_temporaries_of_a_killed_merge(tiny_pipeline, tmp_path) -> None:
    out = tmp_path / "run"
    run_sampling(tiny_pipeline, out, settings(2.0), batch_size=2, show_progress=False)
    code = (f"import os, signal; from sphere_ar_hf.utils import atomic_write\n"
            f"with atomic_write({str(out / 'samples.npz')!r}) as f:\n"
            "    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == -9
    left = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".samples.npz.")
    run_sampling(tiny_pipeline, out, settings(2.0), batch_size=2, resume=True, show_progress=False)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
