"""Figures and a one-file HTML page for the quality report (pure core: PIL and matplotlib only).

- ``reconstruction_grid``: the published picture's layout, "original, reconstructed from float,
  reconstructed from uint8", one row per image, with each reconstruction's PSNR drawn on it;
- ``channel_histograms`` / ``channel_bars``: per-channel latent distributions and statistics
  (rows of ``ChannelStats.summary()``);
- ``html_table`` / ``html_report``: a self-contained HTML page with the PNGs inlined.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagenet_int8_assets.core.common.plotting import figure_png, pyplot

# --- reconstruction grid -------------------------------------------------------------------------
#
# Layout (all in pixels), for ``n`` rows and tiles of ``tile`` x ``tile``:
#
#   +-----------------------------------------------+  y = 0
#   | header row: GRID_HEADER high, column titles   |
#   +-----------------------------------------------+  y = GRID_HEADER
#   | PAD | tile | PAD | tile | PAD | tile | PAD    |  row 0 starts at y = GRID_HEADER + PAD
#   |  ... one row per image, PAD between rows ...  |
#   +-----------------------------------------------+  one PAD below the last row
#
#   width  = 3 * tile + 4 * GRID_PAD
#   height = GRID_HEADER + n * tile + (n + 1) * GRID_PAD
#   tile (row r, column c) has its top-left corner at
#       x = GRID_PAD + c * (tile + GRID_PAD),  y = GRID_HEADER + GRID_PAD + r * (tile + GRID_PAD)
#
# Text (PSNR on columns 1 and 2, the optional label on column 0) is white on a dark box anchored
# at the tile's bottom-left corner; the box is at most TEXT_BOX_MAX_HEIGHT pixels high, so the
# top ``tile - TEXT_BOX_MAX_HEIGHT`` rows of every tile show the resized image untouched.

GRID_PAD = 4
GRID_HEADER = 20
GRID_FONT_SIZE = 12
TEXT_MARGIN = 2  # box inset from the tile corner, and padding around the text inside the box
TEXT_BOX_MAX_HEIGHT = 20
GRID_BACKGROUND = (255, 255, 255)
HEADER_COLOUR = (0, 0, 0)
TEXT_COLOUR = (255, 255, 255)
TEXT_BOX_COLOUR = (0, 0, 0)
DEFAULT_HEADERS = ("original", "from float", "from uint8")


def grid_size(n: int, tile: int) -> tuple[int, int]:
    """``(width, height)`` of ``reconstruction_grid`` for ``n`` images and ``tile`` px tiles."""
    return 3 * tile + 4 * GRID_PAD, GRID_HEADER + n * tile + (n + 1) * GRID_PAD


def tile_origin(row: int, column: int, tile: int) -> tuple[int, int]:
    """Top-left ``(x, y)`` of the tile at ``row``, ``column`` (0 original, 1 float, 2 uint8)."""
    return GRID_PAD + column * (tile + GRID_PAD), GRID_HEADER + GRID_PAD + row * (tile + GRID_PAD)


def _font(size: int = GRID_FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType: the bitmap font
        return ImageFont.load_default()


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64)), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H x W x 3 image, got shape {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return Image.fromarray(a[..., :3], "RGB")


def format_psnr(value) -> str | None:
    """``"31.2 dB"``; ``"inf"`` for identical images; ``None`` (no text) for ``None``."""
    if value is None:
        return None
    value = float(value)
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "n/a"
    return f"{value:.1f} dB"


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with an ellipsis) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def _text_box(draw: ImageDraw.ImageDraw, x0: int, y0: int, tile: int, text: str, font) -> None:
    """White ``text`` on a dark box in the bottom-left corner of the tile at ``(x0, y0)``."""
    text = _fit(draw, text, font, tile - 4 * TEXT_MARGIN)
    if not text:
        return
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    # box rows: [tile-1-MARGIN-h-2*MARGIN, tile-1-MARGIN], so it stays in the bottom TEXT_BOX_MAX_HEIGHT
    h = min(h, TEXT_BOX_MAX_HEIGHT - 3 * TEXT_MARGIN - 1)
    box_x0 = x0 + TEXT_MARGIN
    box_y1 = y0 + tile - 1 - TEXT_MARGIN
    box_y0 = max(y0, box_y1 - h - 2 * TEXT_MARGIN)
    box_x1 = min(x0 + tile - 1, box_x0 + w + 2 * TEXT_MARGIN)
    draw.rectangle([box_x0, box_y0, box_x1, box_y1], fill=TEXT_BOX_COLOUR)
    draw.text((box_x0 + TEXT_MARGIN - left, box_y0 + TEXT_MARGIN - top), text, font=font, fill=TEXT_COLOUR)


def reconstruction_grid(
    originals,
    from_float,
    from_uint8,
    psnr_float,
    psnr_uint8,
    labels=None,
    tile: int = 128,
    headers: Sequence[str] = DEFAULT_HEADERS,
) -> Image.Image:
    """An RGB grid: one row per image, columns original | reconstructed from float | from uint8.

    Images are ``H x W x 3`` arrays (uint8, or float on 0..255) or PIL images, resized (bicubic)
    to ``tile`` x ``tile``. ``psnr_float`` / ``psnr_uint8`` (dB, one per image; ``inf`` prints
    "inf", ``None`` prints nothing) are drawn on the reconstruction tiles; ``labels`` (optional,
    e.g. class names) on the original tiles. The size is ``grid_size(n, tile)`` whatever the
    inputs (layout at the top of this module).
    """
    n = len(originals)
    if not (len(from_float) == len(from_uint8) == len(psnr_float) == len(psnr_uint8) == n):
        raise ValueError("originals, reconstructions and PSNR lists must have the same length")
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    grid = Image.new("RGB", grid_size(n, tile), GRID_BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    for c, title in enumerate(headers[:3]):
        x0, _ = tile_origin(0, c, tile)
        text = _fit(draw, str(title), font, tile)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx = x0 + (tile - (right - left)) // 2 - left
        ty = (GRID_HEADER - (bottom - top)) // 2 - top
        draw.text((tx, ty), text, font=font, fill=HEADER_COLOUR)
    for r in range(n):
        cells = (
            (originals[r], None if labels is None else str(labels[r])),
            (from_float[r], format_psnr(psnr_float[r])),
            (from_uint8[r], format_psnr(psnr_uint8[r])),
        )
        for c, (image, text) in enumerate(cells):
            x0, y0 = tile_origin(r, c, tile)
            grid.paste(_to_pil(image).resize((tile, tile), Image.BICUBIC), (x0, y0))
            if text:
                _text_box(draw, x0, y0, tile, text, font)
    return grid


# --- per-channel plots ---------------------------------------------------------------------------


def channel_histograms(
    latents_per_channel_sample, value_range: float, bins: int = 100, log: bool = True
) -> bytes:
    """PNG: one histogram panel per channel, with dashed lines at the clip bounds +-range.

    ``latents_per_channel_sample`` is a ``(C, M)`` array or a list of 1-D arrays (a sample of
    each channel's latent values). Non-finite values are left out. The x axis spans the larger
    of 1.15 * range and the largest |value|, so out-of-range tails stay visible; with ``log``
    (default) the counts are on a log scale for the same reason. Titles read
    ``"ch i: clip x.xx%"``, the share of values with ``|v| > range`` (as ``ChannelStats`` counts).
    """
    channels = [np.asarray(v, dtype=np.float64).ravel() for v in latents_per_channel_sample]
    if not channels:
        raise ValueError("no channels to plot")
    channels = [v[np.isfinite(v)] for v in channels]
    extent = max((float(np.abs(v).max()) for v in channels if v.size), default=0.0)
    lim = max(1.15 * value_range, extent)
    cols = min(len(channels), 4)
    rows = math.ceil(len(channels) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(channels):
            ax.axis("off")
            continue
        v = channels[i]
        clip = float(np.mean(np.abs(v) > value_range)) if v.size else float("nan")
        counts, edges = np.histogram(v, bins=bins, range=(-lim, lim))
        ax.stairs(counts, edges, fill=True, color="tab:blue")
        if log and counts.any():
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.7)
            ax.yaxis.set_minor_locator(plt.NullLocator())  # fewer ticks: faster, cleaner panels
        for bound in (-value_range, value_range):
            ax.axvline(bound, color="tab:red", linestyle="--", linewidth=1)
        ax.set_xlim(-lim, lim)
        ax.set_title(f"ch {i}: clip {100 * clip:.2f}%", fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"latent values per channel (dashed: clip bounds ±{value_range:g})", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def channel_bars(summary_rows: Sequence[Mapping], key: str, title: str) -> bytes:
    """PNG: a bar per channel of ``row[key]`` (e.g. ``quant_rmse`` or ``clip_fraction``).

    ``summary_rows`` are ``ChannelStats.summary()`` rows (``channel`` names each bar; the row
    index is used when it is missing). Each bar is labelled with its value.
    """
    if not summary_rows:
        raise ValueError("no rows to plot")
    names = [f"ch {row.get('channel', i)}" for i, row in enumerate(summary_rows)]
    values = [float(row[key]) for row in summary_rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(values) + 2.0), 3.0))
    heights = [0.0 if math.isnan(v) else v for v in values]
    bars = ax.bar(names, heights, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
    ax.set_ylabel(key)
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.15)
    fig.tight_layout()
    return figure_png(fig)


# --- HTML ----------------------------------------------------------------------------------------


def _cell(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) and value > 0 else f"{value:.4g}"
    return str(value)


def html_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """An HTML ``<table>`` of ``rows`` (dicts) in ``columns`` order; floats as ``.4g``, escaped."""
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{png_data_uri(png)}" alt="{html.escape(alt)}">'


_PLACEHOLDER = re.compile(r"\{\{image:([^}]+)\}\}")
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\((data:image/[a-z]+;base64,[A-Za-z0-9+/=]+)\)")


def _inline(text: str) -> str:
    """Escape ``text`` and apply the few inline markdown forms used here (code, bold, images)."""
    images: list[str] = []

    def keep(m):
        images.append(f'<img src="{m.group(2)}" alt="{html.escape(m.group(1))}">')
        return f"\x00{len(images) - 1}\x00"

    text = html.escape(_MD_IMAGE.sub(keep, text), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub("\x00(\\d+)\x00", lambda m: images[int(m.group(1))], text)


def _markdown_table(lines: list[str]) -> str:
    def cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header = cells(lines[0])
    body = [cells(line) for line in lines[1:] if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
    head = "".join(f"<th>{_inline(c)}</th>" for c in header)
    rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _markdown(text: str) -> str:
    """A small markdown subset: pipe tables, ``-`` lists, ``#`` headings, paragraphs."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if all(line.lstrip().startswith("|") for line in lines):
            out.append(_markdown_table(lines))
        elif all(line.lstrip().startswith(("- ", "* ")) for line in lines):
            items = "".join(f"<li>{_inline(line.lstrip()[2:])}</li>" for line in lines)
            out.append(f"<ul>{items}</ul>")
        elif len(lines) == 1 and lines[0].startswith("#"):
            level = min(6, len(lines[0]) - len(lines[0].lstrip("#")) + 2)
            out.append(f"<h{level}>{_inline(lines[0].lstrip('#').strip())}</h{level}>")
        else:
            out.append("<p>" + "<br>\n".join(_inline(line) for line in lines) + "</p>")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
figure { margin: 1em 0; }
figcaption { color: #555; font-size: 0.9em; }
code { background: #f3f3f3; padding: 0 3px; }
""".strip()


def html_report(title: str, sections: Sequence[tuple[str, str]], images: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: ``title``, the sections in order, every image inlined.

    Each section is ``(heading, text)``. ``text`` starting with ``<`` is used as HTML as it is
    (e.g. ``html_table(...)``); anything else is read as a small markdown subset (pipe tables,
    ``-`` lists, ``#`` headings, paragraphs, inline code, bold, base64 markdown images). A
    ``{{image:NAME}}`` anywhere in a section's text is replaced by ``images[NAME]``; images no
    section refers to are shown, captioned with their names, in a final "Figures" section.
    """
    used: set[str] = set()

    def figure(name: str) -> str:
        if name not in images:
            return f"<p><em>(missing image {html.escape(name)})</em></p>"
        used.add(name)
        return f"<figure>{_img(images[name], name)}<figcaption>{html.escape(name)}</figcaption></figure>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, text in sections:
        text = text or ""
        chunks = _PLACEHOLDER.split(text)  # text, name, text, name, ...
        rendered = []
        for i, chunk in enumerate(chunks):
            if i % 2:
                rendered.append(figure(chunk.strip()))
            elif chunk.strip():
                rendered.append(chunk if chunk.lstrip().startswith("<") else _markdown(chunk))
        parts.append(f"<section><h2>{html.escape(heading)}</h2>\n" + "\n".join(rendered) + "</section>")
    rest = [name for name in images if name not in used]
    if rest:
        parts.append("<section><h2>Figures</h2>\n" + "\n".join(figure(name) for name in rest) + "</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
