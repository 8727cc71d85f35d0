"""Parity: numbers and a verdict, never a bare assert."""

from .report import Check, Report, compare_ids, compare_tensors

__all__ = ["Check", "Report", "compare_ids", "compare_tensors"]
