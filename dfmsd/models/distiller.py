"""StageDistiller: one stage of stage-wise distillation as an mmdet detector.

A student detector plus one frozen teacher (stage k of SAL distills from teacher k;
the next stage is a new run whose student starts from this stage's checkpoint).

    L = L_det + L_feat(S, T) + beta * L_aug(S~, T~) + L_sfa(S, T)        (paper Eq. 6)
          [+ L_logit]                                        (head-level baselines)

where L_feat is the configured feature loss (DMKD for DFMSD, MGD/PKD/... for the
baselines; its loss_weight is alpha), L_aug is Eq. 8 on masking-enhanced images, and
L_sfa the Pearson alignment (its loss_weight is gamma). L_logit is an optional
head-level loss (PCD, CrossKD; `losses/logits.py`) on the dense heads' class logits;
it gets what its `needs` names (student / teacher per-location logits, or the teacher's
cls branch as a function) plus the training progress iter / max_iters.

The teacher is kept out of the module tree: it is never in `parameters()`, the
optimizer, `state_dict()` or DDP, and stays in eval mode (BN included). It normalises
the raw batch with its own data preprocessor. Student and teacher FPN levels are
matched by stride, found by probing both models once at build time.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.model import BaseDataPreprocessor
from mmengine.runner.checkpoint import load_checkpoint, load_state_dict
from torch import nn

from dfmsd.checkpoint import allow_mmengine_checkpoints
from dfmsd.models.losses.logits import LOGIT_INPUTS, dense_head, head_class_logits


class DistillError(RuntimeError):
    """A distillation set-up or run that cannot give a meaningful result."""


def build_teacher(config: str | Path | dict, checkpoint: str | Path | None,
                  sha256: str | None = None) -> nn.Module:
    """Frozen detector in eval mode; the checkpoint must match the config exactly."""
    cfg = Config.fromfile(str(config)) if not isinstance(config, (dict, Config)) else Config(config)
    teacher = MODELS.build(cfg.model)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise DistillError(f'teacher checkpoint {checkpoint} does not exist')
        try:
            if sha256:  # a downloaded file: verified before it is unpickled
                from dfmsd.download import load_verified_checkpoint
                state = load_verified_checkpoint(checkpoint, sha256=sha256)
                load_state_dict(teacher, state.get('state_dict', state), strict=True)
            else:
                allow_mmengine_checkpoints()
                load_checkpoint(teacher, str(checkpoint), map_location='cpu', strict=True,
                                logger='silent')
        except RuntimeError as err:
            raise DistillError(f'teacher checkpoint {checkpoint} does not match its config '
                               f'{config if not isinstance(config, dict) else "(dict)"}: {err}') from err
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def probe_fpn(model: nn.Module, size: int = 256) -> list[tuple[int, int]]:
    """(stride, channels) of each FPN level, from one forward pass on a blank image."""
    was_training = model.training
    model.eval()
    feats = model.extract_feat(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    model.train(was_training)
    return [(round(size / f.shape[-1]), f.shape[1]) for f in feats]


def training_progress() -> float | None:
    """iter / max_iters of the running mmengine loop (0 at the first iteration), read from
    the current MessageHub; None outside a training run (no such info)."""
    hub = MessageHub.get_current_instance()
    it, total = hub.get_info('iter'), hub.get_info('max_iters')
    if it is None or not total:
        return None
    return min(1.0, max(0.0, float(it) / float(total)))


@MODELS.register_module()
class StageDistiller(BaseDetector):
    """Student + frozen teacher with stride-matched feature losses.

    Args:
        student: mmdet model config of the student.
        teacher: dict(config=..., checkpoint=..., sha256=None) of this stage's teacher.
        feature_loss: loss config (DMKDLoss, MGDLoss, ...) built once per matched level;
            its `loss_weight` is alpha.
        sfa_loss: optional Pearson alignment loss config (PKDLoss); weight is gamma.
        logit_loss: optional head-level loss config (PCDLoss, CrossKDLoss) built once per
            matched level; needs dense-head models (a two-stage one is a DistillError).
        aug_loss_weight: beta of Eq. 8, on images from an MEAugmentedCocoDataset.
        student_init: plain student checkpoint to start from (the previous SAL stage).
        distill_strides: restrict distillation to these strides (default: all common).
    """

    def __init__(self, student: dict, teacher: dict, feature_loss: dict | None = None,
                 sfa_loss: dict | None = None, logit_loss: dict | None = None,
                 aug_loss_weight: float = 0.0,
                 student_init: str | None = None, distill_strides: list[int] | None = None,
                 probe_size: int = 256, data_preprocessor: dict | None = None,
                 init_cfg: dict | None = None) -> None:
        # The batch reaches loss() raw: student and teacher each normalise it with their own
        # preprocessor. A normalising one here would normalise twice. mmengine's Runner puts a
        # config's top-level `data_preprocessor` (mmdet base configs have one) into the model
        # config when the model has none, so distill configs must name this one explicitly.
        data_preprocessor = data_preprocessor or dict(type='BaseDataPreprocessor')
        kind = (data_preprocessor.get('type') if isinstance(data_preprocessor, dict)
                else type(data_preprocessor))  # a config, or an already built module
        if kind not in ('BaseDataPreprocessor', BaseDataPreprocessor):
            raise DistillError(
                f"StageDistiller's data_preprocessor must be BaseDataPreprocessor (the student and "
                f"teacher normalise the raw batch with their own), got {kind}; set "
                f"model.data_preprocessor=dict(type='BaseDataPreprocessor') in the distillation config")
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.student = MODELS.build(student)
        # Plain attribute, not a submodule: hidden from parameters/state_dict/DDP.
        object.__setattr__(self, 'teacher', build_teacher(**teacher))
        self.student_init = student_init
        self.aug_loss_weight = float(aug_loss_weight)
        if self.aug_loss_weight and not (
                feature_loss and hasattr(MODELS.get(feature_loss['type']), 'reconstruct')):
            raise DistillError(f"aug_loss_weight needs a masked-reconstruction feature loss; "
                               f"{(feature_loss or {}).get('type')} has no reconstruct()")

        self.level_pairs = self._match_levels(probe_fpn(self.student, probe_size),
                                              probe_fpn(self.teacher, probe_size), distill_strides)
        self.feature_losses = self._per_level(feature_loss)
        self.sfa_losses = self._per_level(sfa_loss)
        self.logit_losses = self._per_level(logit_loss)
        self.logit_needs, self.logit_sigmoid = self._check_logit_loss(logit_loss)
        self._student_feats: tuple[torch.Tensor, ...] | None = None
        self.student.neck.register_forward_hook(self._record_student_feats)

    # ---- set-up -------------------------------------------------------------------
    @staticmethod
    def _match_levels(student_levels, teacher_levels, wanted_strides):
        teacher_by_stride = {s: (i, c) for i, (s, c) in enumerate(teacher_levels)}
        pairs = []
        for s_idx, (stride, s_ch) in enumerate(student_levels):
            if stride in teacher_by_stride and (wanted_strides is None or stride in wanted_strides):
                t_idx, t_ch = teacher_by_stride[stride]
                pairs.append(dict(stride=stride, student_idx=s_idx, teacher_idx=t_idx,
                                  student_channels=s_ch, teacher_channels=t_ch))
        if not pairs:
            raise DistillError(
                f'teacher and student share no FPN stride to distill: student strides '
                f'{[s for s, _ in student_levels]}, teacher strides {[s for s, _ in teacher_levels]}'
                + (f', requested {list(wanted_strides)}' if wanted_strides else ''))
        return pairs

    def _per_level(self, loss_cfg: dict | None) -> nn.ModuleList | None:
        if not loss_cfg:
            return None
        return nn.ModuleList(
            MODELS.build(dict(loss_cfg, student_channels=p['student_channels'],
                              teacher_channels=p['teacher_channels'])) for p in self.level_pairs)

    def _check_logit_loss(self, loss_cfg: dict | None) -> tuple[frozenset, bool]:
        """(what the logit loss needs, sigmoid heads?), checked against the dense heads."""
        if not loss_cfg:
            return frozenset(), True
        needs = frozenset(getattr(self.logit_losses[0], 'needs', ()))
        if not needs or needs - LOGIT_INPUTS:
            raise DistillError(f"logit_loss {loss_cfg['type']} must declare `needs` within "
                               f"{sorted(LOGIT_INPUTS)}, got {sorted(needs)}")
        heads = {}
        if 'student_logits' in needs:
            heads['student'] = dense_head(self.student, 'student')
        if needs & {'teacher_logits', 'teacher_head_fn'}:
            heads['teacher'] = dense_head(self.teacher, 'teacher')
        kinds = {role: (h.cls_out_channels, bool(h.use_sigmoid_cls)) for role, h in heads.items()}
        if len(set(kinds.values())) > 1:
            raise DistillError(f'logit_loss {loss_cfg["type"]}: student and teacher heads differ '
                               f'in (class outputs, sigmoid): {kinds}')
        return needs, next(iter(kinds.values()))[1]

    def _logit_inputs(self, s: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """The logit loss's `needs` for one level (s with grad, t detached) + `sigmoid`."""
        inputs: dict[str, Any] = {}
        if 'student_logits' in self.logit_needs:
            inputs['student_logits'] = head_class_logits(self.student.bbox_head, s)
        teacher_head = getattr(self.teacher, 'bbox_head', None)
        if 'teacher_logits' in self.logit_needs:
            with torch.no_grad():
                inputs['teacher_logits'] = head_class_logits(teacher_head, t)
        if 'teacher_head_fn' in self.logit_needs:  # frozen weights, differentiable in x
            inputs['teacher_head_fn'] = partial(head_class_logits, teacher_head,
                                                reduce_anchors=False)
        inputs['sigmoid'] = self.logit_sigmoid
        return inputs

    def _record_student_feats(self, module, args, output) -> None:
        self._student_feats = output

    def init_weights(self) -> None:
        super().init_weights()
        if self.student_init:  # after the random init, so the previous stage's weights win
            allow_mmengine_checkpoints()
            load_checkpoint(self.student, self.student_init, map_location='cpu', strict=True,
                            logger='silent')

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() move the hidden teacher too
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen BN statistics, always
        return self

    # ---- forward --------------------------------------------------------------------
    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        raw = dict(inputs=inputs, data_samples=data_samples)
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        data = self.student.data_preprocessor(raw, False)
        if mode == 'predict':
            return self.student.predict(data['inputs'], data['data_samples'])
        return self.student._forward(data['inputs'], data['data_samples'])

    def loss(self, inputs, data_samples) -> dict[str, torch.Tensor]:
        raw = dict(inputs=inputs, data_samples=data_samples)
        student_data = self.student.data_preprocessor(raw, True)
        samples = student_data['data_samples']
        losses = self.student.loss(student_data['inputs'], samples)  # fills _student_feats
        s_feats, self._student_feats = self._student_feats, None
        with torch.no_grad():
            t_feats = self.teacher.extract_feat(self.teacher.data_preprocessor(raw, True)['inputs'])

        augmented = torch.tensor([bool(s.metainfo.get('is_augmented', False)) for s in samples],
                                 device=s_feats[0].device)
        original = ~augmented
        keep = original.nonzero().flatten().tolist()  # L_feat and L_logit: original images
        gt_bboxes = [samples[i].gt_instances.bboxes for i in keep]
        img_shapes = [samples[i].img_shape for i in keep]
        progress = training_progress() if self.logit_losses is not None else None
        for level, pair in enumerate(self.level_pairs):
            s = s_feats[pair['student_idx']]
            t = t_feats[pair['teacher_idx']].detach()
            if t.shape[-2:] != s.shape[-2:]:  # same stride, different padding
                t = F.interpolate(t, size=s.shape[-2:], mode='bilinear', align_corners=False)
            if self.feature_losses is not None and keep:
                losses[f'loss_distill_feat_s{pair["stride"]}'] = self.feature_losses[level](
                    s[original], t[original], gt_bboxes=gt_bboxes, img_shapes=img_shapes,
                    stride=pair['stride'])
            if self.aug_loss_weight and augmented.any():
                rebuilt = self.feature_losses[level].reconstruct(s[augmented], t[augmented])
                losses[f'loss_distill_aug_s{pair["stride"]}'] = (
                    self.aug_loss_weight * F.mse_loss(rebuilt, t[augmented], reduction='mean'))
            if self.sfa_losses is not None:
                losses[f'loss_distill_sfa_s{pair["stride"]}'] = self.sfa_losses[level](s, t)
            if self.logit_losses is not None and keep:
                s_o, t_o = s[original], t[original]
                losses[f'loss_distill_logit_s{pair["stride"]}'] = self.logit_losses[level](
                    s_o, t_o, **self._logit_inputs(s_o, t_o), progress=progress,
                    gt_bboxes=gt_bboxes, img_shapes=img_shapes, stride=pair['stride'])
        self._check_finite(losses)
        return losses

    @staticmethod
    def _check_finite(losses: dict[str, Any]) -> None:
        # Keys hold "loss" so that mmengine's parse_losses adds them to the total.
        for name, value in losses.items():
            if name.startswith('loss_distill_') and not torch.isfinite(value).all():
                raise DistillError(f'distillation loss {name} is {value.item()}: lower its weight '
                                   f'or the learning rate (the run was stopped, not continued)')

    # BaseDetector's abstract hooks, answered by the student.
    def extract_feat(self, batch_inputs):
        return self.student.extract_feat(batch_inputs)

    def _forward(self, batch_inputs, batch_data_samples=None):
        return self.student._forward(batch_inputs, batch_data_samples)

    def predict(self, batch_inputs, batch_data_samples, rescale: bool = True):
        return self.student.predict(batch_inputs, batch_data_samples, rescale=rescale)
