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
"""

import hashlib
import json
import struct
from dataclasses import asdict, dataclass

import constriction
import numpy as np
import torch

from vdvae.checkpoints import data_module, load_module
from vdvae.data import ImageDataModule

MAGIC = b"VDVAE-BB"
VERSION = 1
PRECISION_BITS = 24  # probability precision of constriction's default ANS coder and models
SEED_PATTERN = 0x5EED  # the seed words are a fixed pseudo-random pattern; only their count varies


class CompressedFileError(ValueError):
    """The file cannot be decompressed here: not this format, damaged, or made with another model."""


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
    with torch.no_grad():
        torch.manual_seed(0)
        for start in range(0, len(images), batch_size):
            inputs, target = preprocess(images[start : start + batch_size])
            total += sum(float(vae(inputs, target).bpd.sum()) for _ in range(draws))
    return total / (draws * len(images))


class _Grid:
    """The entropy models of one file's coding options, and its latent grid."""

    def __init__(self, options: CodingOptions):
        model = constriction.stream.model
        self.options, k = options, options.max_symbol
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
        return mean.flatten().numpy(), std.flatten().numpy()


def _ints(t: torch.Tensor) -> np.ndarray:
    return t.flatten().numpy().astype(np.int32)


class Codec:
    """Compress uint8 images (N, C, H, W) to bytes and back with a VAE and its pixel preprocessing.

    The VAE runs on the CPU in fp32: the decoder must repeat the encoder's arithmetic bit for bit.
    """

    def __init__(self, vae, preprocess):
        self.vae, self.preprocess = vae.eval().cpu().float(), preprocess
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
            pmf = vae.likelihood.channel_pmf(params, target, c).numpy()
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
            pmf = likelihood.channel_pmf(params, likelihood.grid(symbols), c).numpy()
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

    def _seed_words_needed(self, grid: _Grid, first) -> int:
        """The seed words the first image's posterior draws read, measured on a seed long enough for any
        image (a draw costs at most PRECISION_BITS bits), plus two for the coder's state."""
        generous = PRECISION_BITS * sum(int(np.prod(s)) for s in self.vae.latent_shapes) // 32 + 4
        popped = self._encode_chunk(constriction.stream.stack.AnsCoder(seed_words(generous)), grid, first)
        return -(-popped // 32) + 2

    def compress(self, images: torch.Tensor, options: CodingOptions = CodingOptions(), names=None):
        """One file (bytes) for all `images` (uint8 (N, C, H, W)), and a Report of its cost. `names`, one
        per image if given, are stored for decompression."""
        self._check_images(images)
        images, n, grid = images.cpu(), len(images), _Grid(options)
        names = [str(name) for name in names] if names is not None else None
        if names is not None and len(names) != n:
            raise ValueError(f"got {len(names)} names for {n} images")
        seed = self._seed_words_needed(grid, images[:1])
        coder = constriction.stream.stack.AnsCoder(seed_words(seed))
        chunks, start, pop_bits = [], 0, 32 * seed
        while start < n:  # each chunk as large as the stack can pay its posterior draws for
            size = max(1, min(int(coder.num_valid_bits() // (1.05 * pop_bits)), options.batch_size, n - start))
            pop_bits = self._encode_chunk(coder, grid, images[start : start + size]) / size
            chunks.append(size)
            start += size
        header = {
            "model": self.identity,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "count": n,
            "shape": list(self.shape),
            "options": asdict(options),
            "chunks": chunks,
            "seed_words": seed,
            "images_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
            "names": names,
        }
        data = write_file(header, coder.get_compressed())
        report = Report(n, self.dims, 8 * len(data), 32 * seed, 8 * (len(data) - 4 * coder.num_words()), chunks)
        return data, report

    def decompress(self, data: bytes) -> tuple[torch.Tensor, list | None]:
        """The images (uint8 (N, C, H, W)) and names (None if none were stored) of a file written by
        `compress` with this model."""
        header, words = read_file(data)
        if header["model"] != self.identity:
            raise CompressedFileError(
                "this file was compressed with another model (its weights, architecture or preprocessing "
                "differ): decompress it with the checkpoint that compressed it"
            )
        if tuple(header["shape"]) != self.shape:
            raise CompressedFileError(f"the file holds images of shape {header['shape']}; the model codes {self.shape}")
        try:
            grid = _Grid(CodingOptions(**header["options"]))
        except (TypeError, ValueError) as error:
            raise CompressedFileError(f"the file's coding options are not valid: {error}") from error
        if max(header["chunks"]) > grid.options.batch_size:
            raise CompressedFileError("the file's chunks are larger than its batch size")
        coder = constriction.stream.stack.AnsCoder(words)
        threads = torch.get_num_threads()
        torch.set_num_threads(header["threads"])  # threads can change the order of a kernel's sums
        try:
            decoded = [self._decode_chunk(coder, grid, n) for n in reversed(header["chunks"])]
        finally:
            torch.set_num_threads(threads)
        images = torch.cat(decoded[::-1])
        intact = hashlib.sha256(images.numpy().tobytes()).hexdigest() == header["images_sha256"]
        if not intact or not np.array_equal(coder.get_compressed(), seed_words(header["seed_words"])):
            raise CompressedFileError(
                "the decoded images do not match the file's checksum: this machine computed other probabilities "
                f"than the encoder's (which ran torch {header['torch']}; this is {torch.__version__}). Decompress "
                "on the same kind of machine and software"
            )
        return images, header["names"]

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
    "names",
}


def write_file(header: dict, words: np.ndarray) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<HI", VERSION, len(text)) + text + words.astype("<u4").tobytes()
    return body + hashlib.sha256(body).digest()


def read_file(data: bytes) -> tuple[dict, np.ndarray]:
    """The header and ANS words of a file, after checking its format, version and checksum."""
    if not data.startswith(MAGIC):
        raise CompressedFileError("not a vdvae compressed file (it does not start with the format's magic bytes)")
    fixed = len(MAGIC) + 6
    if len(data) < fixed + 32:
        raise CompressedFileError("the file is truncated (shorter than the format's header)")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise CompressedFileError("the file is truncated or corrupt (its SHA-256 checksum does not match)")
    version, length = struct.unpack("<HI", data[len(MAGIC) : fixed])
    if version != VERSION:
        raise CompressedFileError(f"the file is format version {version}; this vdvae reads version {VERSION}")
    try:
        header = json.loads(body[fixed : fixed + length].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompressedFileError(f"the file's header is not valid JSON: {error}") from error
    if not isinstance(header, dict) or set(header) != HEADER_KEYS:
        raise CompressedFileError("the file's header does not have the fields of this format")
    if (len(body) - fixed - length) % 4:
        raise CompressedFileError("the file's compressed data is not a whole number of 32-bit words")
    if not _header_is_valid(header):
        raise CompressedFileError("the file's header has fields of the wrong type or out of range")
    return header, np.frombuffer(body[fixed + length :], dtype="<u4").astype(np.uint32)


def _header_is_valid(header: dict) -> bool:
    def ints(values, low):
        return isinstance(values, list) and all(type(v) is int and v >= low for v in values)

    count, names = header["count"], header["names"]
    names_ok = names is None or (
        isinstance(names, list) and len(names) == count and all(isinstance(n, str) for n in names)
    )
    return (
        type(count) is int
        and count > 0
        and ints(header["chunks"], 1)
        and sum(header["chunks"]) == count
        and ints(header["shape"], 1)
        and len(header["shape"]) == 3
        and type(header["threads"]) is int
        and 1 <= header["threads"] <= 4096
        and type(header["seed_words"]) is int
        and header["seed_words"] >= 0
        and isinstance(header["options"], dict)
        and all(isinstance(header[k], str) for k in ("model", "torch", "images_sha256"))
        and names_ok
    )


def codec_from_checkpoint(ckpt_path, use_ema: bool = True, data=None) -> tuple[Codec, ImageDataModule]:
    """The codec of a checkpoint's model (its EMA weights by default) with the preprocessing of the data
    it was trained on (or of the data config `data`), and that data module (for its test split)."""
    module, checkpoint = load_module(ckpt_path)
    datamodule, _ = data_module(checkpoint, ckpt_path, data)
    return Codec(module.ema if use_ema else module.vae, datamodule.preprocess), datamodule
