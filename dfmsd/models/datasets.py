"""Dataset of masking-enhanced (ME) copies, made once by stages/augment.py."""
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS


@DATASETS.register_module()
class MEAugmentedCocoDataset(CocoDataset):
    """A COCO dataset whose samples carry `is_augmented=True` into their metainfo.

    The distiller applies the ME loss (Eq. 8) to exactly these samples; the train
    pipeline's PackDetInputs must list 'is_augmented' in its meta_keys.
    """

    def parse_data_info(self, raw_data_info: dict) -> dict:
        info = super().parse_data_info(raw_data_info)
        info['is_augmented'] = True
        return info
