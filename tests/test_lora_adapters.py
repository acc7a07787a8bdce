"""LoRA adapters on a tiny pipeline: save / load / merge / unload round trips (the adapters live in the transformer,
merging is PEFT's merge bit for bit), adapter folders in PEFT's own format, loading an adapter to train it further,
the base model refusing to save with adapters in it, and the loading errors. The targets, the example script, the
digits fine-tune and the adapter's card are tested in test_lora.py, whose helpers these tests share."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from sphere_ar_hf import SphereARPipeline, SphereARTransformer
from sphere_ar_hf.lora import (
    adapter_parameter_count,
    build_lora_config,
    get_lora_model,
    load_lora,
    merge_lora,
    save_lora,
    unload_lora,
)
from test_lora import adapter_tensors, assert_same_weights, lora_module_names, sample, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def test_load_unload_merge_round_trip(make_pipeline, adapter_dir):
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {f.name for f in adapter_dir.iterdir()}
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    pipe = make_pipeline()
    transformer = pipe.transformer
    before, base = snapshot(transformer), sample(pipe)

    attributes = set(transformer.__dict__)
    peft_model = load_lora(pipe, adapter_dir)
    assert pipe.transformer is transformer and isinstance(pipe.transformer, SphereARTransformer)
    assert set(transformer.__dict__) - attributes == {"peft_config"}  # PEFT's own marker; no handle, no patch
    assert get_lora_model(pipe) is transformer
    assert not any(p.requires_grad for p in peft_model.parameters())
    adapted = sample(pipe)
    assert not torch.allclose(adapted, base, atol=1e-3)
    # enough rows for the pipeline's CPU fast path of the head (products with the head's weights read directly)
    many = [i % 10 for i in range(getattr(SphereARPipeline, "TRANSPOSED_HEAD_MIN_ROWS", 32))]
    adapted_many = sample(pipe, many)
    assert torch.equal(sample(pipe), adapted)  # deterministic for a seed
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(pipe, adapter_dir)
    del peft_model  # the PeftModel is only a view: the pipeline alone still unloads, merges and saves

    assert unload_lora(pipe) is transformer
    assert_same_weights(transformer, before)
    assert set(transformer.__dict__) == attributes
    assert not lora_module_names(transformer) and get_lora_model(pipe) is None
    assert torch.equal(sample(pipe), base)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        unload_lora(pipe)

    load_lora(transformer, adapter_dir)  # a transformer works too
    merged = merge_lora(pipe)
    assert merged is transformer and not lora_module_names(transformer) and get_lora_model(pipe) is None
    assert (sample(pipe) - adapted).abs().max() < 1e-2
    assert (sample(pipe, many) - adapted_many).abs().max() < 1e-2  # 3.5 if skipped; the head's adapters are not skipped
    rows = transformer.class_embedding.weight
    changed = [i for i in range(rows.shape[0]) if not torch.equal(rows[i], before["class_embedding.weight"][i])]
    assert changed == [1, 10]
    assert not torch.equal(transformer.layers[0].attention.wqkv.weight, before["layers.0.attention.wqkv.weight"])
    assert torch.equal(transformer.proj_in.weight, before["proj_in.weight"])
    pipe.save_pretrained(str(adapter_dir.parent / "merged"))  # a plain pipeline again
    reloaded = SphereARPipeline.from_pretrained(str(adapter_dir.parent / "merged"))
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(reloaded), sample(pipe))


def test_adapter_folders_are_peft_format(make_pipeline, adapter_dir, tmp_path):
    """A save_lora folder loads with PEFT alone, holds what PEFT's own save_pretrained writes, and a pipeline (not
    only a PeftModel) saves it again unchanged."""
    pipe = make_pipeline()
    peft_model = load_lora(pipe, adapter_dir)
    adapted = sample(pipe)
    peft_model.save_pretrained(str(tmp_path / "by_peft"), save_embedding_layers=False)
    by_peft, ours = adapter_tensors(tmp_path / "by_peft"), adapter_tensors(adapter_dir)
    assert by_peft.keys() == ours.keys() and all(torch.equal(by_peft[k], ours[k]) for k in ours)
    assert any(".lora_A." in k for k in ours) and any("trainable_tokens_delta" in k for k in ours)
    again = save_lora(pipe, tmp_path / "again")
    assert adapter_tensors(again).keys() == ours.keys()
    assert all(torch.equal(adapter_tensors(again)[k], ours[k]) for k in ours)
    config = peft.LoraConfig.from_pretrained(str(again))
    assert config.inference_mode and config.r == 4 and config.trainable_token_indices == {"class_embedding": [1, 10]}
    assert adapter_parameter_count(pipe) == sum(t.numel() for t in ours.values())

    plain = make_pipeline()  # PEFT's own loader on a bare transformer: the same adapted model
    wrapped = peft.PeftModel.from_pretrained(plain.transformer, str(adapter_dir))
    assert isinstance(wrapped.get_base_model(), SphereARTransformer) and wrapped.get_base_model() is plain.transformer
    assert torch.equal(sample(plain), adapted)
    unload_lora(plain)  # and ours undoes PEFT's injection
    assert torch.equal(sample(plain), sample(make_pipeline()))
    merged_by_peft = peft.PeftModel.from_pretrained(plain.transformer, str(adapter_dir)).merge_and_unload()
    assert merge_lora(pipe) is pipe.transformer and not hasattr(pipe.transformer, "peft_config")
    assert_same_weights(pipe.transformer, snapshot(merged_by_peft))  # our merge is PEFT's, bit for bit


def test_load_trainable(make_pipeline, adapter_dir):
    pipe = make_pipeline()
    peft_model = load_lora(pipe, adapter_dir, is_trainable=True)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert adapter_parameter_count(peft_model) == sum(p.numel() for n, p in peft_model.named_parameters()
                                                      if n in trainable)


def test_saving_the_base_with_adapters_is_refused(make_pipeline, make_transformer, adapter_dir, tmp_path):
    """While adapters are injected, the base model's save_pretrained refuses (its weights would be written under
    PEFT's names, a folder that reloads as random weights), also for adapters injected by PEFT directly."""
    pipe = make_pipeline()
    load_lora(pipe, adapter_dir)
    with pytest.raises(RuntimeError, match="merge_lora"):
        pipe.save_pretrained(str(tmp_path / "bad"))
    with pytest.raises(RuntimeError, match="merge_lora"):
        pipe.transformer.save_pretrained(str(tmp_path / "bad_transformer"))
    assert not (tmp_path / "bad_transformer" / "model.safetensors").exists()
    unload_lora(pipe)
    pipe.save_pretrained(str(tmp_path / "base"))  # the base model saves again
    model = make_transformer()
    peft.get_peft_model(model, build_lora_config(rank=2))
    with pytest.raises(RuntimeError, match="merge_lora"):
        model.save_pretrained(str(tmp_path / "bad_direct"))


def test_load_errors(make_pipeline, tmp_path):
    pipe = make_pipeline()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(pipe, tmp_path / "empty")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_lora(pipe)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(pipe, tmp_path / "none")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        adapter_parameter_count(pipe)
    assert get_lora_model(pipe) is None
    with pytest.raises(TypeError, match="SphereARPipeline"):
        load_lora(torch.nn.Linear(2, 2), tmp_path)
