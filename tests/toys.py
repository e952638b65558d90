"""Small learnable toy problems, one per task shape (they live in edgeseq.data.builtin)."""

from edgeseq.data.builtin import frequency_classes, level_regression, sine_from_vector, sine_series

__all__ = ["frequency_classes", "level_regression", "sine_from_vector", "sine_series"]
