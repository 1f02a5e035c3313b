"""Evaluation split across processes: each process computes whole batches (batch ``b`` on process
``b mod N``), then every process receives all results in item order.

Splitting by batch, not by item, keeps each batch exactly as one process would have formed it (same items,
same padding), so the gathered log equals the one-process log value for value. Under ``accelerate launch``
(or ``torchrun``) the evaluation scripts and ``--eval_tofu`` use every process this way instead of one
process working while the others wait at a barrier.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's place among the evaluating processes (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch_index: int) -> bool:
        """Whether this process computes batch ``batch_index``."""
        return batch_index % self.world == self.rank

    def gather(self, local: dict[int, Any], total: int) -> list[Any]:
        """Every process's ``{item index: result}`` merged into one list of ``total`` results, on every process."""
        merged = dict(local)
        if self.world > 1:
            import torch.distributed as dist

            parts: list[dict[int, Any] | None] = [None] * self.world
            dist.all_gather_object(parts, local)
            merged = {k: v for part in parts for k, v in (part or {}).items()}
        missing = [i for i in range(total) if i not in merged]
        if missing:
            raise RuntimeError(f"sharded evaluation lost items {missing[:5]} (of {total})")
        return [merged[i] for i in range(total)]

    def share(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Shard()


def current_shard() -> Shard:
    """The running processes as a :class:`Shard`: started by ``accelerate launch``/``torchrun`` (the process group
    is joined here when nobody has yet: gloo on CPU, NCCL on GPUs), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        logger.info("evaluating on %d processes (%s)", world, backend)
    return Shard(dist.get_rank(), dist.get_world_size())
