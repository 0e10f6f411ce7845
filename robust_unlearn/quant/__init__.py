"""Quantization formats: one object per format (``QuantFormat``) owning its name, grid, compression
and library cross-check (``formats``); the quantizers behind them: bitsandbytes (``bnb``),
round-to-nearest (``rtn``), GPTQ / AWQ with llm-compressor (``calibrated``)."""
from .formats import (BNB_BLOCK, KIND_CT, KIND_INT8, KIND_RTN, KIND_TABLE, NAMES, QuantFormat, bin_width,  # noqa: F401
                      bounds, check_group, code_of, codes, comparable_codes, dequantized, domain, group_index, grouped, is_format,
                      levels, library_codes, multiplier, normalize, parse_format, rows_cols, scales)
