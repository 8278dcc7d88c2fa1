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
from torchvision.utils import make_grid, save_image  # noqa: E402

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
        self.dirpath.mkdir(parents=True, exist_ok=True)
        vae, step = module.ema, trainer.global_step
        with torch.random.fork_rng(devices=[module.device] if module.device.type == "cuda" else []):
            torch.manual_seed(0)
            for t in self.temperatures:
                images = vae.sample(self.n_samples, t)
                path = self.dirpath / f"{stage}_samples_t{t:g}_step{step:07d}.png"
                save_image(make_grid(images.float() / 255, nrow=int(self.n_samples**0.5), pad_value=1), path)
                log_image(trainer, f"{stage}/samples_t{t:g}", path)
            originals = torch.stack([dataset[i] for i in range(min(self.n_recon, len(dataset)))]).to(module.device)
            x, _ = trainer.datamodule.preprocess(originals)
            ks = sorted({0, 1, vae.n_groups // 4, vae.n_groups // 2, vae.n_groups})
            rows = [originals.cpu()] + [vae.reconstruct(x, k=k, temperature=0.1 if k else 1.0).cpu() for k in ks]
            path = self.dirpath / f"{stage}_reconstructions_step{step:07d}.png"
            save_image(make_grid(torch.cat(rows).float() / 255, nrow=len(originals), pad_value=1), path)
            log_image(trainer, f"{stage}/reconstructions", path)
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
