"""Synthetic chest CT and the demo model trained on it (no medical data set is available)."""
