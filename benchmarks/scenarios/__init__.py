"""The scenarios, in report order. Each module has NAME, TITLE, ``units(cfg)`` (progress
units it will report) and ``run(cfg, progress) -> ScenarioResult``."""

from __future__ import annotations

from types import ModuleType

from . import (
    advertised,
    day,
    flaky,
    inprocess,
    instructions,
    outage,
    overhead,
    overload,
    quota,
    scale,
    shared,
    storm,
    tail,
    unknown,
)

SCENARIOS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (
        overhead,
        inprocess,
        instructions,
        quota,
        storm,
        flaky,
        outage,
        day,
        scale,
        shared,
        unknown,
        advertised,
        tail,
        overload,
    )
}

__all__ = ["SCENARIOS"]
