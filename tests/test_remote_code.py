"""Remote code: a pushed folder loads with `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` where
sphere_ar_hf cannot be imported, and gives the package's images; the bundler that generates its modules."""

from __future__ import annotations

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

from sphere_ar_hf import hub

REMOTE_FILES = ["pipeline_sphere_ar.py", "scheduler/scheduling_sphere_ar.py", "transformer/modeling_sphere_ar.py",
                "vae/modeling_sphere_vae.py"]
ALLOWED_IMPORTS = {"torch", "diffusers", "transformers", "numpy", "safetensors", "huggingface_hub", "PIL"}
SEED, STEPS, LABEL = 0, 2, 3

# runs in a fresh interpreter where sphere_ar_hf cannot be imported (whatever sys.path or the editable install say)
LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import importlib.abc, json, sys

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

    folder, out = sys.argv[1], sys.argv[2]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([LABEL], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                  output_type="pt").images
    model = AutoModel.from_pretrained(folder, subfolder="transformer", trust_remote_code=True)
    torch.save({"images": images, "transformer_state": model.state_dict()}, out)
    info = {"pipeline": type(pipe).__module__ + "." + type(pipe).__name__,
            "components": {k: type(v).__module__ for k, v in pipe.components.items()},
            "automodel": type(model).__module__,
            "id2label": {str(k): v for k, v in pipe.id2label.items()},
            "package_imported": any(m.split(".")[0] == "sphere_ar_hf" for m in sys.modules)}
    print("RESULT " + json.dumps(info))
""").replace("LABEL", str(LABEL)).replace("STEPS", str(STEPS)).replace("SEED", str(SEED))


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_pipeline) -> tuple[Path, Path]:
    """A tiny pipeline folder and the folder `sphere-ar push` would upload for it."""
    root = tmp_path_factory.mktemp("remote")
    tiny_pipeline.save_pretrained(root / "pipeline", safe_serialization=True)
    out = hub.build_push_folder(root / "pipeline", root / "repo", repo_id="someone/sphere-ar-tiny", license="mit",
                                card="b")
    return root / "pipeline", out


def package_images(folder: Path) -> torch.Tensor:
    from sphere_ar_hf import SphereARPipeline

    pipe = SphereARPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe([LABEL], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED),
                output_type="pt").images


def test_pushed_folder_loads_and_generates_without_the_package(pushed, tmp_path):
    pipeline_dir, repo = pushed
    out = tmp_path / "remote.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"),
               DIFFUSERS_VERBOSITY="warning", TRANSFORMERS_VERBOSITY="warning", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(repo), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
    assert not info["package_imported"]
    assert info["pipeline"] == "diffusers_modules.local.pipeline_sphere_ar.SphereARPipeline"
    assert info["components"] == {"transformer": "diffusers_modules.local.modeling_sphere_ar",
                                  "vae": "diffusers_modules.local.modeling_sphere_vae",
                                  "scheduler": "diffusers_modules.local.scheduling_sphere_ar"}
    assert info["automodel"].startswith("transformers_modules.")
    assert info["id2label"]["0"] == "zero, nil"
    # the bundled pipeline checks its components against their base classes: no type-mismatch warning
    assert "Expected types for" not in proc.stderr

    remote = torch.load(out)
    expected = package_images(pipeline_dir)
    assert remote["images"].shape == expected.shape == (1, 3, 32, 32)
    assert torch.equal(remote["images"], expected)  # same code, same seed: the same image, bit for bit
    from sphere_ar_hf import SphereARTransformer

    package_state = SphereARTransformer.from_pretrained(pipeline_dir / "transformer").state_dict()
    assert remote["transformer_state"].keys() == package_state.keys()
    assert all(torch.equal(remote["transformer_state"][k], v) for k, v in package_state.items())


def test_remote_code_needs_trust_remote_code(pushed):
    _, repo = pushed
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(repo)


def test_pushed_folder_layout(pushed):
    pipeline_dir, repo = pushed
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    originals = sorted(str(p.relative_to(pipeline_dir)) for p in pipeline_dir.rglob("*") if p.is_file())
    assert files == sorted([*originals, "README.md", *REMOTE_FILES])
    index = json.loads((repo / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sphere_ar", "SphereARPipeline"]
    assert index["transformer"] == ["modeling_sphere_ar", "SphereARTransformer"]
    assert index["vae"] == ["modeling_sphere_vae", "SphereVAE"]
    assert index["scheduler"] == ["scheduling_sphere_ar", "SphereARScheduler"]
    assert index["id2label"] == json.loads((pipeline_dir / "model_index.json").read_text())["id2label"]
    config = json.loads((repo / "transformer" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "transformer/modeling_sphere_ar.SphereARConfig",
                                  "AutoModel": "transformer/modeling_sphere_ar.SphereARTransformer"}
    for name in originals:  # weights and the other files are copied unchanged
        if name.endswith(".safetensors") or name == "scheduler/scheduler_config.json":
            assert (repo / name).read_bytes() == (pipeline_dir / name).read_bytes()


@pytest.mark.parametrize("name", REMOTE_FILES)
def test_remote_modules_are_self_contained(pushed, name):
    """diffusers downloads only the module file named in model_index.json from a component folder with weights:
    the files must import nothing relatively, and only libraries a diffusers user has."""
    _, repo = pushed
    path = repo / name
    text = path.read_text()
    assert get_relative_imports(str(path)) == []  # what diffusers would copy alongside
    compile(text, name, "exec")
    imported = set(re.findall(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", text, flags=re.MULTILINE))
    stdlib = set(sys.stdlib_module_names)
    assert imported - stdlib <= ALLOWED_IMPORTS, imported - stdlib
    assert text.startswith("# Generated by `sphere-ar push`")
    assert text.count("from __future__ import") <= 1


def test_bundle_order_and_contents():
    text = hub.bundle_module("modeling_sphere_ar")
    sections = re.findall(r"^# -+ sphere_ar_hf/(\w+)\.py -+$", text, flags=re.MULTILINE)
    assert sections[-1] == "modeling_sphere_ar"
    assert {"layers", "configuration_sphere_ar", "scheduling_sphere_ar"} <= set(sections)
    assert sections.index("layers") < sections.index("configuration_sphere_ar")
    assert "class SphereARConfig(" in text and "class SphereARTransformer(" in text
    assert text.count("__all__ =") == 1  # only the main module keeps its __all__
    namespace: dict = {"__name__": "bundled_modeling"}
    exec(compile(text, "modeling_sphere_ar.py", "exec"), namespace)
    assert namespace["SphereARTransformer"].config_class is namespace["SphereARConfig"]


def test_package_model_index_round_trip(pushed):
    pipeline_dir, repo = pushed
    original = json.loads((pipeline_dir / "model_index.json").read_text())
    remote = json.loads((repo / "model_index.json").read_text())
    assert hub.package_model_index(remote) == original
    assert hub.package_model_index(original) == original
    assert hub.package_model_index((remote, {"x": 1})) == (original, {"x": 1})


# ---- the bundler on a throwaway package -----------------------------------------------------------------------------
def make_package(tmp_path: Path, monkeypatch, files: dict[str, str]) -> None:
    name = f"fakepkg_{tmp_path.name.replace('-', '_')}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for file, source in files.items():
        (package / f"{file}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hub, "PACKAGE", name)
    monkeypatch.setattr(hub, "PACKAGE_DIR", package)


def test_bundler_inlines_aliases_and_lazy_imports(tmp_path, monkeypatch):
    make_package(tmp_path, monkeypatch, {
        "base": '''
            from __future__ import annotations
            import math
            __all__ = ["twice"]
            def twice(x: float) -> float:
                return 2 * math.sqrt(x) ** 2
            ''',
        "extra": "def helper():\n    return 7\n",
        "main": '''
            """Main."""
            from __future__ import annotations
            from .base import twice as double
            __all__ = ["run", "lazy"]
            def run(x):
                return double(x)
            def lazy():
                from .extra import helper
                return helper()
            ''',
    })
    text = hub.bundle_module("main")
    assert "double = twice" in text and "from ." not in text
    namespace: dict = {"__name__": "bundled"}
    exec(compile(text, "main.py", "exec"), namespace)
    assert namespace["run"](4.0) == pytest.approx(8.0)
    assert namespace["__all__"] == ["run", "lazy"]
    with pytest.raises(ImportError, match="extra is not part of this repository's bundled code"):
        namespace["lazy"]()


def test_bundler_refuses_a_name_bound_twice(tmp_path, monkeypatch):
    make_package(tmp_path, monkeypatch, {
        "a": "from math import sqrt as root\n\ndef f(x):\n    return root(x)\n",
        "b": "from .a import f\n\ndef root(x):\n    return x ** (1 / 3)\n\ndef g(x):\n    return f(x) + root(x)\n",
    })
    with pytest.raises(hub.HubError, match="bind `root` to different objects"):
        hub.bundle_module("b")


def test_bundler_refuses_an_alias_that_shadows_a_name(tmp_path, monkeypatch):
    make_package(tmp_path, monkeypatch, {
        "a": "def total(x):\n    return sum(x)\n",
        "b": "from .a import total as combine\n\ndef run(x):\n    return combine(x)\n",
        "c": "from .b import run\n\ndef combine(x):\n    return x\n\ndef go(x):\n    return run(x), combine(x)\n",
    })
    with pytest.raises(hub.HubError, match="bind `combine` to different objects"):
        hub.bundle_module("c")


def test_bundler_refuses_parent_relative_imports(tmp_path, monkeypatch):
    make_package(tmp_path, monkeypatch, {"a": "from .. import something\n"})
    with pytest.raises(hub.HubError, match="only `from .module import name`"):
        hub.bundle_module("a")
