"""What a distillation loss may take besides S and T: the keyword-only parameters of its ``forward``
name properties of :class:`LossInputs`, which the distiller makes for each distilled level (and one
for the whole pyramid); a property is computed when a loss first asks for it, once per level."""

from __future__ import annotations

import hashlib
from functools import cached_property
from typing import Any

import torch
from mmengine.logging import MessageHub
from torch import Tensor, nn


def draw_seed(*parts: Any) -> int:
    """A 63-bit seed from (run seed, iteration, level, ...): the same draw on a rerun or resume."""
    digest = hashlib.blake2b(':'.join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & (2**63 - 1)


def training_progress() -> float | None:
    """iter / max_iters of the running loop (0 at the first iteration); None outside one."""
    hub = MessageHub.get_current_instance()
    it, total = hub.get_info('iter'), hub.get_info('max_iters')
    if it is None or not total:
        return None
    return min(1.0, max(0.0, float(it) / float(total)))


class LossInputs:
    """The inputs of distilled level ``level``, or (``level=None``) of the whole pyramid, where the
    per-level ones (stride, student_head_out) are lists over the distilled levels.

    ``pairs``: the distiller's level pairs (stride, student_idx, ...); ``head_outs``: what the
    student's dense head returned in this step's detection forward (cls_scores, bbox_preds, ...).
    """

    def __init__(
        self,
        *,
        level: int | None,
        pairs: list[dict],
        samples: list,
        seed: int,
        iteration: int,
        student: nn.Module,
        teacher: nn.Module,
        head_outs=None,
        device=None,
    ):
        self._level, self._all_pairs, self._samples = level, pairs, samples
        self._pairs = pairs if level is None else [pairs[level]]
        self._seed, self._iteration, self._device = seed, iteration, device
        self._student, self._teacher, self._head_outs = student, teacher, head_outs

    def of(self, loss: nn.Module) -> dict[str, Any]:
        """The keyword arguments of ``loss`` (its ``needs``)."""
        return {name: getattr(self, name) for name in loss.needs}

    def _per_level(self, values: list) -> Any:
        return values if self._level is None else values[0]

    @cached_property
    def boxes(self) -> list[Tensor]:
        """ground-truth boxes per image, N tensors k x 4 (xyxy, input pixels)"""
        return [s.gt_instances.bboxes for s in self._samples]

    @cached_property
    def img_shapes(self) -> list[tuple[int, int]]:
        """per image (h, w) of the unpadded input"""
        return [s.img_shape for s in self._samples]

    @cached_property
    def stride(self) -> int | list[int]:
        """the level's stride in pixels"""
        return self._per_level([p['stride'] for p in self._pairs])

    @cached_property
    def generator(self) -> torch.Generator:
        """a torch.Generator for random draws, seeded by (run seed, iteration, level), shared by the level's losses"""
        gen = torch.Generator(device=self._device)
        gen.manual_seed(draw_seed(self._seed, self._iteration, 'all' if self._level is None else self._level))
        return gen

    @cached_property
    def progress(self) -> float | None:
        """training progress iter / max_iters in [0, 1] (None outside training)"""
        return training_progress()

    @cached_property
    def level(self) -> int | None:
        """index of the level among the distilled ones"""
        return self._level

    @cached_property
    def strides(self) -> list[int]:
        """the strides of all distilled levels (whole-pyramid losses)"""
        return [p['stride'] for p in self._all_pairs]

    @cached_property
    def student_head(self) -> nn.Module:
        """the student's dense head (its modules, with grad)"""
        return self._student.bbox_head

    @cached_property
    def teacher_head(self) -> nn.Module | None:
        """the teacher's dense head (frozen; None for a two-stage teacher)"""
        return getattr(self._teacher, 'bbox_head', None)

    @cached_property
    def student_head_out(self):
        """the student head's own (cls_score, bbox_pred) of this level, from its forward"""
        cls_scores, bbox_preds = self._head_outs[:2]
        return self._per_level([(cls_scores[p['student_idx']], bbox_preds[p['student_idx']]) for p in self._pairs])

    @cached_property
    def samples(self) -> list:
        """the data samples (gt_instances, metainfo) of the original images"""
        return self._samples


#: name -> description of every input a loss may take
INPUTS = {name: attr.__doc__ for name, attr in vars(LossInputs).items() if isinstance(attr, cached_property)}
