"""The scenarios, in report order. Each module has NAME, TITLE, ``units(cfg)`` (progress
units it will report) and ``run(cfg, progress) -> ScenarioResult``."""

from __future__ import annotations

from types import ModuleType

from . import day, flaky, inprocess, outage, overhead, quota, scale, shared, storm

SCENARIOS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (overhead, inprocess, quota, storm, flaky, outage, day, scale, shared)
}

__all__ = ["SCENARIOS"]
