"""Observability: ``_events`` (one Event per decision, hooks), ``_log`` (the
``resilient`` logger), ``_metrics`` (the telemetry seam), ``_otel`` (OpenTelemetry),
``_stats`` (the snapshots ``stats()`` returns)."""
