"""What each rank of the distributed tests runs (imported by the spawned processes): join one
gloo group, then run each config through ``peftbench.run.execute`` as a rank of it."""

from __future__ import annotations

import datetime
from typing import Any, Optional


def run_configs(configs: list[list[str]]) -> Optional[list[dict[str, Any]]]:
    """Every config (a list of overrides) in turn, as this rank; rank 0 returns the records."""
    import torch.distributed as dist

    from peftbench import cli, parallel, run

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    try:
        for overrides in configs:
            cfg = cli.checked_config(*overrides)
            parallel.ACTIVE = parallel.Context(rank, world, cfg.parallel.strategy)
            rec = run.new_record(cfg)
            run.execute(cfg, rec)
            out.append(rec)
    finally:
        parallel.ACTIVE = None
        dist.destroy_process_group()
    return out if rank == 0 else None
