"""``diffsynth run CONFIG --nproc-per-node N``: start torchrun's elastic launcher on this machine.

It is ``torchrun --standalone --nproc-per-node N --max-restarts K -m diffsynth run CONFIG``
without typing it: ``torch.distributed.run`` starts N workers, restarts all of them when one
dies (up to K times; each restart resumes from the files on disk) and stops them all when one
fails for good. On the CPU each worker gets ``cores // N`` threads unless ``OMP_NUM_THREADS``
is set (torchrun alone would give each one thread).
"""
from __future__ import annotations

import os
import sys


def launch(config_path: str, nproc: int, max_restarts: int, worker_args: list[str], device: str | None) -> int:
    """Run the render on ``nproc`` local processes; returns the exit code (0: every worker finished)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {max_restarts}")
    if str(device or "").startswith("cuda"):
        import torch

        visible = torch.cuda.device_count()
        if nproc > visible:
            raise ValueError(f"--nproc-per-node {nproc} needs {nproc} CUDA devices, one per process; this machine shows {visible}")
    elif "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    argv = ["--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "diffsynth", "run", os.path.abspath(config_path), *worker_args]
    try:
        torchrun(argv)
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {rank}: exit code {failure.exitcode}" for rank, failure in sorted(exc.failures.items()))
        print(f"error: the render stopped ({failures}); the workers' messages are above. Finished work is kept: "
              f"run the same command again to continue.", file=sys.stderr)
        return 1
    return 0
