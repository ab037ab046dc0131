"""Cross-backend and cross-machine parity (record, compare, report). Not built yet: see issue 3."""
