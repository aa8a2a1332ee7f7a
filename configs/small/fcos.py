_base_ = ['../_base_/synthetic_detection.py', '../_base_/runtime_iters.py', '../_base_/small_models.py']
# FCOS on P3-P7; regress ranges scaled down from the 800 px defaults to 128 px images.
model = dict(
    type='FCOS',
    data_preprocessor={{_base_.data_preprocessor}},
    backbone={{_base_.resnet}},
    neck=dict(type='FPN', in_channels=[32, 64, 128], out_channels=64, start_level=0,
              add_extra_convs='on_output', num_outs=5, relu_before_extra_convs=True),
    bbox_head=dict(
        type='FCOSHead', num_classes=5, in_channels=64, stacked_convs=2, feat_channels=64,
        strides=[8, 16, 32, 64, 128],
        regress_ranges=((-1, 16), (16, 32), (32, 64), (64, 128), (128, 1e8)),
        norm_on_bbox=True, centerness_on_reg=True, center_sampling=True, conv_bias=True,
        loss_cls={{_base_.focal_loss}},
        loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=dict(allowed_border=-1, pos_weight=-1, debug=False),
    test_cfg={{_base_.dense_test_cfg}})
