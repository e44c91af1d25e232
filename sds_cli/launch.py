"""OmegaConf resolvers for running a sweep's jobs in parallel, one GPU each (conf/hydra/launcher/gpus.yaml).

`${hydra:job.num}` cannot pick a worker's GPU: jobs start whenever a worker frees up, so job k and job k+n may
run at once on the same `cuda:(k % n)`. Instead each worker process claims the first GPU no other process holds
(an flock on a per-GPU lock file) and keeps it until it exits; the OS frees the lock even when it crashes."""
from __future__ import annotations

import fcntl
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

LOCKS = Path(os.environ.get("SDS_GPU_LOCKS", Path(tempfile.gettempdir()) / f"sds-cli-gpu-locks-{os.getuid()}"))
_claimed: dict[str, object] = {}  # the device this process holds -> its open lock file (closing it frees the GPU)


def gpu_ids() -> list[str]:
    """Visible GPUs by physical id (CUDA_VISIBLE_DEVICES entries), so that two sweeps given disjoint sets never
    wait on each other and two given the same set never share a GPU."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return (ids or [str(i) for i in range(torch.cuda.device_count())])[: torch.cuda.device_count()]


def gpu_count() -> int:
    """Workers for the joblib launcher: one per visible GPU (at least one, so a CPU-only machine still runs)."""
    return max(1, len(gpu_ids()))


def free_gpu(poll_s: float = 5.0) -> str:
    """`cuda:N` for a GPU no other process has claimed, waiting for one if all are held; `cpu` without GPUs.
    Keep the launcher's n_jobs at most the GPU count: a surplus worker waits until an idle one exits."""
    if _claimed:
        return next(iter(_claimed))
    ids = gpu_ids()
    if not ids:
        return "cpu"
    LOCKS.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count():
        if attempt == 1:
            print(f"sds-run: all {len(ids)} GPUs are claimed (locks in {LOCKS}); waiting for one", file=sys.stderr)
        for index, gpu in enumerate(ids):
            handle = (LOCKS / f"gpu-{gpu}.lock").open("w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _claimed[f"cuda:{index}"] = handle
            return f"cuda:{index}"
        time.sleep(poll_s)


def register() -> None:
    for name, fn in {"sds.gpu_count": gpu_count, "sds.free_gpu": free_gpu}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
