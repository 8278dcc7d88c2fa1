"""Bits-back compression (vdvae.compression, compress.py) on a tiny model trained by the tests: exact round
trips through another process, the code length against the information of every push and pop computed
independently, the size against the ELBO, and files that must fail."""

import os
import subprocess
import sys
from pathlib import Path

import constriction
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, build_model, perturb_
from tests.run_helpers import TINY_RUN, run_in_process, shows_progress
from vdvae.compression import Codec, CodingOptions, CompressedFileError, codec_from_checkpoint
from vdvae.data.base import first_images
from vdvae.tasks.compress import read_exact_images

pytestmark = pytest.mark.slow
ANS_CODER = constriction.stream.stack.AnsCoder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VDVAE trained on digits, its codec and its first 60 test images."""
    out = tmp_path_factory.mktemp("trained")
    run_in_process(out, *TINY_RUN, "trainer.max_epochs=2", "test=false")
    ckpt = out / "checkpoints" / "last.ckpt"
    codec, datamodule = codec_from_checkpoint(ckpt)
    datamodule.setup("test")
    return ckpt, codec, first_images(datamodule.test_set, 60)


def run_compress(cwd, *args, threads="2"):
    """compress.py run from `cwd` (its logs/ go there) with `threads` threads."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": threads}
    return subprocess.run(
        [sys.executable, str(ROOT / "compress.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def output_dir(result) -> Path:
    """The run directory of the first output compress.py says it wrote."""
    line = next(line for line in result.stderr.splitlines() + result.stdout.splitlines() if "wrote " in line)
    return Path(line.split("wrote ", 1)[1].strip()).parent


def read_pngs(folder: Path, names) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(folder / n))).unsqueeze(0) for n in names])


def test_round_trip_is_exact_in_another_process(trained, tmp_path):
    """Compressed here (1 thread under the test runner), decompressed by compress.py in a new process with
    2 threads: every image comes back bit for bit, and chunks of several sizes were used."""
    ckpt, codec, images = trained
    data, report = codec.compress(images, CodingOptions(batch_size=8))
    assert len(set(report.chunks)) > 1  # chunks grow with the stack
    path = tmp_path / "digits.vdvae"
    path.write_bytes(data)
    result = run_compress(tmp_path, f"ckpt_path={ckpt}", "mode=decompress", f"file={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = output_dir(result) / "images"
    names = [f"{i:05d}.png" for i in range(len(images))]
    assert sorted(p.name for p in folder.iterdir()) == names
    assert torch.equal(read_pngs(folder, names), images)


def test_image_files_keep_their_names_through_the_command_line(trained, tmp_path):
    ckpt, codec, images = trained
    folder = tmp_path / "pngs"
    folder.mkdir()
    names = [f"digit_{i}.png" for i in range(5)]
    for image, name in zip(images[:5], names, strict=True):
        Image.fromarray(image[0].numpy()).save(folder / name)
    done = run_compress(tmp_path, f"ckpt_path={ckpt}", f"inputs=[{folder}]", threads="1")
    assert done.returncode == 0, done.stderr[-3000:]
    file = output_dir(done) / "images.vdvae"
    back = run_compress(tmp_path, f"ckpt_path={ckpt}", "mode=decompress", f"file={file}")
    assert back.returncode == 0, back.stderr[-3000:]
    assert torch.equal(read_pngs(output_dir(back) / "images", names), images[:5])
    assert not shows_progress(done.stderr + back.stderr)  # bars are for terminals only


class RecordingCoder:
    """An ANS coder that records every push and pop with its entropy model's parameters."""

    def __init__(self, *args):
        self.coder, self.ops = ANS_CODER(*args), []
        self.initial_bits = self.coder.num_valid_bits()

    def decode(self, model, *params):
        symbols = self.coder.decode(model, *params)
        self.ops.append((-1, symbols, params))
        return symbols

    def encode_reverse(self, symbols, model, *params):
        self.ops.append((+1, symbols, params))
        self.coder.encode_reverse(symbols, model, *params)

    def __getattr__(self, name):
        return getattr(self.coder, name)


def quantized_gaussian(symbols, mean, std, k_max):
    """P(k) of a N(mean, std) clipped to [-k_max - 1/2, k_max + 1/2] and binned at the integers (torch)."""
    normal = torch.distributions.Normal(torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std))
    k = torch.as_tensor(symbols, dtype=torch.float64)
    mass = normal.cdf(k + 0.5) - normal.cdf(k - 0.5)
    return mass / (normal.cdf(torch.tensor(k_max + 0.5)) - normal.cdf(torch.tensor(-k_max - 0.5)))


def test_code_length_is_the_information_of_the_pushes_less_the_pops(trained, monkeypatch):
    """The stack grows by sum(-log2 p) over pushes less sum(-log2 q) over pops, computed here with
    torch.distributions. The tolerance is derived from the coder: its models hold probabilities in 24-bit
    fixed point, each symbol's at least 2^-24 and the rest scaled by (1 - n 2^-24) for n symbols, then
    rounded, so |p~ - p| <= n 2^-24 p + 2^-23 per symbol; plus 64 bits for the coder's state."""
    _, codec, images = trained
    coders = []
    monkeypatch.setattr(
        constriction.stream.stack, "AnsCoder", lambda *a: coders.append(RecordingCoder(*a)) or coders[-1]
    )
    options = CodingOptions(bin_width=1 / 32, latent_range=8, batch_size=4)
    _, report = codec.compress(images[:12], options)
    coder = coders[-1]  # the first coder measured the seed
    k_max = options.max_symbol
    information, moved, tolerance = 0.0, 0.0, 64.0
    for sign, symbols, params in coder.ops:
        if len(params) == 2:  # a posterior: mean and std per symbol
            p, n = quantized_gaussian(symbols, *params, k_max), 2 * k_max + 1
        elif len(params) == 1 and np.ndim(params[0]) == 2:  # pixels: a pmf per symbol
            pmf = torch.as_tensor(params[0])
            p, n = (
                pmf[torch.arange(len(symbols)), torch.as_tensor(symbols, dtype=torch.long)] / pmf.sum(1),
                pmf.shape[1],
            )
        else:  # the prior: N(0, 1 / bin_width) for every symbol
            p, n = quantized_gaussian(symbols, 0.0, 1 / options.bin_width, k_max), 2 * k_max + 1
        error = n * 2.0**-24 * p + 2.0**-23
        bits = float(-torch.log2(p.clamp(min=2.0**-24)).sum())
        information, moved = information + sign * bits, moved + bits
        tolerance += float(torch.log2((p + error) / (p - error).clamp(min=2.0**-24)).sum())
    grown = coder.num_valid_bits() - coder.initial_bits
    assert abs(grown - information) <= tolerance, (grown, information, tolerance)
    assert tolerance - 64 < 1e-3 * moved  # the check is tight enough to mean something


def test_compressed_size_is_close_to_the_elbo(trained):
    """Without the initial bits, the file costs the images' negative ELBO up to the noise of coding with one
    posterior draw per image (4 standard errors, measured over 50 draws) and what the latent grid costs."""
    _, codec, images = trained
    with torch.no_grad():
        torch.manual_seed(0)
        inputs, target = codec.preprocess(images.repeat(50, 1, 1, 1))
        draws = codec.vae(inputs, target).bpd.view(50, len(images))
    elbo, noise = float(draws.mean()), 4 * float(draws.mean(1).std())
    for bin_width in (1 / 4, 1 / 64):
        _, report = codec.compress(images, CodingOptions(bin_width=bin_width, batch_size=30))
        assert abs(report.net_bits_per_dim - elbo) < noise + 0.005 * elbo, (bin_width, report, elbo, noise)


def test_bad_files_fail_clearly(trained):
    _, codec, images = trained
    data, _ = codec.compress(images[:3])
    cases = {
        "truncated": (data[:-100], "truncated or corrupt"),
        "corrupt": (data[:200] + bytes([data[200] ^ 1]) + data[201:], "truncated or corrupt"),
        "another format": (b"\x89PNG\r\n\x1a\n" + data[8:], "not a vdvae compressed file"),
        "empty": (b"", "not a vdvae compressed file"),
    }
    for bad, message in cases.values():
        with pytest.raises(CompressedFileError, match=message):
            codec.decompress(bad)
    other = Codec(perturb_(build_model("tiny"), scale=0.01), codec.preprocess)
    with pytest.raises(CompressedFileError, match="another model"):
        other.decompress(data)


def test_images_the_model_cannot_code_are_refused(trained, tmp_path):
    _, codec, images = trained
    with pytest.raises(ValueError, match="shape"):
        codec.compress(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        codec.compress(images.float())
    big, rgb = tmp_path / "big.png", tmp_path / "rgb.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(big)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(rgb)
    for path, found in ((big, "16x16 L image"), (rgb, "8x8 RGB image")):
        with pytest.raises(ValueError, match=f"{found}; this model compresses 8x8 grayscale"):
            read_exact_images([path], codec.shape)


def test_wrong_model_on_the_command_line_writes_nothing(trained, tmp_path):
    ckpt, codec, images = trained
    other = perturb_(build_model("tiny"), scale=0.01)
    data, _ = Codec(other, codec.preprocess).compress(images[:2])
    path = tmp_path / "other.vdvae"
    path.write_bytes(data)
    result = run_compress(tmp_path, f"ckpt_path={ckpt}", "mode=decompress", f"file={path}")
    assert result.returncode != 0 and "compressed with another model" in result.stderr
    assert not list((tmp_path / "logs").rglob("*.log")) and not list((tmp_path / "logs").rglob("*.png"))
