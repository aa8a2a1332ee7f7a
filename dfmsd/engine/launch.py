"""Multi-GPU / multi-node training through torchrun and mmengine's ``pytorch`` launcher.

params.yaml (absent = one process)::

    launch: {nproc_per_node: 8, nnodes: 1, node_rank: 0, master_addr: 127.0.0.1,
             master_port: 29500, backend: nccl}

A training stage keeps its plain DVC command. When more than one process is configured,
the stage re-executes itself under ``python -m torch.distributed.run ... <script> <args>``
(:func:`maybe_relaunch`; ``os.execv``, so torchrun's exit status is the stage's), and each
worker turns its mmengine config into a distributed one (:func:`apply_launcher`). Only rank
0 writes outputs. ``launch`` is a DVC parameter of the training stages: the global batch is
``train.batch_size`` x world size, so it changes what a run computes.

Every key can be overridden per machine with ``DFMSD_LAUNCH_<KEY>`` (e.g.
``DFMSD_LAUNCH_NODE_RANK=1`` on the second node), so that all nodes share one params.yaml.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from dfmsd.core.params import Launch


def in_worker() -> bool:
    """True inside a process started by torchrun (or torch.distributed.launch)."""
    return 'LOCAL_RANK' in os.environ


def world_size(launch: Launch) -> int:
    return launch.nproc_per_node * launch.nnodes


def torchrun_command(launch: Launch, argv: list[str] | None = None) -> list[str]:
    argv = list(sys.argv if argv is None else argv)
    return [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--nproc_per_node',
        str(launch.nproc_per_node),
        '--nnodes',
        str(launch.nnodes),
        '--node_rank',
        str(launch.node_rank),
        '--master_addr',
        launch.master_addr,
        '--master_port',
        str(launch.master_port),
        '--',  # the stage's own options after it: argparse would take `--log` for torchrun's `--log-dir`
        *argv,
    ]


def maybe_relaunch(launch: Launch, argv: list[str] | None = None) -> None:
    """Re-execute this stage under torchrun when more than one process is configured.

    Returns (doing nothing) for one process or inside a torchrun worker; otherwise it never
    returns: the process becomes torchrun, whose exit status is the stage's.
    """
    if world_size(launch) <= 1 or in_worker():
        return
    cmd = torchrun_command(launch, argv)
    print(f'[launch] {shlex.join(cmd)}', flush=True)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def apply_launcher(cfg: Any, launch: Launch) -> bool:
    """Inside a torchrun worker, make ``cfg`` a distributed mmengine config; else no-op.

    Sets ``launcher='pytorch'``, the backend and the DDP wrapper. ME runs get
    ``find_unused_parameters=True``: a batch without views leaves the ME branch's inputs
    unused. Without CUDA (the CPU gloo set-up the tests use) the process group is started
    here, because mmengine's init_dist calls torch.cuda.set_device, and DDP gets no
    device_ids. Returns whether the config was changed.
    """
    if not in_worker():
        return False
    import torch

    from dfmsd.core.errors import ParamsError

    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    cfg.launcher = 'pytorch'
    cfg.env_cfg = {**(cfg.get('env_cfg') or {}), 'dist_cfg': dict(backend=launch.backend)}
    uses_me = any(step.get('type') == 'MaskingEnhancement' for step in cfg.train_dataloader.dataset.pipeline)
    wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False, find_unused_parameters=uses_me)
    if not torch.cuda.is_available():
        if launch.backend == 'nccl':
            raise ParamsError("params.yaml: launch.backend 'nccl' needs CUDA GPUs; use 'gloo' on a CPU")
        wrapper['device_ids'] = None  # a CPU module: DDP refuses device ids
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend=launch.backend)
    cfg.model_wrapper_cfg = wrapper
    print(
        f'[launch] rank {rank}/{world} (node {launch.node_rank}, local rank {os.environ["LOCAL_RANK"]}), '
        f'backend {launch.backend}, find_unused_parameters={uses_me}',
        flush=True,
    )
    return True


def single_process_config(cfg: Any) -> Any:
    """A copy of ``cfg`` without the launcher and DDP wrapper, as written next to a checkpoint."""
    out = cfg.copy()
    for key in ('launcher', 'model_wrapper_cfg'):
        out.pop(key, None)
    return out
