"""Tests for dfmsd.zoo against the model index shipped in the installed mmdet."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="mmdet is not installed"),
]

from dfmsd import zoo  # noqa: E402
from dfmsd.zoo import ZooModel, find_model, list_models  # noqa: E402

URL_RE = re.compile(r"^https://download\.openmmlab\.com/mmdetection/.+-([0-9a-f]{8})\.pth$")


def test_index_lists_hundreds_of_models():
    models = list_models()
    assert len(models) >= 300
    assert all(isinstance(m, ZooModel) for m in models)
    assert len({m.name for m in models}) == len(models)
    root = zoo.mim_dir()
    assert (root / "model-index.yml").is_file()
    for m in models:
        assert os.path.isabs(m.config) and m.config.startswith(str(root)), m
        assert os.path.isfile(m.config), m  # incl. repaired "gn%2Bws" / bare-name entries
        assert m.url.startswith("https://"), m
    with_prefix = [m for m in models if m.sha256_prefix]
    assert len(with_prefix) >= 0.95 * len(models)
    for m in with_prefix:
        assert re.fullmatch(r"[0-9a-f]{8,64}", m.sha256_prefix)
        assert m.url.endswith(f"-{m.sha256_prefix}.pth"), m


def test_list_models_is_cached_but_returns_a_fresh_list():
    a, b = list_models(), list_models()
    assert a == b and a is not b
    a.clear()
    assert list_models() == b
    assert zoo._load_index.cache_info().hits >= 1


def test_zoo_model_is_frozen():
    m = find_model("retinanet_r50_fpn_1x_coco")
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name, prefix, ap",
    [
        ("retinanet_r50_fpn_1x_coco", "c2398f9e", 36.5),
        ("retinanet_r50_fpn_2x_coco", "fdb43119", 37.4),
        ("faster-rcnn_r50_fpn_1x_coco", "047c8118", 37.4),
        ("faster-rcnn_r50_fpn_2x_coco", "a5d8aa15", 38.4),
        ("cascade-mask-rcnn_x101-64x4d_fpn_20e_coco", "bdb5126a", 45.6),
        ("gfl_r101_fpn_ms-2x_coco", "dd12f847", 44.7),
        ("mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco", "bacf6f7b", 46.0),
    ],
)
def test_find_model_by_name(name, prefix, ap):
    m = find_model(name)
    assert m.name == name
    mt = URL_RE.match(m.url)
    assert mt, m.url
    assert m.sha256_prefix == mt.group(1) == prefix
    assert os.path.isfile(m.config) and os.path.basename(m.config) == name + ".py"
    assert m.box_ap == pytest.approx(ap)


def test_find_model_by_config_stem_and_path():
    # Name and config stem differ for this entry (mmdet 2.x name kept in the metafile)
    m = find_model("faster-rcnn_r50_fpn_ms-3x_coco")
    assert m.name == "faster-rcnn_r50_fpn_mstrain_3x_coco"
    assert find_model("faster-rcnn_r50_fpn_mstrain_3x_coco") is m
    assert find_model("configs/faster_rcnn/faster-rcnn_r50_fpn_ms-3x_coco.py") is m
    assert find_model(m.config) is m
    assert find_model("  retinanet_r50_fpn_1x_coco ") is find_model("retinanet_r50_fpn_1x_coco")


def test_find_model_accepts_mmdet2_spelling():
    assert find_model("faster_rcnn_r50_fpn_1x_coco").name == "faster-rcnn_r50_fpn_1x_coco"
    assert find_model("cascade_mask_rcnn_r50_fpn_1x_coco").name == "cascade-mask-rcnn_r50_fpn_1x_coco"


def test_repaired_config_paths():
    # metafile says configs/gn%2Bws/...; the shipped directory is gn+ws
    m = find_model("mask-rcnn_r101_fpn_gn-ws-all_2x_coco")
    assert os.path.isfile(m.config) and "gn+ws" in m.config


def test_unknown_name_raises_keyerror_with_suggestions():
    with pytest.raises(KeyError) as ei:
        find_model("retinanet_r50_fpn_1x_cocoo")
    msg = str(ei.value)
    assert "unknown mmdet model zoo entry" in msg and "retinanet_r50_fpn_1x_coco" in msg
    with pytest.raises(KeyError, match="gfl_r101_fpn_ms-2x_coco"):
        find_model("gfl_r101_fpn_2x_coco")
    with pytest.raises(KeyError, match="fcos_r50-caffe_fpn_gn-head_ms-640-800-2x_coco"):
        find_model("fcos_r50_fpn_2x_coco")  # no such entry: FCOS R50 2x exists only as caffe + ms
    with pytest.raises(KeyError, match="mask-rcnn_swin-t-p4-w7_fpn_1x_coco"):
        find_model("swin-t")
    with pytest.raises(KeyError):
        find_model("definitely-not-a-model")
