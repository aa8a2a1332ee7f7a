"""Train a config with mmengine's Runner and export a plain, stock-mmdet checkpoint.

The work directory is keyed by a digest of the resolved config: a stage killed halfway
resumes from its last checkpoint on rerun, while a changed config starts afresh instead
of resuming a run that no longer matches it.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner

from dfmsd.checkpoint import allow_mmengine_checkpoints, export_plain_checkpoint, resumable_training
from dfmsd.launch import single_process_config


class ConciseRunner(Runner):
    """mmengine's Runner with a one-line environment log instead of its multi-kilobyte
    dump (torch build flags), which buried the training progress in stage logs."""

    def _log_env(self, env_cfg: dict) -> None:
        import mmcv
        import mmdet
        import mmengine
        import torch
        self.logger.info(f'torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}, '
                         f'mmengine {mmengine.__version__}, seed {self.seed}, '
                         f'deterministic {self._deterministic}, world size {self.world_size}')


def build_runner(cfg: Config) -> Runner:
    """A Runner whose visualizer is its own: mmengine reuses a global visualizer by name,
    which would keep writing into an earlier runner's (possibly deleted) work dir."""
    if cfg.get('visualizer'):
        cfg.visualizer.pop('name', None)  # defaults to the runner's unique experiment name
    return ConciseRunner.from_cfg(cfg)


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(cfg.pretty_text.encode()).hexdigest()[:12]


def prepare_work_dir(cfg: Config, name: str, work_root: str | Path = 'work_dirs') -> Path:
    """Set cfg.work_dir; resume from its newest hash-verified checkpoint when one exists."""
    work_dir = Path(work_root) / f'{name}-{config_digest(cfg)}'
    cfg.work_dir = str(work_dir)
    resumable_training(cfg)
    if cfg.resume:
        print(f'[{name}] resuming from {cfg.load_from}', flush=True)
    return work_dir


def collect_scalars(work_dir: str | Path) -> list[dict[str, Any]]:
    """Training scalars logged by LocalVisBackend, across resumed runs, one row per iter."""
    rows: dict[int, dict[str, Any]] = {}
    for scalars in sorted(Path(work_dir).glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if 'loss' in row and 'iter' in row:
                rows[int(row['iter'])] = row
    return [rows[i] for i in sorted(rows)]


def write_loss_csv(work_dir: str | Path, path: str | Path) -> None:
    rows = collect_scalars(work_dir)
    keys = ['iter'] + sorted({k for r in rows for k in r if k == 'loss' or k.startswith('loss_')})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)


def train_and_export(cfg: Config, *, name: str, out_checkpoint: str | Path, out_config: str | Path,
                     loss_csv: str | Path | None = None, export_cfg: Config | None = None,
                     export_prefix: str = '', work_root: str | Path = 'work_dirs') -> Path:
    """Train `cfg`; write the model (minus `export_prefix` wrapper keys) and its config.

    `export_cfg` is the config the exported weights load into (the plain student for a
    distiller); it defaults to `cfg`.
    """
    allow_mmengine_checkpoints()
    # Deep copies: Config.copy() shares nested dicts, and the training-only settings added
    # below (work dir, resume, hashed checkpoint hook) must not reach the exported config.
    export_cfg = copy.deepcopy(export_cfg or cfg)
    cfg = copy.deepcopy(cfg)
    work_dir = prepare_work_dir(cfg, name, work_root)
    runner = build_runner(cfg)
    runner.train()
    if not is_main_process():
        return Path(out_checkpoint)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    meta = {'name': name, 'iters': int(runner.iter), 'config_digest': work_dir.name.rsplit('-', 1)[1],
            'mmdet_config': Path(out_config).name}
    export_plain_checkpoint(model.state_dict(), out_checkpoint, meta=meta, prefix=export_prefix)
    Path(out_config).parent.mkdir(parents=True, exist_ok=True)
    single_process_config(export_cfg).dump(str(out_config))  # no launcher / DDP keys
    if loss_csv:
        write_loss_csv(work_dir, loss_csv)
    # Finished: the work dir only exists to resume unfinished runs; a forced rerun retrains.
    shutil.rmtree(work_dir, ignore_errors=True)
    return Path(out_checkpoint)
