"""Objectives: encoder outputs -> a loss. The trainer sees only these."""
from mmssl.objectives.base import Objective, PrepareContext

__all__ = ["Objective", "PrepareContext"]
