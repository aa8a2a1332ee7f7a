"""Each registered loss's value on one fixed input (a reference for changes to the losses).

    python scripts/loss_values.py

S and T are `torch.randn(2, 8, 8, 8)` after `torch.manual_seed(0)`; every module is built
with loss_weight=1 right after `torch.manual_seed(0)`; FGD/MAR get two images' boxes.
"""
import torch
from mmdet.registry import MODELS

import dfmsd.models  # noqa: F401


def main() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    boxes = [torch.tensor([[8., 8., 40., 40.]]), torch.tensor([[0., 16., 24., 64.], [32., 0., 64., 24.]])]
    ctx = dict(gt_bboxes=boxes, img_shapes=[(64, 64), (64, 64)], stride=8)
    for name in ('FeatureKDLoss', 'MGDLoss', 'DMKDLoss', 'PKDLoss', 'FGDLoss', 'MARLoss', 'MARRelationLoss'):
        torch.manual_seed(0)
        loss = MODELS.build(dict(type=name, student_channels=8, teacher_channels=8, loss_weight=1.0))
        torch.manual_seed(0)
        print(f'{name:16s} {float(loss(s, t, **ctx).detach()):.6f}')
    torch.manual_seed(0)
    dmkd = MODELS.build(dict(type='DMKDLoss', student_channels=8, teacher_channels=8, loss_weight=1.0))
    torch.manual_seed(0)
    print(f'{"DMKD mean (L_aug)":16s} {float(dmkd(s, t, reduction="mean")):.6f}')
    torch.manual_seed(0)
    pcd = MODELS.build(dict(type='PCDLoss', student_channels=8, teacher_channels=8, loss_weight=1.0,
                            temperature=2.0, num_groups=2, num_stages=3))
    # Logit losses: S and T read as 8-class logit maps; CrossKD's teacher head is the identity.
    print(f'{"PCDLoss p=0.5":16s} {float(pcd(student_logits=s, teacher_logits=t, progress=0.5, **ctx)):.6f}')
    torch.manual_seed(0)
    crosskd = MODELS.build(dict(type='CrossKDLoss', student_channels=8, teacher_channels=8, loss_weight=1.0,
                                temperature=2.0))
    value = crosskd(s, t, teacher_head_fn=lambda x: x.unsqueeze(1), **ctx)
    print(f'{"CrossKDLoss":16s} {float(value.detach()):.6f}')


if __name__ == '__main__':
    main()
