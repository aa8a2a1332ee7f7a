"""Checkpoints: loaded under torch's ``weights_only=True`` default, kept safe.

Two kinds of file, two rules:

* Model weights (``student.pth``, teachers, downloads) are plain: tensors and plain values
  only. They load with ``weights_only=True`` plus an allow-list of the numpy types and
  mmengine's HistoryBuffer that mmengine puts in its own checkpoints' meta.
* Training states (mmengine's resume checkpoints: optimizer, schedulers, message hub) pickle
  ``getattr(HistoryBuffer, 'min')``, and allow-listing ``getattr`` would let any file call
  anything. So each state is written with a ``.sha256`` sidecar, and only a file whose hash
  matches is loaded with full unpickling, through the ``verified://`` loader scheme.

Safety is never switched off: no message here suggests ``weights_only=False``.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfmsd.core.errors import CheckpointError
from dfmsd.core.io import atomic_write, sha256_file

VERIFIED_SCHEME = 'verified://'


def _numpy_globals() -> list[Any]:
    multiarray = np.core.multiarray  # numpy 1.x location of the pickling helpers
    found = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    found += [type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDGSUV']  # np.dtypes.*DType
    return found


def allow_mmengine_checkpoints() -> None:
    """Register the non-tensor types found in mmengine checkpoints as safe to unpickle."""
    from mmengine.logging.history_buffer import HistoryBuffer

    torch.serialization.add_safe_globals(_numpy_globals() + [HistoryBuffer])


#: What loading damaged or foreign bytes raises (a matching hash only says they are the expected bytes).
UNPICKLING_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    OSError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
)


def load_weights(path: str | Path, what: str = 'checkpoint') -> dict[str, Any]:
    """A plain checkpoint's dict, or a CheckpointError naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{what} {path} does not exist (run the stage that makes it: `dvc repro`)')
    allow_mmengine_checkpoints()
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except UNPICKLING_ERRORS as err:
        reason = _load_failure(err)
        raise CheckpointError(
            f'{what} {path} cannot be loaded as model weights ({type(err).__name__}: {reason}). It is damaged, '
            f'or not a weights file: restore it with `dvc checkout --force {path}` or rebuild it with `dvc repro`; '
            f'a downloaded file is fetched again when its hash does not match'
        ) from None


def _load_failure(err: BaseException) -> str:
    """torch's reason for refusing a file, without its advice to retry with weights_only=False
    (which would run whatever code the file holds): the lines that name weights_only go."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [line for line in lines if 'weights_only' not in line]
    if len(kept) < len(lines):
        kept = ['not plain weights' + (f': {kept[0]}' if kept else '')]
    return (kept[0] if kept else type(err).__name__)[:200]


def state_dict_of(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    return checkpoint.get('state_dict', checkpoint)


def load_model_weights(model: torch.nn.Module, path: str | Path, what: str = 'checkpoint') -> dict[str, Any]:
    """Load ``path`` into ``model`` strictly; a mismatch names the file and its config."""
    checkpoint = load_weights(path, what)
    try:
        model.load_state_dict(state_dict_of(checkpoint), strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()
        raise CheckpointError(
            f'{what} {path} does not fit its model config: {" ".join(line.strip() for line in first[:3])[:400]}'
        ) from None
    return checkpoint


def save_weights(obj: Any, path: str | Path) -> Path:
    """torch.save through a file handle (torch names the zip's root folder after a path it is
    given; the temp name would make identical weights differ in bytes), atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def export_plain_checkpoint(
    state_dict: dict[str, torch.Tensor], path: str | Path, meta: dict[str, Any] | None = None, prefix: str = ''
) -> Path:
    """Write ``{'state_dict', 'meta'}`` with only tensors and plain values inside.

    Stock mmdet (``init_detector``, ``load_checkpoint``) reads it with ``weights_only=True``
    and no project code; ``meta['dataset_meta']`` (class names) labels its boxes. ``prefix``
    strips a wrapper's key prefix (``student.``).
    """
    plain = {k[len(prefix) :]: v.detach().cpu().clone() for k, v in state_dict.items() if k.startswith(prefix)}
    return save_weights({'state_dict': plain, 'meta': dict(meta or {})}, path)


# ---- training states -------------------------------------------------------------
#: What an mmengine checkpoint records about the clock, the machine and the checkout, not the
#: training (mmengine_version carries the git hash of the working directory's repository):
#: dropped from a state kept as a stage output, so that a rerun writes the same bytes.
_CLOCK_META = ('time', 'experiment_name', 'mmengine_version')
_CLOCK_RUNTIME = ('eta', 'last_ckpt', 'keep_ckpt_ids', 'experiment_name', 'mmengine_version')
_CLOCK_SCALARS = ('train/time', 'train/data_time')


def save_portable_state(checkpoint: dict[str, Any], path: str | Path) -> Path:
    """Save a training state for resuming elsewhere (SAL's stage 2) without its timestamps,
    timings, absolute paths and git hash; ``Runner.resume`` needs none of them."""
    out = dict(checkpoint, meta={k: v for k, v in checkpoint['meta'].items() if k not in _CLOCK_META})
    hub = checkpoint.get('message_hub')
    if hub is not None:
        out['message_hub'] = dict(
            hub,
            runtime_info={k: v for k, v in hub['runtime_info'].items() if k not in _CLOCK_RUNTIME},
            log_scalars={k: v for k, v in hub['log_scalars'].items() if k not in _CLOCK_SCALARS},
        )
    path = save_weights(out, path)
    record_hash(path)
    return path


def sidecar(path: str | Path) -> Path:
    return Path(f'{path}.sha256')


def record_hash(path: str | Path) -> None:
    sidecar(path).write_text(sha256_file(path) + '\n')


def is_verified(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and sidecar(path).is_file() and sidecar(path).read_text().strip() == sha256_file(path)


def latest_verified_checkpoint(work_dir: str | Path) -> Path | None:
    """Newest iter_*.pth whose recorded hash matches (a file cut short by a kill does not)."""
    found = sorted(Path(work_dir).glob('iter_*.pth'), key=lambda p: int(p.stem.split('_')[1]))
    return next((p for p in reversed(found) if is_verified(p)), None)


def load_verified(
    path: str | Path, map_location=None, *, sha256: str | None = None, key: str | None = None
) -> dict[str, Any]:
    """Full unpickling, only of a file whose SHA-256 matches: ``sha256`` (a full digest or a
    prefix of at least 8 hex digits, e.g. a download's) or else its ``.sha256`` sidecar.

    The bytes are read once, and that same buffer is hashed and unpickled, so the file
    cannot change between the check and the load.

    ``key`` is the params entry of a user's own file (``pairs.<pair>.<role>``, a teacher with
    ``checkpoint`` and ``sha256``): errors then name ``<key>.checkpoint`` or ``<key>.sha256`` and
    how to fix them, instead of how to rebuild or restore a pipeline output.
    """
    import hashlib
    import io

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(_missing(path, key))
    expected = sha256 or (sidecar(path).read_text().strip() if sidecar(path).is_file() else None)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if not expected or len(expected) < 8 or not actual.startswith(expected.lower()):
        raise CheckpointError(_mismatch(path, actual, expected, key))
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)  # hash-verified
    except UNPICKLING_ERRORS as err:
        raise CheckpointError(_not_a_checkpoint(path, err, key)) from None


def _missing(path: Path, key: str | None) -> str:
    if key is None:
        return f'{path} does not exist (run the stage that makes it: `dvc repro`)'
    return (
        f'{key}.checkpoint: {path} does not exist. It is your own file, not one the pipeline makes: '
        f'put the checkpoint there, or set {key}.checkpoint to where it is'
    )


def _mismatch(path: Path, actual: str, expected: str | None, key: str | None) -> str:
    if key is None:
        return (
            f'refusing to unpickle {path}: its sha256 {actual} does not match the recorded '
            f'{expected or "(none)"}. Rebuild it with `dvc repro`, restore it with '
            f'`dvc checkout`, or delete a damaged download so that it is fetched again'
        )
    return (
        f'{key}.sha256: refusing to unpickle {path}: its sha256 is {actual}, but {key}.sha256 says {expected}. '
        f"If {path} is the checkpoint you mean, set {key}.sha256: '{actual}'; if not, replace the file "
        f'with the one {key}.sha256 is the hash of'
    )


def _not_a_checkpoint(path: Path, err: BaseException, key: str | None) -> str:
    reason = f'{type(err).__name__}: {_load_failure(err)}'
    if key is None:
        return (
            f'{path} cannot be unpickled ({reason}), though its sha256 matches: it was damaged before its hash '
            f'was recorded. Rebuild it with `dvc repro`, or restore it with `dvc checkout --force {path}`'
        )
    return (
        f'{key}.checkpoint: {path} cannot be loaded as a checkpoint ({reason}), though its sha256 matches '
        f"{key}.sha256: replace it with the right checkpoint and set {key}.sha256 to that file's hash"
    )


def register_verified_checkpoints() -> None:
    """The ``verified://`` scheme for mmengine's loader, and a CheckpointHook that writes sidecars."""
    from mmdet.registry import HOOKS
    from mmengine.dist import is_main_process
    from mmengine.hooks import CheckpointHook
    from mmengine.runner.checkpoint import CheckpointLoader

    if 'HashedCheckpointHook' in HOOKS.module_dict:
        return

    @HOOKS.register_module()
    class HashedCheckpointHook(CheckpointHook):
        """CheckpointHook that writes ``<checkpoint>.sha256`` once the file is complete."""

        def _save_checkpoint_with_step(self, runner, step, meta):
            super()._save_checkpoint_with_step(runner, step, meta)
            if is_main_process():
                record_hash(self.last_ckpt)
                for stale in Path(self.out_dir).glob('iter_*.pth.sha256'):
                    if not stale.with_suffix('').is_file():
                        stale.unlink()

    @CheckpointLoader.register_scheme(prefixes=VERIFIED_SCHEME)
    def _load(filename: str, map_location=None):
        return load_verified(filename[len(VERIFIED_SCHEME) :], map_location)
