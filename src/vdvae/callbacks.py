"""Optional training behaviour: sample and reconstruction grids, the rate-per-group plot, and a
checkpoint on SIGTERM (SLURM pre-emption). Images are saved in the run directory and sent to the
loggers that take images (W&B, TensorBoard)."""

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning import Callback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_only  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from PIL import Image  # noqa: E402

from vdvae import sampling  # noqa: E402
from vdvae.lit_module import seeded  # noqa: E402

log = logging.getLogger(__name__)


def log_image(trainer, key: str, path: Path):
    """Send a saved PNG to every logger that shows images."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
            logger.experiment.add_image(key, array, trainer.global_step, dataformats="HWC")


class ImageGrids(Callback):
    """Every `every_n_epochs` validations and after testing: EMA samples at each temperature, and
    reconstructions of validation images that keep the first k groups' posterior latents."""

    def __init__(
        self, dirpath: str, n_samples: int = 36, temperatures=(1.0, 0.8, 0.0), n_recon: int = 8, every_n_epochs: int = 1
    ):
        self.dirpath, self.n_samples, self.temperatures = Path(dirpath), n_samples, list(temperatures)
        self.n_recon, self.every_n_epochs = n_recon, every_n_epochs

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.write(trainer, module, trainer.datamodule.val_set, "val")

    def on_test_epoch_end(self, trainer, module):
        self.write(trainer, module, trainer.datamodule.test_set, "test")

    @rank_zero_only
    def write(self, trainer, module, dataset, stage):
        vae, step = module.ema, trainer.global_step
        with seeded(module.device, 0):
            paths = sampling.sample_grids(vae, self.n_samples, self.temperatures, self.dirpath / "tmp")
            for t, path in zip(self.temperatures, paths, strict=True):
                target = self.dirpath / f"{stage}_samples_t{t:g}_step{step:07d}.png"
                path.replace(target)
                log_image(trainer, f"{stage}/samples_t{t:g}", target)
            originals = torch.stack([dataset[i] for i in range(min(self.n_recon, len(dataset)))]).to(module.device)
            x, _ = trainer.datamodule.preprocess(originals)
            ks = sorted({0, 1, vae.n_groups // 4, vae.n_groups // 2, vae.n_groups})
            path = sampling.reconstruction_grid(vae, originals, x, ks, 0.1, self.dirpath / "tmp")
            target = self.dirpath / f"{stage}_reconstructions_step{step:07d}.png"
            path.replace(target)
            (self.dirpath / "tmp").rmdir()
            log_image(trainer, f"{stage}/reconstructions", target)
            log.info("%s image grids (rows: data, then k = %s posterior groups kept) in %s", stage, ks, self.dirpath)


class RatePerGroupPlot(Callback):
    """A bar chart of the KL (rate) of every latent group after each validation and after testing."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    # The *_end hooks run after the module's epoch-end hooks, which compute the per-group KL.
    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.write(trainer, module, "val")

    def on_test_end(self, trainer, module):
        self.write(trainer, module, "test")

    @rank_zero_only
    def write(self, trainer, module, stage):
        kl = module.last_kl_per_group.get(stage)
        if kl is None:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(max(6, len(kl) * 0.15), 3))
        ax.bar(range(len(kl)), kl.numpy())
        ax.set(xlabel="latent group (top-down)", ylabel="KL (nats per image)", title=f"{stage} rate per group")
        fig.tight_layout()
        path = self.dirpath / f"{stage}_rate_per_group_step{trainer.global_step:07d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        log_image(trainer, f"{stage}/rate_per_group", path)


class CheckpointOnSigterm(Callback):
    """On SIGTERM (SLURM pre-emption, `scancel`), save `last.ckpt` before the process exits."""

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "last.ckpt"

    def on_exception(self, trainer, module, exception):
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: saved %s; resume with ckpt_path=%s", self.path, self.path)


class BpdCurve(Callback):
    """Validation (and running training) bits/dim against the step, plotted after every validation."""

    def __init__(self, dirpath: str):
        self.dirpath, self.steps, self.val, self.train = Path(dirpath), [], [], []

    def on_validation_end(self, trainer, module):
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/bpd" not in metrics:
            return
        self.steps.append(trainer.global_step)
        self.val.append(float(metrics["val/bpd"]))
        self.train.append(float(metrics.get("train/bpd", float("nan"))))
        self.write(trainer)

    @rank_zero_only
    def write(self, trainer):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.train, "o-", label="train (last step, online weights)")
        ax.plot(self.steps, self.val, "o-", label="validation (EMA weights)")
        ax.set(xlabel="step", ylabel="bits per dim (negative ELBO)")
        ax.legend()
        fig.tight_layout()
        path = self.dirpath / "bpd_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        log_image(trainer, "val/bpd_curve", path)

    def state_dict(self):
        return {"steps": self.steps, "val": self.val, "train": self.train}

    def load_state_dict(self, state):
        self.steps, self.val, self.train = state["steps"], state["val"], state["train"]
