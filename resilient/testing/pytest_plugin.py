"""pytest plugin (issue 4)."""
