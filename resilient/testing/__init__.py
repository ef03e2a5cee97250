"""Test helpers for users: a simulated Sage-like API and fault injection (issue 4)."""
