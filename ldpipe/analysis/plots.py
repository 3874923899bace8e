"""PNG output shared by the analyses' plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import io


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
