"""Optional training behaviour: sample and reconstruction grids (labelled with what they show, the step and
the bits/dim at that step; vdvae.grids), the rate-per-group plot, `last.ckpt` as the latest state (also on
SIGTERM and crashes), the best checkpoints (Lightning's ModelCheckpoint confined to the run's checkpoints
folder). Images are saved in the run directory and sent, with their labels as captions, to the loggers
that take images (W&B, TensorBoard). The trainer's checkpoint plugin: atomic saves, weights-only loads,
removals of checkpoint files only. Progress over training's steps and eval.py's test images
(vdvae.progress), and the model's summary without Lightning's FLOPs (0 without an example input).
What a resume needs in a checkpoint is vdvae.resume's."""

import logging
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning import Callback  # noqa: E402
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch import callbacks  # noqa: E402
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, ProgressBar  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from PIL import Image  # noqa: E402

from vdvae import grids, sampling  # noqa: E402
from vdvae.checkpoints import save_atomically  # noqa: E402
from vdvae.data.base import first_images  # noqa: E402
from vdvae.lit_module import seeded  # noqa: E402
from vdvae.model import NonFiniteOutputError  # noqa: E402
from vdvae.progress import advance, progress  # noqa: E402

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with saves that are never left half-written and loads that run no code."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_atomically(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        # Checkpoints are data: whatever the caller or torch's default says, nothing is unpickled as code.
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path):
        # Lightning's removes recursively whatever the path names; a checkpoint is one file, never a folder.
        path = Path(path)
        if path.is_file() or path.is_symlink():
            path.unlink()
        elif path.exists():
            log.warning("%s is not a checkpoint file: not removed", path)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (the best `save_top_k` checkpoints by a metric), whose paths restored
    from a checkpoint are kept only where they name an existing file inside its own `dirpath`: Lightning
    deletes the kept checkpoints it replaces, and a crafted file (`<dirpath>/../../some_dir`) must not choose
    what; and a file removed after the checkpoint was saved (a crash between two saves) cannot be tested."""

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        named = [*self.best_k_models, self.best_model_path, self.kth_best_model_path, self.last_model_path]
        dropped = [p for p in dict.fromkeys(named) if p and not self._keeps(p)]
        self.best_k_models = {p: score for p, score in self.best_k_models.items() if p not in dropped}
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if getattr(self, name) in dropped:
                setattr(self, name, "")
        if not self.best_model_path:
            self.best_model_score = None
        if not self.kth_best_model_path and self.best_k_models:  # the worst kept one, as Lightning picks it
            pick = max if self.mode == "min" else min
            self.kth_best_model_path = pick(self.best_k_models, key=self.best_k_models.get)
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        for path in dropped:
            what = "no longer exists" if self._owns(path) else f"is not a file in {self.dirpath}"
            log.warning(
                "the checkpoint's record of kept checkpoints names %r, which %s: forgotten, never loaded or removed",
                path,
                what,
            )

    def _keeps(self, path) -> bool:
        return self._owns(path) and Path(path).is_file()

    def _owns(self, path) -> bool:
        """Whether `path` resolves (links and `..` followed) to an entry of this callback's own folder."""
        if not isinstance(path, str) or not path or self.dirpath is None:
            return False
        resolved = Path(path).resolve()
        return resolved.parent == Path(self.dirpath).resolve() and not resolved.is_dir()

    def _should_remove_checkpoint(self, trainer, previous, current):
        return self._owns(previous) and super()._should_remove_checkpoint(trainer, previous, current)


def log_image(trainer, key: str, path: Path, caption: str = ""):
    """Send a saved PNG to every logger that shows images: to W&B with its caption, to TensorBoard under the
    tag `key` (kept the same at every step, so that its step slider works) with the caption as text beside it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            captions = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step, **captions)
        elif isinstance(logger, TensorBoardLogger):
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            logger.experiment.add_image(key, array, trainer.global_step, dataformats="HWC")
            if caption:
                logger.experiment.add_text(f"{key}/caption", caption, trainer.global_step)


def metric_note(trainer, stage: str) -> list[str]:
    """The stage's bits/dim at this step, where the trainer has it, for a figure's title."""
    bpd = trainer.callback_metrics.get(f"{stage}/bpd")
    return [f"{stage} {float(bpd):.3f} bits/dim"] if bpd is not None else []


class ImageGrids(Callback):
    """Every `every_n_epochs` validations and after testing: EMA samples at each temperature, and
    reconstructions of validation images that keep the first k groups' posterior latents. Each grid is
    labelled (vdvae.grids): what it shows, the step, the stage's bits/dim, and for reconstructions the k of
    every row. During training, grids take at most `max_time_share` of the wall time (a validation's grids
    are skipped while those drawn so far took more), so their cost follows the model's size and the run's
    length."""

    def __init__(
        self,
        dirpath: str,
        n_samples: int = 36,
        temperatures=(1.0, 0.8, 0.0),
        n_recon: int = 8,
        every_n_epochs: int = 1,
        max_time_share: float = 0.1,
        recon_temperature: float = 0.1,
    ):
        self.dirpath, self.n_samples, self.temperatures = Path(dirpath), n_samples, list(temperatures)
        self.n_recon, self.every_n_epochs, self.max_time_share = n_recon, every_n_epochs, max_time_share
        self.recon_temperature = recon_temperature
        self._started, self._spent = time.monotonic(), 0.0

    def on_train_start(self, trainer, module):
        self._started, self._spent = time.monotonic(), 0.0

    # The *_end hooks run after the module's epoch-end hooks: the stage's bits/dim at this step is logged.
    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._spent > self.max_time_share * (time.monotonic() - self._started):
            log.debug("step %d: no image grids (they took %.0f s so far)", trainer.global_step, self._spent)
            return
        self.write(trainer, module, trainer.datamodule.val_set, "val")

    def on_test_end(self, trainer, module):
        self.write(trainer, module, trainer.datamodule.test_set, "test")

    @rank_zero_only
    def write(self, trainer, module, dataset, stage):
        started = time.monotonic()
        try:
            self.draw(trainer, module, dataset, stage)
        except NonFiniteOutputError as error:  # the stall guard deals with the run; keep it going until then
            log.warning("step %d: %s; no %s image grids", trainer.global_step, error, stage)
        self._spent += time.monotonic() - started

    def draw(self, trainer, module, dataset, stage):
        vae, step = module.ema, trainer.global_step
        note = [f"step {step}", *metric_note(trainer, stage)]
        with seeded(module.device, 0):
            for t in self.temperatures:
                images = sampling.sample_images(vae, self.n_samples, t)
                title = [f"{stage} samples", f"t={t:g}", *note]
                target = self.dirpath / f"{stage}_samples_t{t:g}_step{step:07d}.png"
                self.save(trainer, f"{stage}/samples_t{t:g}", target, images, math.ceil(self.n_samples**0.5), title)
            originals = first_images(dataset, self.n_recon)
            x, _ = trainer.datamodule.preprocess(originals.to(module.device))
            ks = sampling.default_ks(vae.n_groups)
            rows = sampling.reconstructions(vae, x, ks, self.recon_temperature)
            labels = ["input"] + [sampling.k_label(k, vae.n_groups) for k in ks]
            title = [
                f"{stage} reconstructions",
                *note,
                f"row k: the first k groups from the posterior, the rest drawn at t={self.recon_temperature:g}",
            ]
            target = self.dirpath / f"{stage}_reconstructions_step{step:07d}.png"
            self.save(trainer, f"{stage}/reconstructions", target, torch.cat([originals, *rows]), len(x), title, labels)
        log.info("%s image grids (rows: data, then k = %s posterior groups kept) in %s", stage, ks, self.dirpath)

    @staticmethod
    def save(trainer, key, target, images, ncol, title, rows=()):
        part = grids.Part(images, ncol, rows=list(rows))
        grids.save_figure(target, [part], title)
        log_image(trainer, key, target, grids.caption([part], title))


class RatePerGroupPlot(Callback):
    """A bar chart of the KL (rate) of every latent group after each validation and after testing."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    # The *_end hooks run after the module's epoch-end hooks, which log the per-group KL.
    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.write(trainer, module, "val")

    def on_test_end(self, trainer, module):
        self.write(trainer, module, "test")

    @rank_zero_only
    def write(self, trainer, module, stage):
        prefix = f"{stage}/kl/group_"
        logged = {int(k[len(prefix) :]): v for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}
        if not logged:
            return
        kl = np.array([float(logged[t]) for t in sorted(logged)])
        self.dirpath.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(6, len(kl) * 0.15), 3))
        ax.bar(range(len(kl)), kl)
        title = f"{stage} rate per group, step {trainer.global_step}"
        ax.set(xlabel="latent group (top-down)", ylabel="KL (nats per image)", title=title)
        fig.tight_layout()
        path = self.dirpath / f"{stage}_rate_per_group_step{trainer.global_step:07d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        log_image(trainer, f"{stage}/rate_per_group", path, title)
        for logger in trainer.loggers:  # and as a native W&B bar chart of a table, beside the scalars
            if isinstance(logger, WandbLogger):
                import wandb

                table = wandb.Table(data=[[t, float(v)] for t, v in enumerate(kl)], columns=["group", "kl_nats"])
                chart = wandb.plot.bar(table, "group", "kl_nats", title=f"{stage} KL per latent group (nats/image)")
                logger.log_metrics({f"{stage}/kl_per_group": chart}, step=trainer.global_step)


def _kept(trainer) -> tuple:
    """The best checkpoints kept now (last.ckpt must name these, not ones already replaced)."""
    best = getattr(trainer, "checkpoint_callback", None)
    return (best.best_model_path, *best.best_k_models) if best is not None else ()


class LastCheckpoint(Checkpoint):
    """`last.ckpt` is always the latest state: written every `every_n_train_steps` updates and every
    `train_time_interval` seconds (what a kill -9 can lose), after every validation, also after a step
    saved already where the best checkpoints changed (Lightning runs checkpoint callbacks last, in their
    order, and the best's comes first in conf/callbacks, saving after validation too: last.ckpt names
    the best checkpoints that exist), at the end of
    training (also when the stall guard stops it), and on SIGTERM or an exception in training, except
    where the exception cut an update short (the state would mix two) or struck one process of several.
    Lightning's ModelCheckpoint writes `last` only at its own save events, so a run that ends between
    them (max_steps mid-epoch, a stall) would leave its final state unsaved; the best weights are
    ModelCheckpoint's job."""

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None, train_time_interval: float | None = None):
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps, self.train_time_interval = every_n_train_steps, train_time_interval
        self._saved_step, self._saved_time, self._saved_kept = -1, time.monotonic(), None
        self._stepped = False  # whether this process trained: before that, last.ckpt already holds the state

    def save(self, trainer):
        """Save unless last.ckpt holds this step and these best checkpoints already."""
        if (trainer.global_step, _kept(trainer)) != (self._saved_step, self._saved_kept):
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step, self._saved_time = trainer.global_step, time.monotonic()
            self._saved_kept = _kept(trainer)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._stepped = True
        by_steps = self.every_n_train_steps and trainer.global_step % self.every_n_train_steps == 0
        by_time = bool(self.train_time_interval) and time.monotonic() - self._saved_time >= self.train_time_interval
        if trainer.world_size > 1:  # every rank takes part in a save: rank 0's clock decides, every 50 steps
            by_time = trainer.global_step % 50 == 0 and trainer.strategy.broadcast(by_time)
        # The final step is saved here, not in on_train_end, where Lightning already counts the epoch as done:
        # a run stopped mid-epoch (max_steps, the stall guard) resumes in that epoch.
        last = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        if by_steps or by_time or last:
            self.save(trainer)

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.save(trainer)

    def on_train_end(self, trainer, module):
        self.save(trainer)

    def on_exception(self, trainer, module, exception):
        # A failure before the first step of this process (a resume that cannot restore its state) leaves
        # last.ckpt as it was: it already holds the latest state, which a save now could only spoil.
        if trainer.state.fn != "fit" or trainer.global_step == 0 or not self._stepped:
            return
        what = "stopped" if isinstance(exception, SIGTERMException) else type(exception).__name__  # (the signal: said)
        kept = f"{self.path} keeps the state last saved"
        if module.applying_update:  # a second Ctrl-C, a crash inside the optimizer's step
            log.error(
                "%s in the middle of update %d: not saved (it would mix two updates); %s",
                what,
                trainer.global_step,
                kept,
            )
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            # A failure of one process: a save needs every process, and the others are in the step.
            log.error(
                "%s at step %d in one of %d processes: not saved; %s",
                what,
                trainer.global_step,
                trainer.world_size,
                kept,
            )
            return
        self._saved_step = -1
        try:
            self.save(trainer)
        except Exception as error:  # the failure being handled is the one to report
            log.error("%s at step %d, and %s could not be saved: %s", what, trainer.global_step, self.path, error)
            return
        log.warning(
            "%s at step %d: saved %s; resume with ckpt_path=%s", what, trainer.global_step, self.path, self.path
        )


class LoopsListen(Callback):
    """Tells a stop controller (vdvae.lifecycle.StopController) when Lightning sets up and runs a loop,
    and lets the processes of a training run agree on a stop at the end of each step (`controller.agree`).
    Not carried into processes Lightning spawns (ddp_spawn): they stop with the process that spawned them."""

    def __init__(self, controller):
        self.controller = controller

    def __getstate__(self):
        return {"controller": None}

    def setup(self, trainer, module, stage):
        if self.controller is not None:
            self.controller.listen(trainer)

    def on_sanity_check_start(self, trainer, module):
        self.setup(trainer, module, None)

    on_train_start = on_validation_start = on_test_start = on_sanity_check_start

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.controller is not None and trainer.world_size > 1:
            self.controller.agree(trainer)

    def teardown(self, trainer, module, stage):
        if self.controller is not None:
            self.controller.listen(None)


class _Progress:
    """Progress shown by a callback (vdvae.progress), closed as its stage ends or fails."""

    bar = None

    def on_exception(self, trainer, module, exception):
        self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EvaluationProgress(_Progress, Callback):
    """Progress over the test images on rank 0 (vdvae.progress: images/s and the time left; a bar on a
    terminal, else lines). eval.py uses it instead of Lightning's bar, which counts batches and writes its
    redraws into logs and pipes."""

    def on_test_start(self, trainer, module):
        if trainer.is_global_zero:
            self.bar = progress(self.images(trainer), "evaluating")

    @staticmethod
    def images(trainer) -> int:
        """The test images this rank scores: its shard of each test loader, as far as limit_test_batches goes."""
        loaders, total = trainer.test_dataloaders, 0
        loaders = loaders if isinstance(loaders, list) else [loaders]
        for loader, batches in zip(loaders, trainer.num_test_batches, strict=True):
            n = len(loader.sampler)
            if math.isfinite(batches) and loader.batch_size:
                n = min(n, int(batches) * loader.batch_size)
            total += n
        return total

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        advance(self.bar, len(batch[0]))

    def on_test_end(self, trainer, module):
        self.close()


class TrainingProgress(_Progress, ProgressBar):
    """Training's progress in updates out of trainer.max_steps, with a recent update's bits/dim (vdvae.progress:
    a bar on a terminal, else a line every 30 s). Lightning's bar counts an epoch's batches (`Epoch 7/-2`
    where a run is bounded by steps) and leaves its redraws in logs and pipes."""

    # Seconds between two reads of the bits/dim: a read waits for the device to finish the step.
    READ_EVERY = 1.0

    def __init__(self):
        super().__init__()
        self.enabled, self.read_at = True, -math.inf

    def disable(self):
        self.enabled = False

    def enable(self):
        self.enabled = True

    def on_train_start(self, trainer, module):
        if trainer.is_global_zero and self.enabled:
            total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            self.bar = progress(int(total), "training", unit="step", initial=trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.bar is None:
            return
        bpd = trainer.callback_metrics.get("train/bpd")
        if bpd is not None and time.monotonic() - self.read_at >= self.READ_EVERY:
            self.read_at = time.monotonic()
            self.bar.set_postfix_str(f"train/bpd {float(bpd):.4f}", refresh=False)
        advance(self.bar, trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, module):
        self.close()


class ModelSummary(callbacks.ModelSummary):
    """Lightning's summary of the module's parts, without its FLOPs column and total (counted only for a model
    with an example input, which a VAE has not: always 0)."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, *_, **__):
        parts = zip(*(dict(summary_data)[column] for column in ("Name", "Type", "Params")), strict=True)
        rows = [f"  {name:<12} {kind:<14} {params:>8}" for name, kind, params in parts]
        log.info(
            "the module's parts:\n%s\n  %s parameters (%s trainable), %.1f MB",
            "\n".join(rows),
            f"{total_parameters:,}",
            f"{trainable_parameters:,}",
            model_size,
        )
