"""Efficient-VDVAE's options (Hazami et al. 2022), each against an independent computation: the softplus
std, Adamax, the cosine learning-rate decay, the KL warm-up, random horizontal flips, latent pruning and
the mixture's log-scale floor."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tests.conftest import TINY_VAE, compose_config, perturb_, random_batch
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
    assert module.trainer.global_step == 4  # the skipped update is a step, as with AdamW: max_steps counts it
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


@pytest.mark.parametrize("name", ["efficient_cifar10", "efficient_imagenet32"])
def test_efficient_presets_follow_its_pytorch_cosine_whose_phase_counts_from_step_zero(name):
    """Its NarrowCosineDecay holds the peak until decay_start, then steps torch's CosineAnnealingLR (T_max =
    decay_steps, so the phase counts from step 0) on from the peak: lr(t) - floor = (peak - floor) (1 +
    cos(pi t / T)) / (1 + cos(pi (start - 1) / T)), the floor from step T on."""
    cfg = compose_config(f"model={name}", config_name="train")
    assert cfg.model.cosine_phase == "zero"
    with torch.device("meta"):
        module = instantiate(cfg.model)
    module._trainer = SimpleNamespace(max_steps=cfg.trainer.max_steps)
    module.configure_optimizers()
    peak, floor, start, end = 1e-3, 2e-4, 50_000, 750_000
    assert (cfg.model.lr, cfg.model.lr_min, cfg.model.decay_start, cfg.model.decay_steps) == (peak, floor, start, end)
    assert cfg.model.warmup_steps == 100 and cfg.trainer.max_steps == 800_000

    def expected(t):
        if t < 100:
            return peak * t / 100
        if t < start:
            return peak
        t = min(t, end)
        return floor + (peak - floor) * (1 + math.cos(math.pi * t / end)) / (1 + math.cos(math.pi * (start - 1) / end))

    lr = lambda t: cfg.model.lr * module._lr_factor(t)  # noqa: E731
    for t in (0, 50, 100, 49_999, 50_000, 100_000, 400_000, 749_999, 750_000, 800_000):
        assert lr(t) == pytest.approx(expected(t), rel=1e-12, abs=1e-15), t
    assert lr(0) == 0 and lr(100) == lr(49_999) == peak
    assert lr(50_000) == pytest.approx(peak, rel=1e-6)  # no jump where the cosine starts
    assert lr(400_000) == pytest.approx(5.6215e-4, rel=1e-4)  # its float32 rate drifts to 5.606e-4 by then
    assert lr(750_000) == pytest.approx(floor) and lr(800_000) == pytest.approx(floor)
    module.hparams.cosine_phase = "start"  # the phase from decay_start: the floor only at 800,000
    assert lr(400_000) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 350_000 / end)))
    assert lr(400_000) == pytest.approx(6.418e-4, rel=1e-4) and lr(750_000) > floor * 1.04


class _NarrowCosine(torch.optim.lr_scheduler.CosineAnnealingLR):
    """Efficient-VDVAE's schedule as its PyTorch code builds it: warm-up and the peak until `decay_start`, then
    torch's own CosineAnnealingLR steps (rates in float64 here; its are float32 tensors)."""

    def __init__(self, optimizer, decay_steps, warmup_steps, decay_start, min_lr):
        self.warmup_steps, self.decay_start = warmup_steps, decay_start
        super().__init__(optimizer, T_max=decay_steps, eta_min=min_lr)

    def get_lr(self):
        if self.last_epoch < self.decay_start:
            return [base * min(1.0, self.last_epoch / self.warmup_steps) for base in self.base_lrs]
        return super().get_lr()


def test_cosine_phase_zero_steps_like_torchs_cosine_annealing_after_the_peak():
    peak, floor, warmup, start, end = 1e-3, 2e-4, 10, 50, 750
    module = VDVAEModule(
        TINY_VAE,
        lr=peak,
        lr_schedule="cosine",
        lr_min=floor,
        warmup_steps=warmup,
        decay_start=start,
        decay_steps=end,
        cosine_phase="zero",
    )
    module._trainer = SimpleNamespace(max_steps=800)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    reference = _NarrowCosine(optimizer, end, warmup, start, floor)
    for t in range(end + 1):  # update t runs at the rate the scheduler holds after t steps
        assert peak * module._lr_factor(t) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9, abs=1e-15), t
        optimizer.step()  # no gradient: only the order torch expects
        reference.step()
    assert [peak * module._lr_factor(t) for t in (end, end + 1, 800)] == pytest.approx([floor] * 3)
    module.hparams.decay_steps = None  # the step it ends at: trainer.max_steps
    assert peak * module._lr_factor(800) == pytest.approx(floor) and peak * module._lr_factor(700) > floor * 1.01
    module.hparams.decay_steps = 40  # ends before it starts
    with pytest.raises(ValueError, match=r"model.cosine_phase=zero .* model.decay_steps=40 .* model.decay_start"):
        module.configure_optimizers()
    with pytest.raises(ValueError, match="model.cosine_phase must be start .* or zero"):
        VDVAEModule(TINY_VAE, lr_schedule="cosine", cosine_phase="0")


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
