"""Hostile inputs to compression (vdvae.compression, compress.py): files whose header claims more than they
hold, paths that are not files, image names that are not file names, weights or probabilities that are not
finite, images that cannot be coded exactly, and interrupted outputs. Each is refused at once, in little time
and memory, with a message that says what is wrong, before any output is written."""

import hashlib
import json
import os
import re
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import build_model, perturb_
from tests.run_helpers import TINY_RUN, run, run_dirs, run_in_process
from vdvae import compression
from vdvae.compression import (
    Codec,
    CodingOptions,
    CompressedFileError,
    ModelError,
    check_names,
    codec_from_checkpoint,
    png_name,
    read_compressed,
    read_file,
    write_file,
)
from vdvae.data.base import Preprocess
from vdvae.errors import Terminated
from vdvae.tasks import compress as task

IMAGES = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
NAMES = [f"digit_{i}.png" for i in range(5)]


@pytest.fixture(scope="module")
def codec():
    """An untrained tiny model (8x8 grayscale) as a codec: coding needs no training to be exact."""
    return Codec(perturb_(build_model("tiny")), Preprocess())


@pytest.fixture(scope="module")
def valid(codec):
    """A file of the 5 images, named, and its header and words."""
    data, _ = codec.compress(IMAGES, CodingOptions(batch_size=8), NAMES)
    header, words = read_file(data)
    return data, header, np.array(words)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of the tiny model after one training step (a second of training): what a command needs."""
    out = tmp_path_factory.mktemp("ckpt")
    run_in_process(out, *TINY_RUN, "trainer.max_steps=1", "test=false")
    return out / "checkpoints" / "last.ckpt"


def craft(header: dict, words: np.ndarray, **changes) -> bytes:
    """A file with a valid checksum whose header has `changes`."""
    return write_file({**header, **changes}, words)


def measured(call):
    """call()'s exception, the seconds it took and the peak of memory Python allocated meanwhile (bytes)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        call()
    except Exception as error:  # the refusal under test
        raised = error
    else:
        raised = None
    seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return raised, seconds, peak


# A file of a few KB declaring 1,000 chunks of 4,096 images; a file asking for 4,096 threads; names that are not
# file names; JSON that is deep, huge or past the file's end; options that are not what they say.
CRAFTED = {
    "counts": (
        dict(count=4_096_000, chunks=[4096] * 1000, options=dict(bin_width=0.0625, latent_range=16.0, batch_size=4096)),
        "declares 4,096,000 images, but it holds",
    ),
    "threads": (dict(threads=4096), "compressed with 4096 threads and this machine has"),
    "long name": (dict(names=["a" * 300, *NAMES[1:]]), "is 304 bytes as a PNG file name"),
    "folder in a name": (dict(names=["../../etc/passwd", *NAMES[1:]]), "is not a plain file name"),
    "NUL in a name": (dict(names=["a\x00b", *NAMES[1:]]), "is not a plain file name"),
    "dot name": (dict(names=["..", *NAMES[1:]]), "is not a plain file name"),
    "same names": (dict(names=["a", "a.png", *NAMES[2:]]), "two images have the name 'a.png'"),
    "name not a string": (dict(names=[7, *NAMES[1:]]), "is not a string"),
    "names not one per image": (dict(names=NAMES[:2]), "names are not a list of 5 names"),
    "chunks past the batch": (
        dict(chunks=[5], options=dict(bin_width=0.0625, latent_range=16.0, batch_size=4)),
        "larger than the file's batch size 4",
    ),
    "chunks not the count": (dict(chunks=[1, 1]), "chunks are not positive integers adding up to the 5 images"),
    "float batch size": (dict(options=dict(bin_width=0.0625, latent_range=16.0, batch_size=4.5)), "an integer"),
    "NaN bin width": (dict(options=dict(bin_width=float("nan"), latent_range=16.0, batch_size=8)), "bin_width"),
    "huge range": (dict(options=dict(bin_width=0.5, latent_range=10**400, batch_size=8)), "options are not valid"),
    "boolean count": (dict(count=True), "not a positive integer"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_headers_are_refused_at_once_in_little_memory(valid, case):
    _, header, words = valid
    changes, message = CRAFTED[case]
    data = craft(header, words, **changes)
    error, seconds, peak = measured(lambda: read_file(data))
    assert isinstance(error, CompressedFileError) and message in str(error), error
    assert seconds < 1 and peak < 4 * 2**20, (seconds, peak)


def test_files_whose_json_or_lengths_lie_are_refused(valid):
    _, header, words = valid

    def with_header(text: bytes, length=None) -> bytes:
        body = compression.MAGIC + struct.pack("<HI", compression.VERSION, length or len(text)) + text
        body += words.astype("<u4").tobytes()
        return body + hashlib.sha256(body).digest()

    deep = b"[" * 100_000 + b"]" * 100_000
    huge = json.dumps({**header, "count": "HUGE"}).replace('"HUGE"', "9" * 5000).encode()
    text = json.dumps(header).encode()
    cases = {
        "deep": (with_header(deep), "header is not valid JSON"),
        "huge int": (with_header(huge), "header is not valid JSON"),
        "length past the end": (with_header(text, len(text) + 10**6), "runs past the file's end"),
        "words cut": (with_header(text, len(text) - 1), "not a whole number of 32-bit words"),
        "not UTF-8": (with_header(b"\xff" * 8), "header is not valid JSON"),
    }
    for data, message in cases.values():
        error, seconds, peak = measured(lambda data=data: read_file(data))
        assert isinstance(error, CompressedFileError) and message in str(error), error
        assert seconds < 1 and peak < 8 * 2**20, (seconds, peak)


def test_a_seed_longer_than_the_model_can_pop_is_refused_before_it_is_allocated(codec, valid):
    _, header, words = valid
    header, words = read_file(craft(header, words, seed_words=250_000_000))  # the header alone cannot tell
    error, seconds, peak = measured(lambda: codec.decode(header, words))
    assert isinstance(error, CompressedFileError) and "seed is 250,000,000 words" in str(error), error
    assert seconds < 1 and peak < 4 * 2**20, (seconds, peak)


def test_every_image_costs_a_word_padding_the_seed_where_images_are_cheaper(codec, valid, monkeypatch):
    """The encoder keeps at least MIN_WORDS_PER_IMAGE words per image (padding the seed), which bounds a
    file's image count by its size; the padded file still decodes exactly."""
    _, header, words = valid
    assert len(words) >= header["count"] * compression.MIN_WORDS_PER_IMAGE
    _, plain = codec.compress(IMAGES[:3])
    monkeypatch.setattr(compression, "MIN_WORDS_PER_IMAGE", 300)  # more than these images cost
    data, report = codec.compress(IMAGES[:3])
    header, words = read_file(data)
    assert len(words) >= 900 and report.initial_bits == 32 * header["seed_words"] > plain.initial_bits
    assert report.chunks == plain.chunks  # the padding changes nothing above it
    assert torch.equal(codec.decompress(data)[0], IMAGES[:3])
    count = len(words) // 300 + 1
    with pytest.raises(CompressedFileError, match=f"declares {count} images, but it holds {len(words)} words"):
        read_file(craft(header, words, count=count, chunks=[1] * count))


def test_a_file_of_garbage_under_a_genuine_header_stops_at_its_first_chunk(codec, monkeypatch, tmp_path):
    """A file that passes every check of its header (copied from a genuine one) but holds other words is
    decoded no further than its first chunk: each chunk's SHA-256 is checked as it is decoded."""
    data, _ = codec.compress(torch.cat([IMAGES] * 8), CodingOptions(batch_size=4))
    header, words = read_file(data)
    assert len(header["chunks"]) >= 8 and len(header["chunks_sha256"]) == len(header["chunks"])
    garbage = np.random.default_rng(0).integers(0, 2**32, len(words), dtype=np.uint32)
    header, words = read_file(write_file(header, garbage))
    decoded = []
    decode_chunk = Codec._decode_chunk
    monkeypatch.setattr(Codec, "_decode_chunk", lambda self, *a: decoded.append(1) or decode_chunk(self, *a))
    with pytest.raises(CompressedFileError, match=f"chunk {len(header['chunks'])} of {len(header['chunks'])} decoded"):
        codec.decode(header, words)
    assert len(decoded) == 1
    # A file of the format's first version (no chunk digests) is refused before any decoding.
    first = dict(read_file(data)[0])
    del first["chunks_sha256"]
    text = json.dumps(first, separators=(",", ":")).encode()
    body = compression.MAGIC + struct.pack("<HI", 1, len(text)) + text + read_file(data)[1].astype("<u4").tobytes()
    with pytest.raises(CompressedFileError, match="format version 1, whose chunks carry no checksums"):
        read_file(body + hashlib.sha256(body).digest())
    # Chunks larger than this run's batch size (the memory of one pass) are refused before the model loads.
    (tmp_path / "f.vdvae").write_bytes(data)
    cfg = OmegaConf.create({"file": str(tmp_path / "f.vdvae"), "batch_size": 2, "ckpt_path": "never read"})
    with pytest.raises(CompressedFileError, match="chunks of up to 4 images, .* more than batch_size=2"):
        task.decompress_file(cfg, tmp_path)


def test_files_ask_for_no_more_threads_than_the_machine_has(codec, monkeypatch):
    monkeypatch.setattr(compression, "_cpus", lambda: 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data, _ = codec.compress(IMAGES[:2])
    finally:
        torch.set_num_threads(before)
    assert read_file(data)[0]["threads"] == 1


@pytest.mark.parametrize("kind", ["device", "FIFO", "directory", "missing", "too large"])
def test_only_regular_files_of_bounded_size_are_read(tmp_path, kind, monkeypatch):
    path = {"device": "/dev/zero", "directory": tmp_path, "missing": tmp_path / "none"}.get(kind, tmp_path / "f")
    if kind == "FIFO":
        os.mkfifo(path)
    if kind == "too large":
        path.write_bytes(b"\0" * 1001)
        monkeypatch.setattr(compression, "MAX_FILE_BYTES", 1000)
    message = {
        "device": "is a device, not a regular file",
        "FIFO": "is a FIFO (named pipe), not a regular file",
        "directory": "is a directory, not a regular file",
        "missing": "cannot be opened: No such file or directory",
        "too large": "is 1,001 bytes, more than the 1,000 bytes",
    }[kind]
    result = []
    reader = threading.Thread(target=lambda: result.append(measured(lambda: read_compressed(path))), daemon=True)
    reader.start()
    reader.join(timeout=10)  # a FIFO opened without O_NONBLOCK would wait for a writer forever
    [(error, seconds, peak)] = result
    assert isinstance(error, CompressedFileError) and message in str(error), error
    assert f"file={path}" in str(error) and seconds < 1 and peak < 2**20


def test_names_must_be_plain_file_names():
    assert png_name("a") == "a.png" and png_name("b.PNG") == "b.PNG"
    check_names(["a", "b.png", "é" * 100])  # 200 bytes of UTF-8 and .png: fine
    for bad, message in [
        (["é" * 126], "is 256 bytes as a PNG file name; file systems accept at most 255"),
        (["\ud800"], "cannot be encoded as a file name"),
        (["a/b"], "not a plain file name"),
        ([""], "not a plain file name"),
        (["x", "x.png"], "two images have the name 'x.png'"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_names(bad)


def test_names_the_decoder_would_refuse_are_refused_before_coding(codec):
    with pytest.raises(ValueError, match="image 1's name 'a/b' is not a plain file name .*: rename the image file"):
        codec.compress(IMAGES[:2], names=["a", "a/b"])


def test_non_finite_weights_or_probabilities_are_refused_before_the_coder(codec, ckpt, tmp_path):
    broken = perturb_(build_model("tiny"))
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ModelError, match="the weights hold NaN or infinite values"):
        Codec(broken, Preprocess())
    # Finite weights so large that the network overflows: its probabilities are refused, not handed on.
    huge = Codec(perturb_(build_model("tiny"), scale=1e30), Preprocess())
    with pytest.raises(ModelError, match="computes .* that is not finite"):
        huge.compress(IMAGES[:2])
    # Through a checkpoint: named in the message.
    checkpoint = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if k.startswith("ema.") and v.is_floating_point())
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'nan.ckpt'))}.*NaN"):
        codec_from_checkpoint(tmp_path / "nan.ckpt")


def write_png(path, depth: int, colour: int, samples: int, size: int = 8):
    """An 8x8 PNG of `depth`-bit samples (PIL cannot write 16-bit RGB): colour type 0 gray, 2 RGB, 4 LA, 6 RGBA."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + bytes(range(27, 27 + 8 * samples * depth // 8))  # 27 = 0b00011011: four 2-bit levels
    ihdr = struct.pack(">IIBBBBB", size, size, depth, colour, 0, 0, 0)  # IDAT: 8x8 whatever `size` says
    png = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * 8)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def test_images_that_cannot_be_coded_exactly_are_refused_with_what_to_do(tmp_path):
    gray, frames = np.arange(64, dtype=np.uint8).reshape(8, 8), tmp_path / "frames.tif"
    Image.fromarray(gray).save(frames, save_all=True, append_images=[Image.fromarray(gray)])
    write_png(tmp_path / "rgb48.png", 16, 2, 3)
    write_png(tmp_path / "la16.png", 16, 4, 2)
    Image.fromarray(gray.astype(np.uint16) * 256).save(tmp_path / "gray16.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(gray).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(gray).convert("CMYK").save(tmp_path / "cmyk.tif")
    Image.fromarray(gray).save(tmp_path / "keyed.png", transparency=0)
    gray_model, rgb_model = (1, 8, 8), (3, 8, 8)
    cases = [
        ("gray16.png", gray_model, "I;16 image; .* more than 8 bits per sample; convert it to 8-bit L first"),
        ("rgb48.png", rgb_model, "RGB image; .* more than 8 bits per sample; convert it to 8-bit RGB first"),
        ("la16.png", gray_model, "RGBA image; .* more than 8 bits per sample"),
        ("palette.png", rgb_model, "P image; .* palette image; convert it to RGB first"),
        ("rgba.png", rgb_model, "RGBA image; .* transparency would be lost"),
        ("la.png", gray_model, "LA image; .* transparency would be lost"),
        ("keyed.png", gray_model, "L image; .* transparency would be lost"),
        ("cmyk.tif", rgb_model, "CMYK image; .* convert it to RGB first"),
        ("frames.tif", gray_model, "L image; .* holds 2 frames"),
    ]
    for name, shape, message in cases:
        with pytest.raises(ValueError, match=f"inputs: {tmp_path / name} is a 8x8 {message}"):
            task.read_exact_images([tmp_path / name], shape)
    # Not images at all: a FIFO named like one in a folder (opening it would block) and a pixel bomb.
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    with pytest.raises(ValueError, match=f"inputs: {folder / 'pipe.png'} is not a regular file"):
        task.read_exact_images([folder], gray_model)
    write_png(tmp_path / "bomb.png", 8, 0, 1, size=30_000)  # 900 megapixels declared
    with pytest.raises(ValueError, match="inputs: .*bomb.png: Image size .* exceeds limit"):
        task.read_exact_images([tmp_path / "bomb.png"], gray_model)
    # Bilevel and 2-bit grayscale are read one-to-one as L.
    Image.fromarray(gray > 31).save(tmp_path / "bilevel.png")
    write_png(tmp_path / "gray2.png", 2, 0, 1)
    images, _ = task.read_exact_images([tmp_path / "bilevel.png", tmp_path / "gray2.png"], gray_model)
    assert torch.equal(images[0, 0], torch.from_numpy((gray > 31).astype(np.uint8) * 255))
    assert len(images[1].unique()) == 4


def decompress_config(ckpt, file):
    return OmegaConf.create({"ckpt_path": str(ckpt), "file": str(file), "use_ema": True, "data": None})


def test_an_interrupted_decompression_leaves_no_images_folder(ckpt, tmp_path, monkeypatch):
    codec, _ = codec_from_checkpoint(ckpt)
    data, _ = codec.compress(IMAGES, names=NAMES)
    (tmp_path / "f.vdvae").write_bytes(data)
    saved = []

    def save_then_stop(image):
        if len(saved) == 3:
            raise Terminated()
        saved.append(image)
        return Image.fromarray(image[0].numpy())

    monkeypatch.setattr(task, "pil_image", save_then_stop)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(Terminated):
        task.decompress_file(decompress_config(ckpt, tmp_path / "f.vdvae"), out)
    assert list(out.iterdir()) == []  # neither images/ nor its temporary folder
    monkeypatch.undo()
    assert task.decompress_file(decompress_config(ckpt, tmp_path / "f.vdvae"), out) == [out / "images"]
    assert sorted(p.name for p in (out / "images").iterdir()) == NAMES


@pytest.mark.slow
def test_the_command_refuses_crafted_files_in_one_line_before_any_work(ckpt, tmp_path):
    """As a user starts it: a header claiming 4 million images, /dev/zero, a FIFO and a 300-character
    name are each refused in one line, exit status 1, leaving no run folder and no PNG."""
    codec, _ = codec_from_checkpoint(ckpt)
    header, words = read_file(codec.compress(IMAGES, names=NAMES)[0])
    counts, long_name, fifo = tmp_path / "counts.vdvae", tmp_path / "long.vdvae", tmp_path / "fifo.vdvae"
    counts.write_bytes(craft(header, np.array(words), **CRAFTED["counts"][0]))
    long_name.write_bytes(craft(header, np.array(words), names=[*NAMES[:2], "b" * 300, *NAMES[3:]]))
    os.mkfifo(fifo)
    cases = [
        (counts, "declares 4,096,000 images"),
        ("/dev/zero", "file=/dev/zero is a device, not a regular file"),
        (fifo, "is a FIFO (named pipe), not a regular file"),
        (long_name, "image 2's name 'bbbbbbbb"),
    ]
    for file, message in cases:
        start = time.time()
        result = run("compress.py", tmp_path, f"ckpt_path={ckpt}", "mode=decompress", f"file={file}", timeout=120)
        seconds = time.time() - start
        assert result.returncode == 1 and message in result.stderr, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert seconds < 60, seconds  # the command's start-up: the file itself is refused in milliseconds
        assert run_dirs(tmp_path, "compress") == [] and not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_a_stopped_compression_or_decompression_exits_130_or_143_and_leaves_nothing(ckpt, tmp_path):
    """Ctrl-C during compress.py and SIGTERM during decompression, as a user sends them once the run
    directory exists: the command stops with 130 or 143 in one line, and no output or run folder is left."""
    import signal
    import subprocess

    from tests.run_helpers import start
    from vdvae.data.base import first_images

    codec, datamodule = codec_from_checkpoint(ckpt)
    datamodule.setup("test")
    data, _ = codec.compress(first_images(datamodule.test_set, 297), CodingOptions(batch_size=1))  # seconds to decode
    (tmp_path / "f.vdvae").write_bytes(data)
    cases = [
        (signal.SIGINT, 130, "SIGINT", ["batch_size=1"]),
        (signal.SIGTERM, 143, "SIGTERM", ["mode=decompress", f"file={tmp_path / 'f.vdvae'}"]),
    ]
    for signum, status, name, args in cases:
        proc = start(
            "compress.py", tmp_path, f"ckpt_path={ckpt}", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.time() + 60
        while not list((tmp_path / "logs").glob("compress/runs/*/.hydra/overrides.yaml")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # past Hydra's set-up: in the command's loading or its coding
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == status, (name, stdout[-2000:], stderr[-2000:])
        assert "Traceback" not in stderr and f"stopped by {name}" in stdout + stderr
        assert run_dirs(tmp_path, "compress") == [] and not list(tmp_path.rglob("*.png"))
