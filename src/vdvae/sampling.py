"""Pictures from a trained model: sample grids at several temperatures, reconstructions that keep
the posterior latents of the first k groups (the rest drawn from the prior), interpolations in
latent space, and latents saved to and decoded from files.

Latent files (`torch.save`, loadable with `torch.load(f, weights_only=True)`) hold a dict:
    latents      list of float tensors, one per latent group, top-down, each (N, zdim, R, R)
    resolutions  list of int, the resolution R of every group
    checkpoint   str, the checkpoint the latents came from
    use_mean     bool, whether they are posterior means (True) or posterior samples
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from vdvae.model import VAE


def pil_image(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) image as a PIL image, grayscale or RGB."""
    return Image.fromarray(image.permute(1, 2, 0).squeeze(-1).cpu().numpy())


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images.float() / 255, nrow=nrow, pad_value=1), path)
    return path


def read_images(paths, image_size: int, channels: int) -> torch.Tensor:
    """Image files (or every image in the folders given) -> uint8 (N, C, S, S), resized and centre-cropped."""
    from vdvae.data.folder import FolderImages, input_files

    images = FolderImages(input_files(paths), image_size, channels)
    return torch.stack([images[i] for i in range(len(images))])


def chunk_size(vae: VAE) -> int:
    """Images per pass when sampling: keeps the likelihood's parameters (e.g. 100 maps) a few hundred MB."""
    return max(1, 2**16 // vae.image_size**2)


@torch.no_grad()
def in_chunks(fn, n: int, chunk: int) -> torch.Tensor:
    """fn(start, stop) for consecutive chunks of range(n), concatenated."""
    return torch.cat([fn(i, min(i + chunk, n)) for i in range(0, n, chunk)])


def default_ks(n_groups: int) -> list[int]:
    """The groups kept in reconstruction grids unless told: none, one, a quarter, half and all."""
    return sorted({0, 1, n_groups // 4, n_groups // 2, n_groups})


def temperature_label(t) -> str:
    return f"{t:g}" if isinstance(t, (int, float)) else "per-group"


@torch.no_grad()
def sample_grids(vae: VAE, n: int, temperatures, out_dir: Path) -> list[Path]:
    """One grid of n samples per temperature (a number, or a list with one value per group)."""
    paths = []
    for t in temperatures:
        t = list(t) if isinstance(t, (list, tuple)) else float(t)
        images = in_chunks(lambda i, j, t=t: vae.sample(j - i, t), n, chunk_size(vae))
        paths.append(save_grid(images, out_dir / f"samples_t{temperature_label(t)}.png", int(np.ceil(n**0.5))))
    return paths


@torch.no_grad()
def reconstruction_grid(vae: VAE, images: torch.Tensor, inputs: torch.Tensor, ks, temperature, out_dir: Path):
    """Rows: the images, then for each k the images decoded from their first k groups' posterior
    means with the remaining groups drawn from the prior at `temperature` (k = all: reconstructions)."""
    chunk = chunk_size(vae)
    rows = [images.cpu()] + [
        in_chunks(
            lambda i, j, k=k: vae.reconstruct(inputs[i:j], k=k, temperature=temperature).cpu(), len(inputs), chunk
        )
        for k in ks
    ]
    return save_grid(torch.cat(rows), out_dir / "reconstructions.png", len(images))


@torch.no_grad()
def interpolate(vae: VAE, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Decode (1 - w) z_a + w z_b for w in [0, 1], every group's posterior means: (steps, C, H, W)."""
    za, zb = vae.encode(a[None]), vae.encode(b[None])
    weights = torch.linspace(0, 1, steps, device=a.device)
    latents = [torch.cat([(1 - w) * u + w * v for w in weights]) for u, v in zip(za, zb, strict=True)]
    return vae.decode(latents, mode=True)


def save_latents(vae: VAE, inputs: torch.Tensor, path: Path, checkpoint: str, use_mean: bool = True) -> Path:
    latents = vae.encode(inputs, use_mean=use_mean)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "latents": [z.cpu() for z in latents],
            "resolutions": [r for _, r, _ in vae.latent_shapes],
            "checkpoint": str(checkpoint),
            "use_mean": use_mean,
        },
        path,
    )
    return path


def load_latents(vae: VAE, path: Path, device) -> list[torch.Tensor]:
    """The latents of a file written by `save_latents`, checked against the model's groups."""
    from vdvae.checkpoints import load_weights_only

    record = load_weights_only(path, "latents file")
    if not isinstance(record, dict) or "latents" not in record:
        raise ValueError(f"{path} is not a latents file (a dict with 'latents'; see vdvae.sampling)")
    latents, expected = record["latents"], vae.latent_shapes
    if len(latents) > len(expected):
        raise ValueError(f"{path} has {len(latents)} groups; the model has {len(expected)}")
    for t, (z, shape) in enumerate(zip(latents, expected, strict=False)):
        if tuple(z.shape[1:]) != shape:
            raise ValueError(f"{path}: group {t} has shape {tuple(z.shape[1:])}, the model needs {shape}")
    return [z.to(device) for z in latents]
