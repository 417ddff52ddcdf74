"""Hyper-parameter search over the training recipes: the typed search file (`search.py`), the
per-epoch trial metrics (`metrics.py`), the offline report (`report.py`); `ray_tune.py` runs it."""
