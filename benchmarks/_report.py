"""Tables (plain text for stdout, markdown for report.md) and results.json."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._harness import ScenarioResult, Target

__all__ = ["fmt", "markdown_report", "text_report", "write_outputs"]


def fmt(value: Any) -> str:
    """A cell: floats to 3 significant-ish digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞"
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def _text_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in rows)])


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table: the first ``left`` columns left-aligned, the others right."""
    head = "| " + " | ".join(columns) + " |"
    align = "|" + "|".join(":---" if i < left else "---:" for i in range(len(columns))) + "|"
    body = ["| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows]
    return "\n".join([head, align, *body])


def _cells(result: ScenarioResult) -> list[list[str]]:
    return [[fmt(row.get(c)) for c in result.columns] for row in result.rows]


def _targets(results: Sequence[ScenarioResult]) -> list[tuple[str, Target]]:
    return [(r.name, t) for r in results for t in r.targets]


TARGET_COLUMNS = ["scenario", "target", "goal", "measured", "verdict"]


def _target_cells(results: Sequence[ScenarioResult]) -> list[list[str]]:
    return [[name, t.name, t.goal, t.measured, t.verdict] for name, t in _targets(results)]


def text_report(results: Sequence[ScenarioResult], machine: dict[str, Any]) -> str:
    """What ``python -m benchmarks`` prints on stdout."""
    out = [
        f"resilient benchmarks — {machine['cpus']} CPUs, Python {machine['python']}, "
        f"aiohttp {machine['aiohttp']}"
    ]
    for result in results:
        out += ["", f"{result.title}  ({result.wall:.1f} s)"]
        if result.error:
            out.append(f"  FAILED: {result.error}")
            continue
        out.append(_text_table(result.columns, _cells(result)))
    if _targets(results):
        out += ["", "Targets (issue 4; reported, not asserted)"]
        out.append(_text_table(TARGET_COLUMNS, _target_cells(results)))
    return "\n".join(out)


def markdown_report(
    results: Sequence[ScenarioResult],
    machine: dict[str, Any],
    command: str,
    plots: dict[str, str],
) -> str:
    """report.md: machine, command, the targets with PASS/MISS, then every scenario."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# resilient benchmark report",
        "",
        f"- Run: `{command}` at {stamp}",
        f"- Machine: {machine['cpus']} CPUs (os.cpu_count()), {machine['processor']}, "
        f"{machine['platform']}",
        f"- Python {machine['python']}, aiohttp {machine['aiohttp']}",
        "- Network: loopback only (127.0.0.1, port 0) against resilient.testing.SimulatedAPI.",
        "",
        "## Targets",
        "",
        "Targets from issue 4, measured in this run. MISS means the target was not met in "
        "this run; the scenario's notes say why.",
        "",
        _md_table(TARGET_COLUMNS, _target_cells(results), left=len(TARGET_COLUMNS)),
    ]
    misses = [(n, t) for n, t in _targets(results) if t.passed is False]
    if misses:
        out += ["", "Missed:"]
        out += [
            f"- **{t.name}** ({n}): goal {t.goal}, measured {t.measured}. {t.note}"
            for n, t in misses
        ]
    for result in results:
        out += ["", f"## {result.title}", "", f"Setup: {result.setup}", ""]
        if result.error:
            out += [f"**This scenario failed:** `{result.error}`"]
            continue
        out.append(_md_table(result.columns, _cells(result)))
        if result.notes:
            out.append("")
            out += [f"- {note}" for note in result.notes]
        for target in result.targets:
            if target.note:
                out.append(f"- Target *{target.name}*: {target.note}")
        out.append(f"- Scenario wall time: {result.wall:.1f} s")
        if result.name in plots:
            out += ["", f"![{result.title}]({plots[result.name]})"]
    return "\n".join(out) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_outputs(
    out_dir: Path,
    results: Sequence[ScenarioResult],
    machine: dict[str, Any],
    command: str,
    plots: dict[str, str],
) -> None:
    """Write report.md and results.json into ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(markdown_report(results, machine, command, plots))
    payload = {
        "machine": machine,
        "command": command,
        "scenarios": [_jsonable(r.to_json()) for r in results],
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
