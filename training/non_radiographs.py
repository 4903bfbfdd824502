"""Grey images that are no radiograph, drawn as a sender might mistake one for a study: pages of
text and code, editors in dark mode, application windows, spreadsheets, charts and photographs.

They are the negatives of the familiarity's radiograph probe (training/familiarity.py). Six
families, each drawn from its own generator, so that a probe fitted without one family can be
measured on it (how it meets a kind of image it never saw). Everything is drawn from a seed:
the same call gives the same PNG and JPEG bytes on every machine with the same Pillow and
matplotlib (the lock pins both).
"""

from __future__ import annotations

import io
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
MONO = "DejaVuSansMono.ttf"
# scikit-image's sample photographs (bundled, no download) and matplotlib's
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "text",
)


def _font(rng: np.random.Generator, size: int, name: str | None = None) -> ImageFont.ImageFont:
    name = name or FONTS[int(rng.integers(len(FONTS)))]
    path = FONT_DIR / name
    if path.exists():
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)  # Pillow's own font where DejaVu is not installed


def _corpus() -> list[str]:
    """Lines of Python's own sources: code, comments and docstrings (prose)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in ("textwrap.py", "argparse.py", "json/__init__.py", "csv.py", "calendar.py"):
        path = stdlib / name
        if path.exists():
            lines += [ln.rstrip() for ln in path.read_text(errors="replace").splitlines()]
    return lines or [f"line {i} of a page of text that is no radiograph" for i in range(400)]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(640, 1700)), int(rng.integers(480, 1300))


def _text_lines(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    corpus: list[str],
    box: tuple[int, int, int, int],
    ink: int | Callable[[], int],
    font: ImageFont.ImageFont,
    spacing: int,
    numbers: tuple[int, int] | None = None,
) -> None:
    """Consecutive corpus lines into `box`; `numbers` (x, grey) draws line numbers left of it."""
    x0, y0, x1, y1 = box
    start = int(rng.integers(len(corpus)))
    for i in range((y1 - y0) // spacing):
        line = corpus[(start + i) % len(corpus)][: max(8, (x1 - x0) // max(spacing // 2, 4))]
        y = y0 + i * spacing
        if numbers is not None:
            draw.text((numbers[0], y), f"{i + 1:>3}", fill=numbers[1], font=font)
        draw.text((x0, y), line, fill=ink() if callable(ink) else ink, font=font)


def document(rng: np.random.Generator, corpus: list[str]) -> np.ndarray:
    """A page of text: dark ink on a light page, a heading, margins, sometimes a rule."""
    w, h = _size(rng)
    paper = int(rng.integers(225, 256))
    image = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(12, 30))
    margin = int(rng.integers(10, 120))
    top = margin
    if rng.random() < 0.6:
        draw.text(
            (margin, top),
            corpus[int(rng.integers(len(corpus)))][:40] or "Report",
            fill=int(rng.integers(0, 60)),
            font=_font(rng, int(size * 1.6)),
        )
        top += int(size * 2.6)
    if rng.random() < 0.4:
        draw.line([(margin, top - size // 2), (w - margin, top - size // 2)], fill=80, width=2)
    ink = int(rng.integers(0, 90))
    _text_lines(
        draw,
        rng,
        corpus,
        (margin, top, w - margin, h - margin),
        ink,
        _font(rng, size),
        int(size * rng.uniform(1.2, 1.8)),
    )
    return np.asarray(image)


def dark_editor(rng: np.random.Generator, corpus: list[str]) -> np.ndarray:
    """Source code in a dark editor: a tab bar, a file sidebar, a gutter of line numbers and
    text in several greys (syntax colours once made grey)."""
    w, h = _size(rng)
    background = int(rng.integers(15, 60))
    image = Image.new("L", (w, h), background)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(12, 24))
    font = _font(rng, size, MONO)
    bar = int(rng.integers(24, 48))
    draw.rectangle([0, 0, w, bar], fill=min(background + 20, 255))
    side = int(rng.integers(0, w // 4))
    if side:
        draw.rectangle([0, bar, side, h], fill=max(background - 10, 0))
        _text_lines(
            draw,
            rng,
            [f"  {n}.py" for n in "abcdefghijklmnop"],
            (8, bar + 8, side, h),
            170,
            _font(rng, max(size - 2, 10)),
            size + 8,
        )
    greys = [int(g) for g in rng.integers(120, 250, size=4)]
    _text_lines(
        draw,
        rng,
        corpus,
        (side + 60, bar + 10, w - 10, h - 10),
        lambda: greys[int(rng.integers(len(greys)))],
        font,
        int(size * 1.4),
        numbers=(side + 6, 110),
    )
    return np.asarray(image)


def interface(rng: np.random.Generator, corpus: list[str]) -> np.ndarray:
    """An application window: a title bar, panels, buttons, input fields and labels, light or
    dark."""
    w, h = _size(rng)
    dark = rng.random() < 0.3
    base = int(rng.integers(30, 70)) if dark else int(rng.integers(200, 246))
    ink = 220 if dark else 30
    image = Image.new("L", (w, h), base)
    draw = ImageDraw.Draw(image)
    font = _font(rng, int(rng.integers(12, 20)))
    draw.rectangle([0, 0, w, 34], fill=base - 25 if not dark else base + 25)
    draw.text((12, 8), "Window", fill=ink, font=font)
    for _ in range(int(rng.integers(4, 14))):
        x, y = int(rng.integers(0, w - 120)), int(rng.integers(40, h - 40))
        bw, bh = int(rng.integers(60, 320)), int(rng.integers(22, 140))
        kind = rng.random()
        if kind < 0.4:  # a button
            fill = int(rng.integers(60, 200))
            draw.rounded_rectangle([x, y, x + bw, y + min(bh, 40)], radius=6, fill=fill)
            draw.text(
                (x + 10, y + 6),
                corpus[int(rng.integers(len(corpus)))].strip()[:12] or "OK",
                fill=255 if fill < 128 else 0,
                font=font,
            )
        elif kind < 0.7:  # an input field with its label
            draw.text((x, y - 18), "Name", fill=ink, font=font)
            draw.rectangle([x, y, x + bw, y + 28], fill=255 if not dark else 20, outline=128)
        else:  # a panel
            draw.rectangle([x, y, x + bw, y + bh], outline=int(rng.integers(90, 180)), width=2)
            for k in range(bh // 20):
                draw.ellipse([x + 6, y + 6 + 20 * k, x + 16, y + 16 + 20 * k], outline=ink)
                draw.text(
                    (x + 22, y + 2 + 20 * k),
                    corpus[int(rng.integers(len(corpus)))].strip()[:20],
                    fill=ink,
                    font=font,
                )
    return np.asarray(image)


def table(rng: np.random.Generator, corpus: list[str]) -> np.ndarray:
    """A spreadsheet: a grid, a shaded header row, numbers and words in the cells."""
    w, h = _size(rng)
    image = Image.new("L", (w, h), int(rng.integers(235, 256)))
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(11, 20))
    font = _font(rng, size)
    cw, rh = int(rng.integers(70, 180)), int(size * rng.uniform(1.6, 2.4))
    draw.rectangle([0, 0, w, rh], fill=int(rng.integers(180, 225)))
    line = int(rng.integers(150, 215))
    for x in range(0, w, cw):
        draw.line([(x, 0), (x, h)], fill=line)
    for r, y in enumerate(range(0, h, rh)):
        draw.line([(0, y), (w, y)], fill=line)
        for c, x in enumerate(range(0, w, cw)):
            if r == 0:
                text = f"Col {c + 1}"
            elif c == 0 or rng.random() < 0.2:
                text = corpus[int(rng.integers(len(corpus)))].strip()[:10]
            else:
                text = f"{rng.normal(100, 60):.2f}"
            draw.text((x + 4, y + 3), text, fill=20, font=font)
    return np.asarray(image)


def chart(rng: np.random.Generator, corpus: list[str]) -> np.ndarray:
    """A plot as a report or a dashboard shows it: lines, bars, scatter or a histogram, with
    axes, a title and sometimes a legend and grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = _size(rng)
    fig = plt.figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    kind = int(rng.integers(4))
    x = np.arange(int(rng.integers(8, 60)))
    for k in range(int(rng.integers(1, 4))):
        y = np.cumsum(rng.normal(0, 1, len(x))) + 5 * k
        if kind == 0:
            ax.plot(x, y, label=f"series {k}")
        elif kind == 1:
            ax.bar(x + 0.25 * k, np.abs(y), width=0.25, label=f"group {k}")
        elif kind == 2:
            ax.scatter(rng.normal(size=80), rng.normal(size=80) + k, s=8, label=f"set {k}")
        else:
            ax.hist(rng.normal(k, 1, 400), bins=30, alpha=0.6, label=f"sample {k}")
    ax.set_title(corpus[int(rng.integers(len(corpus)))].strip()[:40])
    ax.set_xlabel("time")
    ax.set_ylabel("value")
    if rng.random() < 0.5:
        ax.legend()
    if rng.random() < 0.5:
        ax.grid(True)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return np.asarray(Image.fromarray(rgba[..., :3]).convert("L"))


def _photo_sources() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        out.append(
            np.asarray(Image.fromarray(pixels[..., :3]).convert("L"))
            if pixels.ndim == 3
            else pixels
        )
    return out


def photograph(rng: np.random.Generator, sources: list[np.ndarray]) -> np.ndarray:
    """A grey photograph: part of a sample photograph, scaled, flipped, its contrast changed."""
    pixels = sources[int(rng.integers(len(sources)))]
    h, w = pixels.shape
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    part = Image.fromarray(pixels[y : y + ch, x : x + cw])
    scale = rng.uniform(0.8, 2.5)
    part = part.resize((max(64, int(cw * scale)), max(64, int(ch * scale))), Image.BILINEAR)
    out = np.asarray(part).astype(np.float32) / 255.0
    out = out ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return (255 * out).astype(np.uint8)


FAMILIES: dict[str, Callable[[np.random.Generator, list], np.ndarray]] = {
    "document": document,
    "dark-editor": dark_editor,
    "interface": interface,
    "table": table,
    "chart": chart,
    "photograph": photograph,
}


def encode(grey: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """PNG as a screenshot is saved, one time in four a JPEG as a phone or a browser sends it."""
    buf = io.BytesIO()
    if rng.random() < 0.25:
        Image.fromarray(grey).save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
        return buf.getvalue(), "image/jpeg"
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue(), "image/png"


def draw(family: str, count: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """`count` encoded images of one family, (bytes, content type) each, from `seed`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: one of {', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, list(FAMILIES).index(family)])
    material = _photo_sources() if family == "photograph" else _corpus()
    return [encode(FAMILIES[family](rng, material), rng) for _ in range(count)]
