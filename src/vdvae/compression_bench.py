"""Bits-back compression measured: a checkpoint's codec on the first n test images, against the same
images' negative ELBO and against PNG (optimized), WebP (lossless) and lzma of the raw bytes; encode and
decode speed; and the gap to the ELBO at several latent grid steps. Every decoded image is checked.

    python -m vdvae.compression_bench logs/train/runs/<date>/checkpoints/last.ckpt --images 1000 \
        --bin-widths 0.25 0.0625 0.015625 --out compression.json
"""

import argparse
import io
import json
import lzma
import time

import torch

from vdvae.compression import CodingOptions, codec_from_checkpoint, negative_elbo
from vdvae.data.base import first_images
from vdvae.sampling import pil_image


def classic_bits(images: torch.Tensor) -> dict[str, int]:
    """Bits of each image as an optimized PNG and a lossless WebP (one file per image), and of lzma on all
    the raw bytes at once."""
    webp = {"lossless": True, "quality": 100, "method": 6}
    formats = {"png_optimized": ("PNG", {"optimize": True}), "webp_lossless": ("WEBP", webp)}
    bits = dict.fromkeys(formats, 0)
    for image in images:
        picture = pil_image(image)
        for name, (fmt, options) in formats.items():
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt, **options)
            bits[name] += 8 * buffer.tell()
    bits["lzma_raw"] = 8 * len(lzma.compress(images.numpy().tobytes(), preset=9 | lzma.PRESET_EXTREME))
    return bits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--images", type=int, default=1000, help="the first n test images")
    parser.add_argument("--bin-widths", type=float, nargs="+", default=[1 / 16], help="the first is decoded too")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--elbo-draws", type=int, default=4)
    parser.add_argument("--out", default="compression.json")
    args = parser.parse_args(argv)

    codec, datamodule = codec_from_checkpoint(args.ckpt)
    datamodule.setup("test")
    images = first_images(datamodule.test_set, args.images)
    dims = len(images) * codec.dims
    elbo = negative_elbo(codec.vae, codec.preprocess, images, args.elbo_draws)
    result = {
        "checkpoint": args.ckpt,
        "images": len(images),
        "threads": torch.get_num_threads(),
        "negative_elbo_bits_per_dim": elbo,
        "classic_bits_per_dim": {k: v / dims for k, v in classic_bits(images).items()},
        "bits_back": [],
    }
    for i, bin_width in enumerate(args.bin_widths):
        start = time.perf_counter()
        data, report = codec.compress(images, CodingOptions(bin_width=bin_width, batch_size=args.batch_size))
        encode = time.perf_counter() - start
        row = {
            "bin_width": bin_width,
            "file_bits_per_dim": report.bits_per_dim,
            "net_bits_per_dim": report.net_bits_per_dim,
            "gap_to_elbo": report.net_bits_per_dim / elbo - 1,
            "initial_bits": report.initial_bits,
            "header_bits": report.header_bits,
            "chunks": len(report.chunks),
            "encode_images_per_s": len(images) / encode,
        }
        if i == 0:
            start = time.perf_counter()
            decoded, _ = codec.decompress(data)
            row["decode_images_per_s"] = len(images) / (time.perf_counter() - start)
            row["decoded_exactly"] = bool(torch.equal(decoded, images))
        result["bits_back"].append(row)
        print(json.dumps(row), flush=True)
    with open(args.out, "w") as file:
        json.dump(result, file, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "bits_back"}, indent=1))
    return result


if __name__ == "__main__":
    main()
