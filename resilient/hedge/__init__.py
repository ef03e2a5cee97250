"""Hedge: ``_hedge`` (the policy: when to send a copy, the first answer wins)."""
