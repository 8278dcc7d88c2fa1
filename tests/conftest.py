"""Shared fixtures: the project's configs composed with Hydra, tiny models and the reference data."""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vdvae import VAE

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: a thread each, their subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# A tiny VDVAE for 8x8 grayscale images, as plain arguments.
TINY_VAE = dict(
    image_size=8,
    image_channels=1,
    width=16,
    zdim=4,
    enc_blocks="8x1,8d2,4x1,4d4,1x1",
    dec_blocks="1x1,4m1,4x1,8m4,8x1",
    num_mixtures=3,
)
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = Path(__file__).resolve().parent / "data"


def compose_config(*overrides: str, config_name: str | None = None):
    """A config composed from conf/ (train.yaml if `config_name="train"`) with Hydra overrides."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=config_name is not None)


def model_config(name: str, *overrides: str):
    """The model preset `name` (a VDVAEModule config), with `key=value` overrides of its `vae` values."""
    return compose_config(f"+model={name}", *[f"model.vae.{o}" for o in overrides]).model


def build_model(name: str, *overrides: str) -> VAE:
    """The VAE of preset `name`."""
    return VAE(**OmegaConf.to_container(model_config(name, *overrides).vae))


def perturb_(model, scale=0.05, seed=0):
    """Add noise to every parameter, so zero-initialized ones (prior outputs, biases) matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def random_batch(model, n=4, seed=0):
    """Random 8-bit images for `model`: model input (centred, scaled) and DMOL targets in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, model.image_channels, model.image_size, model.image_size), generator=gen).float()
    return (x - 127.5) / 64.0, (x - 127.5) / 127.5


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")
