"""Evaluation protocols: GPR1200, labelled collections, revisited Oxford/Paris."""

from cbir.eval.gpr1200 import (
    GPRResult,
    LabelledResult,
    evaluate_gpr1200,
    evaluate_labelled,
    gpr_average_precisions,
    gpr_average_precisions_full_sort,
    summarize_gpr,
)
from cbir.eval.ranking import average_precision, full_ranking, positive_ranks, similarity_blocks

__all__ = [
    "GPRResult",
    "LabelledResult",
    "average_precision",
    "evaluate_gpr1200",
    "evaluate_labelled",
    "full_ranking",
    "gpr_average_precisions",
    "gpr_average_precisions_full_sort",
    "positive_ranks",
    "similarity_blocks",
    "summarize_gpr",
]
