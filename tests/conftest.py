"""Shared fixtures: the project's configs composed with Hydra, tiny models and the reference data."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DATA = Path(__file__).resolve().parent / "data"


def model_config(name: str, *overrides: str):
    """The model preset `name` composed from conf/model, with `key=value` overrides."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+model={name}", *[f"model.{o}" for o in overrides]]).model


def build_model(name: str, *overrides: str):
    return instantiate(model_config(name, *overrides))


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
