"""The paper's two illustrations, drawn from the pipeline's own data and models.

* :func:`spectra_figure` (the paper's Fig. 6): the 2-D DFT amplitude spectra of a few
  validation images and of their flipped, noised and cropped versions, the views masking
  enhancement makes: noise lifts the high frequencies, a crop (zoomed back to the input
  size) the low ones.
* :func:`attention_figure`: per distilled FPN level, the teacher's spatial and channel
  attention, the masks DMKD samples from them, and the student's reconstruction of the
  teacher feature, for a trained DFMSD student and its loss modules.

Both use matplotlib's Agg backend and write PNGs without a timestamp (same inputs, same bytes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dfmsd.data.coco import load_json, load_rgb, split_files
from dfmsd.data.me import enhance

SAVE = dict(dpi=110, metadata={'Software': None})


def _gray(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def amplitude_spectrum(image_rgb: np.ndarray) -> np.ndarray:
    """log(1 + |F|) of the grey image's 2-D DFT, zero frequency in the centre."""
    return np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(_gray(image_rgb)))))


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def views_of(image: np.ndarray, image_id: int, me, seed: int) -> dict[str, np.ndarray]:
    """The image, flipped, noised and cropped (the crop zoomed back to the input size)."""
    common = dict(image_id=image_id, seed=seed, noise_sigma=me.noise_sigma, crop_min=me.crop_min, crop_max=me.crop_max)
    crop = enhance(image, 'crop', **common)
    return {
        'image': image,
        'flipped': np.ascontiguousarray(image[:, ::-1]),
        'noised': enhance(image, 'noise', **common),
        'cropped': _resize(crop, image.shape[:2]),
    }


def _figure(rows: int, cols: int, size: float = 2.1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * size, rows * size))
    return fig, fig.subplots(rows, cols, squeeze=False)


def spectra_figure(data, me, out: str | Path, *, images: int = 3, seed: int = 0) -> Path:
    ann, img_dir = split_files(data, 'val')
    entries = load_json(ann)['images'][:images]
    fig, axes = _figure(2 * len(entries), 4)
    for row, entry in enumerate(entries):
        views = views_of(load_rgb(Path(img_dir) / entry['file_name']), entry['id'], me, seed)
        spectra = {k: amplitude_spectrum(v) for k, v in views.items()}
        vmax = max(float(s.max()) for s in spectra.values())
        for col, (name, view) in enumerate(views.items()):
            axes[2 * row, col].imshow(view)
            axes[2 * row, col].set_title(f'{name} (val {entry["id"]})', fontsize=7)
            axes[2 * row + 1, col].imshow(spectra[name], cmap='magma', vmin=0, vmax=vmax)
            axes[2 * row + 1, col].set_title('log(1 + |DFT|)', fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle('DFT amplitude spectra of the ME views (noise: high frequencies; crop: low)', fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, **SAVE)
    return out


def _load_distiller(run_dir: Path, teacher_dir: Path):
    """The run's StageDistiller (train.py) with its trained student and loss modules."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.engine.checkpoint import load_weights, state_dict_of

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(run_dir / 'train.py'))
    cfg.model.teacher = dict(config=str(teacher_dir / 'model.py'), checkpoint=str(teacher_dir / 'model.pth'))
    cfg.model.student_init = None
    model = MODELS.build(cfg.model)
    model.student.load_state_dict(state_dict_of(load_weights(run_dir / 'model.pth', 'student')))
    model.losses.load_state_dict(state_dict_of(load_weights(run_dir / 'losses.pth', 'loss modules')))
    model.eval()
    torch.set_grad_enabled(False)
    return cfg, model


def attention_figure(
    data,
    run_dir: str | Path,
    teacher_dir: str | Path,
    out: str | Path,
    *,
    image_index: int = 0,
    loss_name: str = 'stage',
    seed: int = 0,
) -> Path:
    """Teacher attention, sampled masks and reconstruction per level, for one val image."""
    import torch
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate

    from dfmsd.models.distiller import draw_seed
    from dfmsd.models.losses.common import channel_attention, spatial_attention

    cfg, model = _load_distiller(Path(run_dir), Path(teacher_dir))
    rec = model.losses[loss_name]
    ann, img_dir = split_files(data, 'val')
    ds_cfg = cfg.test_dataloader.dataset
    ds_cfg.update(
        data_root=str(data.root).rstrip('/') + '/',
        ann_file=data.splits['val'].ann,
        data_prefix=dict(img=data.splits['val'].img),
    )
    sample = DATASETS.build(ds_cfg)[image_index]
    batch = pseudo_collate([sample])
    s_feats = model.student.extract_feat(model.student.data_preprocessor(batch, False)['inputs'])
    t_feats = model.teacher.extract_feat(model.teacher.data_preprocessor(batch, False)['inputs'])
    image = sample['inputs'].numpy().transpose(1, 2, 0)[..., ::-1]  # BGR as loaded -> RGB
    columns = [
        'input',
        '|T| (teacher)',
        'spatial attention',
        'spatial mask',
        'channel attention',
        'reconstruction',
        '|rebuilt - T|',
    ]
    fig, axes = _figure(len(model.level_pairs), len(columns), size=1.9)
    for level, pair in enumerate(model.level_pairs):
        s = s_feats[pair['student_idx']]
        t = model._resized(t_feats[pair['teacher_idx']], s)
        module = rec[level]
        gen = torch.Generator().manual_seed(draw_seed(seed, 0, level))
        m_s, _ = module.masks(t, gen) if hasattr(module, 'masks') else (None, None)
        gen = torch.Generator().manual_seed(draw_seed(seed, 0, level))
        rebuilt = module.reconstruct(s, t, gen)
        tau = getattr(module, 'tau', 0.5)
        a_c = channel_attention(t, tau)[0, :, 0, 0].numpy()
        panels = [
            image,
            t[0].abs().mean(0).numpy(),
            spatial_attention(t, tau)[0, 0].numpy(),
            None if m_s is None else m_s[0, 0].numpy(),
            a_c,
            rebuilt[0].abs().mean(0).numpy(),
            (rebuilt - t)[0].abs().mean(0).numpy(),
        ]
        for col, (name, panel) in enumerate(zip(columns, panels)):
            ax = axes[level, col]
            if panel is None:
                ax.set_axis_off()
                continue
            if name == 'channel attention':
                ax.bar(np.arange(len(panel)), np.sort(panel)[::-1], width=1.0, color='#1f77b4')
                ax.tick_params(labelsize=5)
            else:
                ax.imshow(panel, cmap=None if name == 'input' else 'viridis')
                ax.set_xticks([]), ax.set_yticks([])
            if level == 0:
                ax.set_title(name, fontsize=6)
        axes[level, 0].set_ylabel(f'stride {pair["stride"]}', fontsize=7)
    fig.suptitle(f'{Path(run_dir).as_posix()}: teacher attention, DMKD masks and reconstruction per level', fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, **SAVE)
    return out
