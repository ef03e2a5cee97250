"""ConcurrencyLimit: ``_limit`` (the policy: slots per key, a first-come queue)."""
