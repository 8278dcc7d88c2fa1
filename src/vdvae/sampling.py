"""Pictures from a trained model: samples at any temperature, reconstructions that keep the posterior
latents of the first k groups (the rest drawn from the prior), interpolations in latent space, and latents
saved to and decoded from files; grids of them saved labelled (`save_grid`, vdvae.grids). The loops over
batches advance a progress bar when given one (vdvae.progress).

Latent files (`torch.save`, loadable with `torch.load(f, weights_only=True)`) hold a dict:
    latents      list of float tensors, one per latent group, top-down, each (N, zdim, R, R)
    resolutions  list of int, the resolution R of every group
    checkpoint   str, the checkpoint the latents came from
    use_mean     bool, whether they are posterior means (True) or posterior samples

A file read for decoding is checked before any decoding (`check_latents`): 1 to n_groups groups, each a
dense float32 tensor (float16 and bfloat16 are widened to float32, exactly), of exactly the group's shape,
one image count N >= 1 for all, finite, and holding its data (an expanded tensor that declares more images
than the file stores is refused, so memory follows the file's size). Images are then decoded
`batch_size` at a time (`decode_latents`).

Every output is written under a temporary name and renamed into place when complete
(`vdvae.files.atomic_path`): an interrupted command never leaves a file that looks whole.
"""

from pathlib import Path

import torch
from PIL import Image

from vdvae.files import atomic_path
from vdvae.grids import Part, save_figure
from vdvae.model import VAE
from vdvae.progress import advance

# Latent dtypes a file may hold: float32 as the model computes, or narrower floats widened exactly.
LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pil_image(image: torch.Tensor) -> Image.Image:
    """A uint8 (C, H, W) image as a PIL image, grayscale or RGB."""
    return Image.fromarray(image.permute(1, 2, 0).squeeze(-1).cpu().numpy())


# The most columns of a grid whose rows are not labelled: more images wrap into further rows (a file of
# many latents decodes to a grid that a viewer opens, not one row millions of pixels wide).
MAX_COLUMNS = 16


def save_grid(images: torch.Tensor, path: Path, nrow: int, title=(), rows=()) -> Path:
    """uint8 images as one labelled PNG grid at `path` (vdvae.grids: scaled up if small, the `title`'s parts
    above, a label per row), `nrow` to a row, written whole or not at all. Rows wider than MAX_COLUMNS wrap:
    unlabelled, into more rows; labelled (`rows`, one per row), into blocks of MAX_COLUMNS columns one under
    the other, each headed by the images it holds and with the row labels again."""
    if not rows:
        return save_figure(path, [Part(images, min(nrow, MAX_COLUMNS))], list(title))
    if nrow <= MAX_COLUMNS or len(images) != len(rows) * nrow:
        return save_figure(path, [Part(images, nrow, rows=list(rows))], list(title))
    grid = images.reshape(len(rows), nrow, *images.shape[1:])
    parts = []
    for start in range(0, nrow, MAX_COLUMNS):
        block = grid[:, start : start + MAX_COLUMNS]
        heading = f"images {start + 1} to {start + block.shape[1]} of {nrow}"
        parts.append(Part(block.reshape(-1, *images.shape[1:]), block.shape[1], heading, list(rows)))
    return save_figure(path, parts, list(title))


def read_images(paths, image_size: int, channels: int) -> torch.Tensor:
    """Image files (or every image in the folders given) -> uint8 (N, C, S, S), resized and centre-cropped;
    converted to the model's channels as image folders are (vdvae.data.folder), conversions logged once."""
    from vdvae.data.folder import checked_images, input_files

    images = checked_images(input_files(paths), image_size, channels, "inputs")
    return torch.stack([images[i] for i in range(len(images))])


def chunk_size(vae: VAE) -> int:
    """Images per pass when sampling: keeps the likelihood's parameters (e.g. 100 maps) a few hundred MB."""
    return max(1, 2**16 // vae.image_size**2)


@torch.no_grad()
def in_chunks(fn, n: int, chunk: int, bar=None) -> torch.Tensor:
    """fn(start, stop) for consecutive chunks of range(n), concatenated; each chunk's images advance `bar`."""
    parts = []
    for i in range(0, n, chunk):
        parts.append(fn(i, min(i + chunk, n)))
        advance(bar, len(parts[-1]))
    return torch.cat(parts)


def default_ks(n_groups: int) -> list[int]:
    """The groups kept in reconstruction grids unless told: none, one, a quarter, half and all."""
    return sorted({0, 1, n_groups // 4, n_groups // 2, n_groups})


def overview_ks(n_groups: int) -> list[int]:
    """The groups kept in an overview's reconstructions unless told: 0, 1, 2, 4 (those the model has) and all."""
    return sorted({min(k, n_groups) for k in (0, 1, 2, 4)} | {n_groups})


def temperature_label(t) -> str:
    return f"{t:g}" if isinstance(t, (int, float)) else "per-group"


def k_label(k: int, n_groups: int) -> str:
    """A reconstruction row's label: how many groups come from the posterior."""
    return f"k={k} (all)" if k >= n_groups else f"k={k}"


@torch.no_grad()
def sample_images(vae: VAE, n: int, temperature, batch_size: int | None = None, bar=None) -> torch.Tensor:
    """n samples at `temperature` (a number, or a list with one value per group), `batch_size` images per
    pass (default: `chunk_size`): uint8 (n, C, H, W) on the CPU."""
    t = list(temperature) if isinstance(temperature, (list, tuple)) else float(temperature)
    return in_chunks(lambda i, j: vae.sample(j - i, t).cpu(), n, batch_size or chunk_size(vae), bar)


@torch.no_grad()
def reconstructions(vae: VAE, inputs: torch.Tensor, ks, temperature, batch_size=None, bar=None) -> list:
    """For each k, the images decoded from their first k groups' posterior means with the remaining groups
    drawn from the prior at `temperature` (k = all: reconstructions): uint8 (N, C, H, W) each, on the CPU."""
    chunk = batch_size or chunk_size(vae)
    return [
        in_chunks(
            lambda i, j, k=k: vae.reconstruct(inputs[i:j], k=k, temperature=temperature).cpu(), len(inputs), chunk, bar
        )
        for k in ks
    ]


@torch.no_grad()
def bits_per_dim(vae: VAE, inputs: torch.Tensor, targets: torch.Tensor, batch_size=None) -> float:
    """The images' mean negative ELBO in bits/dim (one posterior draw each)."""
    chunk = batch_size or chunk_size(vae)
    bpd = in_chunks(lambda i, j: vae(inputs[i:j], targets[i:j]).bpd.float().cpu(), len(inputs), chunk)
    return float(bpd.mean())


@torch.no_grad()
def interpolate(vae: VAE, a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Decode (1 - w) z_a + w z_b for w in [0, 1], every group's posterior means: (steps, C, H, W)."""
    za, zb = vae.encode(a[None]), vae.encode(b[None])
    weights = torch.linspace(0, 1, steps, device=a.device)
    latents = [torch.cat([(1 - w) * u + w * v for w in weights]) for u, v in zip(za, zb, strict=True)]
    return vae.decode(latents, mode=True)


@torch.no_grad()
def save_latents(
    vae: VAE, inputs: torch.Tensor, path: Path, checkpoint: str, use_mean: bool = True, batch_size=None, bar=None
) -> Path:
    """The latents of every group of `inputs`, encoded `batch_size` at a time (each batch advances `bar`), to
    the file `path`."""
    chunk = batch_size or chunk_size(vae)
    batches = []
    for i in range(0, len(inputs), chunk):
        batches.append(vae.encode(inputs[i : i + chunk], use_mean=use_mean))
        advance(bar, len(inputs[i : i + chunk]))
    record = {
        "latents": [torch.cat(group).cpu() for group in zip(*batches, strict=True)],
        "resolutions": [r for _, r, _ in vae.latent_shapes],
        "checkpoint": str(checkpoint),
        "use_mean": use_mean,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return path


def load_latents(vae: VAE, path: Path, device=None) -> list[torch.Tensor]:
    """The latents of a file written by `save_latents`, checked against the model's groups
    (`check_latents`), as float32 tensors on `device` (default: the CPU, for `decode_latents`)."""
    from vdvae.checkpoints import load_weights_only

    record = load_weights_only(path, "latents file")
    if not isinstance(record, dict) or "latents" not in record:
        raise ValueError(f"{path} is not a latents file (a dict with 'latents'; see vdvae.sampling)")
    latents = check_latents(record["latents"], vae.latent_shapes, path)
    return [z.to(device) for z in latents] if device is not None else latents


def check_latents(latents, shapes, path) -> list[torch.Tensor]:
    """Latents read from the file `path` for a model whose groups have `shapes` ((zdim, R, R) each), as
    contiguous float32 tensors; ValueError, naming the group and the remedy, for anything else.

    Shapes, types and counts are checked on the tensors' metadata first; the data is touched (finite
    values, the copy) only once the file is known to hold every value it declares."""
    if not isinstance(latents, (list, tuple)):
        raise ValueError(
            f"{path}: 'latents' is a {type(latents).__name__}; it must be a list of tensors, one per group"
        )
    if not 1 <= len(latents) <= len(shapes):
        raise ValueError(
            f"{path} has {len(latents)} latent groups; the model has {len(shapes)}: a file needs the first "
            f"1 to {len(shapes)} groups, top-down (mode=samples draws every group from the prior)"
        )
    for t, (z, shape) in enumerate(zip(latents, shapes, strict=False)):
        check_group(z, t, shape, path)
    counts = [len(z) for z in latents]
    if len(set(counts)) > 1:
        raise ValueError(f"{path}: the groups hold latents of different numbers of images, {counts}; all need one each")
    if counts[0] == 0:
        raise ValueError(f"{path} holds the latents of no image: nothing to decode")
    for t, z in enumerate(latents):
        check_holds_its_data(z, t, path)
    for t, z in enumerate(latents):
        if bad := z.numel() - int(torch.isfinite(z).sum()):
            raise ValueError(f"{path}: group {t} holds {bad} NaN or infinite values; latents must be finite numbers")
    return [z.to(torch.float32).contiguous() for z in latents]


def check_group(z, t: int, shape: tuple, path):
    """One group's tensor: with values (not a meta tensor), dense, a float type the model takes, (N, *shape)."""
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"{path}: group {t} is a {type(z).__name__}, not a tensor")
    if z.device.type != "cpu":  # torch.load keeps meta tensors, which declare a size but store nothing
        raise ValueError(f"{path}: group {t} is a {z.device.type} tensor, which holds no values; save real latents")
    if z.layout != torch.strided:
        raise ValueError(f"{path}: group {t} is a {z.layout} tensor; save dense tensors (tensor.to_dense())")
    if z.dtype not in LATENT_DTYPES:
        raise ValueError(
            f"{path}: group {t} holds {z.dtype} values; latents must be float32 (float16 and bfloat16 are "
            f"also read): convert them with tensor.float() before saving"
        )
    if z.dim() != 4 or tuple(z.shape[1:]) != tuple(shape):
        raise ValueError(
            f"{path}: group {t} has shape {tuple(z.shape)}; the model needs (N, {', '.join(map(str, shape))})"
        )


def check_holds_its_data(z: torch.Tensor, t: int, path):
    """An expanded (stride-0) or overlapping tensor declares more values than its storage holds: a small file
    could then ask for any number of images. Refused, so that what is decoded is what the file stores."""
    needed, held = z.numel() * z.element_size(), z.untyped_storage().nbytes()
    if needed > held:
        raise ValueError(
            f"{path}: group {t} declares {len(z)} images ({needed:,} bytes of latents) but the file stores only "
            f"{held:,} bytes for it (an expanded or overlapping tensor); save each latent's own values "
            f"(tensor.clone())"
        )


@torch.no_grad()
def decode_latents(vae: VAE, latents: list[torch.Tensor], temperature, batch_size: int, bar=None) -> torch.Tensor:
    """uint8 images (N, C, H, W) on the CPU from checked latents, `batch_size` images per pass on the model's
    device, so that memory follows the batch, not the file. Groups the latents lack are drawn from the prior at
    `temperature`: each batch draws its own, so random parts (those groups, and the pixels unless every
    temperature is 0) depend on the seed and the batch size; with every group given and temperature 0 the
    images do not depend on either. Each batch advances `bar`."""
    device = next(vae.parameters()).device
    n = len(latents[0])
    decode = lambda i, j: vae.decode([z[i:j].to(device) for z in latents], temperature).cpu()  # noqa: E731
    return in_chunks(decode, n, batch_size, bar)
