"""Registers the project's modules in mmdet's registries (import for side effects)."""
from dfmsd.models import losses  # noqa: F401
from dfmsd.models.datasets import MEAugmentedCocoDataset
from dfmsd.models.distiller import DistillError, StageDistiller

__all__ = ['StageDistiller', 'DistillError', 'MEAugmentedCocoDataset']
