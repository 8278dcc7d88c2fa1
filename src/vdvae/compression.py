"""Lossless image compression with a trained VDVAE: bits-back coding (BB-ANS, Townsend et al. 2019) on
an ANS stack from the `constriction` package, with the model's own top-down inference.

Compressing a chunk of images x pushes onto one stack, in this order:
  1. pop    z_0, z_1, ..., z_T  from the posterior q(z_t | z_<t, x), group by group (bits back);
  2. push   x  with p(x | z): 1 channel, or the RGB channels B, G, R so that R decodes first;
  3. push   z_T, ..., z_0  with the prior p(z_t | z_<t).
Decompressing a chunk mirrors it: pop z_0..z_T with the prior, pop x, then push z_T..z_0 back with the
posterior, which restores the stack as it was before the chunk. The net cost of a chunk is
-log P(x|z) - log P(z) + log Q(z|x): the ELBO's code length plus what discretizing the latents costs.

Latents are discretized on a grid in units of the prior's own scale: z = mu_p + sigma_p * bin_width * k
for integers |k| <= latent_range / bin_width, so the prior is always a quantized N(0, 1 / bin_width)
over k, and the posterior a quantized N((mu_q - mu_p) / (sigma_p bin_width), sigma_q / (sigma_p bin_width)).

The first chunk needs bits to pop before anything has been pushed: the stack starts with `seed`
words (a fixed pseudo-random pattern) that pay for the first image's posterior draws. They are in the
file and reported as `initial_bits`. After that, each chunk's pops are paid for by the stack the
earlier chunks left, so chunks grow from one image to `batch_size` as the stack allows.

Encoder and decoder must compute bit-identical distributions: the decoder replays the encoder's
chunks exactly (their sizes are in the header), with as many threads, in the same dtype and memory
format, and a checksum of the images checks the result. The file is a header (format version, model
identity, image shapes, coding options), the ANS words, and a SHA-256 of everything before it.

A file is data from anywhere: it costs only what it holds. It is read only if it is a regular file of at
most MAX_FILE_BYTES, and every count in its header is checked before anything is allocated or decoded:
at most one image per ANS word (the encoder pads the seed to keep this true, see `MIN_WORDS_PER_IMAGE`),
chunks no larger than the batch size, a seed no longer than the model's first image can need plus that
padding, no more threads than this machine has, and image names that are plain file names. A model whose weights or
probabilities are not finite is refused before the coder sees them.

On a terminal, compression, decompression and the negative ELBO show a bar of the images done, images/s and
the time left (vdvae.progress); logs and pipes get none.
"""

import contextlib
import hashlib
import json
import os
import stat
import struct
from dataclasses import asdict, dataclass

import constriction
import numpy as np
import torch

from vdvae.checkpoints import data_module, load_module
from vdvae.data import ImageDataModule
from vdvae.progress import progress

MAGIC = b"VDVAE-BB"
# 2 adds each chunk's SHA-256: damaged or crafted data stops the decode at its first chunk. Version 1 files
# (without) are refused: one whose header is genuine but whose data is not costs a whole decode to find out.
VERSION = 2
PRECISION_BITS = 24  # probability precision of constriction's default ANS coder and models
SEED_PATTERN = 0x5EED  # the seed words are a fixed pseudo-random pattern; only their count varies
MAX_FILE_BYTES = 4 * 2**30  # a generous bound on a file to read: it is read whole into memory
# Each image costs at least this many ANS words in a file this module writes: no bound from coding
# alone holds (bits back can return more bits than an image's pushes cost, so an image on a strong model
# can cost almost nothing), so the encoder makes it hold by padding the seed (words nothing pops, at the
# bottom of the stack) where images cost less. Real images cost far more (an 8x8 digit on the tests' tiny
# model: ~300 bits; a CIFAR-10 image: ~9,000), so this costs nothing in practice, and a file's image count -
# and so a decode's work - is bounded by its size.
MIN_WORDS_PER_IMAGE = 1
MAX_NAME_BYTES = 255  # the longest file name common file systems (ext4, APFS, NTFS, ...) accept


class CompressedFileError(ValueError):
    """The file cannot be decompressed here: not this format, damaged, or made with another model."""


def read_compressed(path) -> bytes:
    """The bytes of a compressed file, after checking that it is a regular file (a FIFO would block and a
    device like /dev/zero never ends) of at most MAX_FILE_BYTES, before reading any of it."""
    try:  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise CompressedFileError(f"file={path} cannot be opened: {error.strerror}") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CompressedFileError(
                f"file={path} is a {_file_kind(info.st_mode)}, not a regular file: give a file written by mode=compress"
            )
        if info.st_size > MAX_FILE_BYTES:
            raise CompressedFileError(
                f"file={path} is {info.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} bytes a compressed "
                f"file may have: it is not a file written by mode=compress"
            )
        with open(fd, "rb", closefd=False) as file:
            return file.read(info.st_size)  # a file still being written then fails the checksum
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket")]
    return next((kind for test, kind in kinds if test(mode)), "device")


def png_name(name: str) -> str:
    """The file an image's stored name decompresses to: the name, with .png added unless it ends so."""
    return name if name.lower().endswith(".png") else f"{name}.png"


def name_problem(name) -> str | None:
    """Why `name` cannot be an image's file name inside the output folder (None if it can): it must be a
    plain file name (no folder, not . or ..) that a file system accepts as <name>.png."""
    if not isinstance(name, str):
        return "is not a string"
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        return "is not a plain file name (empty, . or .., or holds '/' or NUL)"
    try:
        size = len(os.fsencode(png_name(name)))
    except UnicodeEncodeError:
        return "cannot be encoded as a file name on this system"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes as a PNG file name; file systems accept at most {MAX_NAME_BYTES}"
    return None


def check_names(names):
    """Every name a valid, distinct PNG file name (see `name_problem`), else a ValueError naming the first."""
    for i, name in enumerate(names):
        if problem := name_problem(name):
            shown = repr(name) if len(repr(name)) <= 60 else f"{repr(name)[:40]}...({len(name)} characters)"
            raise ValueError(f"image {i}'s name {shown} {problem}")
    seen = set()
    for name in map(png_name, names):
        if name in seen:
            raise ValueError(f"two images have the name {name!r}")
        seen.add(name)


@dataclass(frozen=True)
class CodingOptions:
    """How latents are discretized and images grouped.

    bin_width: latent grid step in units of the prior's standard deviation (smaller: closer to the
        ELBO, more initial bits and slower coding).
    latent_range: the grid spans +-latent_range prior standard deviations around the prior's mean.
    batch_size: the most images coded in one pass of the network.
    """

    bin_width: float = 1 / 16
    latent_range: float = 16.0
    batch_size: int = 64

    def __post_init__(self):
        if not 0 < self.bin_width <= 1:
            raise ValueError(f"bin_width must be in (0, 1] (prior standard deviations), got {self.bin_width}")
        if self.latent_range < 1 or self.latent_range / self.bin_width > 2**20:
            raise ValueError(
                f"latent_range={self.latent_range} with bin_width={self.bin_width}: the range must be at least 1 "
                f"and span at most 2^21 bins"
            )
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f"batch_size must be between 1 and 4096, got {self.batch_size}")

    @property
    def max_symbol(self) -> int:
        return int(round(self.latent_range / self.bin_width))


def model_identity(vae, preprocess) -> str:
    """SHA-256 of the architecture, the weights and the pixel preprocessing: files decode only with the
    model that wrote them."""
    digest = hashlib.sha256()
    digest.update(repr(preprocess).encode())
    digest.update(repr(vae).encode())
    for name, tensor in vae.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def seed_words(n: int) -> np.ndarray:
    """The first n words of the seed pattern, in the order that pops read them (the stack's top is the
    array's end), so that a longer seed pops exactly as a shorter one until the shorter one runs out."""
    words = np.random.default_rng(SEED_PATTERN).integers(1, 2**32, size=n, dtype=np.uint32)
    return words[::-1].copy()


@dataclass
class Report:
    """What a compression cost, in bits (totals over all images)."""

    images: int
    dims: int  # data dimensions per image
    file_bits: int
    initial_bits: int  # the seed words' bits, in the file
    header_bits: int
    chunks: list

    @property
    def bits_per_dim(self) -> float:
        """The whole file, per data dimension."""
        return self.file_bits / (self.images * self.dims)

    @property
    def net_bits_per_dim(self) -> float:
        """The file less its header and initial bits, per data dimension."""
        return (self.file_bits - self.header_bits - self.initial_bits) / (self.images * self.dims)


def negative_elbo(vae, preprocess, images, draws: int = 1, batch_size: int = 100) -> float:
    """The images' negative ELBO in bits/dim (what a file of them should cost), averaged over `draws`
    posterior draws per image, seeded."""
    total = 0.0
    with torch.no_grad(), progress(len(images), "negative ELBO") as bar:
        torch.manual_seed(0)
        for start in range(0, len(images), batch_size):
            inputs, target = preprocess(images[start : start + batch_size])
            total += sum(float(vae(inputs, target).bpd.sum()) for _ in range(draws))
            bar.update(len(inputs))
    return total / (draws * len(images))


class ModelError(ValueError):
    """The model cannot code losslessly: its weights, or the probabilities it computes, are not finite."""


def check_finite_weights(vae, source: str):
    """Refuse weights holding NaN or infinities (a diverged run): the coder would fail deep inside."""
    bad = [name for name, t in vae.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ModelError(
            f"{source}: the weights hold NaN or infinite values (in {', '.join(bad[:3])}{more}), so the model "
            f"cannot code: the training diverged; use a checkpoint from before it did"
        )


class _Grid:
    """The entropy models of one file's coding options, and its latent grid; the distributions handed to
    the coder are checked to be finite first (the coder panics on a NaN scale instead of raising)."""

    def __init__(self, options: CodingOptions, source: str):
        model = constriction.stream.model
        self.options, self.source, k = options, source, options.max_symbol
        self.prior = model.QuantizedGaussian(-k, k, 0.0, 1.0 / options.bin_width)
        self.posterior = model.QuantizedGaussian(-k, k)
        self.pixels = model.Categorical(perfect=False)

    def latent(self, prior, k):
        """z on the grid: mu_p + sigma_p * bin_width * k."""
        mean, logstd = prior
        return mean + torch.exp(logstd) * (k.to(mean.dtype) * self.options.bin_width)

    def posterior_in_bins(self, out):
        """A group's posterior mean and std in grid units, as float64 arrays for the coder."""
        (p_mean, p_logstd), (q_mean, q_logstd) = out.prior, out.posterior
        p_mean, p_logstd, q_mean, q_logstd = (t.double() for t in (p_mean, p_logstd, q_mean, q_logstd))
        mean = (q_mean - p_mean) * torch.exp(-p_logstd) / self.options.bin_width
        std = torch.exp(q_logstd - p_logstd) / self.options.bin_width
        mean, std = mean.flatten().numpy(), std.flatten().numpy()
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            self._refuse("a latent posterior")
        return mean, std

    def pixel_pmf(self, pmf: torch.Tensor) -> np.ndarray:
        pmf = pmf.numpy()
        if not (np.isfinite(pmf).all() and (pmf >= 0).all() and (pmf.sum(1) > 0).all()):
            self._refuse("the pixels' probabilities")
        return pmf

    def _refuse(self, what: str):
        raise ModelError(
            f"{self.source} computes {what} that is not finite (NaN, infinite or zero scale) for these images, "
            f"so they cannot be coded: the weights are finite but overflow; use another checkpoint"
        )


def _ints(t: torch.Tensor) -> np.ndarray:
    return t.flatten().numpy().astype(np.int32)


def _cpus() -> int:
    return os.cpu_count() or 1


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op threads set to n inside the block: the order of a kernel's sums depends on them."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


class Codec:
    """Compress uint8 images (N, C, H, W) to bytes and back with a VAE and its pixel preprocessing.

    The VAE runs on the CPU in fp32: the decoder must repeat the encoder's arithmetic bit for bit.
    `source` names the model in errors (the checkpoint).
    """

    def __init__(self, vae, preprocess, source: str = "the model"):
        self.vae, self.preprocess, self.source = vae.eval().cpu().float(), preprocess, source
        check_finite_weights(self.vae, source)
        self.identity = model_identity(self.vae, preprocess)
        self.shape = (vae.image_channels, vae.image_size, vae.image_size)
        self.dims = int(np.prod(self.shape))

    def _symbols(self, images):
        """Model inputs, likelihood targets and integer symbols of uint8 images, checked to be exact."""
        inputs, target = self.preprocess(images)
        likelihood = self.vae.likelihood
        symbols = likelihood.symbols(target)
        if not torch.equal(likelihood.to_uint8(likelihood.grid(symbols)), images):
            raise ValueError(
                "these images are not on the model's pixel grid (e.g. 8-bit images for a model of "
                f"{getattr(likelihood, 'bits', 1)}-bit or binary data), so they cannot be compressed losslessly"
            )
        return inputs, target, symbols

    @torch.no_grad()
    def _encode_chunk(self, coder, grid: _Grid, images) -> int:
        """Push a chunk of images; returns the bits its posterior draws popped."""
        vae = self.vae
        inputs, target, symbols = self._symbols(images)
        activations = vae.encoder(vae._check_input(inputs))
        before, ks = coder.num_valid_bits(), []

        def pop_posterior(t, out):
            k = coder.decode(grid.posterior, *grid.posterior_in_bins(out))
            ks.append(torch.from_numpy(k.astype(np.int64)).view(out.prior[0].shape))
            return grid.latent(out.prior, ks[-1])

        h, _ = vae.decoder(len(images), activations, choose=pop_posterior)
        popped = before - coder.num_valid_bits()
        params = vae.likelihood(h)
        for c in reversed(range(self.shape[0])):
            pmf = grid.pixel_pmf(vae.likelihood.channel_pmf(params, target, c))
            coder.encode_reverse(_ints(symbols[:, c]), grid.pixels, pmf)
        for k in reversed(ks):
            coder.encode_reverse(_ints(k), grid.prior)
        return popped

    @torch.no_grad()
    def _decode_chunk(self, coder, grid: _Grid, n: int):
        vae, likelihood = self.vae, self.vae.likelihood
        ks = []

        def pop_prior(t, out):
            mean = out.prior[0]
            ks.append(torch.from_numpy(coder.decode(grid.prior, mean.numel()).astype(np.int64)).view(mean.shape))
            return grid.latent(out.prior, ks[-1])

        h, _ = vae.decoder(n, None, choose=pop_prior)
        params = likelihood(h)
        symbols = torch.zeros(n, *self.shape, dtype=torch.long)
        for c in range(self.shape[0]):
            pmf = grid.pixel_pmf(likelihood.channel_pmf(params, likelihood.grid(symbols), c))
            symbols[:, c] = torch.from_numpy(coder.decode(grid.pixels, pmf).astype(np.int64)).view(symbols[:, c].shape)
        images = likelihood.to_uint8(likelihood.grid(symbols))
        activations = vae.encoder(vae._check_input(self.preprocess(images)[0]))
        posteriors = []

        def known(t, out):
            posteriors.append(grid.posterior_in_bins(out))
            return grid.latent(out.prior, ks[t])

        vae.decoder(n, activations, choose=known)
        for k, (mean, std) in zip(reversed(ks), reversed(posteriors), strict=True):
            coder.encode_reverse(_ints(k), grid.posterior, mean, std)
        return images

    def _generous_seed(self) -> int:
        """Seed words enough for any first image: a posterior draw pops at most PRECISION_BITS bits (the
        coder gives every symbol a probability of at least 2^-PRECISION_BITS), plus the coder's state."""
        return PRECISION_BITS * sum(int(np.prod(s)) for s in self.vae.latent_shapes) // 32 + 4

    def _seed_words_needed(self, grid: _Grid, first) -> int:
        """The seed words the first image's posterior draws read, measured on a generous seed, plus two for
        the coder's state: at most `_generous_seed() + 2`, which bounds a file's seed."""
        popped = self._encode_chunk(constriction.stream.stack.AnsCoder(seed_words(self._generous_seed())), grid, first)
        return -(-popped // 32) + 2

    def _encode(self, images, grid: _Grid, seed: int, padding: int, bar) -> tuple[np.ndarray, list[int]]:
        """The final stack's words and the chunk sizes, from a stack of `seed` seed words on top of `padding`
        more that nothing pops (unless a chunk pops more than the stack holds, which the seed then pays);
        each chunk advances `bar` (which starts again from zero)."""
        bar.reset()
        coder = constriction.stream.stack.AnsCoder(seed_words(seed + padding))
        chunks, start, pop_bits, n = [], 0, 32 * seed, len(images)
        while start < n:  # each chunk as large as the stack can pay its posterior draws for
            usable = coder.num_valid_bits() - 32 * padding  # the padding does not change the chunks
            size = max(1, min(int(usable // (1.05 * pop_bits)), grid.options.batch_size, n - start))
            pop_bits = self._encode_chunk(coder, grid, images[start : start + size]) / size
            chunks.append(size)
            start += size
            bar.update(size)
        return coder.get_compressed(), chunks

    def compress(self, images: torch.Tensor, options: CodingOptions = CodingOptions(), names=None):
        """One file (bytes) for all `images` (uint8 (N, C, H, W)), and a Report of its cost. `names`, one
        per image if given (plain file names, see `name_problem`), are stored for decompression."""
        self._check_images(images)
        images, n, grid = images.cpu(), len(images), _Grid(options, self.source)
        names = [str(name) for name in names] if names is not None else None
        if names is not None:
            if len(names) != n:
                raise ValueError(f"got {len(names)} names for {n} images")
            try:
                check_names(names)  # the decoder would refuse them
            except ValueError as error:
                raise ValueError(f"{error}: rename the image file") from error
        # At most as many threads as this machine has CPUs: the decoder refuses files asking for more.
        with _torch_threads(min(torch.get_num_threads(), _cpus())) as threads, progress(n, "compressing") as bar:
            seed, padding = self._seed_words_needed(grid, images[:1]), 0
            words, chunks = self._encode(images, grid, seed, padding, bar)
            needed = MIN_WORDS_PER_IMAGE * n
            while len(words) < needed and padding < needed:  # images this cheap are rare: pad the seed
                padding = min(needed, padding + needed - len(words))
                words, chunks = self._encode(images, grid, seed, padding, bar)
        if len(words) < needed:
            raise ValueError(
                f"these {n} images cost less than {MIN_WORDS_PER_IMAGE} word(s) each even with a padded seed, "
                f"which this format does not allow (it bounds a file's work by its size)"
            )
        header = {
            "model": self.identity,
            "torch": torch.__version__,
            "threads": threads,
            "count": n,
            "shape": list(self.shape),
            "options": asdict(options),
            "chunks": chunks,
            "seed_words": seed + padding,
            "images_sha256": _sha256(images),
            "chunks_sha256": [_sha256(part) for part in torch.split(images, chunks)],
            "names": names,
        }
        data = write_file(header, words)
        bits = 32 * (seed + padding)
        return data, Report(n, self.dims, 8 * len(data), bits, 8 * (len(data) - 4 * len(words)), chunks)

    def decompress(self, data: bytes) -> tuple[torch.Tensor, list | None]:
        """The images (uint8 (N, C, H, W)) and names (None if none were stored) of a file written by
        `compress` with this model."""
        return self.decode(*read_file(data))

    def decode(self, header: dict, words: np.ndarray) -> tuple[torch.Tensor, list | None]:
        """As `decompress`, from a file's header and words as `read_file` returns them (checked there)."""
        if header["model"] != self.identity:
            raise CompressedFileError(
                "this file was compressed with another model (its weights, architecture or preprocessing "
                "differ): decompress it with the checkpoint that compressed it"
            )
        if tuple(header["shape"]) != self.shape:
            raise CompressedFileError(f"the file holds images of shape {header['shape']}; the model codes {self.shape}")
        most = self._generous_seed() + 2 + MIN_WORDS_PER_IMAGE * header["count"]
        if header["seed_words"] > most:  # checked before the seed is allocated, at the end
            raise CompressedFileError(
                f"the file's seed is {header['seed_words']:,} words, more than this model's first image can pop "
                f"plus the padding of {header['count']} images ({most:,} words): the file is damaged"
            )
        grid = _Grid(CodingOptions(**header["options"]), self.source)
        coder = constriction.stream.stack.AnsCoder(words)
        # As many threads as the encoder's: threads can change the order of a kernel's sums.
        with _torch_threads(header["threads"]), progress(header["count"], "decompressing") as bar:
            decoded, hashes = [], header["chunks_sha256"]
            for i in reversed(range(len(header["chunks"]))):
                decoded.append(self._decode_chunk(coder, grid, header["chunks"][i]))
                if _sha256(decoded[-1]) != hashes[i]:  # the first wrong chunk ends the decode
                    raise CompressedFileError(self._mismatch(header, f"chunk {i + 1} of {len(hashes)}"))
                bar.update(header["chunks"][i])
        images = torch.cat(decoded[::-1])
        intact = _sha256(images) == header["images_sha256"]
        if not intact or not np.array_equal(coder.get_compressed(), seed_words(header["seed_words"])):
            raise CompressedFileError(self._mismatch(header, "the images"))
        return images, header["names"]

    @staticmethod
    def _mismatch(header, what: str) -> str:
        return (
            f"{what} decoded do not match the file's checksum: its compressed data is damaged, or this machine "
            f"computed other probabilities than the encoder's (which ran torch {header['torch']}; this is "
            f"{torch.__version__}; a file decodes only on the same kind of machine and software)"
        )

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor (N, C, H, W)")
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(f"this model codes images of shape {self.shape}, got {tuple(images.shape[1:])}")
        if len(images) == 0:
            raise ValueError("no images to compress")


# File format ---------------------------------------------------------------------------------------
# MAGIC | version (u16) | header length (u32) | header (JSON, UTF-8) | ANS words (u32 LE) | SHA-256
HEADER_KEYS = {
    "model",
    "torch",
    "threads",
    "count",
    "shape",
    "options",
    "chunks",
    "seed_words",
    "images_sha256",
    "chunks_sha256",
    "names",
}


def write_file(header: dict, words: np.ndarray) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(text)) + text + words.astype("<u4").tobytes()
    return body + hashlib.sha256(body).digest()


def read_file(data: bytes) -> tuple[dict, np.ndarray]:
    """The header and ANS words of a file, after checking its format, version and checksum, and that its
    header fits its size and this machine (`check_header`). The words are a view of `data`, not a copy."""
    if not data.startswith(MAGIC):
        raise CompressedFileError("not a vdvae compressed file (it does not start with the format's magic bytes)")
    fixed = len(MAGIC) + 6
    if len(data) < fixed + 32:
        raise CompressedFileError("the file is truncated (shorter than the format's header)")
    body = memoryview(data)[:-32]
    if hashlib.sha256(body).digest() != data[-32:]:
        raise CompressedFileError("the file is truncated or corrupt (its SHA-256 checksum does not match)")
    version, length = struct.unpack_from("<HI", data, len(MAGIC))
    if version == 1:
        raise CompressedFileError(
            "the file is format version 1, whose chunks carry no checksums (a damaged one costs a whole decode "
            f"to find out); this vdvae reads version {VERSION}: compress the images again"
        )
    if version != VERSION:
        raise CompressedFileError(f"the file is format version {version}; this vdvae reads version {VERSION}")
    if length > len(body) - fixed:
        raise CompressedFileError(f"the file's header length ({length:,} bytes) runs past the file's end")
    if (len(body) - fixed - length) % 4:
        raise CompressedFileError("the file's compressed data is not a whole number of 32-bit words")
    try:
        header = json.loads(bytes(body[fixed : fixed + length]).decode())
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, ints of 4,300+ digits, deep nesting
        raise CompressedFileError(f"the file's header is not valid JSON: {str(error)[:200]}") from error
    words = np.frombuffer(body, dtype="<u4", offset=fixed + length).astype(np.uint32, copy=False)
    check_header(header, len(words))
    return header, words


def _sha256(images: torch.Tensor) -> str:
    return hashlib.sha256(images.numpy().tobytes()).hexdigest()


def _is_int(value) -> bool:
    return type(value) is int  # not bool, not float


def _int_list(values, low: int) -> bool:
    return isinstance(values, list) and all(_is_int(v) and v >= low for v in values)


def check_header(header, n_words: int):
    """Every field of a header of the right type, and every count in it within what the file's `n_words`
    ANS words can hold and what this machine can do, before anything is allocated for it."""

    def bad(field, why):
        return CompressedFileError(f"the file's header is damaged or not written by vdvae: {field} {why}")

    if not isinstance(header, dict) or set(header) != HEADER_KEYS:
        raise CompressedFileError("the file's header does not have the fields of this format")
    for key in ("model", "torch", "images_sha256"):
        if not isinstance(header[key], str):
            raise bad(key, "is not a string")
    count, chunks = header["count"], header["chunks"]
    if not _is_int(count) or count < 1:
        raise bad("count", f"is {count!r}, not a positive integer")
    if count * MIN_WORDS_PER_IMAGE > n_words:  # see MIN_WORDS_PER_IMAGE: this bounds a decode's work
        raise CompressedFileError(
            f"the file is damaged or not written by vdvae: its header declares {count:,} images, but it holds "
            f"{n_words:,} words of compressed data and every image costs at least {MIN_WORDS_PER_IMAGE}"
        )
    if not _int_list(header["shape"], 1) or len(header["shape"]) != 3:
        raise bad("shape", "is not three positive integers")
    options = _check_options(header["options"], bad)
    if not _int_list(chunks, 1) or sum(chunks) != count:
        raise bad("chunks", f"are not positive integers adding up to the {count} images")
    if max(chunks) > options.batch_size:
        raise bad("chunks", f"are larger than the file's batch size {options.batch_size}")
    hashes = header["chunks_sha256"]
    if not isinstance(hashes, list) or len(hashes) != len(chunks) or not all(map(_is_sha256, hashes)):
        raise bad("chunks_sha256", f"are not {len(chunks)} SHA-256 digests, one per chunk")
    if not _is_int(header["seed_words"]) or header["seed_words"] < 1:
        raise bad("seed_words", "is not a positive integer")
    _check_threads(header["threads"], bad)
    names = header["names"]
    if names is not None:
        if not isinstance(names, list) or len(names) != count:
            raise bad("names", f"are not a list of {count} names")
        try:  # all of them, before any image is decoded or written
            check_names(names)
        except ValueError as error:
            raise CompressedFileError(f"the file cannot be decompressed under its stored names: {error}") from error


def _is_sha256(text) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _check_options(options, bad) -> CodingOptions:
    fields = set(CodingOptions.__dataclass_fields__)
    if not isinstance(options, dict) or set(options) != fields:
        raise bad("options", f"are not the coding options {sorted(fields)}")
    numbers = all(type(options[key]) in (int, float) for key in ("bin_width", "latent_range"))
    if not numbers or not _is_int(options["batch_size"]):
        raise bad("options", "are not numbers (bin_width, latent_range) and an integer (batch_size)")
    try:
        return CodingOptions(**options)
    except (ValueError, OverflowError) as error:  # OverflowError: an integer too large for a float
        raise bad("options", f"are not valid: {error}") from error


def _check_threads(threads, bad):
    if not _is_int(threads) or threads < 1:
        raise bad("threads", "is not a positive integer")
    if threads > _cpus():
        raise CompressedFileError(
            f"the file was compressed with {threads} threads and this machine has {_cpus()} CPUs: decoding must "
            f"repeat the encoder's arithmetic, which depends on the thread count, so it cannot use fewer. "
            f"Decompress it on a machine with at least {threads} CPUs"
        )


def codec_from_checkpoint(ckpt_path, use_ema: bool = True, data=None) -> tuple[Codec, ImageDataModule]:
    """The codec of a checkpoint's model (its EMA weights by default) with the preprocessing of the data
    it was trained on (or of the data config `data`), and that data module (for its test split)."""
    module, checkpoint = load_module(ckpt_path)
    datamodule, _ = data_module(checkpoint, ckpt_path, data)
    source = f"{ckpt_path} ({'EMA' if use_ema else 'raw, use_ema=false'} weights)"
    return Codec(module.ema if use_ema else module.vae, datamodule.preprocess, source), datamodule
