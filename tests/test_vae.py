"""The VAE: preset sizes and layouts, the reference outputs of the original code, the ELBO against an
independent Monte-Carlo computation, gradients, training, sampling, encode/decode and options."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch._inductor.config
from hydra.utils import instantiate

from tests.conftest import DATA, build_model, model_config, perturb_, random_batch
from vdvae import VAE, VDVAEModule
from vdvae.original import convert_state_dict, from_original_hparams, load_original

LAYOUT = json.loads((DATA / "original_layout.json").read_text())
EXPECTED = json.loads((DATA / "expected.json").read_text())


def reference_model(h):
    return VAE(**from_original_hparams(h))


@pytest.mark.parametrize("preset", ["cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024"])
def test_paper_presets_match_the_original_exactly(preset):
    ref = LAYOUT[preset]
    with torch.device("meta"):
        model = build_model(preset)
    assert sum(p.numel() for p in model.parameters()) == ref["n_params"]
    shapes = {k: torch.empty(shape, device="meta") for k, shape in ref["state_dict"]}
    converted = convert_state_dict(shapes, model)  # checks names and shapes one to one
    assert len(converted) == len(model.state_dict()) == len(ref["state_dict"])
    with pytest.raises(ValueError, match="shape"):
        first = ref["state_dict"][0][0]
        convert_state_dict({**shapes, first: torch.empty(1, device="meta")}, model)


def test_paper_preset_parameter_counts():
    expected = {
        "cifar10": 39_145_700,
        "imagenet32": 119_280_868,
        "imagenet64": 125_005_860,
        "ffhq256": 114_874_852,
        "ffhq1024": 109_366_904,
    }
    for preset, n in expected.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in build_model(preset).parameters()) == n, preset


@pytest.mark.parametrize("name", ["tiny", "tiny_custom_width"])
def test_reproduces_the_original_code_on_its_checkpoints(name):
    h = EXPECTED["models"][name]
    model = load_original(reference_model(h), torch.load(DATA / h["file"], weights_only=True))
    x = torch.load(DATA / "batch.pt", weights_only=True)["x"].permute(0, 3, 1, 2).float()
    with torch.no_grad():
        out = model((x - 120.63838) / 64.16736, (x - 127.5) / 127.5, use_mean=True)
    torch.testing.assert_close(out.loss, torch.tensor(h["elbo"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.distortion, torch.tensor(h["distortion"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(out.rate, torch.tensor(h["rate"]), rtol=1e-5, atol=0)
    # The KL is evaluated in a different (more stable) order than the original: float32 rounding.
    torch.testing.assert_close(out.kl, torch.tensor(h["kl_per_group"]), rtol=1e-4, atol=1e-6)


def test_original_import_rejects_missing_and_module_prefixed_keys_map():
    h = EXPECTED["models"]["tiny"]
    state = torch.load(DATA / h["file"], weights_only=True)
    model = reference_model(h)
    load_original(model, {f"module.{k}": v for k, v in state.items()})
    with pytest.raises(KeyError, match="lacks 1"):
        convert_state_dict({k: v for k, v in state.items() if k != "decoder.gain"}, model)
    with pytest.raises(KeyError, match="no counterpart"):
        convert_state_dict({**state, "decoder.extra": torch.zeros(1)}, model)


def test_elbo_equals_independent_monte_carlo_estimate():
    """ELBO = E_q[log p(x|z) + log p(z) - log q(z|x)], with every density from torch.distributions."""
    torch.manual_seed(0)
    model = perturb_(build_model("tiny"), scale=0.1)
    x, target = random_batch(model, n=1)
    n = 4000
    x, target = x.expand(n, -1, -1, -1), target.expand(n, -1, -1, -1)
    Normal = torch.distributions.Normal
    with torch.no_grad():
        torch.manual_seed(1)
        out = model(x, target)
        torch.manual_seed(1)  # the same noise: the same z in every group
        h, groups = model.decoder(n, model.encoder(x))
        log_px_z = model.likelihood.log_prob(model.likelihood(h), target)
        log_p = sum(Normal(g.prior[0], g.prior[1].exp()).log_prob(g.z).sum(dim=(1, 2, 3)) for g in groups)
        log_q = sum(Normal(g.posterior[0], g.posterior[1].exp()).log_prob(g.z).sum(dim=(1, 2, 3)) for g in groups)
    torch.testing.assert_close(out.log_px_z, log_px_z)
    # Same z: the decoder driven by the given latents (prior path) decodes to the same output.
    with torch.no_grad():
        h_given, _ = model.decoder(n, latents=[g.z for g in groups])
    torch.testing.assert_close(h_given, h)
    mc_elbo = log_px_z + log_p - log_q
    stderr = mc_elbo.std() / math.sqrt(n)
    assert out.kl.sum(1).mean() > 1.0  # the perturbed prior differs from the posterior
    assert abs(mc_elbo.mean() - out.elbo.mean()) < 4 * stderr
    assert abs((log_q - log_p).mean() - out.kl.sum(1).mean()) < 4 * (log_q - log_p).std() / math.sqrt(n)


def test_at_initialization_the_prior_is_standard_normal(tiny):
    x, target = random_batch(tiny)
    _, groups = tiny.decoder(x.shape[0], tiny.encoder(x))
    for g in groups:
        assert g.prior[0].abs().max() == 0 and g.prior[1].abs().max() == 0
    out = tiny(x, target)
    assert out.rate.max() < 0.05 * out.distortion.min()
    assert out.kl.shape == (4, tiny.n_groups) and (out.kl >= -1e-6).all()  # float32 rounding


def test_gradients_reach_every_parameter():
    model = perturb_(build_model("tiny"))
    x, target = random_batch(model)
    model(x, target).loss.mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tiny_model_overfits_one_batch(tiny):
    # Eight distinct structured images (stripes at different angles and contrasts).
    i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    images = torch.stack([127.5 + 120 * torch.sin((k % 4 + 1) * 0.6 * (i + (k // 4) * j)) for k in range(8)])
    images = images.round().unsqueeze(1)
    x, target = (images - 127.5) / 64, (images - 127.5) / 127.5
    opt = torch.optim.Adam(tiny.parameters(), lr=1e-2)
    initial = tiny(x, target, use_mean=True).loss.mean().item()
    for _ in range(300):
        opt.zero_grad()
        loss = tiny(x, target).loss.mean()
        loss.backward()
        opt.step()
    final = tiny(x, target, use_mean=True).loss.mean().item()
    assert final < 0.7 * initial, (initial, final)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.0, [1.0, 0.0, 0.7, 0.2, 0.0]])
def test_samples_are_valid_images(tiny, temperature):
    perturb_(tiny)
    images = tiny.sample(6, temperature)
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8


def test_temperature_zero_is_deterministic_and_one_is_not(tiny):
    perturb_(tiny)
    torch.testing.assert_close(tiny.sample(4, 0.0), tiny.sample(4, 0.0), rtol=0, atol=0)
    assert not torch.equal(tiny.sample(4, 1.0), tiny.sample(4, 1.0))
    with pytest.raises(ValueError, match="temperatures for 5 latent groups"):
        tiny.sample(2, [1.0, 1.0])


def test_rgb_5bit_samples_use_the_5bit_grid():
    model = perturb_(build_model("tiny", "image_channels=3", "bits=5"))
    images = model.sample(3).float()
    assert images.shape == (3, 3, 8, 8)
    grid = (torch.arange(32) * 255 / 31).round()
    assert torch.isin(images, grid).all()


def test_encode_decode_and_partial_reconstructions(tiny):
    perturb_(tiny)
    x, _ = random_batch(tiny)
    latents = tiny.encode(x)
    assert [z.shape[-1] for z in latents] == [1, 4, 4, 8, 8]
    # Decoding all posterior means with the mode output is the deterministic posterior reconstruction.
    full = tiny.decode(latents, mode=True)
    torch.testing.assert_close(tiny.reconstruct(x, mode=True), full, rtol=0, atol=0)
    h, _ = tiny.decoder(x.shape[0], tiny.encoder(x), use_mean=True)
    reference = tiny.likelihood.to_uint8(tiny.likelihood.sample(tiny.likelihood(h), mode=True))
    torch.testing.assert_close(full, reference, rtol=0, atol=0)
    # Re-encoding keeps the top group's posterior (it sees only x), and k=0 is an unconditional sample.
    assert tiny.reconstruct(x, k=2, temperature=0.0).shape == (4, 1, 8, 8)
    assert tiny.reconstruct(x, k=0).shape == (4, 1, 8, 8)


def test_plain_vae_is_one_group():
    model = build_model("vae")
    assert model.n_groups == 1
    x, target = random_batch(model, n=2)
    out = model(x, target)
    assert out.kl.shape == (2, 1)
    assert model.sample(2).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("option", ["checkpointing=true", "channels_last=true"])
def test_options_keep_the_numerics(option):
    torch.manual_seed(0)
    plain = perturb_(build_model("tiny"))
    torch.manual_seed(0)
    other = perturb_(build_model("tiny", option))
    assert_same_step(plain, other, grad_rtol=1e-4)


def assert_same_step(reference, other, grad_rtol, grad_atol=1e-6, loss_tol=None):
    """The same loss and gradients from both models on one batch with the same noise."""
    x, target = random_batch(reference)
    losses = []
    for model in (reference, other):
        torch.manual_seed(3)
        loss = model(x, target).loss.mean()
        loss.backward()
        losses.append(loss)
    tolerance = {} if loss_tol is None else {"rtol": loss_tol, "atol": loss_tol}  # None: float32 defaults
    torch.testing.assert_close(losses[1], losses[0], **tolerance)
    for (name, a), b in zip(reference.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=grad_rtol, atol=grad_atol, msg=name)


def test_bernoulli_model():
    model = build_model("tiny", "likelihood=bernoulli")
    x = torch.randint(0, 2, (3, 1, 8, 8)).float()
    out = model(x, x)
    assert torch.isfinite(out.loss).all()
    assert set(model.sample(3).unique().tolist()) <= {0, 255}


def test_every_model_preset_instantiates_as_a_lightning_module():
    names = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))
    assert {"cifar10", "ffhq1024", "tiny", "vae", "vdvae"} <= set(names)
    for name in names:
        with torch.device("meta"):
            module = instantiate(model_config(name))
        assert isinstance(module, VDVAEModule) and isinstance(module.vae, VAE), name
        assert isinstance(module.hparams.vae, dict)  # plain values: loadable without Hydra


@torch._inductor.config.patch(fallback_random=True)  # (monkeypatch would delete the option on undo)
@pytest.mark.slow
def test_compiled_model_matches_eager():
    """torch.compile (inductor) gives the eager fp32 loss and gradients; eager RNG keeps the noise identical."""
    torch.manual_seed(0)
    eager = perturb_(build_model("tiny", "channels_last=true"))
    compiled = build_model("tiny", "channels_last=true")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    assert_same_step(eager, compiled, grad_rtol=1e-3, grad_atol=1e-5, loss_tol=1e-5)


@pytest.mark.slow
def test_forward_and_loss_trace_as_one_graph_without_breaks():
    """What whole-step capture (CUDA graphs, fullgraph compile) needs of the model: no graph breaks."""
    model = perturb_(build_model("tiny"))
    x, target = random_batch(model)
    explanation = torch._dynamo.explain(lambda x, t: model(x, t).loss.mean())(x, target)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
