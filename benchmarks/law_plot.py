"""Draw the learned-rate law (``resilient/ratelimit/_learned.py``) after one measured cut.

``python -m benchmarks.law_plot [out.png]`` (default ``docs/img/learned-rate.png``): the
rate ``r(t)`` a key sends at after a 429, in units of the accepted rate ``a``, with the
cut ``β·a``, the plateau ``W = P·a`` reached at ``K`` and the slow probe above it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from resilient.ratelimit._learned import _K, BETA, PLATEAU, LearnedRate

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "learned-rate.png"
ACCEPTED = 50.0
"""Requests per second the server accepted before the 429 (the drawing is in units of it)."""


def curve(seconds: float = 25.0, step: float = 0.05) -> tuple[list[float], list[float]]:
    """``(t, r(t)/a)`` after a cut measured at about ``ACCEPTED`` per second."""
    rate = LearnedRate(0.0)
    rate.cut(0.0)  # the key's first 429: slow start
    for i in range(int(ACCEPTED * 2)):  # two seconds at the accepted rate, all accepted
        rate.accepted((i + 1) / ACCEPTED)
    rate.cut(2.0)  # a measured cut: a = what was accepted over the last second
    a = rate.accepted_rate
    ts = [i * step for i in range(int(seconds / step) + 1)]
    return ts, [rate.rate(2.0 + t) / a for t in ts]


def main(argv: list[str]) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(argv[0]) if argv else DEFAULT_OUT
    ts, rs = curve()
    fig, ax = plt.subplots(figsize=(7.0, 3.2))
    ax.plot(ts, rs, color="#1f77b4", label="r(t) / a: the key's send rate")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="a: accepted before the 429")
    ax.axhline(PLATEAU, color="grey", linestyle=":", linewidth=1, label=f"W = {PLATEAU:g}·a")
    ax.axvline(_K, color="grey", linestyle=":", linewidth=1)
    ax.annotate(
        f"K ≈ {_K:.1f} s", (_K, BETA), textcoords="offset points", xytext=(4, -2), fontsize=8
    )
    ax.annotate(
        f"cut: {BETA:g}·a", (0.0, BETA), textcoords="offset points", xytext=(4, -12), fontsize=8
    )
    ax.set_xlabel("seconds of sending since the 429")
    ax.set_ylabel("rate / a")
    ax.set_ylim(BETA - 0.05, 1.15)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Learned rate after a 429: cut, CUBIC climb to the plateau, slow probe above")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
