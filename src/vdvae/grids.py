"""Image grids a person can read. Images smaller than 64 px are scaled up by a whole factor (nearest
neighbour, so pixels stay pixels); larger ones keep their size, and a grid keeps its columns. The labels
are in the image: a title (what is shown: step, temperature, bits/dim), a heading per part and a label
per row, in PIL's default font. The PNG's text metadata holds the same labels ("Title", "Description"),
and `caption` gives them as one line for the loggers. Files are written whole or not at all
(vdvae.files.atomic_path).
"""

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torchvision.utils import make_grid

from vdvae.files import atomic_path

MIN_CELL = 64  # px per image, at least, once scaled
PAD = 2  # px between images
MARGIN = 4  # px around text
TEXT_WIDTH = 360  # px a figure is widened to, at most, for its labels: narrow grids keep legible lines
SEP = ", "  # between the title's parts


@dataclass
class Part:
    """`images` (uint8 (N, C, H, W)) in rows of `ncol`, under an optional `heading`, the rows labelled by
    `rows` (one label per row, or none)."""

    images: torch.Tensor
    ncol: int
    heading: str = ""
    rows: list[str] = field(default_factory=list)


def scale_factor(size: int) -> int:
    """The whole factor that brings `size` px to at least MIN_CELL px (1 for images that large already)."""
    return max(1, -(-MIN_CELL // size))


def enlarge(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Every pixel repeated `factor` times down and across."""
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) if factor > 1 else images


@lru_cache
def font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at `size` px (scalable with FreeType; the fixed bitmap font otherwise)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


_MEASURE = ImageDraw.Draw(Image.new("L", (1, 1)))


def text_box(text: str, face) -> tuple[int, int, int, int]:
    return _MEASURE.textbbox((0, 0), text, font=face)


def text_width(text: str, face) -> int:
    return text_box(text, face)[2]


def wrap(parts: list[str], face, width: int) -> list[str]:
    """Text parts joined into lines no wider than `width` px: whole parts where they fit, else word by word."""
    lines = []
    for part in parts:
        if lines and text_width(lines[-1] + SEP + part, face) <= width:
            lines[-1] += SEP + part
            continue
        line = ""
        for word in part.split(" "):
            if line and text_width(f"{line} {word}", face) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def grid_image(part: Part, factor: int) -> torch.Tensor:
    """The part's images scaled and tiled: uint8 (3, H, W) on a white ground."""
    images = enlarge(part.images.cpu(), factor)
    return make_grid(images, nrow=part.ncol, padding=PAD, pad_value=255)


def render(parts: list[Part], title: list[str]) -> Image.Image:
    """One image: the title's lines, then each part's heading and labelled grid, top to bottom."""
    factor = scale_factor(max(parts[0].images.shape[-2:]))
    cell = parts[0].images.shape[-2] * factor
    face = font(min(32, max(14, cell // 5)))  # text follows the images' size: legible beside 64 or 256 px
    grids = [grid_image(p, factor) for p in parts]
    labels = [r for p in parts for r in p.rows]
    label_w = max(text_width(r, face) for r in labels) + 3 * MARGIN if labels else 0
    width = text_room(title + [p.heading for p in parts], face, label_w + max(g.shape[-1] for g in grids))
    line_h = text_box("Ag", face)[3] + 2 * MARGIN
    lines = wrap(title, face, width - 2 * MARGIN)
    headings = [wrap([p.heading], face, width - 2 * MARGIN) if p.heading else [] for p in parts]
    height = (len(lines) + sum(map(len, headings))) * line_h + sum(g.shape[-2] for g in grids)
    mode = "RGB" if any(p.images.shape[1] == 3 for p in parts) else "L"
    canvas = Image.new(mode, (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for line in lines:
        draw.text((MARGIN, y + MARGIN), line, fill="black", font=face)
        y += line_h
    for part, grid, heading in zip(parts, grids, headings, strict=True):
        for line in heading:
            draw.text((MARGIN, y + MARGIN), line, fill="black", font=face)
            y += line_h
        array = grid.permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(array[..., 0] if mode == "L" else array), (label_w, y))
        cell_h = part.images.shape[-2] * factor
        for r, label in enumerate(part.rows):
            _, top, _, bottom = text_box(label, face)
            centre = y + PAD + r * (cell_h + PAD) + cell_h // 2
            draw.text((MARGIN, centre - (top + bottom) // 2), label, fill="black", font=face)
        y += grid.shape[-2]
    return canvas


def text_room(texts: list[str], face, content: int) -> int:
    """The figure's width: its images' (`content` px), widened for its text up to TEXT_WIDTH (lines wrap
    beyond that), and for any single word wider still."""
    texts = [t for t in texts if t]
    longest = max((text_width(t, face) for t in texts), default=0)
    widest_word = max((text_width(w, face) for t in texts for w in t.split(" ")), default=0)
    return max(content, min(longest, TEXT_WIDTH) + 2 * MARGIN, widest_word + 2 * MARGIN)


def caption(parts: list[Part], title: list[str]) -> str:
    """The figure's labels as one line: the title, then each part's heading and row labels."""
    pieces = [SEP.join(title)]
    for part in parts:
        rows = f"rows: {SEP.join(part.rows)}" if part.rows else ""
        pieces.append(": ".join(p for p in (part.heading, rows) if p))
    return "; ".join(p for p in pieces if p)


def save_figure(path: Path, parts: list[Part], title: list[str]) -> Path:
    """The labelled figure as a PNG at `path` (labels also in its text metadata), written whole or not at all."""
    image = render(parts, title)
    info = PngInfo()
    info.add_text("Title", SEP.join(title))
    info.add_text("Description", caption(parts, title))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)  # the temporary name has no .png suffix to go by
    return path


def labels(path: Path) -> dict:
    """The text metadata of a PNG written by `save_figure` ({"Title": ..., "Description": ...})."""
    with Image.open(path) as image:
        return dict(image.text)
