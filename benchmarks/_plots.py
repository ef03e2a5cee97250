"""PNG plots (matplotlib, Agg backend): request rate against the quota, the 429 storm,
the latency CDF under a flaky server, server load during an outage, CPU per request,
the sending rate against an unknown or advertised limit."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._harness import ScenarioResult

__all__ = ["write_plots"]

COLORS = {
    "aiohttp": "#7f7f7f",
    "resilient": "#1f77b4",
    "resilient budget=None": "#17becf",
    "aiohttp-retry": "#ff7f0e",
    "tenacity": "#2ca02c",
    "naive": "#d62728",
    "resilient default chain": "#1f77b4",
    "aiohttp-retry +429": "#ff7f0e",
}


def _color(label: str) -> str:
    return COLORS.get(label, "#9467bd")


def _quota(result: ScenarioResult, plt: Any) -> Any:
    quota, window = result.series["quota"], result.series["window"]
    arrivals: dict[str, list[tuple[float, int]]] = result.series["arrivals"]
    fig, axes = plt.subplots(len(arrivals), 1, sharex=True, figsize=(9, 1.6 * len(arrivals) + 1))
    for ax, (label, log) in zip(axes, arrivals.items(), strict=True):
        times = sorted(t for t, _ in log)
        counts, lo = [], 0
        for hi, t in enumerate(times):
            while times[lo] <= t - window:
                lo += 1
            counts.append(hi - lo + 1)
        ax.step(times, counts, where="post", color=_color(label), label=label)
        ax.axhline(quota, color="black", linestyle="--", linewidth=1)
        rejected = [t for t, s in log if s == 429]
        if rejected:
            ax.plot(rejected, [quota * 1.05] * len(rejected), "|", color="red", markersize=6)
        ax.set_ylabel("req / window")
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_title(
        f"Requests in the trailing {window:g} s window vs the quota ({quota}, dashed); "
        "red ticks: 429s"
    )
    axes[-1].set_xlabel("seconds since the first caller")
    return fig


def _histogram(
    result: ScenarioResult,
    plt: Any,
    span: tuple[float, float],
    title: str,
    width: float,
    xlim: tuple[float, float] | None = None,
) -> Any:
    """Per client: requests reaching the server per second, in buckets of ``width`` s."""
    arrivals: dict[str, list[tuple[float, int]]] = result.series["arrivals"]
    lo, hi = xlim or (0.0, max((t for log in arrivals.values() for t, _ in log), default=1.0))
    edges = [lo + i * width for i in range(int((hi - lo) / width) + 2)]
    fig, axes = plt.subplots(len(arrivals), 1, sharex=True, figsize=(9, 1.5 * len(arrivals) + 1))
    for ax, (label, log) in zip(axes, arrivals.items(), strict=True):
        times = [t for t, _ in log if lo <= t <= edges[-1]]
        ax.hist(
            times,
            bins=edges,
            weights=[1 / width] * len(times),
            color=_color(label),
            label=f"{label}: {len(log)} requests in all",
        )
        ax.axvspan(span[0], span[1], color="red", alpha=0.12)
        ax.set_ylabel("req/s")
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_title(title)
    axes[-1].set_xlabel("seconds (virtual)")
    axes[-1].set_xlim(lo, edges[-1])
    return fig


def _storm(result: ScenarioResult, plt: Any) -> Any:
    block = result.series["block"]
    starts = [
        next((t for t, s in log if s == 429), 0.0) for log in result.series["arrivals"].values()
    ]
    start = min(starts, default=0.0)
    return _histogram(
        result,
        plt,
        (start, start + block),
        "Requests reaching the server per second; shaded: the 429 block",
        1.0,
    )


def _outage(result: ScenarioResult, plt: Any) -> Any:
    start, end = result.series["outage"]
    return _histogram(
        result,
        plt,
        (start, end),
        "Server load (req/s); shaded: the outage, every request answered 503",
        0.5,
        xlim=(start - 10.0, end + 35.0),
    )


def _flaky(result: ScenarioResult, plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    floor = 1e-3
    for label, values in result.series["latency_s"].items():
        ordered = sorted(max(v, floor) for v in values)
        if not ordered:
            continue
        frac = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step([floor, *ordered], [0.0, *frac], where="post", color=_color(label), label=label)
    ax.set_xscale("log")
    ax.set_xlabel(
        "latency per call, virtual seconds (log scale; calls answered at once, "
        "without a wait, are drawn at 1 ms)"
    )
    ax.set_ylabel("fraction of calls")
    ax.set_title("Latency CDF with 30 % of requests answered 503")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _overhead(result: ScenarioResult, plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [row["client"] for row in result.rows]
    for i, key in enumerate(("CPU µs/req c=1", "CPU µs/req c=50")):
        ax.bar(
            [x + i * 0.4 for x in range(len(labels))],
            [row[key] for row in result.rows],
            width=0.4,
            label=key.replace("CPU µs/req ", ""),
            alpha=0.85,
        )
    ax.set_xticks([x + 0.2 for x in range(len(labels))], labels)
    ax.set_ylabel("client CPU µs per request")
    ax.set_title("Client CPU per request (median over rounds), by concurrency")
    ax.legend(title="concurrent callers")
    return fig


def _sending_rate(result: ScenarioResult, plt: Any) -> Any:
    """Per server set-up (rows) and client (columns): server arrivals per second in
    buckets of ``series["bucket"]`` s, accepted stacked under 429, against the server's
    sustained rate R (dashed)."""
    width: float = result.series["bucket"]
    runs: dict[str, dict[str, Any]] = result.series["runs"]
    labels = list(dict.fromkeys(label for run in runs.values() for label in run["arrivals"]))
    fig, axes = plt.subplots(
        len(runs), len(labels), squeeze=False, figsize=(5.5 * len(labels), 2.6 * len(runs) + 0.8)
    )
    for row, (server, run) in zip(axes, runs.items(), strict=True):
        logs: dict[str, list[tuple[float, int]]] = run["arrivals"]
        end = max((t for log in logs.values() for t, _ in log), default=1.0)
        edges = [i * width for i in range(int(end / width) + 2)]
        for ax, label in zip(row, labels, strict=True):
            log = logs.get(label, [])
            accepted = [t for t, s in log if s != 429]
            refused = [t for t, s in log if s == 429]
            ax.hist(
                [accepted, refused],
                bins=edges,
                stacked=True,
                weights=[[1 / width] * len(accepted), [1 / width] * len(refused)],
                color=[_color(label), "#d62728"],
                label=["accepted", "429"],
            )
            ax.axhline(
                run["rate"],
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"R = {run['rate']:g}/s",
            )
            ax.set_title(f"{label}: {server}", fontsize=9)
            ax.set_ylabel("req/s at the server")
            ax.legend(loc="upper right", fontsize=7)
            ax.set_xlim(-2 * width, edges[-1])  # keep the first bucket clear of the spine
    for ax in axes[-1]:
        ax.set_xlabel(f"seconds (virtual), {width:g} s buckets")
    fig.suptitle("Sending rate against the server's limit: accepted (colour) and 429 (red)")
    return fig


PLOTS: dict[str, Callable[[ScenarioResult, Any], Any]] = {
    "overhead": _overhead,
    "quota": _quota,
    "storm": _storm,
    "flaky": _flaky,
    "outage": _outage,
    "shared": _quota,
    "unknown": _sending_rate,
    "advertised": _sending_rate,
}


def write_plots(out_dir: Path, results: Sequence[ScenarioResult]) -> dict[str, str]:
    """Write one PNG per plotted scenario; returns {scenario name: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for result in results:
        plot = PLOTS.get(result.name)
        if plot is None or result.error or not result.rows:
            continue
        fig = plot(result, plt)
        fig.tight_layout()
        name = f"{result.name}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written[result.name] = name
    return written
