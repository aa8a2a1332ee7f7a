"""The frozen teacher's FPN features of a batch, computed once per flow run and shared by its rows.

Every row of a seed draws the same batches (``benchmarks/batch_digests.py``), and a teacher
is frozen, so the strong teacher's features of a batch are the same in the nine single-stage
rows, ``distill_me`` and the SAL rows' stage 2: per seed about 5,750 batch forwards of which
500 differ. A flow run (``make repro``) names a directory in ``DFMSD_TEACHER_MEMO``; each
:class:`~dfmsd.models.distiller.StageDistiller` then looks a batch up before running its
teacher, and stores what it computed. The flow removes the directory when the run ends.

It changes no result. The key is a digest of everything the features depend on:

* the teacher: its model config and every tensor of its state dict;
* the batch as the teacher sees it: the preprocessed input tensor (dtype, shape, strides, bytes);
* the arithmetic: the torch version, its CPU capability and thread count, and the pinned
  numerics settings with the CPU model (:func:`dfmsd.core.numerics.machine`).

A hit therefore returns the bytes the teacher would have computed; ``tests/test_training.py``
trains a row with a memo that another row filled and checks its outputs byte for byte against
the same row trained without one. Entries are written whole (a rename), so two workers may
compute the same batch at once; a file that does not load is computed again. CPU only: on a
GPU the forward costs less than its file, and 800 px COCO features would fill a disk.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from dfmsd.core.io import TEACHER_MEMO_ENV, atomic_write

Features = tuple[torch.Tensor, ...]


def _update_tensor(digest, t: torch.Tensor) -> None:
    digest.update(f'{t.dtype}{tuple(t.shape)}{t.stride()}'.encode())
    digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # its buffer, not a copy


def teacher_identity(config_text: str, teacher: torch.nn.Module) -> str:
    """Digest of the teacher's config, weights and buffers, and of the arithmetic that runs it."""
    from dfmsd.core.numerics import machine

    digest = hashlib.blake2b(digest_size=20)
    settings = dict(machine(), torch=torch.__version__, capability=torch.backends.cpu.get_cpu_capability())
    digest.update(repr(sorted(settings.items())).encode())
    digest.update(config_text.encode())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        _update_tensor(digest, tensor)
    return digest.hexdigest()


class TeacherMemo:
    """``memo(inputs, extract)``: ``extract(inputs)``, or the stored result of that call."""

    def __init__(self, directory: str | os.PathLike, identity: str):
        self.directory = Path(directory)
        self.identity = identity
        self.hits = self.misses = 0
        atexit.register(self._say)

    @classmethod
    def from_env(cls, config_text: Callable[[], str], teacher: torch.nn.Module) -> TeacherMemo | None:
        """The memo ``DFMSD_TEACHER_MEMO`` names, or None; ``config_text`` is read only then."""
        directory = os.environ.get(TEACHER_MEMO_ENV)
        if not directory:
            return None
        return cls(directory, teacher_identity(config_text(), teacher))

    def key(self, inputs: torch.Tensor) -> str:
        digest = hashlib.blake2b(self.identity.encode(), digest_size=20)
        digest.update(str(torch.get_num_threads()).encode())
        _update_tensor(digest, inputs)
        return digest.hexdigest()

    def __call__(self, inputs: torch.Tensor, extract: Callable[[torch.Tensor], Sequence[torch.Tensor]]) -> Features:
        if inputs.device.type != 'cpu':
            return tuple(extract(inputs))
        key = self.key(inputs)
        path = self.directory / key[:2] / f'{key}.pt'
        if path.is_file():
            try:
                feats = torch.load(path, map_location='cpu', weights_only=True)
                self.hits += 1
                return tuple(feats)
            except Exception as exc:  # noqa: BLE001  a damaged entry: computed again, and replaced
                print(f'[teacher-memo] {path}: does not load ({type(exc).__name__}); computing it again')
        feats = tuple(extract(inputs))
        atomic_write(path, lambda f: torch.save(list(feats), f))
        self.misses += 1
        return feats

    def _say(self) -> None:
        if self.hits or self.misses:
            print(f'[teacher-memo] {self.directory}: {self.hits} batches read, {self.misses} computed')
