"""Evaluation of trained artifacts on the shapes splits (``vlmtrain eval``)."""

from vlmtrain.eval.prompts import EvalSample, build_prompt, read_eval_samples
from vlmtrain.eval.report import format_table, read_report, write_report
from vlmtrain.eval.shapes_eval import (
    chance_levels,
    evaluate_artifact,
    evaluate_split,
    predict,
    score,
)

__all__ = [
    "EvalSample",
    "build_prompt",
    "chance_levels",
    "evaluate_artifact",
    "evaluate_split",
    "format_table",
    "predict",
    "read_eval_samples",
    "read_report",
    "score",
    "write_report",
]
