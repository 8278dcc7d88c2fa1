"""Efficient-VDVAE's options (Hazami et al. 2022), each against an independent computation: the softplus
std, Adamax, the cosine learning-rate decay, the KL warm-up, random horizontal flips, latent pruning and
the mixture's log-scale floor."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_VAE, perturb_, random_batch
from tests.test_train import fit_on_batches
from vdvae import VAE, VDVAEModule
from vdvae.lit_module import kl_balance
from vdvae.model.distributions import gaussian_kl, softplus_logstd
from vdvae.model.likelihoods import DiscretizedMixtureLogistics


def test_softplus_std_is_its_definition_and_gives_torch_distributions_kl():
    raw = torch.linspace(-200, 50, 2001, dtype=torch.float64)
    expected = torch.log(F.softplus(raw * math.log(2)) / math.log(2))  # float64: no underflow down to -700
    torch.testing.assert_close(softplus_logstd(raw.float()).double(), expected, rtol=1e-6, atol=1e-6)
    assert softplus_logstd(torch.zeros(1)).item() == pytest.approx(0.0, abs=1e-7)  # std(0) = 1, as exp(0)
    gen = torch.Generator().manual_seed(0)
    mq, mp, vq, vp = (3 * torch.randn(1000, generator=gen) for _ in range(4))
    std = lambda v: F.softplus(v * math.log(2)) / math.log(2)  # noqa: E731
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mq, std(vq)), torch.distributions.Normal(mp, std(vp))
    )
    torch.testing.assert_close(
        gaussian_kl(mq, softplus_logstd(vq), mp, softplus_logstd(vp)), reference, rtol=1e-4, atol=1e-5
    )


def test_a_softplus_model_samples_with_the_prior_std():
    torch.manual_seed(0)
    model = perturb_(VAE(**TINY_VAE, std="softplus"), scale=0.1)
    x, target = random_batch(model)
    out = model(x, target)
    assert torch.isfinite(out.loss).all() and (out.kl >= 0).all()
    with pytest.raises(ValueError, match="std must be 'exp'.*or 'softplus'"):
        VAE(**TINY_VAE, std="log")


def test_adamax_follows_the_efficient_vdvae_recursion_and_skips_bad_updates():
    torch.manual_seed(0)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    module = VDVAEModule(
        TINY_VAE, optimizer="adamax", lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, warmup_steps=2, grad_clip=1e9
    )
    params = list(module.vae.parameters())
    grads = [[] for _ in params]  # per parameter, one gradient per step (hooks run in backward's order)
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda p, i=i: grads[i].append(p.grad.detach().clone().double()))
    x = torch.randint(0, 256, (4, 1, 8, 8)).float()
    good = ((x - 127.5) / 127.5, (x - 127.5) / 127.5)
    nan = (good[0].clone().fill_(float("nan")), good[1])
    batches = [good, good, nan, good]
    states = fit_on_batches(module, batches)
    n = len(params)
    steps = [[grads[i][step] for i in range(n)] for step in range(len(batches))]
    # Independent, in float64: m = b1 m + (1 - b1) g, u = max(b2 u, |g| + eps), p -= lr_t / (1 - b1^t) m / u,
    # lr_t = lr min(1, step / warmup); the skipped (non-finite) update changes neither weights nor moments.
    weights = [p.double() for p in states[0][0]]
    m = [torch.zeros_like(w) for w in weights]
    u = [torch.zeros_like(w) for w in weights]
    t = 0
    for step, (batch, g) in enumerate(zip(batches, steps, strict=True)):
        if batch is nan:
            continue
        t += 1
        rate = lr * min(1.0, step / 2) / (1 - b1**t)
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            u[i] = torch.maximum(b2 * u[i], g[i].abs() + eps)
            weights[i] = weights[i] - rate * m[i] / u[i]
    assert int(module.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(states[2][0], states[3][0], strict=True))  # the skipped step
    for expected, got in zip(weights, states[-1][0], strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_cosine_decay_reaches_its_floor_after_warmup():
    module = VDVAEModule(TINY_VAE, lr=1e-3, lr_schedule="cosine", lr_min=2e-4, warmup_steps=10)
    module._trainer = SimpleNamespace(max_steps=110)  # decay_steps: the 100 steps after warm-up
    factor = module._lr_factor
    assert [factor(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert factor(60) == pytest.approx((1 + 0.2) / 2)  # halfway: the mean of the peak and the floor
    assert factor(35) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert factor(110) == pytest.approx(0.2) and factor(500) == pytest.approx(0.2)
    values = [factor(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    module.hparams.decay_steps = 50  # or an explicit length
    assert factor(60) == pytest.approx(0.2)
    module.hparams.decay_start, module.hparams.decay_steps = 40, None  # Efficient-VDVAE holds the peak first
    assert [factor(s) for s in (10, 25, 40)] == [1.0, 1.0, 1.0]
    assert factor(75) == pytest.approx(0.6) and factor(110) == pytest.approx(0.2)  # halfway over 70 steps
    module.hparams.decay_start, module._trainer = None, SimpleNamespace(max_steps=5)  # ends within warm-up
    module.configure_optimizers()  # a run too short to reach the cosine is no error
    assert factor(3) == pytest.approx(0.3)
    module.hparams.decay_steps, module._trainer = None, SimpleNamespace(max_steps=-1)
    with pytest.raises(ValueError, match="needs model.decay_steps or a trainer.max_steps"):
        module.configure_optimizers()  # before training starts
    with pytest.raises(ValueError, match="model.lr_schedule must be constant or cosine"):
        VDVAEModule(TINY_VAE, lr_schedule="linear")


def elbo_and_objective_per_step(module, steps: int):
    """Train `module` for `steps` updates on one fixed batch; each step's ELBO terms and the objective it
    back-propagated."""
    outputs, objectives = [], []
    forward = module.vae.forward
    module.vae.forward = lambda *a, **k: outputs.append(forward(*a, **k)) or outputs[-1]
    backward = module.manual_backward
    module.manual_backward = lambda loss, *a, **k: objectives.append(loss.detach()) or backward(loss, *a, **k)
    x = torch.randint(0, 256, (4, 1, 8, 8)).float()
    fit_on_batches(module, [((x - 127.5) / 127.5, (x - 127.5) / 127.5)] * steps)
    return list(zip(outputs, objectives, strict=True))


def test_kl_warmup_weights_the_rate_and_leaves_the_logged_elbo_alone():
    torch.manual_seed(0)
    module = VDVAEModule(TINY_VAE, kl_warmup_steps=4, warmup_steps=1)
    for n, (out, objective) in enumerate(elbo_and_objective_per_step(module, steps=6)):
        weight = min(1.0, (n + 1) / 4)
        expected = (out.distortion + weight * out.rate).mean()
        torch.testing.assert_close(objective, expected.detach())
        if weight < 1:
            assert objective < out.loss.mean()  # the logged loss stays the negative ELBO


def test_kl_balancing_weights_groups_by_their_kl_per_variate_until_its_last_step():
    kl = torch.tensor([[1.0, 4.0, 0.5], [3.0, 0.0, 1.5]], requires_grad=True)
    variates = torch.tensor([2.0, 8.0, 1.0])
    # KL per variate, batch mean: 1, 0.25, 1 (sum 2.25); weights 3 * a / 2.25, constant in the gradient.
    weights = kl_balance(kl, variates)
    torch.testing.assert_close(weights, torch.tensor([4 / 3, 1 / 3, 4 / 3]))
    (kl * weights).sum().backward()
    torch.testing.assert_close(kl.grad, weights.expand(2, 3))

    torch.manual_seed(0)
    module = VDVAEModule(TINY_VAE, kl_balancing_steps=3, warmup_steps=1)
    variates = torch.tensor([4 * 1, 4 * 16, 4 * 16, 4 * 64, 4 * 64.0])  # TINY_VAE: zdim 4 at 1, 4, 4, 8, 8
    for n, (out, objective) in enumerate(elbo_and_objective_per_step(module, steps=5)):
        if n < 3:
            expected = (out.distortion + (out.kl * kl_balance(out.kl, variates)).sum(1) / out.ndims).mean()
        else:
            expected = out.loss.mean()
        torch.testing.assert_close(objective, expected.detach())


def test_random_flip_mirrors_about_half_the_training_images_and_no_evaluation_image():
    from vdvae.data.digits import DigitsDataModule

    data = DigitsDataModule(root=".", image_size=8, channels=1, batch_size=4, random_flip=True, val_size=10)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (400, 1, 8, 8), dtype=torch.uint8)
    plain, _ = data.preprocess(images)
    data.trainer = SimpleNamespace(training=True)
    flipped, _ = data.on_after_batch_transfer(images, 0)
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 150 < int(mirrored.sum()) < 250
    data.trainer = SimpleNamespace(training=False)
    assert torch.equal(data.on_after_batch_transfer(images, 0)[0], plain)


def test_variate_masks_keep_the_most_informative_share_of_all_groups():
    from vdvae.pruning import variate_masks

    gen = torch.Generator().manual_seed(0)
    kl = [torch.rand(8, generator=gen, dtype=torch.float64) * (g + 1) for g in range(5)]
    masks = variate_masks(kl, 0.1)
    flat, kept = torch.cat(kl), torch.cat(masks)
    assert int(kept.sum()) == 4  # 10% of 40, by brute force: the 4 largest
    assert set(torch.nonzero(kept).flatten().tolist()) == set(flat.argsort(descending=True)[:4].tolist())
    assert all(m.all() for m in variate_masks(kl, 1.0))
    with pytest.raises(ValueError, match="quantile of variates to keep"):
        variate_masks(kl, 0.0)


def test_pruned_variates_cost_no_kl_and_all_kept_is_the_plain_elbo():
    torch.manual_seed(0)
    model = perturb_(VAE(**TINY_VAE), scale=0.1)
    x, target = random_batch(model)
    with torch.no_grad():
        plain = model(x, target, use_mean=True)
        every = [torch.ones(z, dtype=torch.bool) for z, _, _ in model.latent_shapes]
        all_kept = model(x, target, use_mean=True, variate_masks=every)
        torch.testing.assert_close(all_kept.loss, plain.loss, rtol=0, atol=0)
        # Group 0 sees only the encoder and the top state: its pruned KL is the kept channels' share of its KL map.
        _, groups = model.decoder(x.shape[0], model.encoder(x), use_mean=True)
        keep = torch.zeros(model.latent_shapes[0][0], dtype=torch.bool)
        keep[::2] = True
        masks = [keep] + [torch.zeros(z, dtype=torch.bool) for z, _, _ in model.latent_shapes[1:]]
        pruned = model(x, target, use_mean=True, variate_masks=masks)
    torch.testing.assert_close(pruned.kl[:, 0], groups[0].kl[:, keep].sum(dim=(1, 2, 3)))
    assert (pruned.kl[:, 1:] == 0).all()


def test_the_log_scale_floor_is_an_option_and_the_pmf_stays_normalized():
    """A component narrower than exp(-7) is widened to exp(-7) by the paper's floor and kept by Efficient-VDVAE's
    -250. With its mean on the edge between two levels, the free one puts half its mass on each; the floored
    one leaks into the next bins: its mass on [0, 2/255] is that of a logistic of scale exp(-7)."""
    paper, free = (DiscretizedMixtureLogistics(4, 1, n_mix=1, bits=8, min_log_scale=f) for f in (-7.0, -250.0))
    params = torch.zeros(1, 3, 1, 1)
    params[:, 2] = -12.0  # log-scale of the single component; its mean 0 is the edge between two levels
    target = torch.full((1, 1, 1, 1), 1 / 255)  # level 128, the bin [0, 2/255]
    p_paper, p_free = (head.log_prob(params, target).exp().item() for head in (paper, free))
    assert p_free == pytest.approx(0.5, rel=1e-6)
    assert p_paper == pytest.approx(1 / (1 + math.exp(-(2 / 255) / math.exp(-7.0))) - 0.5, rel=1e-5)
    for head in (paper, free):
        assert head.channel_pmf(params, target, 0).sum().item() == pytest.approx(1.0)
    assert VAE(**TINY_VAE, min_log_scale=-250.0).likelihood.min_log_scale == -250.0


def test_softplus_mixture_scales_are_logistics_of_that_scale():
    """Efficient-VDVAE's mixture std: scale = softplus(ln2 l) / ln2 = log2(1 + 2^l); with l = -3 the
    bin [0, 2/255] above a mean of 0 has the mass of a logistic of scale log2(1.125)."""
    head = DiscretizedMixtureLogistics(4, 1, n_mix=1, bits=8, min_log_scale=-250.0, std="softplus")
    params = torch.zeros(1, 3, 1, 1)
    params[:, 2] = -3.0
    target = torch.full((1, 1, 1, 1), 1 / 255)
    scale = math.log2(1.125)
    assert head.log_prob(params, target).exp().item() == pytest.approx(1 / (1 + math.exp(-(2 / 255) / scale)) - 0.5)
    assert head.channel_pmf(params, target, 0).sum().item() == pytest.approx(1.0)
    assert VAE(**TINY_VAE, mixture_std="softplus").likelihood.softplus_std
    with pytest.raises(ValueError, match="mixture's std"):
        DiscretizedMixtureLogistics(4, 1, std="log")
