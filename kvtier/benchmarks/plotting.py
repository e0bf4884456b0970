"""PNG figures of the benchmarks. matplotlib is the `bench` extra, not a dependency of the engine:
it is imported here, and only when a plot is asked for."""

from __future__ import annotations

import json
from typing import Any

MISSING_MATPLOTLIB = "plots need matplotlib: install kvtier[bench] (pip install -e '.[bench]')"


def require_matplotlib(option: str) -> None:
    """Refuse a plot option when matplotlib is missing: before the benchmark runs, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ValueError(f"{option}: {MISSING_MATPLOTLIB}") from e


def save_results(result: Any, output_json: str | None, plot: str | None, draw: Any) -> None:
    """A benchmark's results as JSON (when asked) and its figure, `draw(result, plot)` (when asked)."""
    if output_json:
        with open(output_json, "w") as f:
            json.dump(result, f, indent=2)
    if plot:
        draw(result, plot)


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib Figure (kwargs as Figure's) drawn by Agg: no pyplot, no global backend, no display."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MISSING_MATPLOTLIB) from e
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig
