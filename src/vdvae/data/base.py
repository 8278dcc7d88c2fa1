"""The DataModule shared by every dataset: uint8 images in, model inputs and likelihood targets out.

Datasets yield uint8 tensors (C, H, W), so batches cross to the device as bytes; the shift/scale,
bit-depth reduction and binarization run on the device in `on_after_batch_transfer`. Sampling is
deterministic given (seed, epoch), and evaluation visits every image exactly once on any number
of devices (no padding, no dropped remainder), so test figures count each test image once.
"""

import abc
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)


class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk: the message names the paths searched and how to get the data."""


def not_found(name: str, searched, how: str) -> DataNotFoundError:
    paths = "\n".join(f"  - {p}" for p in searched)
    return DataNotFoundError(f"{name}: no data found. Searched:\n{paths}\nTo get it: {how}")


@contextlib.contextmanager
def removing_empty_dirs(root: Path):
    """On failure (a download without network), remove the empty folders the block created at `root`."""
    top = Path(root).absolute()
    while not top.parent.exists():  # the highest folder the block may create
        top = top.parent
    existed = ({top, *top.rglob("*")}) if top.exists() else set()
    try:
        yield
    except BaseException:
        created = [p for p in ([*top.rglob("*"), top] if top.exists() else []) if p not in existed]
        for path in sorted(created, key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise


@dataclass(frozen=True)
class Preprocess:
    """uint8 images -> (model input, likelihood target).

    input = (x + shift) * scale with x reduced to `bits` (and rescaled to 0..255); the target is on
    the likelihood's grid 2k / (2^bits - 1) - 1, or {0, 1} draws with probability x / 255 when
    `binarize` (dynamic binarization: a fresh draw every time an image is seen).

    `original_low_bit` (bits < 8) reproduces the original code instead, for its imported weights: the
    input keeps all 8 bits and the target is floor(x / 2^(8 - bits)) * 2^(8 - bits) / 127.5 - 1, which
    is off the likelihood's grid (its top bin loses the upper tail), so its figures differ from ours.
    """

    shift: float = -127.5
    scale: float = 1 / 127.5
    bits: int = 8
    binarize: bool = False
    original_low_bit: bool = False

    def __call__(self, images: torch.Tensor):
        x = images.float()
        if self.binarize:
            target = torch.bernoulli(x / 255)
            return (target * 255 + self.shift) * self.scale, target
        if self.original_low_bit and self.bits < 8:
            step = 2 ** (8 - self.bits)
            return (x + self.shift) * self.scale, torch.floor(x / step) * step / 127.5 - 1
        levels = 2**self.bits - 1
        k = torch.floor(x / 2 ** (8 - self.bits)) if self.bits < 8 else x
        target = k * (2 / levels) - 1
        return (k * (255 / levels) + self.shift) * self.scale, target


class TensorImages(Dataset):
    """Images held as one uint8 array (N, C, H, W) or (N, H, W, C) (a tensor or a memory-mapped numpy array)."""

    def __init__(self, images, channels_last: bool = False, indices=None):
        self.images, self.channels_last = images, channels_last
        self.indices = indices

    def __len__(self):
        return len(self.indices) if self.indices is not None else len(self.images)

    def __getitem__(self, i):
        image = self.images[self.indices[i] if self.indices is not None else i]
        image = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image  # copy out of a memmap
        return image.permute(2, 0, 1).contiguous() if self.channels_last else image

    def subset(self, indices):
        chosen = [int(i if self.indices is None else self.indices[i]) for i in indices]
        return TensorImages(self.images, self.channels_last, chosen)


def hold_out(dataset, size: int, seed: int, option: str = "val_size"):
    """Split off `size` images at random (fixed by `seed`): returns (rest, held_out). `option` names the size
    in errors."""
    if not 0 < size < len(dataset):
        raise ValueError(
            f"data.{option}={size} must be between 1 and {len(dataset) - 1}: it splits images off the "
            f"{len(dataset)} there are"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return _subset(dataset, order[:-size]), _subset(dataset, order[-size:])


def hold_out_as_original(dataset, size: int, seed: int, held_out_first: bool = False):
    """The original code's split, so that validation figures compare with its logs: numpy's
    RandomState(seed) permutation, holding out its last `size` images (its ImageNet and FFHQ-256 splits)
    or its first `size` (scikit-learn's train_test_split, its CIFAR-10 split). Returns (rest, held_out)."""
    if not 0 < size < len(dataset):
        raise ValueError(
            f"data.val_size={size} must be between 1 and the {len(dataset) - 1} of the {len(dataset)} training images"
        )
    order = torch.from_numpy(np.random.RandomState(seed).permutation(len(dataset)))
    if held_out_first:
        return _subset(dataset, order[size:]), _subset(dataset, order[:size])
    return _subset(dataset, order[:-size]), _subset(dataset, order[-size:])


def first_images(dataset, n: int) -> torch.Tensor:
    """The first `n` images of a dataset (all of them if it has fewer), stacked: uint8 (N, C, H, W)."""
    return torch.stack([dataset[i] for i in range(min(n, len(dataset)))])


def _subset(dataset, indices):
    if hasattr(dataset, "subset"):
        return dataset.subset(indices.tolist())
    return torch.utils.data.Subset(dataset, indices.tolist())


class ShardSampler(Sampler):
    """Every index exactly once across ranks (rank r takes r, r + R, ...): for evaluation."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler's order (fixed by seed and epoch), able to start its next epoch part-way through:
    a run resumed mid-epoch skips the batches it has already trained on, so it sees the data in the order
    the uninterrupted run would have."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = 0  # samples of this rank to skip in the next epoch only

    def __iter__(self):
        indices, self.skip = list(super().__iter__())[self.skip :], 0
        return iter(indices)


def batches_done_this_epoch(trainer) -> int:
    """Batches of the current epoch that a restored checkpoint has trained on (0 unless resuming mid-epoch).

    Read from Lightning's loop progress, which the checkpoint restores before the train dataloader is built;
    `processed` counts the batches whose training step finished, wherever the checkpoint was saved.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    if fit_loop is None or not fit_loop.restarting:
        return 0
    return fit_loop.epoch_loop.batch_progress.current.processed


class ImageDataModule(LightningDataModule, abc.ABC):
    """Base DataModule: subclasses implement `load()` -> (train, val, test) datasets of uint8 images.

    `setup("fit")` refuses a training batch larger than the training split (drop_last would leave no batch
    at all); an evaluation batch larger than its split is lowered to the split, with a warning."""

    name = "images"
    # How many batches of data.batch_size one loaded training batch holds (trainer.accumulate_grad_batches,
    # which the training task multiplies `batch_size` by): only for naming data.batch_size in messages.
    batches_per_update = 1

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shift: float = -127.5,
        scale: float = 1 / 127.5,
        bits: int = 8,
        binarize: bool = False,
        original_low_bit: bool = False,
        val_size: int = 5000,
        split_seed: int = 42,
        seed: int = 0,
        limit_train: int | None = None,
        random_flip: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if not 1 <= bits <= 8:
            raise ValueError(f"data.bits must be between 1 and 8 for 8-bit images, got {bits}")
        self.root = Path(root).expanduser()
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.val_size, self.split_seed, self.seed = num_workers, val_size, split_seed, seed
        self.limit_train, self.random_flip = limit_train, random_flip
        self.preprocess = Preprocess(shift, scale, bits, binarize, original_low_bit)
        self.train_set = self.val_set = self.test_set = None
        self._eval_warned = set()  # the splits whose evaluation batches were lowered, once warned

    @abc.abstractmethod
    def load(self):
        """(train, val, test) datasets of uint8 (C, H, W) images; raises DataNotFoundError if absent."""

    def setup(self, stage=None):
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.load()
            if self.limit_train:
                self.train_set = _subset(self.train_set, torch.arange(min(self.limit_train, len(self.train_set))))
            shape = tuple(self.train_set[0].shape)
            if shape != (self.channels, self.image_size, self.image_size):
                raise ValueError(
                    f"{self.name}: images have shape {shape}, but data.channels={self.channels} and "
                    f"data.image_size={self.image_size} say ({self.channels}, {self.image_size}, "
                    f"{self.image_size})"
                )
            log.info("%s: %d train, %d val, %d test images", self.name, *map(len, self.splits))
        if stage in (None, "fit"):
            self._check_training_batch()
        for split in {"fit": ["val"], "validate": ["val"], "test": ["test"]}.get(stage, ["val", "test"]):
            self._eval_batch_size(split, warn=True)

    def _check_training_batch(self):
        """One training batch (on each device) must fit in the training split: a clear refusal here, not
        an empty loader or a traceback from inside the training loop."""
        _, world = self._rank_world()
        n, per_update = len(self.train_set), max(1, self.batches_per_update)
        if n >= self.batch_size * world:
            return
        given = f"data.batch_size={self.batch_size // per_update}"
        if per_update > 1:
            given += f" x trainer.accumulate_grad_batches={per_update}"
        if world > 1:
            given += f" x {world} devices"
        limited = f" (data.limit_train={self.limit_train})" if self.limit_train and self.limit_train <= n else ""
        most = n // (world * per_update)
        if most >= 1:
            remedy = f"use data.batch_size={most} or less"
        else:
            remedy = "use fewer devices or a smaller trainer.accumulate_grad_batches"
        if limited:
            remedy += ", or raise data.limit_train"
        raise ValueError(
            f"{given} asks for {self.batch_size * world} training images per update, but the training split of "
            f"{self.name} has {n}{limited}: {remedy}"
        )

    def _eval_batch_size(self, split: str, warn: bool = False) -> int:
        """data.eval_batch_size, or the split's size where that is smaller (every image is seen once either
        way; the warning says that a batch of this size never comes)."""
        n = len(self.val_set if split == "val" else self.test_set)
        if n == 0 or self.eval_batch_size <= n:
            return self.eval_batch_size
        if warn and split not in self._eval_warned:
            self._eval_warned.add(split)
            names = {"val": "validation", "test": "test"}
            log.warning(
                "%s: evaluation batches of %d images (data.eval_batch_size, or eval.py's batch_size) are more "
                "than the %d %s images: evaluating them in one batch of %d",
                self.name,
                self.eval_batch_size,
                n,
                names[split],
                n,
            )
        return n

    @property
    def splits(self):
        return self.train_set, self.val_set, self.test_set

    def _rank_world(self):
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset, batch_size, sampler, drop_last=False):
        # A private generator: creating the iterator must not consume the global RNG (exact resume).
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=drop_last,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self):
        rank, world = self._rank_world()
        self._check_training_batch()
        sampler = ResumableSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed, drop_last=True
        )
        done = batches_done_this_epoch(self.trainer)
        sampler.skip = done * self.batch_size if done < len(sampler) // self.batch_size else 0  # 0: epoch over
        return self._loader(self.train_set, self.batch_size, sampler, drop_last=True)

    def val_dataloader(self):
        sampler = ShardSampler(len(self.val_set), *self._rank_world())
        return self._loader(self.val_set, self._eval_batch_size("val"), sampler)

    def test_dataloader(self):
        sampler = ShardSampler(len(self.test_set), *self._rank_world())
        return self._loader(self.test_set, self._eval_batch_size("test"), sampler)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.random_flip and self.trainer is not None and self.trainer.training:
            # Each training image mirrored left-right with probability 1/2, on the device, from the global
            # RNG (restored on resume); evaluation sees the images as they are.
            flip = torch.rand(batch.shape[0], device=batch.device) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        return self.preprocess(batch)
