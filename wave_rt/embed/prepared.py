"""PreparedItem: one item after decoding, feature extraction and tokenization (CPU tensors, picklable)."""

from __future__ import annotations

from dataclasses import dataclass

from wave_rt.model.batch import ItemInputs


@dataclass
class PreparedItem:
    modality: str  # "text" | "audio" | "video" | "av"
    num_tokens: int  # LLM sequence length: what token budgets count
    duration: float | None  # media seconds before padding; None for text
    inputs: ItemInputs  # model inputs (opaque to clients)
