"""``python -m benchmarks [--quick] [--only NAME ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from ._harness import Config, Progress, ScenarioResult, machine
from ._report import text_report, write_outputs
from .scenarios import SCENARIOS

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark resilient against raw aiohttp, aiohttp-retry, tenacity and a "
        "naive retry loop, on a simulated API over loopback.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts: about 1.5 minutes (3 with valgrind)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=list(SCENARIOS),
        help=f"run only these scenarios ({', '.join(SCENARIOS)})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument(
        "--log",
        action="store_true",
        help="show resilient's log lines (breaker opened, long waits) on stderr",
    )
    return parser.parse_args(argv)


def run_scenarios(names: Sequence[str], cfg: Config, progress: Progress) -> list[ScenarioResult]:
    """Run ``names`` in order; a scenario that raises is reported as failed, not fatal."""
    results = []
    for name in names:
        module = SCENARIOS[name]
        progress.set_label(f"{name}: starting")
        before = progress.done
        started = time.perf_counter()
        try:
            result: ScenarioResult = module.run(cfg, progress)
        except Exception as exc:  # a broken scenario must not hide the others' results
            traceback.print_exc(file=sys.stderr)
            result = ScenarioResult(name, module.TITLE, "", [], [], error=repr(exc))
        result.wall = time.perf_counter() - started
        progress.done = before + module.units(cfg)
        progress.advance(0.0)
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    logger = logging.getLogger("resilient")
    level = logger.level
    try:
        return _main(argv, logger)
    finally:
        logger.setLevel(level)  # main() also runs in-process (tests): leave logging as found


def _main(argv: Sequence[str] | None, logger: logging.Logger) -> int:
    args = parse_args(argv)
    if not args.log:  # the scenarios open breakers and wait on purpose: keep stderr for the bar
        logger.setLevel(logging.ERROR)
    cfg = Config(quick=args.quick)
    names = [n for n in SCENARIOS if args.only is None or n in args.only]
    progress = Progress(sum(SCENARIOS[n].units(cfg) for n in names), enabled=not args.no_progress)
    results = run_scenarios(names, cfg, progress)
    progress.close()
    info = machine()
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    plots: dict[str, str] = {}
    if not args.no_plots:
        from ._plots import write_plots

        plots = write_plots(args.out, results)
    write_outputs(args.out, results, info, command.strip(), plots)
    print(text_report(results, info))
    print(f"\nreport: {args.out / 'report.md'}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
