"""RateLimitBackoff: ``_ratelimit`` (the policy: 429 in, pause, probe, paced release),
``_pause`` (the per-key gate), ``_learned`` (the learned-rate law), ``_redis`` +
``pause.lua`` / ``rate.lua`` (the shared pause and rate, mirroring ``_pause`` and
``_learned``)."""
