"""Bar charts drawn on the server as SVG: no chart library, no script, nothing to load.

A chart is plain data (bars with their geometry, axis labels, a legend) that the
``chart`` macro in ``templates/macros.html`` turns into an ``<svg>`` with a title and
a ``<title>`` per bar, next to a table of the same numbers for screen readers. Colours
come from CSS classes (``series-0`` ...), so the strict Content-Security-Policy (no
inline style) holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WIDTH = 480
HEIGHT = 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 40, 6, 10, 26
_MAX_X_LABELS = 12


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int
    label: str
    value: float


@dataclass(frozen=True)
class Chart:
    title: str
    labels: tuple[str, ...]  # one per group along the x axis
    series: tuple[str, ...]  # legend, in colour order
    values: tuple[tuple[float, ...], ...]  # [series][group], for the table
    bars: tuple[Bar, ...]
    x_ticks: tuple[tuple[float, str], ...]
    y_ticks: tuple[tuple[float, str], ...]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def points(self) -> int:
        """How many values the chart shows: one per label and series."""
        return len(self.labels) * len(self.series)

    @property
    def baseline(self) -> float:
        return HEIGHT - _BOTTOM

    @property
    def left(self) -> float:
        return _LEFT


def bar_chart(title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]]) -> Chart:
    """Grouped bars: for each label, one bar per series (in the mapping's order)."""
    names = tuple(series) or ("",)
    values = tuple(tuple(series.get(name, ())) or (0.0,) * len(labels) for name in names)
    top = max((v for row in values for v in row), default=0) or 1
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    group_w = plot_w / max(1, len(labels))
    bar_w = max(1.0, group_w * 0.8 / len(names))
    bars = []
    for s, row in enumerate(values):
        for i, value in enumerate(row):
            height = plot_h * value / top
            x = _LEFT + i * group_w + group_w * 0.1 + s * bar_w
            bars.append(
                Bar(
                    round(x, 1),
                    round(_TOP + plot_h - height, 1),
                    round(bar_w, 1),
                    round(height, 1),
                    s,
                    labels[i],
                    value,
                )
            )
    step = max(1, -(-len(labels) // _MAX_X_LABELS))
    x_ticks = tuple(
        (round(_LEFT + i * group_w + group_w / 2, 1), label)
        for i, label in enumerate(labels)
        if i % step == 0
    )
    y_ticks = tuple(
        (round(_TOP + plot_h * (1 - share), 1), _number(top * share)) for share in (0, 0.5, 1)
    )
    return Chart(title, tuple(labels), names, values, tuple(bars), x_ticks, y_ticks)


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"
