"""benchmarks/bench_gpu.py end to end on the CPU (``--device cpu --tiny``: a tiny random model at 32 px, the CPU
standing in for the accelerator): the fixture check, every sampling path, both offload modes and training, a
training run out of memory as a result line, and a failed part that the script reports and goes on after."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


TRAIN_FLAGS = ["--train-batch", "4,8", "--train-steps", "3", "--train-warmup", "1"]
TRAINING_LINE = re.compile(
    r"training (eager|compiled) +batch +(\d+): step +([\d.]+) ms \(median of 3; mean [\d.]+\), +([\d.]+) images/s, "
    r"first step +([\d.]+) s, peak GPU memory n/a; loss ([\d.]+) -> ([\d.]+) \(mean of the last 3: ([\d.]+), "
    r"finite: True\)(?:; (\d+) graphs compiled \(graph breaks \+ 1\), max \|loss - eager loss\| over the steps "
    r"([\d.e+-]+))?")


def test_gpu_benchmark_runs_on_the_cpu(capsys, fresh_dynamo) -> None:
    """benchmarks/bench_gpu.py end to end with tiny sizes: the fixture, every path, both offload modes, training."""
    from conftest import FIXTURE_DIR

    _bench_gpu().main(["--device", "cpu", "--tiny", "--batch-sizes", "2", "--steps", "2", "--compile-backend",
                       "eager", "--fixture", str(FIXTURE_DIR), *TRAIN_FLAGS])
    out = capsys.readouterr().out
    for tag in ("cfg", "nocfg", "const"):
        assert f"fixture {tag}: cpu fp32 eager tokens vs CPU: max |diff| 0.00e+00" in out
    for path in ("eager", "compiled", "graph"):
        assert f"{path:8s} batch   2:" in out and "synchronising calls inside the token loop: none" in out
        assert re.search(rf"{path:8s} batch   2: .*; peak GPU memory nan GiB \(weights [\d.]+ \+ the call's "
                         r"estimate [\d.]+\)\n", out), out
    # the fast paths first: a run cut short by its time limit still has their numbers
    assert out.index("graph    batch   2:") < out.index("compiled batch   2:") < out.index("eager    batch   2:")
    for path in ("compiled", "graph"):  # the first call compiled what the timed call runs: no recompilation
        assert re.search(rf"{path} +batch   2: .* graphs compiled by the timed call: 0;", out), out
    for path in ("eager", "graph"):
        # the pipeline's compiled trunk step, reused: nothing compiles again
        assert re.search(rf"{path} +batch   2: trunk steps alone +[\d.]+ ms per token \(issued by the host in "
                         r" *[\d.]+ ms\); graphs compiled: 0\n", out), out
    for line in ("model CPU offload:", "model CPU offload + fast path:", "sequential CPU offload:",
                 "group CPU offload:"):
        assert line in out
    assert out.count("max |diff| from no offload 0.00e+00") == 4 and out.rstrip().endswith("done")
    assert re.search(r"two requests at once \(the graph path capturing at batch 5 (NOT )?inside an eager call, "
                     r"[\d.]+ s in [\d.]+ s\): max \|diff\| from alone: eager 0.00e\+00, graph 0.00e\+00\n", out), out
    assert re.search(r"decoder at batch 2: one pass +[\d.]+ s, peak \+nan GiB; sliced +[\d.]+ s, peak \+nan GiB "
                     r"\(estimate for one pass [\d.]+ GiB\)", out), out
    runs = {(m[1], int(m[2])): m for m in TRAINING_LINE.finditer(out)}
    assert sorted(runs) == [("compiled", 4), ("compiled", 8), ("eager", 4), ("eager", 8)], out
    for (tag, batch), m in runs.items():
        step_ms, rate, first_loss, last_loss = float(m[3]), float(m[4]), float(m[6]), float(m[7])
        assert step_ms > 0 and rate == pytest.approx(batch * 1000 / step_ms, rel=0.01)
        assert first_loss != last_loss and 0 < last_loss < 10  # the step trains: the loss moves, stays finite
        if tag == "compiled":  # the eager backend runs the captured graphs: the same losses as eager, bit for bit
            # one graph: the draws outside the model (with the generator inside forward it was 7), and the rope
            # tables built inside the graph (cached by the first compiled call, a second graph followed)
            assert int(m[9]) == 1 and float(m[10]) == 0.0


def test_gpu_benchmark_reports_training_out_of_memory(capsys, fresh_dynamo, monkeypatch) -> None:
    """A training run out of memory is a result line; the other runs and the script go on."""
    bench = _bench_gpu()
    real = bench.gpu_training.train_run

    def fake(a, config, device, batch, compiled):
        if batch == 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(a, config, device, batch, compiled)

    monkeypatch.setattr(bench.gpu_training, "train_run", fake)
    bench.main(["--device", "cpu", "--tiny", "--compile-backend", "eager", "--sections", "training", *TRAIN_FLAGS])
    out = capsys.readouterr().out
    for tag in ("eager   ", "compiled"):
        assert f"training {tag} batch   8: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in out
        assert f"training {tag} batch   4: step" in out
    assert out.rstrip().endswith("done")


def test_gpu_benchmark_goes_on_after_a_failed_part(capsys, fresh_dynamo, monkeypatch) -> None:
    """A part that raises is a FAILED line naming it and its error; the parts after it still run, and the script
    ends by naming every failed part, with exit status 1 (a device is lent for minutes: one run shows all)."""
    from conftest import FIXTURE_DIR

    bench = _bench_gpu()
    real = bench.timed_batch

    def broken_capture(pipe, a, device, path, b):
        if path == "graph":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        return real(pipe, a, device, path, b)

    monkeypatch.setattr(bench, "timed_batch", broken_capture)
    def broken_compile(*args):
        raise RuntimeError("backend='inductor' raised:\nAssertionError: scan is not an OpOverload\n\nSet TORCH_LOGS")

    monkeypatch.setattr(bench, "offload", broken_compile)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--tiny", "--batch-sizes", "2,3", "--steps", "2", "--compile-backend", "eager",
                    "--fixture", str(FIXTURE_DIR), "--sections", "sampling,offload,training", *TRAIN_FLAGS])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    capture_error = "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    for b in (2, 3):
        assert f"FAILED graph batch {b}: {capture_error}\n" in out
        assert f"eager    batch   {b}:" in out and f"compiled batch   {b}:" in out  # the other paths ran
    assert "graph   : " in out  # the graph path's own check and count still ran
    assert re.search(r"50,000 images at the best rate \([\d.]+ images/s, (eager|compiled) at batch [23]\)", out)
    assert "bfloat16 compiled-path images vs float32 eager (batch 2" in out  # the next-best path's images
    # an error whose first line only announces the next one: both
    assert "FAILED offload: RuntimeError: backend='inductor' raised: AssertionError: scan is not an OpOverload\n" in out
    assert len(list(TRAINING_LINE.finditer(out))) == 4  # the part after the failed one ran whole
    last = out.rstrip().splitlines()[-1]
    assert "done; 3 part(s) failed: graph batch 2: RuntimeError" in last
    assert "graph batch 3: RuntimeError" in last and "offload: RuntimeError" in last
