"""CircuitBreaker: ``_breaker`` (the policy: admit, send, record), ``_circuit`` (the
state machine, pure), ``_window`` (outcome counts), ``_store`` (the store interface and
its memory peer), ``_redis`` + ``breaker.lua`` (the Redis peer, mirroring ``_circuit``)."""
