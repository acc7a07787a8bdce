"""Red-team the package and print what happened, as a table: mutated pipeline folders, bad CLI and example-script
invocations, misuses of the Python API, and writers killed with SIGKILL.

    python benchmarks/fuzz_robustness.py            # every case (1,064; about 40 s on 1 thread)
    python benchmarks/fuzz_robustness.py --quick    # every 10th case (the test suite runs this)
    python benchmarks/fuzz_robustness.py --show "traceback-type error"   # list the cases of one row ('bad': all
                                                                         # but works and clean error)

Each case ends in one of these outcomes:

- ``works``: it ran; for a folder mutation, the images equal the unmutated folder's, or the mutated field is a
  setting that may change them (guidance, sampler, ...);
- ``clean error``: a one-line ``ValueError`` / ``TypeError`` / ``OSError`` (or, from the CLI, exit status 2 and one
  ``error:`` line, or argparse's usage error) that names what is wrong (the mutated field or file, the flag, the
  argument);
- ``one line, not naming it``: the same, but the field / flag / argument is not in the message;
- ``traceback-type error``: any other exception (``KeyError``, ``ZeroDivisionError``, ...) or a multi-line error;
- ``silent wrong result``: a folder mutation of an architecture field (or weights) that loads and generates other
  images without a word;
- ``memory blow-up``: the process's peak memory grew by more than 2 GiB during the case;
- ``files lost``: after a killed writer and the next run of the same command, the user's folder is gone or
  leftovers remain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other fuzz_* modules (also when loaded by path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fuzz_api import api_cases  # noqa: E402
from fuzz_cases import CLEAN_TYPES, OUTCOMES, ROOT, Case, classify_exception, run_case  # noqa: E402
from fuzz_kill import kill_cases  # noqa: E402

# ---- folder mutations ------------------------------------------------------------------------------------------
INT_VALUES = [0, -1, 1e9, 1.5, "abc", None, True, [], 10**12, "1", -2**31]
FLOAT_VALUES = [0, -1, math.nan, math.inf, 1e9, "abc", None, True, [], -1e-300, "0.5"]
STR_VALUES = [3, None, "", "bogus", [], True]
BOOL_VALUES = ["yes", 1, None, [], "true"]
# fields that are settings: another value may change the images (or only training)
SETTINGS = {"guidance_scale", "normalize_tokens", "class_dropout_prob", "diff_batch_mul", "initializer_range",
            "num_inference_steps", "last_step_size", "sampler", "time_shift"}


def other_valid(value) -> list:
    """In-range values other than ``value`` (a number): what weight shapes may not reveal."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return []
    return [value * 2, value / 10 if isinstance(value, float) else max(1, value // 2)]


def field_values(value) -> list:
    if isinstance(value, bool):
        return BOOL_VALUES
    if isinstance(value, int):
        return INT_VALUES
    if isinstance(value, float):
        return FLOAT_VALUES
    if isinstance(value, str):
        return STR_VALUES
    if isinstance(value, list):
        return [[], [0], [-1, 2], "abc", None, [1.5]]
    return [None, "abc"]


class Folders:
    """The tiny pipeline saved once, its reference images, and mutated copies of it."""

    def __init__(self, work: Path):
        from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, SphereVAE

        torch.manual_seed(0)
        tf = SphereARTransformer(SphereARConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                head_hidden_size=64, head_num_layers=2, head_num_adaln=1,
                                                latent_dim=16, image_size=32, patch_size=16, num_classes=10,
                                                num_class_tokens=2))
        vae = SphereVAE(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64),
                        encoder_layers=1, decoder_layers=1)
        with torch.no_grad():  # non-trivial outputs: the zero-initialised layers get small values
            for module in (tf, vae):
                for p in module.parameters():
                    if torch.all(p == 0):
                        p.add_(torch.randn(p.shape) * 0.05)
        self.base = work / "base"
        SphereARPipeline(transformer=tf.eval(), vae=vae.eval(), scheduler=SphereARScheduler()).save_pretrained(
            self.base)
        self.work, self.count = work, 0
        self.reference = self.images(self.base)

    @staticmethod
    def images(folder: Path) -> np.ndarray:
        from sphere_ar_hf import SphereARPipeline

        pipe = SphereARPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe([1, 2], guidance_scale=2.0, num_inference_steps=2, generator=gens, output_type="np").images

    def copy(self) -> Path:
        self.count += 1
        out = self.work / f"m{self.count}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.base, out)
        return out

    def case(self, name: str, mutate: Callable[[Path], None], needle: str, setting: bool = False) -> Case:
        def run() -> str:
            folder = self.copy()
            try:
                mutate(folder)
                try:
                    images = self.images(folder)
                except Exception as e:  # noqa: BLE001  (classified)
                    return classify_exception(e, needle)
                if setting or (images.shape == self.reference.shape and np.array_equal(images, self.reference)):
                    return "works"
                return "silent wrong result"
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        return Case("folder mutations", name, run)


def set_json(file: str, key: str | None, value) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        data = json.loads((folder / file).read_text())
        if key is None:
            data = value
        else:
            data[key] = value
        (folder / file).write_text(json.dumps(data))

    return mutate


def folder_cases(folders: Folders) -> Iterator[Case]:
    for file in ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        config = json.loads((folders.base / file).read_text())
        for key, value in sorted(config.items()):
            if key.startswith("_") or key in ("architectures", "model_type", "transformers_version", "auto_map"):
                continue
            for bad in [*field_values(value), *other_valid(value)]:
                yield folders.case(f"{file}: {key}={bad!r}", set_json(file, key, bad), key, key in SETTINGS)
        for whole in ([], 3, "x", None):
            yield folders.case(f"{file} = {whole!r}", set_json(file, None, whole), file.split("/")[0])
        yield folders.case(f"{file}: not JSON", lambda f, file=file: (f / file).write_text("{oops"), file.split("/")[0])
        yield folders.case(f"{file}: missing", lambda f, file=file: (f / file).unlink(), file.split("/")[0])
    for key in ("transformer", "vae", "scheduler"):
        for bad in ([], ["x"], [1, 2], "SphereVAE", None, ["sphere_ar_hf", "NoSuchClass"]):
            yield folders.case(f"model_index.json: {key}={bad!r}", set_json("model_index.json", key, bad), key)
    for bad in (["a"], {"x": "y"}, {"0": 3}, "abc", 5):
        yield folders.case(f"model_index.json: id2label={bad!r}", set_json("model_index.json", "id2label", bad),
                           "id2label")
    yield from weight_cases(folders)


def edit_weights(file: str, edit: Callable[[dict], dict]) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / file)
        save_file(edit(weights), folder / file, metadata={"format": "pt"})

    return mutate


def first(weights: dict) -> str:
    return sorted(weights)[0]


def weight_cases(folders: Folders) -> Iterator[Case]:
    files = {"transformer": "transformer/model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors"}
    for component, file in files.items():
        yield folders.case(f"{file}: int8", edit_weights(file, lambda w: {k: v.to(torch.int8) for k, v in w.items()}),
                           "floating point")
        yield folders.case(f"{file}: a NaN weight", edit_weights(
            file, lambda w: {**w, first(w): torch.full_like(w[first(w)], math.nan)}), "NaN")
        yield folders.case(f"{file}: a missing weight", edit_weights(file, lambda w: dict(sorted(w.items())[1:])),
                           "missing")
        yield folders.case(f"{file}: an extra weight",
                           edit_weights(file, lambda w: {**w, "extra.weight": torch.ones(2)}), "unexpected")
        yield folders.case(f"{file}: a mis-shaped weight", edit_weights(
            file, lambda w: {**w, first(w): torch.zeros(3, 3)}), first_key(folders.base / file))
        yield folders.case(f"{file}: truncated", lambda f, file=file: truncate(f / file), component)
        yield folders.case(f"{file}: missing", lambda f, file=file: (f / file).unlink(), component)
    yield folders.case("vae: zeroed decoder_conv_out", edit_weights(
        files["vae"], lambda w: {**w, "decoder_conv_out.weight": torch.zeros_like(w["decoder_conv_out.weight"])}),
        "VAE")


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:99])


def first_key(file: Path) -> str:
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        return sorted(f.keys())[0]


# ---- CLI and example scripts -----------------------------------------------------------------------------------
def needles_of(flag: str, value: str = "") -> tuple[str, ...]:
    """What a message about ``flag`` (and its bad ``value``) may say: the flag, its dest, or the value if a name."""
    name = flag.lstrip("-")
    found = (flag, name, name.replace("-", "_"), name.replace("-", " "))
    return (*found, value) if len(value) >= 3 and not value.lstrip("-").replace(".", "").isdigit() else found


def cli_case(argv: list[str], needle: str | tuple[str, ...], cwd: Path) -> Case:
    def run() -> str:
        from sphere_ar_hf.cli import main

        out, err = io.StringIO(), io.StringIO()
        previous = Path.cwd()
        os.chdir(cwd)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse's usage errors
                    code = e.code
        except Exception as e:  # noqa: BLE001  (escaped the CLI: a traceback for the user)
            return "traceback-type error" if not isinstance(e, MemoryError) else "memory blow-up"
        finally:
            os.chdir(previous)
        return classify_cli(code, err.getvalue(), needle)

    return Case("CLI / scripts", " ".join(argv), run)


def classify_cli(code, err: str, needle: str | tuple[str, ...]) -> str:
    if code in (0, None):
        return "works"
    lines = [line.split("\r")[-1] for line in err.strip().splitlines()]  # a progress bar's last state
    lines = [line[line.index("error:"):] if "error:" in line else line for line in lines]
    lines = [line for line in lines if line and not line.startswith(("usage:", "  ", "Loading"))
             and "/s]" not in line]
    if "Traceback" in err or len(lines) != 1:
        return "traceback-type error"
    needles = (needle,) if isinstance(needle, str) else needle
    return "clean error" if any(n.lower() in lines[0].lower() for n in needles) else "one line, not naming it"


def script_case(script: str, argv: list[str], needle: str, cwd: Path) -> Case:
    def run() -> str:
        import importlib.util

        spec = importlib.util.spec_from_file_location(f"fuzz_{script}", ROOT / "examples" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        previous = Path.cwd()
        os.chdir(cwd)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                module.main(argv)
            return "works"
        except SystemExit as e:
            return classify_cli(e.code, err.getvalue(), needle)
        except Exception as e:  # noqa: BLE001  (what run_main would print)
            return classify_exception(e, needle)
        finally:
            os.chdir(previous)

    return Case("CLI / scripts", f"{script} {' '.join(argv)}", run)


BAD_NUMBERS = ["0", "-1", "abc", "1e9", "nan", "inf", "1.5", ""]


def cli_cases(model: Path, work: Path) -> Iterator[Case]:
    gen = ["generate", "--model", str(model), "--class-labels", "1", "--steps", "1", "--output", "out.png"]
    for flag in ("--steps", "--guidance-scale", "--seed", "--batch-size", "--scale", "--grid-cols", "--threads"):
        for bad in [*BAD_NUMBERS, "99999999999999999999", "1e38"]:
            yield cli_case([*gen, flag, bad], needles_of(flag, bad), work)
    for labels in (["-1"], ["10"], ["abc"], [""], ["1.5"], ["1", "-3"], ["9" * 30]):
        yield cli_case([*gen[:4], *labels, "--steps", "1", "--output", "out.png"], "label", work)
    for flag, values in (("--cfg-schedule", ["bogus", ""]), ("--dtype", ["abc", "int8", ""]),
                         ("--device", ["abc", "cuda:99", "meta"]), ("--output", ["x.jpg", "/no/such/dir/x.png", ".",
                                                                                   "out"]),
                         ("--model", ["/no/such/model", "", "a/b/c", str(model / "model_index.json")])):
        for bad in values:
            argv = [a if a != gen[gen.index(flag) + 1] or flag not in gen else bad for a in gen] if flag in gen \
                else [*gen, flag, bad]
            yield cli_case(argv, needles_of(flag, bad), work)
    runs = iter(range(10**6))

    def sample() -> list[str]:  # a new output folder per case: a valid value samples into its own
        return ["sample", "--model", str(model), "--output-dir", f"samples-{next(runs)}", "--steps", "1",
                "--num-images", "2"]

    for flag in ("--num-images", "--shard-size", "--batch-size", "--steps", "--guidance-scale", "--time-shift",
                 "--seed"):
        for bad in [*BAD_NUMBERS, str(10**12)]:
            yield cli_case([*sample(), flag, bad], needles_of(flag, bad), work)
    for flag, values in (("--labels", ["bogus", ""]), ("--sampler", ["bogus"]), ("--dtype", ["abc"]),
                         ("--output-dir", ["/proc/x", "model_index.json"])):
        for bad in values:
            yield cli_case([*sample(), flag, bad], needles_of(flag, bad), work)
    yield from evaluate_cases(work)
    for argv, needle in ((["convert", "--checkpoint", "missing.pt", "--output", "c"], "missing.pt"),
                         (["convert", "--checkpoint", "text.txt", "--output", "c"], "text.txt"),
                         (["convert", "--checkpoint", "empty.pt", "--output", "c"], "empty.pt"),
                         (["push", "--pipeline", str(model), "--repo-id", "bad id", "--license", "mit", "--dry-run",
                           "p"], "repo"),
                         (["push", "--pipeline", str(model), "--repo-id", "me/x", "--license", "not-a-license",
                           "--dry-run", "p"], "license"),
                         (["push", "--pipeline", "missing", "--repo-id", "me/x", "--license", "mit", "--dry-run", "p"],
                          "missing"),
                         (["space", "--output", "s", "--model", "missing-folder/x/y"], "missing"),
                         (["space", "--output", "s", "--model", str(model)], "license")):
        yield cli_case(argv, needle, work)
    for flag in ("--num-heads", "--vae-num-heads"):
        for bad in BAD_NUMBERS:
            yield cli_case(["convert", "--checkpoint", "missing.pt", "--output", "c", flag, bad],
                           needles_of(flag, bad), work)
    yield from demo_cli_cases(model, work)
    yield from training_script_cases(work)


def demo_cli_cases(model: Path, work: Path) -> Iterator[Case]:
    """``sphere-ar-demo`` flags, parsed and checked by ``create_demo`` (which would build the app, not serve it)."""
    def case(argv: list[str], needles: tuple[str, ...]) -> Case:
        def run() -> str:
            from sphere_ar_hf.demo import create_demo

            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    create_demo(argv)
                return "works"
            except SystemExit as e:
                return classify_cli(e.code, err.getvalue(), needles)
            except Exception as e:  # noqa: BLE001  (CLIError: what the demo's main prints as one error: line)
                from sphere_ar_hf.cli_common import CLIError

                return classify_exception(e, needles, (CLIError, *CLEAN_TYPES))

        return Case("CLI / scripts", f"demo {' '.join(argv)}", run)

    for flag in ("--port", "--max-images", "--max-steps", "--steps", "--concurrency-limit", "--queue-size"):
        for bad in [*BAD_NUMBERS, "99999999999999999999"]:
            if flag == "--port" or bad not in ("1e9",):
                yield case(["--model", str(model), flag, bad], needles_of(flag, bad))
    for flag, bad in (("--dtype", "abc"), ("--dtype", "int8"), ("--device", "bogus"), ("--model", "/no/such/model"),
                      ("--threads", "0"), ("--threads", "abc")):
        yield case([*(["--model", str(model)] if flag != "--model" else []), flag, bad], needles_of(flag, bad))


def evaluate_cases(work: Path) -> Iterator[Case]:
    rng = np.random.default_rng(0)
    np.savez(work / "ok.npz", arr_0=rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8))
    np.savez(work / "empty.npz")
    (work / "zero.npz").write_bytes(b"")
    np.savez(work / "zero_px.npz", arr_0=np.zeros((3, 0, 0, 3), np.uint8))
    np.savez(work / "floats.npz", arr_0=np.zeros((3, 16, 16, 3), np.float32))
    a = rng.standard_normal((8, 8))
    np.savez(work / "neg_sigma.npz", mu=np.zeros(8), sigma=-(a @ a.T))
    (work / "text.txt").write_text("hello")
    (work / "empty.pt").write_bytes(b"")
    for gen, needle in (("missing.npz", "missing"), ("empty.npz", "empty"), ("zero.npz", "zero"),
                        ("zero_px.npz", "zero_px"), ("floats.npz", "floats"), ("text.txt", "text")):
        yield cli_case(["evaluate", gen, "ok.npz"], needle, work)
        yield cli_case(["evaluate", gen, "--features", "digits"], needle, work)
    yield cli_case(["evaluate", "ok.npz", "neg_sigma.npz"], "sigma", work)
    yield cli_case(["evaluate", "ok.npz", "ok.npz", "--inception-weights", "text.txt"], "text.txt", work)
    for flag in ("--batch-size", "--k", "--split-size"):
        for bad in BAD_NUMBERS:
            yield cli_case(["evaluate", "ok.npz", "--features", "digits", flag, bad], needles_of(flag, bad), work)


def training_script_cases(work: Path) -> Iterator[Case]:
    from sphere_ar_hf.training.argument_checks import RULES

    common = {"train_vae": ["--output_dir", "runs/v", "--dataset_path", "no-data"],
              "train_sphere_ar": ["--output_dir", "runs/a", "--pretrained_vae", "no-vae", "--dataset_path", "no-data"],
              "train_lora": ["--output_dir", "runs/l", "--pretrained_model", "no-model", "--dataset_path", "no-data"]}
    fields = {"train_vae": ["num_train_epochs", "global_batch_size", "resolution", "gradient_accumulation_steps",
                            "checkpointing_steps", "kl_weight", "learning_rate", "disc_weight", "max_grad_norm"],
              "train_sphere_ar": ["num_train_epochs", "per_device_train_batch_size", "class_dropout_prob",
                                  "ema_decay", "diff_batch_mul", "learning_rate", "weight_decay", "aug_ratio"],
              "train_lora": ["lora_alpha", "lora_rank", "lora_dropout", "learning_rate", "num_train_epochs"]}
    for script, names in fields.items():
        for name in names:
            for bad in ("0", "-1", "nan", "inf", "abc", "1e9", "0.5"):
                if not valid(RULES[name], bad):  # a valid value would start the run (on data that is not there)
                    yield script_case(script, [*common[script], f"--{name}", bad], name, work)
    digits = {"--threads": "threads", "--heads": "num_attention_heads", "--num_class_tokens": "latent_dim",
              "--diff_batch_mul": "diff_batch_mul", "--vae_lr": "learning_rate", "--ema_decay": "ema_decay",
              "--vae_epochs": "global_batch_size", "--ar_batch_size": "per_device_train_batch_size"}
    for flag, rule in digits.items():  # (the rule of a field with the same range)
        for bad in ("0", "-1", "nan", "abc", "2.5"):
            if not valid(RULES[rule], bad):
                yield script_case("train_digits", [flag, bad, "--output_dir", "d", "--work_dir", "dw"],
                                  flag.lstrip("-"), work)


def valid(rule, text: str) -> bool:
    """Whether ``text`` parses to a value that ``rule`` accepts (as an int if it is one, else a float)."""
    ok, _ = rule
    for parse in (int, float):
        try:
            return ok(parse(text))
        except ValueError:
            continue
    return False


# ---- main ------------------------------------------------------------------------------------------------------------
def all_cases(work: Path) -> list[Case]:
    folders = Folders(work / "folders")
    cli_work = work / "cli"
    cli_work.mkdir()
    return [*folder_cases(folders), *cli_cases(folders.base, cli_work), *api_cases(folders.base),
            *kill_cases(folders.base, work)]


def run_all(a: argparse.Namespace) -> dict[str, Counter]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        cases = all_cases(Path(tmp))
        if a.quick:  # every 10th case of each kind (at least one of each)
            groups = {c.group: [d for d in cases if d.group == c.group] for c in cases}
            cases = [c for group in groups.values() for c in group[::10]]
        table: dict[str, Counter] = {}
        for case in cases:
            outcome = run_case(case)
            table.setdefault(case.group, Counter())[outcome] += 1
            if a.show and (outcome == a.show or (a.show == "bad" and outcome not in OUTCOMES[:2])):
                print(f"{outcome}: {case.group}: {case.name}", flush=True)
    return table


def main(argv: list[str] | None = None) -> dict[str, Counter]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every 10th case of each kind")
    ap.add_argument("--show", default=None, metavar="OUTCOME",
                    help="list the cases with this outcome ('bad': every outcome but works and clean error)")
    a = ap.parse_args(argv)
    import logging

    threads, quiet = torch.get_num_threads(), logging.root.manager.disable
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # the libraries' warnings about the broken inputs
    try:
        table = run_all(a)
    finally:  # (run in-process by the tests: leave the process as it was)
        logging.disable(quiet)
        torch.set_num_threads(threads)
    groups = list(table)
    print("\n| outcome | " + " | ".join(groups) + " |")
    print("| --- | " + " | ".join("---:" for _ in groups) + " |")
    for outcome in OUTCOMES:
        print(f"| {outcome} | " + " | ".join(str(table[g][outcome]) for g in groups) + " |")
    print("| total | " + " | ".join(str(sum(table[g].values())) for g in groups) + " |")
    return table


if __name__ == "__main__":
    main()
