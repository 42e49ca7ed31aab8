"""Offline quality evaluation of KV cache policies on the bundled digits model (`lineray eval`)."""
from lineray.quality import metrics
from lineray.quality.runner import EvalRow, add_arguments, cache_rows, evaluate, markdown_table, run

__all__ = ["EvalRow", "add_arguments", "cache_rows", "evaluate", "markdown_table", "metrics", "run"]
