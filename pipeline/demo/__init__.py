"""Synthetic demo corpus: procedural faces written in the four real on-disk formats."""
