"""What the saved figures show: every response type in its own colour and line style, phase labels clear of the
legend, and no title, label or legend cut off by the figure's edge.

Each plot function is run as the pipeline runs it (through plots.figure_png, which lays the figure out and saves
it); `drawn` keeps the figure it saved, so the tests read the matplotlib artists rather than the PNG's pixels."""
import polars as pl
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.legend import Legend
from matplotlib.text import Annotation

from ldpipe.analysis import borrowing, curves, plots, squeeze_toy
from ldpipe.influence import heatmap as influence_heatmap
from ldpipe.schema import CORE_RESPONSE_TYPES, INFLUENCE_HEATMAP_SCHEMA

CUSTOM = [f"custom_{i:02d}" for i in range(20)]   # user-declared types (spec probes.custom_types)
CHAIN_TITLE = ("exp_with_a_long_name.sft_run (sft) → exp_with_a_long_name.dpo_run (dpo): change of log π(y|x) "
               "since the first phase (EMA 0.9)")


@pytest.fixture
def drawn(monkeypatch):
    """drawn(module, fn, *args, **kw): call the plot function `fn` of `module`; returns the figure it saved,
    drawn, and its renderer."""
    def run(module, fn, *args, **kwargs):
        saved = []
        # a figure of several panels is rendered through plots.panels_png, which calls plots.figure_png
        owner = module if hasattr(module, "figure_png") else plots
        real = owner.figure_png

        def keep(fig):
            saved.append(fig)
            return real(fig)

        monkeypatch.setattr(owner, "figure_png", keep)
        png = fn(*args, **kwargs)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        fig, = saved
        FigureCanvasAgg(fig)   # a closed pyplot figure has lost its Agg canvas
        fig.canvas.draw()
        return fig, fig.canvas.get_renderer()
    return run


def _curves(types, steps=range(0, 50, 5)) -> pl.DataFrame:
    return pl.DataFrame([{"run_id": "e.sft", "step": s, "response_type": t, "mean_logp": 0.1 * (10 - i) * s,
                          "mean_delta": 0.1 * (10 - i) * s} for i, t in enumerate(types) for s in steps])


def _styles(fig) -> dict[str, tuple[str, str]]:
    """(colour as hex, line style) of each labelled line of the figure's one axes."""
    ax, = fig.axes
    return {ln.get_label(): (to_hex(ln.get_color()), ln.get_linestyle()) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def _titles(fig) -> list:
    """The suptitle and every axes' titles that hold text."""
    out = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        out += [ax._left_title, ax.title, ax._right_title]
    return [t for t in out if t.get_text()]


def _inside(box, fig) -> bool:
    outer = fig.bbox
    return (box.x0 >= outer.x0 - 0.5 and box.y0 >= outer.y0 - 0.5 and box.x1 <= outer.x1 + 0.5
            and box.y1 <= outer.y1 + 0.5)


def _texts_inside(fig, renderer) -> None:
    """Every title, axis label and legend lies inside the figure; titles of different axes do not overlap."""
    for t in _titles(fig):
        assert _inside(t.get_window_extent(renderer), fig), f"title {t.get_text()!r} is cut off"
    for ax in fig.axes:
        for label in (ax.xaxis.label, ax.yaxis.label):
            if label.get_text():
                assert _inside(label.get_window_extent(renderer), fig), f"label {label.get_text()!r} is cut off"
        if ax.get_legend() is not None:
            assert _inside(ax.get_legend().get_window_extent(renderer), fig), "a legend is cut off"
    heads = [t for t in _titles(fig) if t.axes is not None]
    for a in heads:
        for b in heads:
            if a.axes is not b.axes:
                assert not a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer)), \
                    f"titles {a.get_text()!r} and {b.get_text()!r} overlap"


def test_every_response_type_has_its_own_colour_and_line_style(drawn):
    types = [*CORE_RESPONSE_TYPES, *CUSTOM]
    fig, renderer = drawn(curves, curves.plot_learning_curves, _curves(types), title="t")
    _texts_inside(fig, renderer)   # the long legend too
    styles = _styles(fig)
    assert sorted(styles) == sorted(types)
    pairs = list(styles.values())
    clashes = {p: [t for t, q in styles.items() if q == p] for p in pairs if pairs.count(p) > 1}
    assert not clashes, f"response types sharing a (colour, line style): {clashes}"

    # fixed per core type: the same pair whichever other types a plot holds
    fig, _ = drawn(curves, curves.plot_learning_curves, _curves(["chosen_selfr", "chosen", "irr_hum"]), title="t")
    assert _styles(fig) == {t: styles[t] for t in ("chosen", "chosen_selfr", "irr_hum")}
    assert curves.response_styles(types) == curves.response_styles(reversed(types))


def test_phase_labels_clear_of_the_legend_and_nothing_cut_off(drawn):
    bounds = {0: "sft_run (sft)", 20: "dpo_run (dpo)", 35: "ipo_run (ipo)"}
    fig, renderer = drawn(curves, curves.plot_learning_curves, _curves(CORE_RESPONSE_TYPES), title=CHAIN_TITLE,
                          smooth=0.9, boundaries=bounds)
    ax, = fig.axes
    phase = [a for a in ax.texts if isinstance(a, Annotation)]
    assert sorted(a.get_text() for a in phase) == sorted(bounds.values())
    legend = ax.get_legend()
    assert isinstance(legend, Legend)
    legend_box = legend.get_window_extent(renderer)
    title_box = ax.title.get_window_extent(renderer)
    for a in phase:
        box = a.get_window_extent(renderer)
        assert not box.overlaps(legend_box), f"the legend hides the phase label {a.get_text()!r}"
        assert not box.overlaps(title_box), f"the title runs into the phase label {a.get_text()!r}"
        assert _inside(box, fig), f"the phase label {a.get_text()!r} is cut off"
    _texts_inside(fig, renderer)
    assert "".join(ax.title.get_text().split()) == "".join(CHAIN_TITLE.split())   # wrapped, not shortened


def _heatmap_rows() -> pl.DataFrame:
    rows = []
    for scope in ("same_prompt", "other_prompt"):
        for k, trained in enumerate(("chosen", "rejected", "dpo")):
            for j, observed in enumerate(("chosen", "irr_hum", "rejected")):
                rows.append({"run_id": "x.sft", "checkpoint": "accumulated", "checkpoint_step": None,
                             "trained_type": trained, "observed_type": observed, "scope": scope,
                             "entk_mean": None, "value": (1.0 + k + j) * (1e-4 if trained == "dpo" else 1.0),
                             "n": 4})
    return pl.DataFrame(rows, schema=INFLUENCE_HEATMAP_SCHEMA)


def _run_rows() -> tuple[pl.DataFrame, pl.DataFrame]:
    runs = ["squeeze_exp.dpo_beta_0.1", "squeeze_exp.sft_then_dpo"]
    view = pl.DataFrame([{"run_id": r, "step": s, "delta_chosen": -0.1 * s, "delta_argmax": 0.05 * s,
                          "gap_per_token": 0.1 * s, "argmax_share": 0.5, "rejected_logp_per_token": -0.2 * s,
                          "delta_irr_train": -0.1 * s, "delta_irr_hum": -0.2 * s}
                         for r in runs for s in range(0, 40, 5)])
    stats = pl.DataFrame([{"run_id": r, "step": s, "split": split, "mean_max_prob": 0.5, "repeater_rate": 0.1,
                           "fact_borrow_share": 0.3, "borrow_share": 0.2}
                          for r in runs for s in (0, 20, 35) for split in ("train", "test")])
    return view, stats


@pytest.mark.parametrize("which", ["curves", "squeeze_toy", "heatmap", "borrowing", "squeezing"])
def test_no_title_cut_off(drawn, which):
    if which == "curves":
        fig, renderer = drawn(curves, curves.plot_learning_curves, _curves(["chosen", "rejected"]),
                              title=CHAIN_TITLE + " " + CHAIN_TITLE)
    elif which == "squeeze_toy":
        fig, renderer = drawn(squeeze_toy, squeeze_toy.plot_panel, squeeze_toy.run_panel("D0"))
    elif which == "heatmap":
        fig, renderer = drawn(influence_heatmap, influence_heatmap.plot_heatmap, _heatmap_rows(),
                              title="exp.sft_run: accumulated eNTK influence")
    elif which == "borrowing":
        fig, renderer = drawn(borrowing, borrowing.plot_borrowing, *_run_rows(),
                              title="squeeze_exp: hallucination borrowing")
    else:
        from ldpipe.analysis import squeezing

        fig, renderer = drawn(squeezing, squeezing.plot_squeezing, *_run_rows(), title="squeeze_exp: squeezing")
    _texts_inside(fig, renderer)
