"""RateLimitBackoff: ``_ratelimit`` (the policy: 429 in, pause, probe, paced release,
written once against a store), ``_store`` (the store interface and its memory peer),
``_pause`` (the per-key gate), ``_learned`` (the learned-rate law), ``_redis`` +
``pause.lua`` / ``rate.lua`` (the Redis peer: the shared pause and rate, mirroring
``_pause`` and ``_learned``)."""
