"""The diffusers / transformers contracts, in the style of their common suites (transformers' ``ModelTesterMixin``
and ``ConfigTester``, diffusers' ``ModelTesterMixin``, ``SchedulerCommonTest`` and ``PipelineTesterMixin``; our
own tests, not theirs), on tiny models: save / load and config round trips, ``return_dict``, hidden states, input
embeddings, gradient checkpointing, determinism, the scheduler's diffusers-style loop, the pipeline's outputs and
batching."""

from __future__ import annotations

import json
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, SphereVAE
from sphere_ar_hf.scheduling_sphere_ar import SAMPLERS, SphereARSchedulerOutput

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_TOKENS = 4  # the tiny configs: 32 px images of 16 px patches
STEPS = 3  # sampler steps per token in pipeline calls


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=_gen(seed)) * 2 - 1


def _public(config) -> dict:
    """A config's public entries, tuples as lists (what JSON keeps)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def _grads(model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_checkpoint_calls(model: torch.nn.Module) -> dict[str, int]:
    """Wrap each checkpointing layer's ``_gradient_checkpointing_func`` to count its calls, per layer name."""
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and hasattr(module, "_gradient_checkpointing_func"):
            def spy(*args, _func=module._gradient_checkpointing_func, _name=name, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _func(*args, **kwargs)

            module._gradient_checkpointing_func = spy
    return calls


def _assert_same_grads(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    assert grads.keys() == ref.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


# ============================================================================= SphereARTransformer (transformers)


@pytest.fixture
def transformer_inputs(make_tokens) -> dict:
    return dict(latents=make_tokens(2, NUM_TOKENS, seed=1), class_labels=torch.tensor([3, 10]))


def test_config_round_trips(make_transformer, tmp_path) -> None:
    """ConfigTester: to_dict / from_dict, the JSON string and file, save_pretrained / from_pretrained; the common
    properties are there."""
    config = make_transformer(guidance_scale=2.5, head_num_layers=3).config
    assert config.hidden_size == 64 and config.num_attention_heads == 2 and config.num_hidden_layers == 2
    reference = config.to_dict()
    assert SphereARConfig.from_dict(reference).to_dict() == reference
    assert SphereARConfig(**json.loads(config.to_json_string())).to_dict() == reference
    config.to_json_file(tmp_path / "config.json")
    assert SphereARConfig.from_json_file(tmp_path / "config.json").to_dict() == reference
    config.save_pretrained(tmp_path / "saved")
    loaded = SphereARConfig.from_pretrained(tmp_path / "saved")
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**reference, "_name_or_path": ""}
    assert loaded.guidance_scale == 2.5 and loaded.head_num_layers == 3
    assert SphereARConfig(return_dict=False, output_hidden_states=True).to_dict()["return_dict"] is False


@torch.no_grad()
def test_transformer_save_load_gives_identical_outputs(make_transformer, transformer_inputs, tmp_path) -> None:
    model = make_transformer()
    model.save_pretrained(tmp_path)
    loaded = SphereARTransformer.from_pretrained(tmp_path).eval()
    a = model(**transformer_inputs, generator=_gen(0), output_hidden_states=True)
    b = loaded(**transformer_inputs, generator=_gen(0), output_hidden_states=True)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.head_condition, b.head_condition)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states, strict=True))


@torch.no_grad()
def test_transformer_determinism(make_transformer, transformer_inputs) -> None:
    model = make_transformer()
    a, b = (model(**transformer_inputs, generator=_gen(5)) for _ in range(2))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.head_condition, b.head_condition)
    assert not torch.equal(a.loss, model(**transformer_inputs, generator=_gen(6)).loss)  # the generator matters


@torch.no_grad()
def test_transformer_return_dict_false_gives_the_same_tensors(make_transformer, transformer_inputs) -> None:
    model = make_transformer()
    out = model(**transformer_inputs, generator=_gen(0))
    assert out.hidden_states is None and len(out.to_tuple()) == 2
    as_tuple = model(**transformer_inputs, generator=_gen(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.head_condition)
    model.config.return_dict = False  # the config's default is honoured, and an explicit argument overrides it
    from_config = model(**transformer_inputs, generator=_gen(0))
    assert isinstance(from_config, tuple) and all(torch.equal(x, y) for x, y in zip(from_config, as_tuple))
    assert torch.equal(model(**transformer_inputs, generator=_gen(0), return_dict=True).loss, out.loss)
    with_states = model(**transformer_inputs, generator=_gen(0), output_hidden_states=True)
    assert len(with_states) == 3 and len(with_states[2]) == model.config.num_hidden_layers + 1


@torch.no_grad()
def test_transformer_hidden_states(make_transformer, transformer_inputs) -> None:
    """The trunk's input (the normalised class and token embeddings) and each block's output; the last one,
    normalised plus the position embedding, is the head condition."""
    model = make_transformer(num_hidden_layers=3)
    c = model.config
    out = model(**transformer_inputs, generator=_gen(0), output_hidden_states=True)
    seq = c.num_class_tokens + NUM_TOKENS - 1
    assert isinstance(out.hidden_states, tuple) and len(out.hidden_states) == c.num_hidden_layers + 1
    assert all(h.shape == (2, seq, c.hidden_size) for h in out.hidden_states)
    assert all(not torch.equal(a, b) for a, b in zip(out.hidden_states, out.hidden_states[1:]))
    latents, labels = transformer_inputs["latents"], transformer_inputs["class_labels"]
    embedded = model.input_norm(torch.cat([model._class_tokens(labels), model.proj_in(latents[:, :-1])], dim=1))
    assert torch.equal(out.hidden_states[0], embedded)
    last = model.norm(out.hidden_states[-1][:, -NUM_TOKENS:]) + model.head_pos_embedding.weight
    assert torch.equal(last, out.head_condition)
    # requesting them changes nothing else; the config's output_hidden_states is honoured too
    plain = model(**transformer_inputs, generator=_gen(0))
    assert torch.equal(plain.loss, out.loss) and torch.equal(plain.head_condition, out.head_condition)
    model.config.output_hidden_states = True
    assert len(model(**transformer_inputs, generator=_gen(0)).hidden_states) == c.num_hidden_layers + 1
    assert model(**transformer_inputs, generator=_gen(0), output_hidden_states=False).hidden_states is None


@torch.no_grad()
def test_transformer_input_embeddings(make_transformer, transformer_inputs) -> None:
    model = make_transformer()
    c = model.config
    embedding = model.get_input_embeddings()
    assert embedding is model.class_embedding and isinstance(embedding, torch.nn.Embedding)
    assert embedding.num_embeddings == c.num_classes + 1  # the null class last
    assert embedding.embedding_dim == c.hidden_size * c.num_class_tokens
    before = model(**transformer_inputs, generator=_gen(0)).head_condition
    new = torch.nn.Embedding(c.num_classes + 1, c.hidden_size * c.num_class_tokens)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new and model.class_embedding is new
    assert not torch.equal(model(**transformer_inputs, generator=_gen(0)).head_condition, before)
    with pytest.raises(ValueError, match="class embedding must be an nn.Embedding of shape"):
        model.set_input_embeddings(torch.nn.Embedding(c.num_classes, c.hidden_size * c.num_class_tokens))


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_transformer_gradient_checkpointing(make_transformer, transformer_inputs, method: str) -> None:
    """transformers 5's way: the trunk's and the head's blocks are ``GradientCheckpointingLayer``s; equal gradients
    with and without; no checkpointing without gradients; disabling turns it off."""
    model = make_transformer().train()
    trunk_blocks = [n for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(trunk_blocks) == model.config.num_hidden_layers + model.config.head_num_layers

    def loss_fn() -> torch.Tensor:
        return model(**transformer_inputs, generator=_gen(3)).loss

    loss_ref, grads_ref = _grads(model, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable: a deprecated alias
        getattr(model, method)()
    assert model.is_activation_checkpointing
    calls = _count_checkpoint_calls(model)
    loss, grads = _grads(model, loss_fn)
    assert calls == dict.fromkeys(trunk_blocks, 1), calls
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    _assert_same_grads(grads, grads_ref, model)
    calls.clear()
    with torch.no_grad():
        model(**transformer_inputs, generator=_gen(3))
    assert not calls
    model.activation_checkpointing_disable()
    _grads(model, loss_fn)
    assert not calls and not model.is_activation_checkpointing


# ============================================================================= SphereVAE (diffusers)


def test_vae_config_round_trips(make_vae, tmp_path) -> None:
    vae = make_vae()
    assert _public(SphereVAE.from_config(vae.config).config) == _public(vae.config)
    assert _public(SphereVAE.from_config(json.loads(vae.to_json_string())).config) == _public(vae.config)
    vae.save_config(tmp_path)
    assert _public(SphereVAE.from_config(SphereVAE.load_config(tmp_path)).config) == _public(vae.config)


@torch.no_grad()
def test_vae_save_load_gives_identical_outputs(make_vae, make_tokens, tmp_path) -> None:
    vae = make_vae()
    vae.save_pretrained(tmp_path)
    loaded = SphereVAE.from_pretrained(tmp_path).eval()
    images, latents = _images(2), make_tokens(2, NUM_TOKENS)
    assert torch.equal(vae(images, sample_posterior=False).sample, loaded(images, sample_posterior=False).sample)
    assert torch.equal(vae(images, generator=_gen(1)).sample, loaded(images, generator=_gen(1)).sample)
    assert torch.equal(vae.decode(latents).sample, loaded.decode(latents).sample)


@torch.no_grad()
def test_vae_determinism_and_return_dict(make_vae, make_tokens) -> None:
    vae = make_vae()
    images, latents = _images(2), make_tokens(2, NUM_TOKENS)
    out = vae(images, generator=_gen(2))
    assert torch.equal(out.sample, vae(images, generator=_gen(2)).sample)
    (as_tuple,) = vae(images, generator=_gen(2), return_dict=False)
    assert torch.equal(as_tuple, out.sample)
    (decoded,) = vae.decode(latents, return_dict=False)
    assert torch.equal(decoded, vae.decode(latents).sample)
    (dist,) = vae.encode(images, return_dict=False)
    reference = vae.encode(images).latent_dist
    assert torch.equal(dist.mu, reference.mu) and torch.equal(dist.kappa, reference.kappa)


def test_vae_gradient_checkpointing(make_vae) -> None:
    """diffusers' ``enable_gradient_checkpointing`` drives the same ``GradientCheckpointingLayer`` blocks: equal
    gradients with and without, one checkpointed call per ViT block."""
    vae = make_vae(encoder_layers=2).train()
    images = _images(2)

    def loss_fn() -> torch.Tensor:
        return vae(images, generator=_gen(4)).sample.square().mean()

    loss_ref, grads_ref = _grads(vae, loss_fn)
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    calls = _count_checkpoint_calls(vae)
    loss, grads = _grads(vae, loss_fn)
    assert calls == {"encoder_vit.layers.0": 1, "encoder_vit.layers.1": 1, "decoder_vit.layers.0": 1}, calls
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    _assert_same_grads(grads, grads_ref, vae)
    vae.disable_gradient_checkpointing()
    calls.clear()
    _grads(vae, loss_fn)
    assert not calls and not vae.is_gradient_checkpointing


# ============================================================================= SphereARScheduler (diffusers)


def _toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1.0 - t) * torch.tanh(x) - x  # a smooth field that depends on the time and the state


def _sample(scheduler: SphereARScheduler, seed: int = 0, shape: tuple[int, int] = (3, 8)) -> torch.Tensor:
    """A plain diffusers-style loop: ``for t in scheduler.timesteps``, the timestep value passed to ``step``."""
    generator = _gen(seed)
    x = torch.randn(shape, generator=generator)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        x = scheduler.step(_toy_velocity(model_input, t), t, x, generator=generator).prev_sample
        assert x.shape == shape and x.dtype == torch.float32
    return x


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scheduler_plain_loop_over_timesteps(sampler: str) -> None:
    scheduler = SphereARScheduler(sampler=sampler, num_inference_steps=5)
    out = _sample(scheduler)
    assert torch.isfinite(out).all() and scheduler.step_index is None  # the pass ended: the next starts over
    assert torch.equal(_sample(scheduler), out)  # a second pass (the next token) runs the same loop
    scheduler.set_timesteps(7)
    assert len(scheduler.timesteps) == len(scheduler) and not torch.equal(_sample(scheduler), out)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_scheduler_save_config_round_trip(sampler: str, tmp_path) -> None:
    scheduler = SphereARScheduler(sampler=sampler, num_inference_steps=6, time_shift=0.7, last_step_size=0.05)
    scheduler.save_config(tmp_path)
    loaded = SphereARScheduler.from_pretrained(tmp_path)
    assert _public(loaded.config) == _public(scheduler.config)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    assert torch.equal(_sample(loaded, seed=3), _sample(scheduler, seed=3))
    assert _public(SphereARScheduler.from_config(json.loads(scheduler.to_json_string())).config) == _public(
        scheduler.config)


def test_scheduler_return_dict_and_step_shape() -> None:
    scheduler = SphereARScheduler(num_inference_steps=4)
    x, v = torch.randn(2, 8, generator=_gen(0)), torch.randn(2, 8, generator=_gen(1))
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    out = scheduler.step(v, t0, x, generator=_gen(2))
    assert isinstance(out, SphereARSchedulerOutput) and out.prev_sample.shape == x.shape
    scheduler.set_timesteps(4)
    (as_tuple,) = scheduler.step(v, t0, x, generator=_gen(2), return_dict=False)
    assert torch.equal(as_tuple, out.prev_sample)
    assert scheduler.step(v, t1, as_tuple, generator=_gen(3)).prev_sample.shape == x.shape


def test_set_timesteps_resets_the_step_index() -> None:
    scheduler = SphereARScheduler(sampler="heun", num_inference_steps=4)
    x, v = torch.zeros(1, 4), torch.ones(1, 4)
    for t in scheduler.timesteps[:3]:  # stop mid-pass
        x = scheduler.step(v, t, x).prev_sample
    assert scheduler.step_index == 3
    scheduler.set_timesteps(4)
    assert scheduler.step_index is None
    assert torch.equal(_sample(scheduler), _sample(SphereARScheduler(sampler="heun", num_inference_steps=4)))


def test_step_with_a_timestep_not_in_timesteps() -> None:
    scheduler = SphereARScheduler(num_inference_steps=10)
    x, v = torch.zeros(2, 4), torch.ones(2, 4)
    with pytest.raises(ValueError, match=r"timestep 0\.5 is not one of this scheduler's timesteps"):
        scheduler.step(v, torch.tensor(0.5), x)
    with pytest.raises(ValueError, match="is not one of this scheduler's timesteps"):
        scheduler.step(v, 1.0, x)  # t = 1 (the data) is never evaluated
    assert scheduler.step_index is None  # nothing advanced


# ============================================================================= SphereARPipeline (diffusers)


def _call(pipe: SphereARPipeline, labels, generator, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(labels, num_inference_steps=STEPS, generator=generator, **kwargs)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pipeline_same_generator_same_images(tiny_pipeline: SphereARPipeline, guidance: float) -> None:
    a = _call(tiny_pipeline, [1, 2], _gen(0), guidance_scale=guidance).images
    assert torch.equal(a, _call(tiny_pipeline, [1, 2], _gen(0), guidance_scale=guidance).images)
    assert not torch.equal(a, _call(tiny_pipeline, [1, 2], _gen(1), guidance_scale=guidance).images)
    assert tiny_pipeline.scheduler.step_index is None  # a call steps a copy of the scheduler, not the pipeline's


def test_pipeline_output_types(tiny_pipeline: SphereARPipeline) -> None:
    pt = _call(tiny_pipeline, [4, 5], _gen(0)).images
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 32, 32)
    arr = _call(tiny_pipeline, [4, 5], _gen(0), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    pil = _call(tiny_pipeline, [4, 5], _gen(0), output_type="pil").images
    assert len(pil) == 2 and all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) for im in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), (arr * 255).round().astype(np.uint8))


def test_pipeline_return_dict_false_gives_a_tuple(tiny_pipeline: SphereARPipeline) -> None:
    out = _call(tiny_pipeline, [7], _gen(0), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert torch.equal(out[0], _call(tiny_pipeline, [7], _gen(0)).images)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pipeline_batch_equals_single_images(tiny_pipeline: SphereARPipeline, guidance: float) -> None:
    """A batch of 2 with per-image generators gives the images of two batches of 1 with those generators (up to
    the rounding of batched products: ~1e-6; a shared draw would differ by > 1e-2)."""
    batch = _call(tiny_pipeline, [3, 8], [_gen(10), _gen(11)], guidance_scale=guidance).images
    singles = torch.cat([_call(tiny_pipeline, [label], [_gen(seed)], guidance_scale=guidance).images
                         for label, seed in ((3, 10), (8, 11))])
    assert batch.shape == singles.shape == (2, 3, 32, 32)
    assert (batch - singles).abs().max() <= 5e-5


def test_pipeline_save_load_and_components(tiny_pipeline: SphereARPipeline, tmp_path) -> None:
    """PipelineTesterMixin: the components rebuild the pipeline, and a saved pipeline reloads to the same images."""
    reference = _call(tiny_pipeline, [0, 9], _gen(0), guidance_scale=2.0).images
    assert set(tiny_pipeline.components) == {"transformer", "vae", "scheduler"}
    rebuilt = SphereARPipeline(**tiny_pipeline.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert torch.equal(_call(rebuilt, [0, 9], _gen(0), guidance_scale=2.0).images, reference)
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = SphereARPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_call(loaded, [0, 9], _gen(0), guidance_scale=2.0).images, reference)
    assert _public(loaded.scheduler.config) == _public(tiny_pipeline.scheduler.config)
