_base_ = ['../_base_/synthetic_detection.py', '../_base_/runtime_iters.py', '../_base_/small_models.py']
# RetinaNet on P3-P7. Anchors start at 16 px (octave_base_scale=2) for 128 px images.
model = dict(
    type='RetinaNet',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone={{_base_.resnet}},
    neck=dict(type='FPN', in_channels=[32, 64, 128], out_channels=64, start_level=0,
              add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(
        type='RetinaHead', num_classes=5, in_channels=64, stacked_convs=2, feat_channels=64,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=2, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls={{_base_.focal_loss}},
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                      ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'), allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg={{_base_.dense_test_cfg}})
