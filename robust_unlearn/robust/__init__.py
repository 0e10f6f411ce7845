"""Quantization-robust unlearning: the sparse robust update (``update``, ``saliency``) and the
quantization-bin floor (``floor``)."""
