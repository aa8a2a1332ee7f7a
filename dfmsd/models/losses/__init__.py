"""Feature-distillation losses, each registered in mmdet's ``MODELS``.

Every loss is built per matched FPN level as
``MODELS.build(dict(type=..., student_channels=Cs, teacher_channels=Ct, **kwargs))`` and
called as ``loss(preds_S, preds_T, *, gt_bboxes=None, img_shapes=None, stride=None,
reduction=None)``, returning a scalar already multiplied by ``loss_weight``.
Teacher features are detached inside every loss (no gradient ever reaches them).

Shared pieces (channel align, teacher attention, generation block G, SE block,
per-channel normalisation, reconstruction reduction, box -> cell mapping,
attention-guided mask sampling) live in ``common.py``.

Masking-enhancement loss (DFMSD Eq. 8) is NOT a separate module: it is the DMKD
reconstruction of the same ``DMKDLoss`` instance evaluated on the augmented images,
reduced with 'mean' and weighted by its own beta:
``aug_reconstruction_loss(dmkd_module, s_aug, t_aug, beta)``
= beta * mean((t_aug - dmkd_module.reconstruct(s_aug, t_aug))**2), summed over levels.
"""
from .common import (SEBlock, channel_attention, channel_normalize, make_align,
                     make_generation, reconstruction_loss, sample_attention_mask,
                     spatial_attention)
from .dmkd import DMKDLoss, aug_reconstruction_loss
from .fgd import FGDLoss, GcBlock, fgd_masks
from .fkd import FeatureKDLoss
from .logits import (LOGIT_INPUTS, CrossKDLoss, PCDLoss, class_kd, dense_class_logits,
                     dense_head, head_class_logits, pcd_class_groups, pcd_num_active_groups,
                     valid_locations)
from .mar import MARLoss, MARRelationLoss, mar_mask, pixel_relation
from .mgd import MGDLoss
from .pkd import PKDLoss, SFALoss

__all__ = [
    'FeatureKDLoss', 'MGDLoss', 'DMKDLoss', 'PKDLoss', 'SFALoss', 'FGDLoss', 'MARLoss',
    'MARRelationLoss', 'aug_reconstruction_loss', 'make_align', 'make_generation', 'SEBlock',
    'spatial_attention', 'channel_attention', 'channel_normalize', 'reconstruction_loss',
    'sample_attention_mask', 'fgd_masks', 'mar_mask', 'pixel_relation', 'GcBlock',
    'PCDLoss', 'CrossKDLoss', 'LOGIT_INPUTS', 'dense_class_logits', 'dense_head',
    'head_class_logits', 'class_kd', 'valid_locations', 'pcd_num_active_groups',
    'pcd_class_groups',
]
