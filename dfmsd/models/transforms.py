"""Masking enhancement as a data-pipeline transform (dfmsd.data.me holds the decisions and pixels)."""

from __future__ import annotations

import numpy as np
from mmcv.transforms import BaseTransform
from mmdet.registry import TRANSFORMS

from dfmsd.data.me import enhance, load_table


@TRANSFORMS.register_module()
class MaskingEnhancement(BaseTransform):
    """Attach the ME view of a training image as ``results['me_view']`` (H x W x 3 uint8, BGR).

    Place it right after ``LoadImageFromFile``: the view is made from the image as loaded,
    by :func:`dfmsd.data.me.enhance` with the op of the decision table ``table`` and a generator
    seeded by (table seed, image id), then resized by ``resize`` (the pipeline's own Resize)
    as the original will be. Images whose op is ``none`` get no view. List ``me_view`` in
    ``PackDetInputs.meta_keys`` so that the distiller receives it.
    """

    def __init__(self, table: str, resize: dict | None = None):
        self.table = table
        self.ops, self.settings = load_table(table)
        self.resize = TRANSFORMS.build(resize) if resize else None

    def transform(self, results: dict) -> dict:
        op = self.ops.get(int(results['img_id']), 'none')
        if op == 'none':
            return results
        s = self.settings
        view = enhance(
            results['img'][..., ::-1],
            op,
            image_id=int(results['img_id']),
            seed=s['seed'],
            noise_sigma=s['noise_sigma'],
            crop_min=s['crop_min'],
            crop_max=s['crop_max'],
        )
        view = np.ascontiguousarray(view[..., ::-1])
        if self.resize is not None:
            view = self.resize(dict(img=view, img_shape=view.shape[:2], ori_shape=view.shape[:2]))['img']
        results['me_view'] = view
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}(table={self.table!r})'
