"""Figures shared by the analyses' plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import io


def subplots(*args, **kwargs):
    """`plt.subplots` on the Agg backend (dpi 100 unless given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kwargs.setdefault("dpi", 100)
    return plt.subplots(*args, **kwargs)


def run_colours(runs) -> dict[str, str]:
    """One colour of the default cycle per run id, in sorted order (the same run, the same colour in every panel)."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {rid: cycle[i % len(cycle)] for i, rid in enumerate(sorted(set(runs)))}


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
