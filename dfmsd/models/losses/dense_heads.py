"""The classification branch of an mmdet dense head, run on its own (PCD, MAR's relation term), and
the check that a head has one we can run (CrossKD, and the distiller at build time).

Dense class logits of one FPN level, written once for every supported head:

    z = cls_branch(x)              N x (A*C) x H x W   (the head's own modules)
    z -> N x A x C x H x W         (mmdet's channel order: index a*C + c)
    per-location logits = max_a z  N x C x H x W       (ours: anchors reduced by max)

``cls_branch`` is the classification half of the head's ``forward_single``: the cls tower then
the final cls conv named in CLS_BRANCHES. C = ``cls_out_channels``: the classes for sigmoid
heads, C + 1 (background last) otherwise.
"""

from __future__ import annotations

import torch.nn as nn
from mmdet.models.dense_heads import AnchorFreeHead, AnchorHead, ATSSHead, FCOSHead, GFLHead, RetinaHead
from torch import Tensor

from dfmsd.core.errors import DistillError

#: mmdet head class -> (cls tower or None, final cls conv) of its ``forward_single``.
CLS_BRANCHES = {
    RetinaHead: ('cls_convs', 'retina_cls'),
    GFLHead: ('cls_convs', 'gfl_cls'),  # its Scale only scales the box branch
    ATSSHead: ('cls_convs', 'atss_cls'),
    FCOSHead: ('cls_convs', 'conv_cls'),  # FCOS's centerness is not folded in
    AnchorFreeHead: ('cls_convs', 'conv_cls'),
    AnchorHead: (None, 'conv_cls'),
}
SUPPORTED = 'RetinaHead, GFLHead, ATSSHead, FCOSHead, AnchorHead and their subclasses'


def branch_class(head: nn.Module) -> type | None:
    """The class of CLS_BRANCHES whose ``forward_single`` the head runs; None when the head's
    ``forward`` or ``forward_single`` comes from a class not in CLS_BRANCHES (VFNet, TOOD, SSD,
    RPN, ...): such a head computes its logits its own way. Checked on the classes that define
    the methods, so a subclass that only changes, say, the loss (FreeAnchor, PAA) is supported."""
    single, forward = (
        next(c for c in type(head).__mro__ if method in vars(c)) for method in ('forward_single', 'forward')
    )
    return single if single in CLS_BRANCHES and forward in CLS_BRANCHES else None


def checked_head(head: nn.Module | None, role: str, user: str) -> nn.Module:
    """``head`` if its cls branch can run alone, else a DistillError naming its class."""
    if head is None:
        raise DistillError(
            f'{user} needs a dense-head {role}: the {role} has no dense bbox_head (a two-stage '
            f'detector classifies RoIs, not FPN locations); supported: {SUPPORTED}'
        )
    if branch_class(head) is None:
        raise DistillError(
            f'{user} needs a dense-head {role} with a plain classification branch ({SUPPORTED}); '
            f"the {role}'s {type(head).__name__} has its own forward"
        )
    return head


def dense_head(detector: nn.Module, role: str = 'detector') -> nn.Module:
    """The detector's dense head, checked (a two-stage detector raises, naming its class)."""
    head = getattr(detector, 'bbox_head', None)
    if head is None:
        raise DistillError(
            f'head-level distillation needs a dense-head teacher/student: the {role} '
            f'{type(detector).__name__} has no dense class head (a two-stage detector '
            f'classifies RoIs, not FPN locations)'
        )
    return checked_head(head, role, 'head-level distillation')


def has_cls_tower(head: nn.Module) -> bool:
    return CLS_BRANCHES[branch_class(head)][0] is not None


def cls_features(head: nn.Module, x: Tensor) -> Tensor:
    """The head's cls tower (``cls_convs``, with activations) on x; x itself for a head without one."""
    tower = CLS_BRANCHES[branch_class(head)][0]
    for layer in getattr(head, tower) if tower else ():
        x = layer(x)
    return x


def split_anchors(cls_score: Tensor, num_classes: int) -> Tensor:
    """N x (A*C) x H x W -> N x A x C x H x W."""
    n, channels, h, w = cls_score.shape
    if channels % num_classes:
        raise DistillError(f'{channels} cls channels are not anchors x {num_classes} classes')
    return cls_score.reshape(n, channels // num_classes, num_classes, h, w)


def head_class_logits(head: nn.Module, x: Tensor, reduce_anchors: bool = True) -> Tensor:
    """One level: N x C x H x W (anchors reduced by max) or N x A x C x H x W."""
    final = getattr(head, CLS_BRANCHES[branch_class(head)][1])
    z = split_anchors(final(cls_features(head, x)), head.cls_out_channels)
    return z.amax(dim=1) if reduce_anchors else z
