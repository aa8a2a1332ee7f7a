"""Pinned numeric code paths: the same kernels on every x86-64 CPU of ours, where the libraries allow.

Float results depend on which kernels the math libraries pick, and they pick by the CPU's
instruction set: oneDNN (convolutions) and MKL (matrix products) take AVX-512 or AMX paths
where they exist, with other blockings and so other summation orders. A run on an Intel Xeon
with AMX and the same run on an AMD EPYC then differ in the last bits after one iteration, and
by about a seed's spread after a training (README, "Reproducing on another CPU"). Every stage
therefore caps the three dispatchers at AVX2, which every machine of this project has:

* ``ATEN_CPU_CAPABILITY=avx2``: PyTorch's own vectorised kernels (elementwise ops, reductions);
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's JIT kernels;
* ``MKL_CBWR=AVX2,STRICT``: MKL's conditional numerical reproducibility mode (the same results
  on any CPU that runs its AVX2 branch, whatever the memory alignment).

Each library reads its variable once, at its first use, so :func:`pin` must run before the
first tensor operation: ``dfmsd.core.cli.run`` calls it before a stage's ``main``, and child
processes (torchrun) inherit it. ``DFMSD_NUMERICS=native`` leaves the libraries to choose (for
a speed comparison: ``benchmarks/step_time.py --numerics``); every run records what it ran with
(:func:`machine`).
"""

from __future__ import annotations

import os
import platform

#: What every stage runs with, unless ``DFMSD_NUMERICS=native``.
PINNED = {'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_CBWR': 'AVX2,STRICT'}
MODE_ENV = 'DFMSD_NUMERICS'


def mode() -> str:
    value = os.environ.get(MODE_ENV, 'pinned')
    if value not in ('pinned', 'native'):
        raise ValueError(f'{MODE_ENV}={value!r}: use pinned (the default) or native')
    return value


def pinnable() -> bool:
    """The settings name x86-64 instruction sets; elsewhere (an Arm laptop) nothing is pinned."""
    return platform.machine().lower() in ('x86_64', 'amd64')


def pin() -> None:
    """Set the pinned code paths in this process's environment (inherited by its children);
    with ``DFMSD_NUMERICS=native``, or on a CPU that is not x86-64, clear them so that the
    libraries choose."""
    native = mode() == 'native' or not pinnable()
    for key, value in PINNED.items():
        if native:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    """What a run's floats depend on besides its inputs and library versions: the CPU and the
    code-path settings. Goes into every run record (run.json, and so metrics/)."""
    numerics = mode() if pinnable() else f'native ({platform.machine()}: nothing to pin)'
    return {'cpu': cpu_model(), 'numerics': numerics, 'settings': {key: os.environ.get(key, '') for key in PINNED}}
