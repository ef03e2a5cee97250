"""Retry: ``_retry`` (the policy: attempt loop, what to re-send), ``_backoff`` (wait
strategies), ``_budget`` (the retry budget), ``_attempt`` (``attempt_timeout``: one
attempt's clock)."""
