"""Distillation losses, each registered in mmdet's ``MODELS`` (interface: ``common.py``)."""

from .common import DistillLoss, MaskedReconstructionLoss
from .crosskd import CrossKDLoss
from .dmkd import AMDLoss, DMKDLoss
from .fbkd import FBKDLoss
from .fgd import FGDLoss
from .fkd import FeatureKDLoss
from .inputs import INPUTS
from .mar import MARLoss, MARRelationLoss
from .mgd import MGDLoss
from .pcd import PCDLoss
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
            FBKDLoss,
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
    'FBKDLoss',
    'FGDLoss',
    'FeatureKDLoss',
    'MARLoss',
    'MARRelationLoss',
    'MGDLoss',
    'PCDLoss',
    'PKDLoss',
]
