"""An encoder double for eval's tests: item i's vector is table[name] (a text, a file's name, or either with
"|instruction" appended when that key is in the table), so metrics can be checked against known answers. Its
processor asks QA rows with the real WaveProcessor.qa_prompt / qa_instruction."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from wave_rt.embed.processor import WaveProcessor
from wave_rt.errors import InputError
from wave_rt.items import Text

QA_SUFFIX = "Letter?"


class LookupProcessor:
    prompts = SimpleNamespace(qa_suffix=QA_SUFFIX)
    qa_prompt = WaveProcessor.qa_prompt
    qa_instruction = WaveProcessor.qa_instruction


class LookupEncoder:
    model_id = "lookup"
    processor = LookupProcessor()

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.dim = len(next(iter(table.values()))) if table else 3

    def prepare(self, item, instruction=None, index=None):
        key = item.text if isinstance(item, Text) else item if isinstance(item, str) else str(item.source)
        key = key.split("/")[-1]
        if instruction and f"{key}|{instruction}" in self.table:
            key = f"{key}|{instruction}"
        if key not in self.table:
            raise InputError(item, "not in the table", index)
        return torch.tensor(self.table[key], dtype=torch.float32)

    def embed_prepared_all(self, prepared):
        return torch.nn.functional.normalize(torch.stack(list(prepared)), dim=-1)
