"""StageDistiller: a student detector distilled from one frozen teacher, as an mmdet detector.

    L = L_det + sum_levels sum_losses L_name(S_l, T_l)  +  beta * sum_levels L_aug(S~_l, T~_l)

``losses`` maps a name to a loss config (``stage``: DMKD for DFMSD, ``sfa``: PKD, ``feature``:
MGD/PKD/FGD/... for the baselines, ``relation``/``logit`` for head-level terms); each is built
once per distilled level (or once for the whole pyramid) and called with the inputs its
``forward`` names, from that level's ``LossInputs``. ``beta`` is
``aug_loss_weight``: DFMSD's ME loss (Eq. 8) on the masking-enhanced views that the
``MaskingEnhancement`` transform attached to the samples, computed with the same masked
reconstruction loss as the stage term. Every original image gets the stage terms; views
add L_aug only.

SAL (stage-wise learning) is one training schedule whose teacher changes at the stage
boundary: each stage is a run of this model with that stage's teacher, the next one
resuming the previous one's training state (dfmsd.engine.training).

The teacher is kept out of the module tree: it is never in ``parameters()``, the
optimizer, ``state_dict()`` or DDP, and stays in eval mode (BN included). It normalises the
raw batch with its own data preprocessor, and follows the model across devices
(``_apply``/``_set_device``). Levels are matched by stride, found by probing both models
once at the training size; only levels with at least ``min_cells`` x ``min_cells`` cells
there are distilled, for every method alike.
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
from torch import distributed as dist
from torch import nn

from dfmsd.core.errors import DistillError
from dfmsd.models.losses.common import MaskedReconstructionLoss, reduce_squared_error
from dfmsd.models.losses.dense_heads import dense_head
from dfmsd.models.losses.inputs import LossInputs, draw_seed
from dfmsd.models.teacher_memo import TeacherMemo


def teacher_config(config: str | Path | dict | Config) -> Config:
    return (
        config
        if isinstance(config, Config)
        else Config(config)
        if isinstance(config, dict)
        else Config.fromfile(str(config))
    )


def build_teacher(config: str | Path | dict | Config, checkpoint: str | Path | None) -> nn.Module:
    """Frozen detector in eval mode; the checkpoint must match the config exactly."""
    from dfmsd.engine.checkpoint import load_model_weights

    cfg = teacher_config(config)
    teacher = MODELS.build(cfg.model)
    if checkpoint is not None:
        load_model_weights(teacher, checkpoint, what='teacher')
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


#: Side (px) of the blank image the strides are read from: a power of two, so that every level up
#: to stride STRIDE_PROBE / 2 has a whole number (>= 2) of cells. At the training size itself
#: size / cells is no stride: P6 and P7 of a 64 px image both have one cell, and 800 px gives 62, 114.
STRIDE_PROBE = 512


@torch.no_grad()
def probe_fpn(model: nn.Module, size: int) -> list[tuple[int, int, int]]:
    """(stride, channels, cells along the shorter side at ``size``) of each FPN level, from
    forward passes on blank images (STRIDE_PROBE px for the strides, size x size for the cells)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats = model.extract_feat(torch.zeros(1, 3, size, size, device=device))
    wide = model.extract_feat(torch.zeros(1, 3, STRIDE_PROBE, STRIDE_PROBE, device=device))
    model.train(was_training)
    return [(round(STRIDE_PROBE / w.shape[-1]), f.shape[1], min(f.shape[-2:])) for f, w in zip(feats, wide)]


def match_levels(student_levels, teacher_levels, min_cells: int) -> list[dict[str, int]]:
    """Student/teacher level pairs of equal stride with at least min_cells cells per side."""
    teacher_by_stride = {s: (i, c) for i, (s, c, _) in enumerate(teacher_levels)}
    pairs = []
    for s_idx, (stride, s_ch, cells) in enumerate(student_levels):
        if stride in teacher_by_stride and cells >= min_cells:
            t_idx, t_ch = teacher_by_stride[stride]
            pairs.append(
                dict(
                    stride=stride,
                    cells=cells,
                    student_idx=s_idx,
                    teacher_idx=t_idx,
                    student_channels=s_ch,
                    teacher_channels=t_ch,
                )
            )
    if not pairs:
        raise DistillError(
            f'teacher and student share no FPN level to distill: student (stride, channels, cells) '
            f'{student_levels}, teacher {teacher_levels}, min_cells {min_cells}'
        )
    return pairs


def _current_iter() -> int | None:
    hub = MessageHub.get_current_instance()
    it = hub.get_info('iter')
    return None if it is None else int(it)


def views_batch(samples) -> dict[str, Any] | None:
    """The ME views attached to ``samples`` as a raw batch (CHW uint8 tensors, BGR as loaded)."""
    views = [s.metainfo.get('me_view') for s in samples]
    views = [torch.from_numpy(v.transpose(2, 0, 1).copy()) for v in views if v is not None]
    return dict(inputs=views, data_samples=None) if views else None


@MODELS.register_module()
class StageDistiller(BaseDetector):
    """Student + frozen teacher with stride-matched distillation losses.

    Args:
        student: mmdet model config of the student.
        teacher: dict(config=..., checkpoint=...) of this stage's teacher.
        losses: name -> loss config, each built once per distilled level (or for the whole pyramid).
        aug_loss_weight: beta of the ME loss on views (needs one masked reconstruction loss).
        seed: the run seed; random draws of the losses come from (seed, iteration, level).
        min_cells: distil levels with at least min_cells x min_cells cells at probe_size.
        probe_size: the training input size the levels are judged at.
        student_init: plain student weights to start from (the run seed's initialisation).
    """

    def __init__(
        self,
        student: dict,
        teacher: dict,
        losses: dict[str, dict] | None = None,
        aug_loss_weight: float = 0.0,
        seed: int = 0,
        min_cells: int = 2,
        probe_size: int = 800,
        student_init: str | None = None,
        data_preprocessor: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        # The batch reaches loss() raw: student and teacher normalise it with their own
        # preprocessors. mmengine's Runner hands a config's top-level `data_preprocessor`
        # (mmdet base configs have one) to a model that names none, which would normalise
        # twice, so distill configs name this one and a normalising one is refused.
        data_preprocessor = data_preprocessor or dict(type='BaseDataPreprocessor')
        kind = data_preprocessor.get('type') if isinstance(data_preprocessor, dict) else type(data_preprocessor)
        if kind not in ('BaseDataPreprocessor', BaseDataPreprocessor):
            raise DistillError(
                f"StageDistiller's data_preprocessor must be BaseDataPreprocessor (the student and "
                f'teacher normalise the raw batch with their own), got {kind}; set '
                f"model.data_preprocessor=dict(type='BaseDataPreprocessor') in the distillation config"
            )
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.student = MODELS.build(student)
        # hidden: a submodule teacher (measured) needs state-dict, optimizer, DDP, init_weights filters; no faster
        object.__setattr__(self, 'teacher', build_teacher(**teacher))
        # a flow run's rows share the frozen teacher's features of their common batches (no result changes)
        self._teacher_memo = TeacherMemo.from_env(
            lambda: repr(teacher_config(teacher['config']).model.to_dict()), self.teacher
        )
        self.seed = int(seed)
        self.student_init = student_init
        self.level_pairs = match_levels(
            probe_fpn(self.student, probe_size), probe_fpn(self.teacher, probe_size), min_cells
        )
        self.losses = nn.ModuleDict({name: self._build_loss(cfg) for name, cfg in (losses or {}).items()})
        self.aug_loss_weight = float(aug_loss_weight)
        self.aug_loss_name = self._reconstruction_loss_name() if self.aug_loss_weight else None
        self.needs = frozenset().union(*(modules[0].needs for modules in self.losses.values()))
        for role, model in (('student', self.student), ('teacher', self.teacher)):
            if f'{role}_head' in self.needs:  # refuse a two-stage model at build time, not mid-run
                dense_head(model, role)
        # what the row cost: original images, ME views, images through the teacher
        for name in ('images_seen', 'views_seen', 'teacher_images'):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))
        # which levels were distilled (the report states them)
        self.register_buffer('distilled_strides', torch.tensor([p['stride'] for p in self.level_pairs]))
        self._student_feats: tuple[torch.Tensor, ...] | None = None
        self._student_head_out = None
        self.student.neck.register_forward_hook(self._record_student_feats)
        if 'student_head_out' in self.needs:
            self.student.bbox_head.register_forward_hook(self._record_head_out)
        self._calls = 0  # iteration stand-in outside a training loop (tests, benchmarks)

    def _build_loss(self, cfg: dict) -> nn.ModuleList:
        """One module per level, or one for the whole pyramid (``per_level = False``: losses
        that need every level at once, e.g. CrossKD's label assignment; the channels are then
        lists over the levels)."""
        channels = [(p['student_channels'], p['teacher_channels']) for p in self.level_pairs]
        if getattr(MODELS.get(cfg['type']), 'per_level', True):
            return nn.ModuleList(
                MODELS.build(dict(cfg, student_channels=cs, teacher_channels=ct)) for cs, ct in channels
            )
        cs, ct = (list(c) for c in zip(*channels))
        return nn.ModuleList([MODELS.build(dict(cfg, student_channels=cs, teacher_channels=ct))])

    def _reconstruction_loss_name(self) -> str:
        names = [n for n, modules in self.losses.items() if isinstance(modules[0], MaskedReconstructionLoss)]
        if len(names) != 1:
            raise DistillError(
                f'aug_loss_weight needs exactly one masked reconstruction loss '
                f'(DMKDLoss, MGDLoss, AMDLoss) among the losses; found {names or "none"}'
            )
        return names[0]

    # ---- module plumbing ---------------------------------------------------------
    def init_weights(self) -> None:
        super().init_weights()
        if self.student_init:  # after the random init, so that the run seed's weights win
            from dfmsd.engine.checkpoint import load_model_weights

            load_model_weights(self.student, self.student_init, what='student initialisation')

    def _record_student_feats(self, module, args, output) -> None:
        self._student_feats = output

    def _record_head_out(self, module, args, output) -> None:
        self._student_head_out = output

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda()/.half() reach the hidden teacher too
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def _set_device(self, device: torch.device) -> None:
        # mmengine updates the device of the data preprocessors in the module tree only
        super()._set_device(device)
        for module in self.teacher.modules():
            if isinstance(module, BaseDataPreprocessor):
                module._device = device

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen BN statistics, always
        return self

    # ---- forward -------------------------------------------------------------------
    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        data = self.student.data_preprocessor(dict(inputs=inputs, data_samples=data_samples), False)
        if mode == 'predict':
            return self.student.predict(data['inputs'], data['data_samples'])
        return self.student._forward(data['inputs'], data['data_samples'])

    def _teacher_feats(self, raw: dict) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            inputs = self.teacher.data_preprocessor(raw, True)['inputs']
            if self._teacher_memo is None:
                return self.teacher.extract_feat(inputs)
            return self._teacher_memo(inputs, self.teacher.extract_feat)

    def distillation_losses(self, s_feats, t_feats, samples, iteration: int) -> dict[str, torch.Tensor]:
        """The distillation terms of a batch from both models' FPN outputs: level by level, each
        per-level loss; then each whole-pyramid loss. The losses of a level share its inputs."""
        s_levels = [s_feats[p['student_idx']] for p in self.level_pairs]
        t_levels = [self._resized(t_feats[p['teacher_idx']], s) for p, s in zip(self.level_pairs, s_levels)]
        inputs = partial(
            LossInputs,
            pairs=self.level_pairs,
            samples=samples,
            seed=self.seed,
            iteration=iteration,
            student=self.student,
            teacher=self.teacher,
            head_outs=self._student_head_out,
            device=s_levels[0].device,
        )
        out = {}
        for level, (pair, s, t) in enumerate(zip(self.level_pairs, s_levels, t_levels)):
            at_level = inputs(level=level)
            for name, modules in self.losses.items():
                if modules[0].per_level:
                    loss = modules[level]
                    out[f'loss_distill_{name}_s{pair["stride"]}'] = loss(s, t, **at_level.of(loss))
        whole = inputs(level=None)
        for name, modules in self.losses.items():
            if not modules[0].per_level:
                terms = modules[0](s_levels, t_levels, **whole.of(modules[0]))
                if isinstance(terms, dict):
                    out.update({f'loss_distill_{name}_{k}': v for k, v in terms.items()})
                else:
                    out[f'loss_distill_{name}'] = terms
        return out

    def loss(self, inputs, data_samples) -> dict[str, torch.Tensor]:
        raw = dict(inputs=inputs, data_samples=data_samples)
        student_data = self.student.data_preprocessor(raw, True)
        samples = student_data['data_samples']
        losses = self.student.loss(student_data['inputs'], samples)  # fills _student_feats
        s_feats, self._student_feats = self._student_feats, None
        t_feats = self._teacher_feats(raw)
        it = _current_iter()
        if it is None:
            it, self._calls = self._calls, self._calls + 1
        losses.update(self.distillation_losses(s_feats, t_feats, samples, it))
        views = views_batch(samples) if self.aug_loss_weight else None
        if views is not None:
            losses.update(self._aug_losses(views, it))
        self._count(len(samples), 0 if views is None else len(views['inputs']))
        return losses

    def _count(self, images: int, views: int) -> None:
        """Add this step's images and views over all processes: DDP broadcasts rank 0's buffers
        at every forward, so each rank adds the global step, not its own share."""
        step = torch.tensor([images, views], dtype=torch.int64, device=self.images_seen.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(step)
        self.images_seen += step[0]
        self.views_seen += step[1]
        self.teacher_images += step[0] + step[1]

    @staticmethod
    def _resized(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Same stride, different padding: resize the teacher map to the student's."""
        if t.shape[-2:] == s.shape[-2:]:
            return t
        return F.interpolate(t, size=s.shape[-2:], mode='bilinear', align_corners=False)

    def _aug_losses(self, views: dict, it: int) -> dict[str, torch.Tensor]:
        """L_aug (Eq. 8): beta * mean over N, C, H, W of (reconstruct(S~, T~) - T~)^2 per level, on the
        views: Eq. 8 normalises by each level's element count, whatever the stage loss's reduction."""
        s_views = self.student.extract_feat(self.student.data_preprocessor(views, True)['inputs'])
        self._student_feats = None  # the neck hook fired again
        t_views = self._teacher_feats(views)
        out = {}
        for level, pair in enumerate(self.level_pairs):
            rec: MaskedReconstructionLoss = self.losses[self.aug_loss_name][level]
            s = s_views[pair['student_idx']]
            t = self._resized(t_views[pair['teacher_idx']], s)
            gen = torch.Generator(device=s.device)
            gen.manual_seed(draw_seed(self.seed, it, level, 'aug'))
            rebuilt = rec.reconstruct(s, t, gen)
            out[f'loss_distill_aug_s{pair["stride"]}'] = self.aug_loss_weight * reduce_squared_error(rebuilt, t, 'mean')
        return out

    # BaseDetector's abstract hooks, answered by the student.
    def extract_feat(self, batch_inputs):
        return self.student.extract_feat(batch_inputs)

    def _forward(self, batch_inputs, batch_data_samples=None):
        return self.student._forward(batch_inputs, batch_data_samples)

    def predict(self, batch_inputs, batch_data_samples, rescale: bool = True):
        return self.student.predict(batch_inputs, batch_data_samples, rescale=rescale)
