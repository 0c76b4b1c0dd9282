"""Retrieval and QA evaluation (`wave-rt eval`)."""

from __future__ import annotations

from wave_rt.eval.retrieval import EvalReport, evaluate

__all__ = ["EvalReport", "evaluate"]
