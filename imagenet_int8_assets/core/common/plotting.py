"""Matplotlib without a display, and figures as PNG bytes (shared by the report and the probe)."""

from __future__ import annotations

import base64
import io


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (safe in run workers and CI)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """A markdown image with the PNG inlined (Dagster's UI renders it in markdown metadata)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
