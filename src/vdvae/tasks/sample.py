"""The sampling recipe behind sample.py: one `mode` per run, outputs in the run directory.

samples      grids at each of `temperatures` (no data needed)
reconstruct  images and their reconstructions from the first k groups, for each k in `ks`
interpolate  between consecutive pairs of images, in the posterior means of every group
encode       the images' latents to latents.pt (format: vdvae.sampling)
decode       images from a latents file (`latents=...`), the groups it lacks drawn at `temperatures[0]`
overview     one figure: a row of samples at each of `temperatures`, then the images and their
             reconstructions from the first k groups for each k in `ks` (default 0, 1, 2, 4 and all)
Images come from `inputs` (files or folders) or else from the checkpoint's test set. The model sees
`batch_size` images per pass (samples, reconstruct, encode, decode, overview). `temperatures` left null
takes the mode's default (`MODE_TEMPERATURES`). Every grid is labelled (vdvae.grids): the checkpoint's step,
the temperature, the k of each row, the inputs' bits/dim. On a terminal a bar shows the images done,
images/s and the time left (vdvae.progress). Outputs appear whole or not at all.
"""

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from vdvae import run_folder, sampling
from vdvae.checkpoints import data_module, load_module
from vdvae.config import check_mode, wanted_value
from vdvae.data.base import first_images
from vdvae.grids import Part, save_figure
from vdvae.lifecycle import checked_before_start, no_run_dir_on_failure
from vdvae.progress import progress

log = logging.getLogger(__name__)

# `temperatures: null` means these, by mode; decode and reconstruct use the first.
MODE_TEMPERATURES = {"samples": [1.0, 0.9, 0.8, 0.6, 0.0], "overview": [1.0, 0.8, 0.6, 0.0]}
DEFAULT_TEMPERATURES = [1.0]


def input_images(cfg, vae, checkpoint, device):
    """uint8 images, model inputs and likelihood targets: from `inputs`, else the first `n_images` of the
    test set."""
    datamodule, _ = data_module(checkpoint, cfg.ckpt_path, cfg.get("data"))
    if cfg.inputs:
        images = sampling.read_images(list(cfg.inputs), vae.image_size, vae.image_channels)[: cfg.n_images]
    else:
        datamodule.setup("test")
        images = first_images(datamodule.test_set, cfg.n_images)
    images = images.to(device)
    return (images, *datamodule.preprocess(images))


def check_batch_size(value):
    """`batch_size`: a whole number of images per pass, or null (None) for the model's default."""
    if wanted_value(value, "int", 1, nullable=True) is not None:
        raise ValueError(f"batch_size={value!r}: give a positive whole number of images per pass, or null")
    return value


def mode_temperatures(cfg) -> list:
    """`temperatures`, or the mode's default where it is null."""
    if cfg.temperatures is None:
        return list(MODE_TEMPERATURES.get(cfg.mode, DEFAULT_TEMPERATURES))
    return OmegaConf.to_container(cfg.temperatures)


def checkpoint_note(checkpoint: dict, use_ema: bool) -> list[str]:
    """What a title says of the weights: the checkpoint's training step if known, and which weights."""
    if isinstance(checkpoint.get("global_step"), int):
        where = f"step {checkpoint['global_step']}"
    else:
        where = "imported weights" if "imported_from" in checkpoint else "step unknown"
    return [where, "EMA weights" if use_ema else "raw weights"]


def sample(cfg: DictConfig) -> list[Path]:
    # Everything that reads the request's files runs first: a mistake leaves no run directory behind.
    with no_run_dir_on_failure():
        if not checked_before_start():  # else checked with the checkpoint before the run directory existed
            check_mode(cfg)
        check_batch_size(cfg.batch_size)
        module, checkpoint = load_module(cfg.ckpt_path)
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        vae = (module.ema if cfg.use_ema else module.vae).to(device)
        batch_size = cfg.batch_size or sampling.chunk_size(vae)
        too_many = [k for k in cfg.ks or () if k > vae.n_groups]
        if too_many:
            raise ValueError(f"ks={list(cfg.ks)}: this model has {vae.n_groups} latent groups; k={too_many[0]} is more")
        images = inputs = targets = latents = None
        if cfg.mode == "decode":
            latents = sampling.load_latents(vae, Path(cfg.latents))  # checked whole, kept on the CPU
        elif cfg.mode != "samples":
            images, inputs, targets = input_images(cfg, vae, checkpoint, device)
            if cfg.mode == "interpolate" and len(images) < 2:
                raise ValueError(f"mode=interpolate needs two images or more; the inputs hold {len(images)}")
    out = run_folder.current()
    job = Job(cfg, vae, out, batch_size, mode_temperatures(cfg), checkpoint_note(checkpoint, cfg.use_ema))
    torch.manual_seed(cfg.seed)
    if cfg.mode == "samples":
        return job.samples()
    if cfg.mode == "decode":
        return job.decode(latents)
    if cfg.mode == "interpolate":
        return job.interpolate(inputs)
    if cfg.mode == "encode":
        return job.encode(images, inputs)
    if cfg.mode == "reconstruct":
        return job.reconstruct(images, inputs, targets)
    return job.overview(images, inputs, targets)


class Job:
    """One mode's work: the images it draws, the labelled figures it writes (and their progress bars)."""

    def __init__(self, cfg, vae, out: Path, batch_size: int, temperatures: list, note: list[str]):
        self.cfg, self.vae, self.out, self.batch_size = cfg, vae, out, batch_size
        self.temperatures, self.note = temperatures, note

    def ks(self, default) -> list[int]:
        return list(self.cfg.ks) if self.cfg.ks else default(self.vae.n_groups)

    def k_labels(self, ks) -> list[str]:
        return ["input"] + [sampling.k_label(k, self.vae.n_groups) for k in ks]

    def inputs_bpd(self, inputs, targets) -> str:
        """The shown inputs' negative ELBO, for a title (drawn after the figure's images: seeds stay as they were)."""
        bpd = sampling.bits_per_dim(self.vae, inputs, targets, self.batch_size)
        return f"inputs {bpd:.3f} bits/dim (negative ELBO)"

    def samples(self) -> list[Path]:
        n, ncol, paths = self.cfg.n, math.ceil(self.cfg.n**0.5), []
        with progress(n * len(self.temperatures), "sampling") as bar:
            for t in self.temperatures:
                label = sampling.temperature_label(t)
                grid = sampling.sample_images(self.vae, n, t, self.batch_size, bar)
                title = ["samples", f"t={label}", *self.note]
                paths.append(sampling.save_grid(grid, self.out / f"samples_t{label}.png", ncol, title))
        return paths

    def decode(self, latents) -> list[Path]:
        t, given = self.temperatures[0], len(latents)
        with progress(len(latents[0]), "decoding") as bar:
            images = sampling.decode_latents(self.vae, latents, t, self.batch_size, bar)
        drawn = "the rest and the pixels" if given < self.vae.n_groups else "the pixels"
        title = [f"decoded from {Path(self.cfg.latents).name}", f"{given} of {self.vae.n_groups} groups given"]
        title.append(f"{drawn} drawn at t={sampling.temperature_label(t)}")
        return [sampling.save_grid(images, self.out / "decoded.png", len(images), [*title, *self.note])]

    def reconstruct(self, images, inputs, targets) -> list[Path]:
        ks, t = self.ks(sampling.default_ks), self.temperatures[0]
        log.info("rows: data, then k = %s of %d groups kept", ks, self.vae.n_groups)
        with progress(len(inputs) * len(ks), "reconstructing") as bar:
            rows = sampling.reconstructions(self.vae, inputs, ks, t, self.batch_size, bar)
        title = [
            "reconstructions",
            *self.note,
            self.inputs_bpd(inputs, targets),
            f"row k: the first k groups from the posterior, the rest drawn at t={sampling.temperature_label(t)}",
        ]
        grid = torch.cat([images.cpu(), *rows])
        return [sampling.save_grid(grid, self.out / "reconstructions.png", len(images), title, self.k_labels(ks))]

    def interpolate(self, inputs) -> list[Path]:
        steps, pairs = self.cfg.steps, range(0, len(inputs) - 1, 2)
        with progress(len(pairs) * steps, "interpolating") as bar:
            rows = []
            for i in pairs:
                rows.append(sampling.interpolate(self.vae, inputs[i], inputs[i + 1], steps).cpu())
                bar.update(steps)
        title = ["interpolations in the posterior means of every group", *self.note]
        labels = [f"images {i + 1} to {i + 2}" for i in pairs]
        return [sampling.save_grid(torch.cat(rows), self.out / "interpolations.png", steps, title, labels)]

    def encode(self, images, inputs) -> list[Path]:
        with progress(len(inputs), "encoding") as bar:
            path = sampling.save_latents(
                self.vae, inputs, self.out / "latents.pt", self.cfg.ckpt_path, batch_size=self.batch_size, bar=bar
            )
        title = ["encoded images (their latents: latents.pt)", *self.note]
        return [path, sampling.save_grid(images.cpu(), self.out / "encoded_images.png", len(images), title)]

    def overview(self, images, inputs, targets) -> list[Path]:
        """One figure: a row of samples per temperature, then the images and their reconstructions per k; the
        groups not kept are drawn at the last of `temperatures`."""
        n, ks, last = len(images), self.ks(sampling.overview_ks), self.temperatures[-1]
        with progress(n * (len(self.temperatures) + len(ks)), "overview") as bar:
            samples = [sampling.sample_images(self.vae, n, t, self.batch_size, bar) for t in self.temperatures]
            rows = sampling.reconstructions(self.vae, inputs, ks, last, self.batch_size, bar)
        t_labels = [f"t={sampling.temperature_label(t)}" for t in self.temperatures]
        heading = "reconstructions (row k: the first k groups from the posterior, the rest at t="
        heading += f"{sampling.temperature_label(last)})"
        parts = [
            Part(torch.cat(samples), n, "samples", t_labels),
            Part(torch.cat([images.cpu(), *rows]), n, heading, self.k_labels(ks)),
        ]
        title = [f"overview of {Path(str(self.cfg.ckpt_path)).name}", *self.note, self.inputs_bpd(inputs, targets)]
        return [save_figure(self.out / "overview.png", parts, title)]
