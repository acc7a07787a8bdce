"""Remote code: a pushed folder carries the package's module files unchanged and loads with
`DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` where sphere_ar_hf cannot be imported (from a folder,
from the Hub, and after `save_pretrained`), giving the package's images; and no import cycle among package modules."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_imports

import sphere_ar_hf
from sphere_ar_hf import SphereARPipeline, SphereARTransformer, SphereVAE, hub, remote_code
from sphere_ar_hf.remote_code import COMPONENTS, ENTRY, package_model_index, remote_modules, write_remote_code

PACKAGE_DIR = Path(sphere_ar_hf.__file__).parent
REPO_ID = "someone/sphere-ar-tiny"
ALLOWED_IMPORTS = {"torch", "diffusers", "transformers", "numpy", "safetensors", "huggingface_hub", "PIL",
                   "packaging"}  # packaging: diffusers imports it itself (through huggingface_hub's requirement)
SEED, STEPS, LABEL = 0, 2, 3

# runs in a fresh interpreter where sphere_ar_hf cannot be imported (whatever sys.path or the editable install say):
# LOAD_WITHOUT_PACKAGE folder|hub SOURCE OUT [SAVE_TO]. "hub": SOURCE is served as the Hub repository REPO_ID by
# fakes of the four huggingface_hub calls diffusers makes, so diffusers' own download rules decide what is fetched.
LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import fnmatch, importlib.abc, json, shutil, sys, types
    from pathlib import Path

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sphere_ar_hf" or name.startswith("sphere_ar_hf."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockPackage())
    try:
        import sphere_ar_hf  # noqa: F401
        raise SystemExit("sphere_ar_hf is importable: the test would prove nothing")
    except ModuleNotFoundError:
        pass

    import torch
    from diffusers import DiffusionPipeline
    from transformers import AutoModel

    mode, source, out, save_to = sys.argv[1], Path(sys.argv[2]), sys.argv[3], (sys.argv[4:] or [None])[0]
    fetched = []
    if mode == "hub":
        import diffusers.pipelines.pipeline_loading_utils as loading_utils
        import diffusers.pipelines.pipeline_utils as pipeline_utils
        import diffusers.utils.dynamic_modules_utils as dynamic_modules_utils

        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        snapshot = Path(out + ".snapshot")

        def fetch(name):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            fetched.append(name)
            return shutil.copyfile(source / name, snapshot / name)

        def hf_hub_download(repo_id, filename, subfolder=None, **kwargs):
            assert repo_id == "REPO_ID", repo_id
            return fetch(f"{subfolder}/{filename}" if subfolder else filename)

        def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
            assert repo_id == "REPO_ID", repo_id
            for name in files:
                if any(fnmatch.fnmatch(name, p) for p in allow_patterns or ["*"]) and not any(
                        fnmatch.fnmatch(name, p) for p in ignore_patterns or []):
                    fetch(name)
            return str(snapshot)

        def model_info(repo_id, **kwargs):
            return types.SimpleNamespace(sha="0" * 40, siblings=[types.SimpleNamespace(rfilename=f) for f in files])

        for module, names in ((pipeline_utils, ("hf_hub_download", "snapshot_download", "model_info")),
                              (dynamic_modules_utils, ("hf_hub_download", "model_info")),
                              (loading_utils, ("model_info",))):
            for name in names:
                setattr(module, name, globals()[name])
        pipeline_utils._resolve_revision = lambda name, revision=None, **kwargs: revision

    pipe = DiffusionPipeline.from_pretrained("REPO_ID" if mode == "hub" else source, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([LABEL], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                  output_type="pt").images
    result = {"images": images}
    if mode == "folder":
        result["transformer_state"] = AutoModel.from_pretrained(source, subfolder="transformer",
                                                                trust_remote_code=True).state_dict()
    if save_to:
        pipe.save_pretrained(save_to)
    torch.save(result, out)
    info = {"pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
            "components": {k: type(v).__module__ for k, v in pipe.components.items()},
            "id2label": {str(k): v for k, v in pipe.id2label.items()}, "fetched": sorted(set(fetched)),
            "package_imported": any(m.split(".")[0] == "sphere_ar_hf" for m in sys.modules)}
    print("RESULT " + json.dumps(info))
""").replace("LABEL", str(LABEL)).replace("STEPS", str(STEPS)).replace("SEED", str(SEED)).replace(
    "REPO_ID", REPO_ID)


def load_without_package(tmp_path: Path, *args: str | Path) -> tuple[dict, dict, str]:
    """Run LOAD_WITHOUT_PACKAGE with a fresh module cache; returns its RESULT info, what it saved, its stderr."""
    out = tmp_path / f"result-{len(list(tmp_path.glob('result-*')))}.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="0" if args[0] == "hub" else "1", HF_MODULES_CACHE=str(out) + ".modules",
               HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", DIFFUSERS_VERBOSITY="warning",
               TRANSFORMERS_VERBOSITY="warning", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, args[0], str(args[1]), str(out),
                           *map(str, args[2:])], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert not info["package_imported"]
    # the components are the very classes the pipeline module imported: no type-mismatch warning
    assert "Expected types for" not in proc.stderr
    return info, torch.load(out), proc.stderr


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_pipeline) -> tuple[Path, Path]:
    """A tiny pipeline folder and the folder `sphere-ar push` would upload for it (its dry run)."""
    root = tmp_path_factory.mktemp("remote")
    tiny_pipeline.save_pretrained(root / "pipeline", safe_serialization=True)
    out = hub.build_push_folder(root / "pipeline", root / "repo", repo_id=REPO_ID, license="mit")
    return root / "pipeline", out


@pytest.fixture(scope="module")
def package_images(pushed) -> torch.Tensor:
    pipe = SphereARPipeline.from_pretrained(pushed[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe([LABEL], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                output_type="pt").images


def code_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))


def expected_code_files() -> list[str]:
    return sorted([f"{m}.py" for m in remote_modules()] + [f"{c}/remote_code.py" for c in COMPONENTS])


def test_round_trip_without_the_package(pushed, package_images, tmp_path):
    """push dry run -> load without the package -> generate -> save_pretrained -> load that -> generate."""
    pipeline_dir, repo = pushed
    info, remote, _ = load_without_package(tmp_path, "folder", repo, tmp_path / "saved")
    assert info["pipeline"] == f"diffusers_modules.local.{ENTRY}.SphereARPipeline"
    assert info["components"] == {"transformer": "diffusers_modules.local.modeling_sphere_ar",
                                  "vae": "diffusers_modules.local.vae",
                                  "scheduler": "diffusers_modules.local.scheduling_sphere_ar"}
    assert info["id2label"]["0"] == "zero, nil"
    assert remote["images"].shape == package_images.shape == (1, 3, 32, 32)
    assert torch.equal(remote["images"], package_images)  # same code, same seed: the same image, bit for bit
    package_state = SphereARTransformer.from_pretrained(pipeline_dir / "transformer").state_dict()
    assert remote["transformer_state"].keys() == package_state.keys()  # transformers' AutoModel, remote code
    assert all(torch.equal(remote["transformer_state"][k], v) for k, v in package_state.items())

    saved = tmp_path / "saved"  # written by the remote pipeline: it carries its code again
    assert code_files(saved) == expected_code_files()
    assert all((saved / f).read_bytes() == (repo / f).read_bytes() for f in code_files(saved))
    for name in ("model_index.json", "transformer/config.json"):
        entries = ("_class_name", *COMPONENTS) if name == "model_index.json" else ("auto_map",)
        old, new = (json.loads((d / name).read_text()) for d in (repo, saved))
        assert {k: new[k] for k in entries} == {k: old[k] for k in entries}
    info, again, _ = load_without_package(tmp_path, "folder", saved)
    assert info["pipeline"] == f"diffusers_modules.local.{ENTRY}.SphereARPipeline"
    assert torch.equal(again["images"], package_images)
    assert all(torch.equal(again["transformer_state"][k], v) for k, v in package_state.items())


def test_hub_download_without_the_package(pushed, package_images, tmp_path):
    """From the Hub, diffusers fetches the root modules the entry imports, but of a component folder that holds
    weights only the file model_index.json names (and the weights and config): that file imports nothing."""
    _, repo = pushed
    info, remote, _ = load_without_package(tmp_path, "hub", repo)
    assert torch.equal(remote["images"], package_images)
    assert info["components"]["transformer"] == "diffusers_modules.local.modeling_sphere_ar"
    fetched = set(info["fetched"])
    assert {"transformer/remote_code.py", "vae/remote_code.py", *(f"{m}.py" for m in remote_modules())} <= fetched
    assert {f for f in fetched if f.startswith(("transformer/", "vae/"))} == {
        "transformer/config.json", "transformer/model.safetensors", "transformer/remote_code.py",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/remote_code.py"}


def test_remote_pipeline_saves_its_code(pushed, tiny_pipeline, tmp_path):
    """The remote pipeline class (here from the package) writes a folder like the push's."""
    from sphere_ar_hf.remote_pipeline import SphereARPipeline as RemotePipeline

    pipe = RemotePipeline(**tiny_pipeline.components, id2label=tiny_pipeline.id2label)
    pipe.save_pretrained(tmp_path / "saved")
    assert code_files(tmp_path / "saved") == code_files(pushed[1])
    for name in ("model_index.json", "transformer/config.json"):
        assert json.loads((tmp_path / "saved" / name).read_text()) == json.loads((pushed[1] / name).read_text())
    with pytest.raises(ValueError, match="before its remote code is written"):
        pipe.save_pretrained(tmp_path / "pushed", push_to_hub=True)
    assert not (tmp_path / "pushed").exists()


def test_remote_code_needs_trust_remote_code(pushed):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(pushed[1])


def test_pushed_folder_layout(pushed):
    pipeline_dir, repo = pushed
    files = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())
    originals = sorted(p.relative_to(pipeline_dir).as_posix() for p in pipeline_dir.rglob("*") if p.is_file())
    assert files == sorted([*originals, "README.md", *expected_code_files()])
    index = json.loads((repo / "model_index.json").read_text())
    assert index["_class_name"] == [ENTRY, "SphereARPipeline"]
    assert index["transformer"] == ["remote_code", "SphereARTransformer"]
    assert index["vae"] == ["remote_code", "SphereVAE"]
    assert index["scheduler"] == ["remote_code", "SphereARScheduler"]
    assert index["id2label"] == json.loads((pipeline_dir / "model_index.json").read_text())["id2label"]
    config = json.loads((repo / "transformer" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_sphere_ar.SphereARConfig",
                                  "AutoModel": "modeling_sphere_ar.SphereARTransformer"}
    for name in originals:  # weights and the other files are copied unchanged
        if name.endswith(".safetensors") or name == "scheduler/scheduler_config.json":
            assert (repo / name).read_bytes() == (pipeline_dir / name).read_bytes()


def test_shipped_code_is_the_package_source(pushed):
    """Every shipped module is a byte-for-byte copy of the package's; they import only what a diffusers user has."""
    _, repo = pushed
    names = code_files(repo)
    assert names == expected_code_files() and "pipeline_sphere_ar.py" in names
    for name in names:
        assert (repo / name).read_bytes() == (PACKAGE_DIR / Path(name).name).read_bytes(), name
        imported = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", (repo / name).read_text(), re.M))
        assert imported - set(sys.stdlib_module_names) <= ALLOWED_IMPORTS, (name, imported)


def relative_closure(module: str) -> set[str]:
    """The modules diffusers would need for ``module``: its relative imports (module level or lazy), recursively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += get_relative_imports(str(PACKAGE_DIR / f"{name}.py"))
    return seen


def test_entry_imports_every_module_it_needs():
    """diffusers copies only the entry's own relative imports (not theirs): they must be the whole closure, and a
    component folder's file must import nothing relatively (its folder's other files are not downloaded)."""
    entry_imports = set(get_relative_imports(str(PACKAGE_DIR / f"{ENTRY}.py")))
    assert relative_closure("pipeline_sphere_ar") <= entry_imports
    assert relative_closure(ENTRY) == entry_imports | {ENTRY}
    assert set(remote_modules()) == entry_imports | {ENTRY}
    assert get_relative_imports(str(PACKAGE_DIR / "remote_code.py")) == []


def test_remote_code_hands_out_component_classes():
    assert remote_code.SphereARTransformer is SphereARTransformer and remote_code.SphereVAE is SphereVAE
    with pytest.raises(AttributeError, match="no attribute 'SphereARPipeline'"):
        remote_code.SphereARPipeline  # noqa: B018


def test_package_model_index_round_trip(pushed):
    pipeline_dir, repo = pushed
    original = json.loads((pipeline_dir / "model_index.json").read_text())
    remote = json.loads((repo / "model_index.json").read_text())
    assert package_model_index(remote) == original
    assert package_model_index(original) == original
    assert package_model_index((remote, {"x": 1})) == (original, {"x": 1})
    saved_by_remote = {**original, "transformer": ["diffusers_modules.local.modeling_sphere_ar", "SphereARTransformer"]}
    assert package_model_index(saved_by_remote) == original
    other = {"_class_name": "OtherPipeline", "transformer": ["remote_code", "SphereARTransformer"]}
    assert package_model_index(other) == other


def test_write_remote_code_refuses_other_pipelines(pushed, tmp_path):
    index = json.loads((pushed[0] / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="has no transformer/ folder"):
        write_remote_code(tmp_path)
    for component in COMPONENTS:
        (tmp_path / component).mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(ValueError, match="expected vae to be a SphereVAE"):
        write_remote_code(tmp_path)
    assert not list(tmp_path.rglob("*.py"))  # checked before anything is written


def package_import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports relatively, at module level or lazily (``training.trainer``,
    ``training.__init__``, ...; a package's own ``__init__``, imported before it anyway, is left out)."""
    modules = {".".join(p.relative_to(PACKAGE_DIR).with_suffix("").parts): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".")[:-1]  # the package a relative import starts from (for an __init__ too)
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level):
                continue
            base = package[:len(package) - node.level + 1]
            targets = [[*base, *node.module.split(".")]] if node.module else [[*base, a.name] for a in node.names]
            for target in targets:
                while ".".join(target) not in modules and ".".join([*target, "__init__"]) not in modules:
                    target = target[:-1]  # a name from a module, not a module
                dep = ".".join(target) if ".".join(target) in modules else ".".join([*target, "__init__"])
                if dep != name and dep.removesuffix("__init__").rstrip(".") not in {
                        ".".join(package[:i]) for i in range(len(package) + 1)}:
                    graph[name].add(dep)
    return graph


def test_no_import_cycle_among_package_modules():
    """pipeline -> hub -> convert -> pipeline was one: relative imports, module level or lazy, form no cycle."""
    graph = package_import_graph()
    assert graph["pipeline_sphere_ar"] >= {"remote_code", "modeling_sphere_ar"}  # lazy imports count
    assert "pipeline_sphere_ar" in graph["convert"] and "lora" in graph["training.lora"]
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join([*path[path.index(name):], name])
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
