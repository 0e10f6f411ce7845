"""Evaluation metrics. ``tofu``: the TOFU suite (Maini et al. 2024) as open-unlearning computes it."""
