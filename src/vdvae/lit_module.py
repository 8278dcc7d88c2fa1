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
import random

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

from vdvae.metrics import ActiveUnits, ELBOMetric, IWMetric, iw_bound
from vdvae.model import VAE
from vdvae.model.likelihoods import nats_to_bits
from vdvae.sweeps import TrainingStalled
from vdvae.whole_step import compile_whole_step, unavailable_reason

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
        data_config: dict | None = None,
        accumulate_grad_batches: int = 1,
        iw_samples: int = 0,
        iw_chunk: int = 64,
        active_units: bool = False,
        variate_masks: list | None = None,
    ):
        """`data_config`: the data module's config, stored in checkpoints (not in the hyperparameters) so
        that evaluation and sampling find the data the model was trained on. `accumulate_grad_batches`
        (`trainer.accumulate_grad_batches`, a training option): how many parts each training batch is split
        into, one forward and backward pass each, for one update. The test set's extras (not
        hyperparameters either): `iw_samples` > 0 adds the importance-weighted bound with that many samples
        (`iw_chunk` at a time), `active_units` counts them per group, and `variate_masks` (one bool (zdim,)
        tensor per group, vdvae.pruning) makes the test ELBO keep only those posterior variates."""
        super().__init__()
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
        # The loggers get the whole run config once, from train().
        self.save_hyperparameters(
            ignore=[
                "data_config",
                "accumulate_grad_batches",
                "iw_samples",
                "iw_chunk",
                "active_units",
                "variate_masks",
            ],
            logger=False,
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
        self.data_config = data_config
        self.accumulate_grad_batches = accumulate_grad_batches
        self._stalled, self._stall_warned = None, False
        self._restored_rng = self._restored_cosine_length = None
        self._whole_step = None  # built at the first training step (after a resume has loaded the optimizer)
        # From the optimizer's step to the schedule's: stopped in between, the state mixes two updates.
        self.applying_update = False

    def configure_model(self):
        if self.hparams.compile:
            self.vae.compile()

    def configure_optimizers(self):
        h = self.hparams
        if h.optimizer == "adamw":
            # Fused: one kernel for all parameters, and it honours `found_inf`, so a skipped update
            # needs no decision on the host.
            optimizer = torch.optim.AdamW(
                self.vae.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay, fused=True
            )
        else:  # Adamax: u = max(beta2 * u, |g| + eps), p -= lr / (1 - beta1^t) * m / u; weight decay as L2
            optimizer = torch.optim.Adamax(
                self.vae.parameters(), lr=h.lr, betas=tuple(h.betas), eps=h.eps, weight_decay=h.weight_decay
            )
        self.check_schedule()
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def check_schedule(self, max_steps: int | None = None):
        """A cosine needs a length: refused before training (train.py calls this before any output, with the
        trainer's max_steps; configure_optimizers with its trainer's), not once warm-up is over."""
        if self.hparams.lr_schedule == "cosine":
            self._decay_steps(max_steps)

    def _lr_factor(self, step: int) -> float:
        """The learning rate over `lr`: linear warm-up over `warmup_steps`, then constant, or with
        `lr_schedule=cosine` constant up to `decay_start` (default: the end of warm-up), then half a cosine
        down to `lr_min`, then `lr_min`. With `cosine_phase=start` the cosine's phase counts from
        `decay_start`: it takes `decay_steps` updates (default: up to `trainer.max_steps`). With
        `cosine_phase=zero` (Efficient-VDVAE's PyTorch code) its phase counts from step 0: it reaches
        `lr_min` at step `decay_steps` (default: `trainer.max_steps`), and is scaled to continue from the peak
        at `decay_start` (torch's CosineAnnealingLR recursion there, in closed form)."""
        h = self.hparams
        warmup = max(h.warmup_steps, 1)
        if step < warmup or h.lr_schedule == "constant":
            return min(1.0, step / warmup)
        start, decay = self._decay_start(), self._decay_steps()
        if step < start:
            return 1.0
        floor = h.lr_min / h.lr
        if h.cosine_phase == "zero":
            # lr(t) - lr_min = (lr(t-1) - lr_min) (1 + cos(pi t / T)) / (1 + cos(pi (t-1) / T)) from the peak at
            # t = decay_start - 1 telescopes to this; held at lr_min after T, as its float32 rate stays there.
            cosine = (1 + math.cos(math.pi * min(step, decay) / decay)) / (1 + math.cos(math.pi * (start - 1) / decay))
        else:
            cosine = 0.5 * (1 + math.cos(math.pi * min(step - start, decay) / decay))
        return floor + (1 - floor) * cosine

    def _decay_start(self) -> int:
        return max(self.hparams.warmup_steps, 1, self.hparams.decay_start or 0)

    def _decay_steps(self, max_steps: int | None = None) -> int:
        """With `cosine_phase=start` the cosine's length: `decay_steps`, or the updates after its start up to
        `trainer.max_steps` (at least 1: a run that ends before the cosine starts never reaches it). With
        `cosine_phase=zero` the step it ends at: `decay_steps`, or `trainer.max_steps` (at least its start).
        `max_steps`: trainer.max_steps where the module has no trainer yet (a check before training)."""
        h = self.hparams
        max_steps = self.trainer.max_steps if max_steps is None else max_steps
        zero = h.cosine_phase == "zero"
        if h.decay_steps:
            if zero and h.decay_steps < self._decay_start():
                raise ValueError(
                    f"model.cosine_phase=zero counts the cosine from step 0, so model.decay_steps={h.decay_steps} "
                    f"(the step it reaches model.lr_min) must be at least where it starts, model.decay_start "
                    f"(here {self._decay_start()}): raise model.decay_steps, or use model.cosine_phase=start"
                )
            return h.decay_steps
        if max_steps is None or max_steps < 0:
            raise ValueError("model.lr_schedule=cosine needs model.decay_steps or a trainer.max_steps")
        if zero:
            return max(self._decay_start(), max_steps)
        return max(1, max_steps - self._decay_start())

    def training_step(self, batch, batch_idx):
        x, target = batch
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        if self._whole_step is None:
            self._whole_step = self._build_whole_step(optimizer.optimizer)
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
        self.log_dict(
            {
                "train/loss": stats["loss"],
                "train/bpd": stats["bpd"],
                "train/distortion": stats["distortion"],
                "train/rate": stats["rate"],
                "train/grad_norm": stats["grad_norm"],
                "train/skipped": stats["skipped"],
                "train/skipped_total": self.skipped_steps.float(),
                "train/skip_rate": self.skipped_steps.float() / self.attempted_steps,
            },
            prog_bar=False,
            on_step=True,
            on_epoch=False,
        )
        self.log("train/bpd_avg", stats["bpd"], prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        return stats["loss"]

    def _build_whole_step(self, optimizer):
        """With `cuda_graphs`, the whole step compiled for CUDA graphs; else (or where it cannot run, with a
        warning saying why) False: the eager step."""
        if not self.hparams.cuda_graphs:
            return False
        reason = unavailable_reason(self)
        if reason:
            rank_zero_warn(f"model.cuda_graphs=true: {reason}; training runs the eager step instead")
            return False
        return compile_whole_step(self, optimizer, mode="reduce-overhead")

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
        """What training minimizes, and the KL's weight in it: the mean loss, or with Efficient-VDVAE's KL
        warm-up and balancing (which change the objective, not the logged ELBO) the reweighted one. `step`
        is the update's 1-based number, a tensor: the weights are decided on the device."""
        h = self.hparams
        loss = out.loss.mean()
        if not (h.kl_warmup_steps or h.kl_balancing_steps):
            return loss, torch.ones_like(loss)
        rate = out.rate
        if h.kl_balancing_steps:  # weights while step <= kl_balancing_steps
            weights = torch.where(step <= h.kl_balancing_steps, kl_balance(out.kl, self.group_variates), 1.0)
            rate = (out.kl * weights).sum(dim=1) / out.ndims
        kl_weight = torch.ones_like(loss)
        if h.kl_warmup_steps:
            kl_weight = torch.clamp(step.float() / h.kl_warmup_steps, max=1.0)
        return (out.distortion + kl_weight * rate).mean(), kl_weight

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
        n, h = int(self.consecutive_skips), self.hparams
        if n < h.skip_warn_after:
            self._stall_warned = False
        elif not self._stall_warned:
            self._stall_warned = True
            rank_zero_warn(
                f"{n} consecutive updates skipped (grad norm {float(grad_norm):.1f} vs model.skip_threshold="
                f"{h.skip_threshold}); training makes no progress while this lasts"
            )
        if n >= h.max_consecutive_skips:
            self._stalled = (
                f"stopped: {n} consecutive updates were skipped (last grad norm {float(grad_norm):.1f}, "
                f"model.skip_threshold={h.skip_threshold}). Raise model.skip_threshold, lower model.lr, or resume "
                f"from an earlier checkpoint; model.max_consecutive_skips={h.max_consecutive_skips} sets this limit."
            )
            log.error(self._stalled)
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
        ndims = self.vae.image_channels * self.vae.image_size**2
        if self.test_iw is not None:
            bound, stderr = self.test_iw.compute()
            self.test_iw.reset()
            self.log_dict(
                {
                    "test/iw_nats_per_image": -bound.float(),
                    "test/iw_stderr_nats": stderr.float(),
                    "test/iw_bpd": nats_to_bits(-bound / ndims).float(),
                    "test/iw_samples": self.iw_samples,
                },
                sync_dist=True,
            )
        if self.test_active_units is not None:
            active = self.test_active_units.compute().reshape(-1)  # torchmetrics squeezes a one-group vector
            self.test_active_units.reset()
            self.log_dict({f"test/active_units/group_{t:02d}": a.float() for t, a in enumerate(active)}, sync_dist=True)
            self.log("test/active_units_total", active.sum().float(), sync_dist=True)

    # Exact resume: the RNG state of every rank travels with the checkpoint.
    def on_save_checkpoint(self, checkpoint):
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)  # weights-only safe
        state = {
            "torch": torch.get_rng_state(),
            "numpy": numpy_state,
            "python": random.getstate(),
            # This process's own GPU only: a resume on a machine with fewer GPUs, or with this rank on
            # another device index, restores it all the same.
            "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        }
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["rng_states"] = states
        if self.hparams.lr_schedule == "cosine":  # its length may follow trainer.max_steps: see on_train_start
            checkpoint["cosine_length"] = self._decay_steps()
        if self.data_config is not None:
            checkpoint["data_config"] = self.data_config

    def on_load_checkpoint(self, checkpoint):
        self._restored_rng = checkpoint.get("rng_states")
        self._restored_cosine_length = checkpoint.get("cosine_length")

    def _configured_optimizer_settings(self):
        """The optimizer's settings as this run configures them (model.lr, betas, eps, weight_decay), also
        where a resumed optimizer state brought the ones it was saved with: resuming with a lower model.lr
        is how a diverging run is rescued. Unchanged settings are left as restored (an exact resume)."""
        h = self.hparams
        optimizer, schedule = self.optimizers().optimizer, self.lr_schedulers()
        wanted = {"betas": tuple(h.betas), "eps": h.eps, "weight_decay": h.weight_decay}
        changed = {}
        for group in optimizer.param_groups:
            for key, value in wanted.items():
                if (tuple(group[key]) if key == "betas" else group[key]) != value:
                    changed[key] = (group[key], value)
                    group[key] = value
        if any(base != h.lr for base in schedule.base_lrs):
            changed["lr"] = (schedule.base_lrs[0], h.lr)
            schedule.base_lrs = [h.lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"] = h.lr
                group["lr"] = h.lr * self._lr_factor(schedule.last_epoch)
            schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
        for key, (before, now) in changed.items() if self.trainer.is_global_zero else ():
            log.warning("resuming with model.%s=%s (the checkpoint's optimizer had %s)", key, now, before)

    def _warn_if_the_cosine_changed(self):
        """A cosine whose length follows trainer.max_steps changes under a resume with another max_steps, and
        the learning rate jumps at once: say so, and how to keep the saved schedule."""
        before, self._restored_cosine_length = self._restored_cosine_length, None
        if not isinstance(before, int) or self.hparams.lr_schedule != "cosine" or not self.trainer.is_global_zero:
            return
        now = self._decay_steps()
        if now != before:
            log.warning(
                "the cosine schedule's length is %d now, %d when the checkpoint was saved (trainer.max_steps changed): "
                "the learning rate changes at once; model.decay_steps=%d keeps the saved schedule",
                now,
                before,
                before,
            )

    def on_train_start(self):
        # Built anew at each fit's first step: between fits Lightning may move the weights out of its buffers.
        self._whole_step = None
        self._configured_optimizer_settings()
        self._warn_if_the_cosine_changed()
        states = self._restored_rng
        if states and len(states) == self.trainer.world_size:
            state = states[self.global_rank]
            torch.set_rng_state(state["torch"])
            name, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(state["python"])
            if state["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state(_own_cuda_state(state["cuda"]))
        elif self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + self.global_rank)  # distinct noise on every rank
        self._restored_rng = None


def _own_cuda_state(states: list):
    """This process's GPU's generator state among a checkpoint's: its one state, or, in checkpoints that
    stored every visible GPU's, this device's (the first where the saving machine had fewer)."""
    if len(states) == 1:
        return states[0]
    index = torch.cuda.current_device()
    return states[index] if index < len(states) else states[0]
