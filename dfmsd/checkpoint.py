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
        torch.save(obj, tmp)
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
