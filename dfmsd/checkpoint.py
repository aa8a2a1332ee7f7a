"""Checkpoint loading under torch's `weights_only=True` default, kept safe.

mmengine 0.10.7 calls `torch.load` without `weights_only`, so torch >= 2.6 refuses its
own checkpoints: their meta and message-hub state hold numpy arrays and scalars and
mmengine's HistoryBuffer. Rather than switching safety off, allow exactly those types.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _numpy_globals() -> list[Any]:
    multiarray = np.core.multiarray  # numpy 1.x location of the pickling helpers
    found = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    found += [type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDGSUV']  # np.dtypes.*DType
    return found


def allow_mmengine_checkpoints() -> None:
    """Register the non-tensor types found in mmengine checkpoints as safe to unpickle."""
    from mmengine.logging.history_buffer import HistoryBuffer
    torch.serialization.add_safe_globals(_numpy_globals() + [HistoryBuffer])


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save into a temp file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        # Through a file handle: torch.save names the zip's root folder after a path it is
        # given (here a random temp name), which would make identical weights differ in bytes.
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_plain_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path,
                            meta: dict[str, Any] | None = None, prefix: str = '') -> None:
    """Write `{'state_dict', 'meta'}` with only tensors and plain values inside.

    Stock mmdet (`init_detector`, `load_checkpoint`) reads it with `weights_only=True`
    and no project code. `prefix` strips a wrapper's key prefix (e.g. 'student.').
    """
    plain = {k[len(prefix):]: v.detach().cpu().clone() for k, v in state_dict.items()
             if k.startswith(prefix)}
    save_atomic({'state_dict': plain, 'meta': dict(meta or {})}, path)


# ---- resuming our own training checkpoints -------------------------------------------
# mmengine's resume state pickles HistoryBuffer methods as `getattr(HistoryBuffer, 'min')`,
# and allow-listing `getattr` would let any checkpoint call arbitrary attributes. Instead
# the training hook below records each checkpoint's sha256 beside it, and only a file
# whose hash matches is loaded with full unpickling, through the `verified://` scheme.
VERIFIED_SCHEME = 'verified://'


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            digest.update(block)
    return digest.hexdigest()


def sidecar(path: str | Path) -> Path:
    return Path(f'{path}.sha256')


def is_verified(path: str | Path) -> bool:
    path = Path(path)
    return (path.is_file() and sidecar(path).is_file()
            and sidecar(path).read_text().strip() == sha256_file(path))


def latest_verified_checkpoint(work_dir: str | Path) -> Path | None:
    """Newest iter_*.pth whose recorded hash matches (a file cut short by a kill does not)."""
    found = sorted(Path(work_dir).glob('iter_*.pth'), key=lambda p: int(p.stem.split('_')[1]))
    return next((p for p in reversed(found) if is_verified(p)), None)


def _register_training_checkpoint_support() -> None:
    from mmdet.registry import HOOKS
    from mmengine.dist import is_main_process
    from mmengine.hooks import CheckpointHook
    from mmengine.runner.checkpoint import CheckpointLoader

    if 'HashedCheckpointHook' in HOOKS.module_dict:
        return

    @HOOKS.register_module()
    class HashedCheckpointHook(CheckpointHook):
        """CheckpointHook that writes `<checkpoint>.sha256` once the file is complete."""

        def _save_checkpoint_with_step(self, runner, step, meta):
            super()._save_checkpoint_with_step(runner, step, meta)
            if is_main_process():
                sidecar(self.last_ckpt).write_text(sha256_file(self.last_ckpt) + '\n')
                for stale in Path(self.out_dir).glob('iter_*.pth.sha256'):
                    if not stale.with_suffix('').is_file():
                        stale.unlink()

    @CheckpointLoader.register_scheme(prefixes=VERIFIED_SCHEME)
    def load_verified(filename: str, map_location=None):
        path = filename[len(VERIFIED_SCHEME):]
        if not is_verified(path):
            raise RuntimeError(f'{path}: hash does not match {sidecar(path)}; refusing to unpickle it')
        return torch.load(path, map_location=map_location, weights_only=False)  # hash-verified, ours


def resumable_training(cfg) -> None:
    """Checkpoints with hash sidecars, and resume (if any) through the verified loader."""
    _register_training_checkpoint_support()
    cfg.default_hooks.checkpoint.type = 'HashedCheckpointHook'
    cfg.default_hooks.checkpoint.max_keep_ckpts = 2  # mmengine deletes the old one before saving
    last = latest_verified_checkpoint(cfg.work_dir)
    cfg.resume = last is not None
    cfg.load_from = f'{VERIFIED_SCHEME}{last}' if last else cfg.get('load_from')
