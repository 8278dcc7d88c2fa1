"""The LightningModule: a VAE trained on its ELBO with the VDVAE recipe.

AdamW with linear warm-up; the global gradient norm (after the multi-device average, before
clipping) decides whether an update is skipped: on a non-finite loss on any rank, or a norm at or
above `skip_threshold`, neither the weights nor the EMA move. Efficient-VDVAE's Adamax, cosine
decay, KL warm-up and KL balancing are options. Skips are counted and logged, and a
run that keeps skipping warns and then stops with a message instead of stalling silently.
Validation, test and sampling use the EMA weights. With `cuda_graphs` on one GPU the whole step
(vdvae.whole_step) runs as one captured graph instead of op by op. Gradient accumulation happens inside
one training step (each loaded batch holds all the batches of one update), so that clipping, the skip
decision and the EMA see the whole update and every checkpoint falls between updates.
"""

import contextlib
import copy
import logging
import math

import torch
from lightning import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from vdvae.config import STEP_METRICS
from vdvae.errors import TrainingStalled
from vdvae.metrics import ActiveUnits, ELBOMetric, IWMetric, iw_bound
from vdvae.model import VAE
from vdvae.model.likelihoods import nats_to_bits
from vdvae.schedule import check_schedule, lr_factor
from vdvae.whole_step import build_whole_step

log = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Run a block with the global RNG (and the device's) seeded, restoring the previous state afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def kl_balance(kl: torch.Tensor, group_variates: torch.Tensor) -> torch.Tensor:
    """NVAE's KL balancing, as Efficient-VDVAE applies it ("gamma"): per-group weights T a_t / sum(a), with
    a_t the batch's mean KL per variate of group t, held constant in the gradient. Groups that carry more
    information per variate are pushed harder, so that the others are not left to collapse early.
    kl: (N, T) nats per image; group_variates: (T,) latent variates per group."""
    per_variate = kl.detach().mean(dim=0) / group_variates
    return len(per_variate) * per_variate / per_variate.sum().clamp(min=torch.finfo(per_variate.dtype).tiny)


def kl_weighted_objective(out, step, h, group_variates):
    """What training minimizes, and the KL's weight in it: the mean loss, or with Efficient-VDVAE's KL warm-up
    and balancing (which change the objective, not the logged ELBO) the reweighted one. `step` is the
    update's 1-based number, a tensor: the weights are decided on the device. `h`: the hyperparameters."""
    loss = out.loss.mean()
    if not (h.kl_warmup_steps or h.kl_balancing_steps):
        return loss, torch.ones_like(loss)
    rate = out.rate
    if h.kl_balancing_steps:  # weights while step <= kl_balancing_steps
        weights = torch.where(step <= h.kl_balancing_steps, kl_balance(out.kl, group_variates), 1.0)
        rate = (out.kl * weights).sum(dim=1) / out.ndims
    kl_weight = torch.ones_like(loss)
    if h.kl_warmup_steps:
        kl_weight = torch.clamp(step.float() / h.kl_warmup_steps, max=1.0)
    return (out.distortion + kl_weight * rate).mean(), kl_weight


class StallGuard:
    """Warns once `skip_warn_after` updates in a row were skipped, and says why to stop at
    `max_consecutive_skips` (a run that keeps skipping stops with a message instead of stalling silently)."""

    def __init__(self, h):
        self.h, self.warned = h, False

    def check(self, n: int, grad_norm) -> str | None:
        """After `n` consecutive skips: None, or the message that stops training."""
        h = self.h
        if n < h.skip_warn_after:
            self.warned = False
        elif not self.warned:
            self.warned = True
            rank_zero_warn(
                f"{n} consecutive updates skipped (grad norm {float(grad_norm):.1f} vs model.skip_threshold="
                f"{h.skip_threshold}); training makes no progress while this lasts"
            )
        if n < h.max_consecutive_skips:
            return None
        return (
            f"stopped: {n} consecutive updates were skipped (last grad norm {float(grad_norm):.1f}, "
            f"model.skip_threshold={h.skip_threshold}). Raise model.skip_threshold, lower model.lr, or resume "
            f"from an earlier checkpoint; model.max_consecutive_skips={h.max_consecutive_skips} sets this limit."
        )


def check_options(optimizer: str, lr_schedule: str, cosine_phase: str):
    """The recipe's choices must be ones it has (before anything is built)."""
    if optimizer not in ("adamw", "adamax"):
        raise ValueError(
            f"model.optimizer must be adamw (the paper's) or adamax (Efficient-VDVAE's), got {optimizer!r}"
        )
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"model.lr_schedule must be constant or cosine, got {lr_schedule!r}")
    if cosine_phase not in ("start", "zero"):
        raise ValueError(
            f"model.cosine_phase must be start (the cosine's phase counts from model.decay_start) or zero "
            f"(from step 0, as Efficient-VDVAE's PyTorch code), got {cosine_phase!r}"
        )


def make_optimizer(params, h) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel for all parameters, and it honours `found_inf`, so a skipped update needs no
    decision on the host. Or Adamax: u = max(beta2 * u, |g| + eps), p -= lr / (1 - beta1^t) * m / u, weight
    decay as L2. `h`: the module's hyperparameters."""
    options = dict(lr=h.lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay)
    if h.optimizer == "adamw":
        return torch.optim.AdamW(params, **options, fused=True)
    return torch.optim.Adamax(params, **options)


class VDVAEModule(LightningModule):
    def __init__(
        self,
        vae: dict,
        lr: float = 2e-4,
        betas: tuple = (0.9, 0.9),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        grad_clip: float = 200.0,
        skip_threshold: float | None = 400.0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        skip_warn_after: int = 20,
        max_consecutive_skips: int = 200,
        compile: bool = False,
        cuda_graphs: bool = False,
        eval_seed: int = 0,
        optimizer: str = "adamw",
        lr_schedule: str = "constant",
        lr_min: float = 0.0,
        decay_steps: int | None = None,
        decay_start: int | None = None,
        cosine_phase: str = "start",
        kl_warmup_steps: int = 0,
        kl_balancing_steps: int = 0,
        accumulate_grad_batches: int = 1,
        iw_samples: int = 0,
        iw_chunk: int = 64,
        active_units: bool = False,
        variate_masks: list | None = None,
    ):
        """`accumulate_grad_batches` (`trainer.accumulate_grad_batches`, a training option, not a
        hyperparameter): how many parts each training batch is split into, one forward and backward pass
        each, for one update. The test set's extras (not hyperparameters either): `iw_samples` > 0 adds the
        importance-weighted bound with that many samples (`iw_chunk` at a time), `active_units` counts them
        per group, and `variate_masks` (one bool (zdim,) tensor per group, vdvae.pruning) makes the test ELBO
        keep only those posterior variates."""
        super().__init__()
        check_options(optimizer, lr_schedule, cosine_phase)
        # The loggers get the whole run config once, from train().
        self.save_hyperparameters(
            ignore=["accumulate_grad_batches", "iw_samples", "iw_chunk", "active_units", "variate_masks"], logger=False
        )
        # As in the original, -1 (or null) turns the norm-based skip off; non-finite updates are always skipped.
        self.skips_on_norm = skip_threshold is not None and skip_threshold != -1
        self.automatic_optimization = False  # the skip decision sits between backward and step
        self.vae = VAE(**vae)
        self.ema = copy.deepcopy(self.vae).requires_grad_(False)
        variates = [math.prod(shape) for shape in self.vae.latent_shapes]
        self.register_buffer("group_variates", torch.tensor(variates, dtype=torch.float32), persistent=False)
        self.register_buffer("attempted_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("consecutive_skips", torch.zeros((), dtype=torch.long))
        self.val_elbo = ELBOMetric(self.vae.n_groups)
        self.test_elbo = ELBOMetric(self.vae.n_groups)
        self.iw_samples, self.iw_chunk, self.variate_masks = iw_samples, iw_chunk, variate_masks
        self.test_iw = IWMetric() if iw_samples else None
        sizes = [z * h * w for z, h, w in self.vae.latent_shapes]
        self.test_active_units = ActiveUnits(sizes) if active_units else None
        self.accumulate_grad_batches = accumulate_grad_batches
        self._stalled, self._stall_guard = None, StallGuard(self.hparams)
        self._whole_step = None  # built at the first training step (after a resume has loaded the optimizer)
        # From the optimizer's step to the schedule's: stopped in between, the state mixes two updates.
        self.applying_update = False

    def configure_model(self):
        if self.hparams.compile:
            self.vae.compile()

    def configure_optimizers(self):
        optimizer = make_optimizer(self.vae.parameters(), self.hparams)
        # The whole step's graph and the bench build optimizers of modules without a trainer.
        check_schedule(self.hparams, self._trainer.max_steps if self._trainer is not None else None)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """The learning rate over `lr` at update `step` (vdvae.schedule)."""
        return lr_factor(step, self.hparams, self._trainer.max_steps if self._trainer is not None else None)

    def training_step(self, batch, batch_idx):
        x, target = batch
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        if self._whole_step is None:
            self._whole_step = build_whole_step(self, optimizer.optimizer)
        if self._whole_step:
            stats = {}
            self.applying_update = True
            # Through the wrapped optimizer, so that Lightning counts the update; it finds no gradients
            # left to apply (the whole step applied them).
            optimizer.step(closure=lambda: stats.update(self._whole_step(x, target)))
        else:
            stats = self._eager_step(x, target, optimizer)
        schedule.step()
        self.applying_update = False
        # Reading the counter syncs an accelerator with the host: there, look only every 10 steps.
        if self.device.type == "cpu" or batch_idx % 10 == 0:
            self._check_stall(stats["grad_norm"])
        if self.hparams.kl_warmup_steps:
            self.log("train/kl_weight", stats["kl_weight"], on_step=True, on_epoch=False)
        skipped = self.skipped_steps.float()
        stats.update(skipped_total=skipped, skip_rate=skipped / self.attempted_steps)
        self.log_dict({f"train/{k}": stats[k] for k in STEP_METRICS}, prog_bar=False, on_step=True, on_epoch=False)
        self.log("train/bpd_avg", stats["bpd"], prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return stats["loss"]

    def _eager_step(self, x, target, optimizer) -> dict:
        """Forward, backward, clipping, the skip decision, the update, the EMA and the counters, op by op.
        With accumulation, forward and backward run on each part of the batch, its objective weighted by its
        share of the images: the summed gradients are the whole batch's."""
        optimizer.zero_grad(set_to_none=True)
        k = self.accumulate_grad_batches
        parts = list(zip(x.tensor_split(k), target.tensor_split(k), strict=True))
        terms = dict.fromkeys(("loss", "bpd", "distortion", "rate"), 0.0)
        for i, (x_part, target_part) in enumerate(parts):
            share = len(x_part) / len(x)
            # Gradients are all-reduced across devices once, in the last part's backward pass.
            with self._backward_sync(enabled=i == len(parts) - 1):
                out = self.vae(x_part, target_part)
                objective, kl_weight = self.objective(out, self.attempted_steps + 1)
                self.manual_backward(objective * share)
            for name in terms:
                terms[name] = terms[name] + getattr(out, name).detach().mean() * share
        loss = terms.pop("loss")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.hparams.grad_clip)
        # 1.0 on a bad update on any rank (the norm is the same on every rank after the all-reduce).
        skip = self.trainer.strategy.reduce(self.bad_update(loss, grad_norm).float(), reduce_op="max")
        self.applying_update = True
        if self.hparams.optimizer == "adamw":
            optimizer.optimizer.found_inf = skip  # the fused AdamW kernel does nothing when it is 1
        elif bool(skip):  # Adamax has no such kernel: decided on the host (a sync on accelerators), and
            optimizer.zero_grad(set_to_none=True)  # a step over no gradients leaves weights and state alone
        optimizer.step()  # also when skipped: every attempted update is a step, as max_steps counts them
        self.update_ema(weight=(1.0 - self.ema_decay()) * (1.0 - skip))
        self.count_step(skip)
        return {"loss": loss, **terms, "grad_norm": grad_norm, "skipped": skip, "kl_weight": kl_weight}

    def _backward_sync(self, enabled: bool):
        """A block whose backward pass all-reduces gradients across devices if `enabled`, else not."""
        strategy = self.trainer.strategy
        if enabled or not isinstance(strategy, ParallelStrategy):
            return contextlib.nullcontext()
        return strategy.block_backward_sync()

    def bad_update(self, loss, grad_norm, threshold=None):
        """Whether to skip the update, decided on the device (no host sync): a non-finite loss, or a
        non-finite or too large gradient norm (before clipping). `threshold`: model.skip_threshold, or
        that value as a tensor (the whole step's graph reads it from memory)."""
        bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm)
        if self.skips_on_norm:
            bad = bad | (grad_norm >= (self.hparams.skip_threshold if threshold is None else threshold))
        return bad

    def objective(self, out, step):
        """What training minimizes at update `step` (a tensor), and the KL's weight in it."""
        return kl_weighted_objective(out, step, self.hparams, self.group_variates)

    def ema_decay(self, decay=None):
        """The EMA's decay: `ema_decay`, or with `ema_warmup` min(ema_decay, (1 + n) / (10 + n)) after n applied
        updates, so that the EMA follows the weights from the first hundred steps (a short run's figures mean
        something) and long runs keep `ema_decay` (from n = 9 / (1 - ema_decay) - 1 on). On the device.
        `decay`: model.ema_decay, or that value as a tensor (the whole step's graph reads it from memory)."""
        decay = self.hparams.ema_decay if decay is None else decay
        if not self.hparams.ema_warmup:
            return decay
        n = (self.attempted_steps - self.skipped_steps).double()
        return torch.clamp((1 + n) / (10 + n), max=decay).float()

    @torch.no_grad()
    def update_ema(self, weight):
        """ema += weight * (online - ema); a zero weight (a skipped update) leaves it exactly as it was."""
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.vae.parameters()), weight)

    @torch.no_grad()
    def count_step(self, skip):
        """Count an attempted update, and `skip` (0. or 1.) as skipped, in place on the device."""
        self.attempted_steps.add_(1)
        self.skipped_steps.add_(skip.long())
        self.consecutive_skips.add_(1).mul_(skip.long())

    def _check_stall(self, grad_norm):
        message = self._stall_guard.check(int(self.consecutive_skips), grad_norm)
        if message:
            self._stalled = message
            log.error(message)
            self.trainer.should_stop = True  # the last state is saved as the run ends, then on_train_end raises

    def on_train_end(self):
        if self._stalled:
            raise TrainingStalled(self._stalled)

    def _evaluate(self, batch, batch_idx, metric, variate_masks=None):
        x, target = batch
        # Evaluation noise is fixed per batch and does not disturb the training RNG stream.
        with seeded(self.device, self.hparams.eval_seed + batch_idx):
            metric.update(self.ema(x, target, variate_masks=variate_masks))

    def on_test_start(self):
        if self.variate_masks is not None:
            self.variate_masks = [m.to(self.device) for m in self.variate_masks]

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, self.val_elbo)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, self.test_elbo, self.variate_masks)
        x, target = batch
        if self.test_iw is not None:
            with seeded(self.device, self.hparams.eval_seed + 7919 * (batch_idx + 1)):
                self.test_iw.update(iw_bound(self.ema, x, target, self.iw_samples, self.iw_chunk, self.variate_masks))
        if self.test_active_units is not None:
            self.test_active_units.update(self.ema.encode(x, use_mean=True))

    def _log_epoch(self, stage, metric):
        values = metric.compute()
        metric.reset()
        kl = values.pop("kl_per_group").reshape(-1)  # torchmetrics squeezes a one-group vector
        # The metrics are already reduced over ranks; sync_dist averages equal values (and tells Lightning so).
        self.log(f"{stage}/bpd", values.pop("bpd").float(), prog_bar=True, sync_dist=True)
        scalars = {f"{stage}/{k}": v.float() for k, v in values.items()}
        scalars.update({f"{stage}/kl/group_{t:02d}": v.float() for t, v in enumerate(kl)})
        self.log_dict(scalars, sync_dist=True)

    def on_validation_epoch_end(self):
        self._log_epoch("val", self.val_elbo)

    def on_test_epoch_end(self):
        self._log_epoch("test", self.test_elbo)
        if self.test_iw is not None:
            bound, stderr = self.test_iw.compute()
            self.test_iw.reset()
            ndims = self.vae.image_channels * self.vae.image_size**2
            iw = {"nats_per_image": -bound, "stderr_nats": stderr, "bpd": nats_to_bits(-bound / ndims)}
            self.log_dict({f"test/iw_{k}": v.float() for k, v in iw.items()}, sync_dist=True)
            self.log("test/iw_samples", self.iw_samples, sync_dist=True)
        if self.test_active_units is not None:
            active = self.test_active_units.compute().reshape(-1)  # torchmetrics squeezes a one-group vector
            self.test_active_units.reset()
            self.log_dict({f"test/active_units/group_{t:02d}": a.float() for t, a in enumerate(active)}, sync_dist=True)
            self.log("test/active_units_total", active.sum().float(), sync_dist=True)

    def on_train_start(self):
        # Built anew at each fit's first step: between fits Lightning may move the weights out of its buffers.
        self._whole_step = None
