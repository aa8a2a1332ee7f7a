"""Registers the project's modules in mmdet's registries (import for side effects)."""

from dfmsd.models import hooks, loops, losses, trackers, transforms  # noqa: F401
from dfmsd.models.distiller import StageDistiller

__all__ = ['StageDistiller']
