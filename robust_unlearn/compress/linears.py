"""What every compression acts on: the model's linear layers except the output head."""
from __future__ import annotations

import torch


def compressible_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """Every ``nn.Linear`` except the output head (lm_head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
