"""The process group a training run lives in: one process, or torchrun's DDP / FSDP2.

`Dist.init()` reads torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR ...)
and starts the default process group (nccl on GPU, gloo on CPU) with `--dist-timeout`;
nothing home-made sits between torchrun and torch.distributed. A group that does not form
within the timeout is one line naming the address, not a hang.

`ParamShards` is where each parameter's part on this process lives, for the state that
follows the parameters (the weight averages): FSDP2's own shard (the DTensor's local
tensor) under FSDP; under DDP, where every process holds the whole replicated parameter,
`torch.chunk(p, world)[rank]`, the same Shard(0) layout FSDP2 uses. One process: the
parameter itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmalloy.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def init(cls, timeout_s: float = 1800, device: str | None = None) -> Dist:
        """`device`: `--device` (None: cuda when available, else cpu)."""
        from lmalloy.io.models import check_device

        dev = check_device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=dev)
        import datetime

        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
            backend = "nccl"
        else:
            backend = "gloo"
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            except dist.DistError as e:
                where = (f"rank {os.environ.get('RANK', '?')} of {world} at "
                         f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}")
                raise UserError(
                    f"the process group did not form within --dist-timeout {timeout_s:g} s "
                    f"({where}: {str(e).splitlines()[0][:160]}); start every process "
                    "(torchrun on each node, the same --nnodes and --rdzv-endpoint)") from None
        return cls(dist.get_rank(), dist.get_world_size(), local, dev)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_mean(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def broadcast(self, obj):
        """Rank 0's value of a small picklable object, on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def atomic_output(self, target: Path) -> Iterator[Path]:
        """`lmalloy.io.writer.atomic_output` for all processes: rank 0 makes the temporary
        folder and renames it into place once every process has written its part there
        (a shared file system when the processes span nodes)."""
        from lmalloy.io.writer import atomic_output

        if not self.main:
            yield self.broadcast(None)
            self.barrier()
            return
        with atomic_output(target, overwrite=True) as tmp:
            self.broadcast(tmp)
            yield tmp
            self.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class ParamShards:
    """This process's part of each parameter of `model`, and the way back to the whole."""

    def __init__(self, model: torch.nn.Module, dist: Dist):
        self.params = dict(model.named_parameters())
        self.rank, self.world = dist.rank, dist.world
        self.sharded = any(_is_dtensor(p) for p in self.params.values())  # FSDP2
        self.fsdp_modules = []
        if self.sharded:
            from torch.distributed.fsdp import FSDPModule

            self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.mesh = None
        if dist.world > 1 and not self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(dist.device.type, (dist.world,))

    def reshard(self) -> None:
        """FSDP2: drop the gathered copies of parameters (the root module keeps its own
        after a forward pass without backward), so that the model's parameters are the
        shards again and the next forward pass gathers what the shards hold now."""
        for m in self.fsdp_modules:
            m.reshard()

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """This process's part of parameter `p` (a view, no copy)."""
        if _is_dtensor(p):
            return p.to_local()
        if self.mesh is None:
            return p
        parts = torch.chunk(p, self.world, dim=0)
        return parts[self.rank] if self.rank < len(parts) else p[p.shape[0]:]

    def dtensor(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """`local`, this process's part of a tensor shaped like parameter `name`, as a
        DTensor of the whole (sharing `local`'s memory); `local` itself in one process."""
        p = self.params[name]
        if _is_dtensor(p):
            mesh, placements = p.device_mesh, p.placements
        elif self.mesh is not None:
            from torch.distributed.tensor import Shard

            mesh, placements = self.mesh, (Shard(0),)
        else:
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, mesh, placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    def full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor whose part `local` is (every process calls: an all-gather)."""
        t = self.dtensor(name, local)
        return t.full_tensor() if _is_dtensor(t) else t

    def assign(self, name: str, local: torch.Tensor) -> None:
        """Put `local` (this process's part of a tensor like parameter `name`) into the
        model: into the FSDP2 shard as it is, into a replicated parameter gathered whole."""
        p = self.params[name]
        with torch.no_grad():
            if _is_dtensor(p):
                p.to_local().copy_(local)
            else:
                p.copy_(self.full(name, local) if self.mesh is not None else local)


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")
