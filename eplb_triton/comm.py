"""Communication: one batched isend/irecv per peer over ``torch.distributed``, and agreement.

NCCL on GPUs, gloo on CPU. Peers are ranks *of the EP group*; they are translated to global
ranks for ``torch.distributed``. Ops are issued in a deterministic order (ascending peer,
receive before send) so that every backend pairs them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Communicator", "InputError"]


class InputError(Exception):
    """Internal carrier of a rank's input verdict; surfaces as ValueError/TypeError."""


@dataclass
class Communicator:
    """The EP group as seen by one rank. ``group=None`` with no process group = one rank alone."""

    group: object | None
    rank: int
    world_size: int
    backend: str | None

    @classmethod
    def from_group(cls, ep_group=None) -> "Communicator":
        if ep_group is None and not (dist.is_available() and dist.is_initialized()):
            return cls(group=None, rank=0, world_size=1, backend=None)
        group = ep_group if ep_group is not None else dist.group.WORLD
        return cls(
            group=group,
            rank=dist.get_rank(group),
            world_size=dist.get_world_size(group),
            backend=str(dist.get_backend(group)).lower(),
        )

    @property
    def collective_device(self) -> torch.device:
        """Where small control tensors live: the current GPU for NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def global_rank(self, peer: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return peer
        return dist.get_global_rank(self.group, peer)

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> list:
        """Start one irecv and one isend per peer as one batch; returns the requests to wait on."""
        if not sends and not recvs:
            return []
        if self.group is None:
            raise RuntimeError("exchange needs a process group")
        ops = []
        for peer in sorted(set(sends) | set(recvs)):
            if peer in recvs:
                ops.append(dist.P2POp(dist.irecv, recvs[peer], self.global_rank(peer), self.group))
            if peer in sends:
                ops.append(dist.P2POp(dist.isend, sends[peer], self.global_rank(peer), self.group))
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(requests: list) -> None:
        for request in requests:
            request.wait()

    def all_reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.group is not None and self.world_size > 1:
            dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values

    def all_gather_object(self, obj) -> list:
        if self.group is None or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None, fingerprint: int = 0) -> None:
        """Agree on the input verdict before any weight is touched.

        Every rank calls this with its local verdict (``None`` if fine) and a fingerprint of
        the inputs that must match everywhere (e.g. a checksum of the maps). If any rank saw
        an error, every rank raises the same exception type carrying every failing rank's
        message; if the fingerprints differ, every rank raises ``ValueError``.
        """
        code = 0 if error is None else (2 if isinstance(error, TypeError) else 1)
        payload = torch.tensor([code, fingerprint, -fingerprint], dtype=torch.int64)
        worst, high, neg_low = self.all_reduce_max(payload.to(self.collective_device)).cpu().tolist()
        if worst:
            messages = self.all_gather_object(None if error is None else str(error))
            failing = [(r, m) for r, m in enumerate(messages) if m is not None]
            if len({m for _, m in failing}) == 1 and len(failing) == self.world_size:
                text = failing[0][1]  # every rank saw the same problem (a bad global map, say)
            else:
                text = "; ".join(f"rank {r}: {m}" for r, m in failing)
            raise (TypeError if worst == 2 else ValueError)(text)
        if high != -neg_low:
            raise ValueError("ranks were given different inputs (old/new maps or weight layouts differ across ranks)")
