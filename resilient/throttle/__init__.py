"""Throttle: ``_throttle`` (the policy), ``_bucket`` (the token bucket, pure), ``_quota``
(quota windows in memory), ``_redis`` + ``quota_*.lua`` (quota windows shared through
Redis)."""
