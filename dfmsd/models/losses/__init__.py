"""Distillation losses, each registered in mmdet's ``MODELS`` (interface: ``common.py``)."""

from .common import INPUTS, DistillLoss, MaskedReconstructionLoss
from .dmkd import AMDLoss, DMKDLoss
from .fgd import FGDLoss
from .fkd import FeatureKDLoss
from .heads import CrossKDLoss, MARRelationLoss, PCDLoss
from .mar import MARLoss
from .mgd import MGDLoss
from .pkd import PKDLoss

LOSS_TYPES = tuple(
    sorted(
        cls.__name__
        for cls in (
            FeatureKDLoss,
            MGDLoss,
            DMKDLoss,
            AMDLoss,
            PKDLoss,
            FGDLoss,
            MARLoss,
            MARRelationLoss,
            PCDLoss,
            CrossKDLoss,
        )
    )
)

__all__ = [
    'INPUTS',
    'LOSS_TYPES',
    'DistillLoss',
    'MaskedReconstructionLoss',
    'AMDLoss',
    'CrossKDLoss',
    'DMKDLoss',
    'FGDLoss',
    'FeatureKDLoss',
    'MARLoss',
    'MARRelationLoss',
    'MGDLoss',
    'PCDLoss',
    'PKDLoss',
]
