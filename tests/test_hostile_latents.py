"""Latents files for sample.py mode=decode: crafted ones are refused, in one line, before any decoding and
in a bounded time and memory; good ones decode in batches to the images of one pass; outputs are written
whole or not at all (in-process; the command itself: tests/test_eval_sample.py)."""

import resource
import time

import pytest
import torch

from tests.conftest import build_model, perturb_, random_batch
from vdvae.errors import Terminated
from vdvae.sampling import decode_latents, load_latents, save_grid, save_latents


@pytest.fixture(scope="module")
def vae():
    return perturb_(build_model("tiny"), scale=0.1).eval()  # groups: (4, 1, 1), (4, 4, 4) x 2, (4, 8, 8) x 2


def latents_file(path, latents):
    torch.save({"latents": latents, "resolutions": [], "checkpoint": "crafted", "use_mean": True}, path)
    return path


def zeros(vae, n, dtype=torch.float32):
    return [torch.zeros(n, *shape, dtype=dtype) for shape in vae.latent_shapes]


CRAFTED = {
    "no-groups": (lambda v: [], "has 0 latent groups; the model has 5"),
    "too-many-groups": (lambda v: zeros(v, 2) + zeros(v, 2)[:1], "has 6 latent groups; the model has 5"),
    "not-a-list": (lambda v: torch.zeros(2, 4, 1, 1), "'latents' is a Tensor; it must be a list"),
    "not-a-tensor": (lambda v: [[0.0]], "group 0 is a list, not a tensor"),
    "no-images": (lambda v: zeros(v, 0), "holds the latents of no image"),
    "mixed-counts": (lambda v: zeros(v, 2)[:2] + zeros(v, 3)[2:], r"different numbers of images, \[2, 2, 3, 3, 3\]"),
    "float64": (lambda v: zeros(v, 2, torch.float64), "group 0 holds torch.float64 values; latents must be float32"),
    "int64": (lambda v: zeros(v, 2, torch.int64), "group 0 holds torch.int64 values"),
    "complex": (lambda v: zeros(v, 2, torch.complex64), "group 0 holds torch.complex64 values"),
    "wrong-shape": (
        lambda v: [torch.zeros(2, 4, 2, 2)],
        r"group 0 has shape \(2, 4, 2, 2\); the model needs \(N, 4, 1, 1\)",
    ),
    "nan": (lambda v: [z.index_fill(0, torch.tensor([1]), float("nan")) for z in zeros(v, 2)], "group 0 holds 4 NaN"),
    "inf": (lambda v: zeros(v, 2)[:3] + [torch.full((2, 4, 8, 8), float("inf"))], "group 3 holds 512 NaN or infinite"),
    "sparse": (lambda v: [zeros(v, 2)[0].to_sparse()], "group 0 is a torch.sparse_coo tensor"),
    "meta": (lambda v: [torch.empty(10**6, 4, 1, 1, device="meta")], "group 0 is a meta tensor, which holds no values"),
    "expanded-spatially": (
        lambda v: [torch.zeros(2, 4, 1, 1), torch.zeros(2, 4, 1, 1).expand(2, 4, 4, 4)],
        r"group 1 declares 2 images \(512 bytes of latents\) but the file stores only 32 bytes",
    ),
}


@pytest.mark.parametrize("case", CRAFTED, ids=list(CRAFTED))
@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_a_crafted_latents_file_is_refused_in_one_line(vae, tmp_path, case):
    build, message = CRAFTED[case]
    path = latents_file(tmp_path / f"{case}.pt", build(vae))
    with pytest.raises(ValueError, match=message) as error:
        load_latents(vae, path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_few_kilobytes_declaring_a_hundred_million_images_are_refused_at_once(vae, tmp_path):
    # Expanded (stride-0) tensors: 25.8 GB of latents declared by a 5 KB file. Refused on the metadata, before
    # anything is materialized (a copy would fail to allocate, or take minutes and gigabytes).
    n = 10**8
    path = latents_file(tmp_path / "expanded.pt", [torch.zeros(1, *s).expand(n, *s) for s in vae.latent_shapes])
    assert path.stat().st_size < 10_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"group 0 declares {n} images .* stores only 16 bytes for it"):
        load_latents(vae, path)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024


def test_narrow_floats_are_widened_exactly(vae, tmp_path):
    x, _ = random_batch(vae, n=3)
    latents = [z.to(torch.bfloat16) for z in vae.encode(x)]
    loaded = load_latents(vae, latents_file(tmp_path / "bf16.pt", latents[:2]))
    assert all(z.dtype == torch.float32 and z.is_contiguous() for z in loaded)
    assert all(torch.equal(a, b.float()) for a, b in zip(loaded, latents, strict=False))


def test_batched_decoding_gives_the_images_of_one_pass(vae, tmp_path):
    x, _ = random_batch(vae, n=10)
    path = save_latents(vae, x, tmp_path / "latents.pt", "ckpt", batch_size=3)  # encoded in batches too
    latents = load_latents(vae, path)
    torch.testing.assert_close(latents, vae.encode(x))
    # Every group given and temperature 0: nothing random, the batch size changes nothing.
    whole = vae.decode(latents, 0.0)
    for batch_size in (1, 3, 10, 64):
        assert torch.equal(decode_latents(vae, latents, 0.0, batch_size), whole), batch_size
    # Groups drawn from the prior: the same seed and batch size give the same images.
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(decode_latents(vae, latents[:2], 1.0, 4))
    assert torch.equal(*draws) and draws[0].shape == whole.shape and draws[0].dtype == torch.uint8


def test_an_interrupted_write_leaves_no_file(vae, tmp_path, monkeypatch):
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert save_grid(images, tmp_path / "grid.png", 2).is_file()
    x, _ = random_batch(vae, n=2)
    assert save_latents(vae, x, tmp_path / "latents.pt", "ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "latents.pt"]  # no temporary files

    def stopped_half_way(obj, f, *args, **kwargs):
        open(f, "wb").write(b"\x89PNG half")
        raise Terminated()

    monkeypatch.setattr("PIL.Image.Image.save", stopped_half_way)
    monkeypatch.setattr(torch, "save", stopped_half_way)
    for write in (
        lambda: save_grid(images, tmp_path / "new" / "grid.png", 2),
        lambda: save_latents(vae, x, tmp_path / "new" / "latents.pt", "ckpt"),
    ):
        with pytest.raises(Terminated):
            write()
    assert list((tmp_path / "new").iterdir()) == []
