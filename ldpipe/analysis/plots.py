"""Figures shared by the analyses' plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import io
import textwrap
import warnings


def subplots(*args, **kwargs):
    """`plt.subplots` on the Agg backend (dpi 100 unless given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kwargs.setdefault("dpi", 100)
    return plt.subplots(*args, **kwargs)


def per_run(curves, other):
    """(run id, its colour, `curves`' rows of that run by step, `other`'s rows of that run by step) for every run
    of either frame: a figure's panels of step curves and of per-checkpoint figures, one colour per run."""
    import polars as pl

    for rid, colour in run_colours([*curves["run_id"].to_list(), *other["run_id"].to_list()]).items():
        yield (rid, colour, curves.filter(pl.col("run_id") == rid).sort("step"),
               other.filter(pl.col("run_id") == rid).sort("step"))


def run_colours(runs) -> dict[str, str]:
    """One colour of the default cycle per run id, in sorted order (the same run, the same colour in every panel)."""
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {rid: cycle[i % len(cycle)] for i, rid in enumerate(sorted(set(runs)))}


def titles(fig) -> list:
    """The figure's title Text artists that hold text: the suptitle and every axes' left, centre and right title."""
    out = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        out += [ax._left_title, ax.title, ax._right_title]
    return [t for t in out if t.get_text()]


def _wrap(text, room: float, renderer) -> bool:
    """Re-break `text`'s lines so that it is at most `room` pixels wide; True when it changed."""
    width = text.get_window_extent(renderer).width
    if width <= room:
        return False
    lines = text.get_text().split("\n")
    chars = max(len(line) for line in lines)
    for _ in range(8):   # a few narrower tries: glyph widths vary, so the first guess may still be too wide
        chars = max(8, min(chars - 1, int(chars * room / width)))
        text.set_text("\n".join(textwrap.fill(line, chars) or line for line in lines))
        width = text.get_window_extent(renderer).width
        if width <= room or chars == 8:
            break
    return True


def _inside(box, outer) -> bool:
    return (box.x0 >= outer.x0 - 0.5 and box.y0 >= outer.y0 - 0.5 and box.x1 <= outer.x1 + 0.5
            and box.y1 <= outer.y1 + 0.5)


def layout_figure(fig):
    """Lay the figure out so that nothing drawn is cut off: `tight_layout` makes room for every title, label and
    legend (also a legend placed outside the axes); a title that still sticks out of the figure, or runs into
    another axes' title, is wrapped onto more lines (to its axes' width; the suptitle: to the figure's) and the
    layout is made again. Returns the figure."""
    with warnings.catch_warnings():
        # tight_layout warns (and leaves the layout as it is) when the decorations cannot fit; wrapping the titles
        # below mends the usual cause, and savefig's bbox_inches="tight" in figure_png keeps the rest in the picture
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        changed = False
        for t in titles(fig):
            box = t.get_window_extent(renderer)
            others = [o.get_window_extent(renderer) for o in titles(fig)
                      if o is not t and o.axes is not None and o.axes is not t.axes]
            if _inside(box, fig.bbox) and (t.axes is None or not any(box.overlaps(o) for o in others)):
                continue
            room = t.axes.get_window_extent(renderer).width if t.axes is not None else fig.bbox.width * 0.96
            changed |= _wrap(t, room, renderer)
        if changed:
            fig.tight_layout()
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes (laid out by layout_figure); the figure is closed (pyplot keeps every open figure
    alive otherwise)."""
    import matplotlib.pyplot as plt

    layout_figure(fig)
    buf = io.BytesIO()
    # bbox_inches="tight": the saved picture is cut to what is drawn, so no title, label or legend is clipped
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def panels_png(fig, axes, title: str) -> bytes:
    """PNG bytes of a figure of several panels: each panel's legend, the figure's title, laid out."""
    for ax in axes:
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    return figure_png(fig)
