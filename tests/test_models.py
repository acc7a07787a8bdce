"""SphereARTransformer and SphereVAE: KV-cache decoding, training forward, checkpointing, save/load, Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, Trainer, TrainingArguments
from transformers.utils import ModelOutput

import sphere_ar_hf  # noqa: F401  (registers the auto classes)
from conftest import compiled_graphs
from sphere_ar_hf import SphereARConfig, SphereARTransformer, SphereVAE

NUM_TOKENS = 4  # the tiny config: 32 px images of 16 px patches


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=_gen(seed)) * 2 - 1


# ----------------------------------------------------------------------------- KV-cache decoding


@torch.no_grad()
def test_kv_cache_decoding_equals_teacher_forcing(make_tokens, make_transformer) -> None:
    model = make_transformer(image_size=64)  # 16 tokens: a 4x4 grid exercises the 2D RoPE in the cache path
    n = model.config.num_image_tokens
    latents = make_tokens(3, n, seed=1)
    labels = torch.tensor([0, 7, model.null_class_id])
    full = model.compute_head_condition(latents, labels)
    cache = model.allocate_kv_cache(3)
    conds = [model.prefill(labels, cache)]
    for i in range(n - 1):
        conds.append(model.decode_step(latents[:, i], i, cache))
    incremental = torch.stack(conds, dim=1)
    assert incremental.shape == full.shape == (3, n, model.config.hidden_size)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)
    # the check is not vacuous: the conditions differ between positions and between classes
    assert (full[:, 1:] - full[:, :-1]).abs().amax(dim=(1, 2)).min() > 1e-2
    assert (full[0] - full[1]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- training forward


def test_training_forward_loss_and_gradients(make_tokens, make_transformer) -> None:
    model = make_transformer().train()
    latents, labels = make_tokens(4, NUM_TOKENS), torch.tensor([1, 2, 3, 4])
    out = model(latents, labels, generator=_gen(0))
    assert isinstance(out, ModelOutput)
    loss = out[0]
    assert loss is out.loss and loss.dim() == 0 and bool(torch.isfinite(loss))
    assert out.head_condition.shape == (4, NUM_TOKENS, model.config.hidden_size)
    loss.backward()
    for name in ["layers.0.attention.wqkv.weight", "layers.1.feed_forward.w2.weight", "proj_in.weight",
                 "class_embedding.weight", "head_pos_embedding.weight", "head.res_blocks.0.w1.weight",
                 "head.final_linear.weight", "head.time_embed.linear_1.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None, name
        assert bool(torch.isfinite(grad).all()) and grad.abs().max() > 0, name
    tup = model(latents, labels, generator=_gen(0), return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], loss.detach())


def test_fresh_model_loss_is_finite(make_tokens, make_transformer) -> None:
    model = make_transformer(randomize=False).train()  # official init: zero head output
    loss = model(make_tokens(2, NUM_TOKENS), torch.tensor([0, 1]), generator=_gen(0)).loss
    assert bool(torch.isfinite(loss)) and loss > 0


def test_forward_rejects_bad_latents(make_transformer) -> None:
    model = make_transformer()
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 4, 16\)"):
        model(torch.zeros(2, 5, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 4, 16\)"):
        model(torch.zeros(2, 4, 8), torch.tensor([0, 1]))


def test_same_generator_same_loss(make_tokens, make_transformer) -> None:
    model = make_transformer().train()
    latents, labels = make_tokens(4, NUM_TOKENS), torch.tensor([1, 2, 3, 4])
    a = model(latents, labels, generator=_gen(5)).loss
    b = model(latents, labels, generator=_gen(5)).loss
    c = model(latents, labels, generator=_gen(6)).loss
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@torch.no_grad()
def test_class_dropout(make_tokens, make_transformer) -> None:
    latents, labels = make_tokens(4, NUM_TOKENS), torch.tensor([1, 2, 3, 4])
    always = make_transformer(class_dropout_prob=1.0)
    never = make_transformer(class_dropout_prob=0.0)  # same seed: same weights
    null = torch.full_like(labels, always.null_class_id)
    cond_labels = always.compute_head_condition(latents, labels)
    cond_null = always.compute_head_condition(latents, null)
    assert (cond_labels - cond_null).abs().max() > 1e-2  # the class matters, so the checks below can tell
    # train mode, p = 1: every label becomes the null class
    out = always.train()(latents, labels, generator=_gen(0))
    torch.testing.assert_close(out.head_condition, cond_null, atol=1e-6, rtol=0)
    # train mode, p = 0: nothing is dropped
    out = never.train()(latents, labels, generator=_gen(0))
    torch.testing.assert_close(out.head_condition, cond_labels, atol=1e-6, rtol=0)
    # eval mode never drops, whatever the probability
    out = always.eval()(latents, labels, generator=_gen(0))
    torch.testing.assert_close(out.head_condition, cond_labels, atol=1e-6, rtol=0)


def test_class_dropout_probability(make_transformer) -> None:
    p, n = 0.3, 20000
    model = make_transformer(class_dropout_prob=p)
    labels = torch.randint(0, 10, (n,), generator=_gen(0))
    dropped = model.drop_labels(labels, generator=_gen(1))
    is_null = dropped == model.null_class_id
    assert torch.equal(dropped[~is_null], labels[~is_null])
    frac = is_null.double().mean().item()
    assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / n)


def _graphs_of_two_calls(fn, *args, **kwargs) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``fn`` compiled (the eager backend: dynamo's graphs, eager kernels) and called twice: the graphs compiled,
    both results."""
    torch._dynamo.reset()
    before = compiled_graphs()
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    first = compiled(*args, **kwargs)
    second = compiled(*args, **kwargs)
    graphs = compiled_graphs() - before
    torch._dynamo.reset()
    return graphs, first, second


def test_compiled_training_forward_is_one_graph(make_tokens, make_transformer, make_vae) -> None:
    """A fresh model's compiled forward compiles once: its first call builds the rope tables inside the graph
    instead of caching them (a cache filled by the first call fails its guard on the second: two graphs)."""
    model = make_transformer().train()
    latents, labels = make_tokens(4, NUM_TOKENS), torch.tensor([1, 2, 3, 4])
    draws = model.draw_training_inputs(latents, labels, _gen(0))
    graphs, first, second = _graphs_of_two_calls(model, latents, labels, **draws)
    assert graphs == 1 and not model.rope._cache
    eager = model(latents, labels, **draws).loss  # the eager call builds and keeps the tables
    assert torch.equal(first.loss, second.loss) and torch.equal(first.loss, eager) and model.rope._cache
    vae = make_vae()
    with torch.no_grad():
        graphs, first, second = _graphs_of_two_calls(vae, _images(2), sample_posterior=False)
        assert graphs == 1 and torch.equal(first.sample, vae(_images(2), sample_posterior=False).sample)


# ----------------------------------------------------------------------------- gradient checkpointing


def _spy_checkpointing(model: torch.nn.Module) -> dict[str, int]:
    """Wrap every checkpointing layer's ``_gradient_checkpointing_func`` to count the calls per module."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or not isinstance(module, GradientCheckpointingLayer):
            continue

        def spy(*args, _func=func, _name=name or "<root>", **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _func(*args, **kwargs)

        module._gradient_checkpointing_func = spy
    return calls


def _loss_and_grads(model: torch.nn.Module, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_transformer_gradient_checkpointing(make_tokens, make_transformer, method: str) -> None:
    model = make_transformer().train()
    latents, labels = make_tokens(2, NUM_TOKENS), torch.tensor([1, 2])

    def fn():
        return model(latents, labels, generator=_gen(3)).loss

    loss_ref, grads_ref = _loss_and_grads(model, fn)
    getattr(model, method)()
    assert model.gradient_checkpointing and model.is_activation_checkpointing
    calls = _spy_checkpointing(model)
    loss, grads = _loss_and_grads(model, fn)
    # the trunk blocks and the head blocks all went through the checkpoint function, once each
    expected = [f"layers.{i}" for i in range(model.config.num_hidden_layers)]
    expected += [f"head.res_blocks.{i}" for i in range(model.config.head_num_layers)]
    assert calls == dict.fromkeys(expected, 1), calls
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)
    # inference (no grad) never checkpoints
    calls.clear()
    with torch.no_grad():
        model(latents, labels, generator=_gen(3))
    assert not calls


def test_vae_gradient_checkpointing(make_vae) -> None:
    vae = make_vae().train()
    images = _images(2)

    def fn():
        return vae(images, generator=_gen(4)).sample.square().mean()

    loss_ref, grads_ref = _loss_and_grads(vae, fn)
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing and vae.encoder_vit.layers[0].gradient_checkpointing
    calls = _spy_checkpointing(vae)
    loss, grads = _loss_and_grads(vae, fn)
    expected = [f"encoder_vit.layers.{i}" for i in range(vae.config.encoder_layers)]
    expected += [f"decoder_vit.layers.{i}" for i in range(vae.config.decoder_layers)]
    assert calls == dict.fromkeys(expected, 1), calls
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(vae.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)


# ----------------------------------------------------------------------------- save / load


def test_auto_classes_round_trip(make_tokens, make_transformer, tmp_path) -> None:
    model = make_transformer(guidance_scale=3.25)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, SphereARConfig) and config.model_type == "sphere_ar"
    assert config.guidance_scale == 3.25 and config.num_classes == 10 and config.num_class_tokens == 4
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SphereARTransformer)
    ref, new = model.state_dict(), loaded.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    latents, labels = make_tokens(2, NUM_TOKENS), torch.tensor([3, 9])
    with torch.no_grad():
        cond = model.compute_head_condition(latents, labels)
        assert torch.equal(loaded.compute_head_condition(latents, labels), cond)
        x, t, z = torch.randn(5, 16), torch.rand(5), torch.randn(5, 64)
        assert torch.equal(loaded.head(x, t, z), model.head(x, t, z))
        loss = model(latents, labels, generator=_gen(0)).loss
        assert torch.equal(loaded(latents, labels, generator=_gen(0)).loss, loss)


def _public(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def test_vae_round_trip(make_tokens, make_vae, tmp_path) -> None:
    vae = make_vae()
    vae.save_pretrained(tmp_path)
    loaded = SphereVAE.from_pretrained(tmp_path).eval()
    assert _public(loaded.config) == _public(vae.config)
    images, latents = _images(2), make_tokens(2, 4)
    with torch.no_grad():
        a, b = vae.encode(images).latent_dist, loaded.encode(images).latent_dist
        assert torch.equal(a.mu, b.mu) and torch.equal(a.kappa, b.kappa)
        assert torch.equal(vae.decode(latents).sample, loaded.decode(latents).sample)


# ----------------------------------------------------------------------------- VAE


def test_a_new_vae_has_the_official_init(tmp_path) -> None:
    """Official ``initialize_weights`` (a new model, not the trainer): linears N(0, 0.02) with zero biases, the
    register tokens (an official nn.Embedding) N(0, 0.02), then PyTorch's default init again for quant_proj,
    post_quant_proj and the encoder output; convolutions keep theirs. from_pretrained draws nothing."""
    torch.manual_seed(0)
    vae = SphereVAE(latent_dim=16, image_size=32, patch_size=16, z_channels=128, cnn_channels=(32, 32, 32, 32, 128),
                    encoder_layers=2, decoder_layers=2)
    reset = {"quant_proj", "post_quant_proj", "encoder_out"}
    linears = {n: m for n, m in vae.named_modules() if isinstance(m, torch.nn.Linear)}
    assert reset < set(linears) and len(linears) > 10
    for name, m in linears.items():
        bound = 1 / math.sqrt(m.in_features)
        if name in reset:  # kaiming-uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std = bound / sqrt(3)
            assert m.weight.abs().max() <= bound and abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.2 * bound
            assert m.bias is None or (m.bias.abs().max() <= bound and m.bias.abs().max() > 0)
        else:
            assert abs(m.weight.std().item() - 0.02) < 0.002, name
            assert abs(m.weight.mean().item()) < 0.002, name
            assert m.bias is None or not m.bias.any(), name
    tokens = torch.cat([vae.encoder_vit.register_tokens, vae.decoder_vit.register_tokens])
    assert abs(tokens.std().item() - 0.02) < 0.004
    conv = vae.down_blocks[0].conv1  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert conv.weight.abs().max() <= 1 / math.sqrt(conv.weight[0].numel())
    assert conv.weight.std() > 0.5 / math.sqrt(3 * conv.weight[0].numel())
    # deterministic under the global seed; loading builds without initialising (no draw) and restores every tensor
    torch.manual_seed(0)
    again = SphereVAE(**vae.config)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))
    vae.save_pretrained(tmp_path)
    rng = torch.get_rng_state()
    loaded = SphereVAE.from_pretrained(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))


@torch.no_grad()
def test_vae_shapes(make_vae) -> None:
    vae = make_vae()
    images = _images(2)
    dist = vae.encode(images).latent_dist
    assert dist.mu.shape == (2, 4, 16) and dist.kappa.shape == (2, 4)
    assert (dist.mu.norm(dim=-1) - 1).abs().max() <= 1e-5
    assert dist.kappa.min() >= 1.0  # softplus + 1
    z = vae.normalize(dist.sample(_gen(0)))
    assert (z.norm(dim=-1) - 4.0).abs().max() <= 1e-4
    out = vae.decode(z)
    assert out.sample.shape == (2, 3, 32, 32)
    assert vae(images, generator=_gen(0)).sample.shape == (2, 3, 32, 32)
    assert vae(images, sample_posterior=False).sample.shape == (2, 3, 32, 32)
    (tup,) = vae.encode(images, return_dict=False)
    assert torch.equal(tup.mu, dist.mu)
    # the posterior sample is seeded: same generator, same reconstruction
    assert torch.equal(vae(images, generator=_gen(1)).sample, vae(images, generator=_gen(1)).sample)


@torch.no_grad()
def test_vae_decodes_non_sphere_latents(make_vae) -> None:
    vae = make_vae()
    for latents in (torch.randn(2, 4, 16, generator=_gen(0)) * 10, torch.zeros(1, 4, 16)):
        out = vae.decode(latents).sample
        assert out.shape == (latents.shape[0], 3, 32, 32) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_vae_low_precision_decode(make_tokens, make_vae, dtype: torch.dtype) -> None:
    vae = make_vae()
    latents = make_tokens(2, 4)
    ref = vae.decode(latents).sample
    low = vae.to(dtype).decode(latents).sample
    assert low.dtype == dtype and bool(torch.isfinite(low).all())
    assert (low.float() - ref).abs().max() <= 0.1 * ref.abs().max() + 0.05  # still the same image


def test_no_split_modules_name_real_submodules(make_transformer, make_vae) -> None:
    for model in (make_transformer(), make_vae()):
        names = {type(m).__name__ for m in model.modules()}
        assert model._no_split_modules, type(model).__name__
        assert set(model._no_split_modules) <= names, (model._no_split_modules, type(model).__name__)
    assert "TransformerBlock" in SphereARTransformer._no_split_modules


# ----------------------------------------------------------------------------- Trainer


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor):
        self.latents = latents
        n = latents.shape[0]
        self.labels = torch.arange(n) % 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[i], "class_labels": self.labels[i]}


def test_trainer_runs(make_tokens, make_transformer, tmp_path) -> None:
    model = make_transformer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, remove_unused_columns=False, save_strategy="no", logging_steps=1,
                             disable_tqdm=True, learning_rate=1e-3, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(make_tokens(8, NUM_TOKENS, seed=2)))
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])]
    assert any(n.startswith("layers.") for n in changed) and any(n.startswith("head.") for n in changed)
