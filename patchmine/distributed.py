"""One mining run over several processes (torchrun): ranks, merged states, a spread second pass.

Public names: Team, launched, from_env.

Under ``torchrun`` (env ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) every process is one rank of a
team. Rank r streams the r-th contiguous slice ``r * n // W : (r + 1) * n // W`` of the corpus (of
the shard, with ``--shard``) into its own collectors, with its own checkpoint. Then:

1. ``combine``: the collector states (top-k, bottom-k, class means), statistics states and image
   records of every rank are gathered on rank 0 and merged there (``TopK.merge`` /
   ``RunningStats.merge`` / ``ClassMeans.merge``: the exact tie rule holds across ranks); the merged
   winners (channels x k per layer, top and bottom) are broadcast to every rank.
2. ``own``: the distinct winner files, sorted, are dealt round-robin to the ranks; each rank
   re-forwards only its own and cuts their patches and heat maps.
3. ``collect``: the patches and heat maps are gathered on rank 0 in chunks of bounded size, and rank
   0 writes the one result file, identical to a single-process run.

Object collectives run over gloo (a side group when the default backend is nccl, so pickled states
and patches never pass through GPU memory). The process group lives as long as the process.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from patchmine.corpus import Corpus
from patchmine.errors import UsageError
from patchmine.patches import LayerPlan, Scratch, SharedPatches, winner_files

__all__ = ["Team", "launched", "from_env"]

_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
_CHUNK_BYTES = 64 << 20  # patches and heat maps gathered at a time, per rank
_TEAM: Team | None = None


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment)."""
    return all(v in os.environ for v in _ENV)


def _timeout() -> datetime.timedelta:
    # Ranks meet after their first pass; one resumed near its end may wait hours for the others.
    return datetime.timedelta(seconds=float(os.environ.get("PATCHMINE_DIST_TIMEOUT", 86400)))


@dataclasses.dataclass
class Team:
    """This process's place in a multi-process run.

    Attributes:
        rank, world: this process's rank and the number of processes.
        local_rank: the rank on this machine (selects the GPU).
        device: where this rank computes (``cuda:LOCAL_RANK`` for a CUDA run).
        group: the process group used for object collectives (gloo).
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: object = None

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world): which contiguous part of the images this rank streams."""
        return self.rank, self.world

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def checkpoint_path(self, out: Path) -> Path:
        """``OUT.ckpt.rank{r}``: each rank saves and resumes its own first pass."""
        return out.with_name(f"{out.name}.ckpt.rank{self.rank}")

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def combine(self, miner) -> None:
        """Merge every rank's first pass on rank 0; give every rank the merged winners.

        Args:
            miner: this rank's :class:`patchmine.mine.Miner` after its first pass. On rank 0 it
                afterwards holds the whole run (collectors, statistics, image records); on the
                other ranks only the merged collectors (what the second pass needs).
        """
        parts = [None] * self.world if self.leader else None
        dist.gather_object(miner.part_state(), parts, dst=0, group=self.group)
        winners = [None]
        if self.leader:
            for part in parts[1:]:
                miner.absorb(part)
            winners[0] = {
                "topk": {n: c.state_dict() for n, c in miner.topk.items()},
                "bottom": {n: c.state_dict() for n, c in miner.bottom.items()},  # --bottom-k
            }
        dist.broadcast_object_list(winners, src=0, group=self.group)
        if not self.leader:
            for kind in ("topk", "bottom"):
                for n, c in getattr(miner, kind).items():
                    c.load_state_dict(winners[0][kind][n])

    def own(self, plans: list[LayerPlan], corpus: Corpus) -> list[LayerPlan]:
        """The plans restricted to this rank's winner images (the others' entries unused: -1).

        The distinct winner files of all layers (`patchmine.patches.winner_files`), sorted, are
        dealt round-robin to the ranks with all their copies, so every rank re-reads about the
        same number of images and each file is read once.
        """
        ids, first = winner_files(corpus, plans)
        mine = ids[np.isin(first, np.unique(first)[self.rank :: self.world])]
        return [
            dataclasses.replace(p, image=np.where(np.isin(p.image, mine), p.image, -1))
            for p in plans
        ]

    def collect(
        self,
        own: list[LayerPlan],
        cut: dict[str, tuple[SharedPatches, Scratch, Scratch | None]],
    ) -> None:
        """Gather every rank's patches, heat maps and projections into rank 0's arrays ``cut``.

        Args:
            own: this rank's plans, as returned by :meth:`own`.
            cut: plan key -> (patch (C, k, P, P, 3), heat (C, k, H, W), projection (C, k, P, P, 3)
                or None) as the second pass filled them from ``own``; on rank 0 the other ranks'
                entries are written into them (in place).
        """
        for p in own:
            patch, heat, proj = cut[p.key]
            n = p.image.size
            per_entry = np.prod(patch.shape[2:]) + 2 * np.prod(heat.shape[2:])
            if proj is not None:
                per_entry += 2 * np.prod(proj.shape[2:])
            step = max(1, _CHUNK_BYTES // max(1, int(per_entry if n else 1)))
            entries = np.flatnonzero(p.image.reshape(-1) >= 0)
            for lo in range(0, n, step):  # the same number of rounds on every rank
                e = entries[(entries >= lo) & (entries < lo + step)]
                got = [None] * self.world if self.leader else None
                payload = None
                if not self.leader:
                    payload = (
                        e,
                        patch.take(e),
                        heat.take(e),
                        proj.take(e) if proj is not None else None,
                    )
                dist.gather_object(payload, got, dst=0, group=self.group)
                if self.leader:
                    for item in got[1:]:
                        idx, pa, he, pr = item
                        if len(idx):
                            patch.put(idx, pa)
                            heat.put(idx, he)
                            if proj is not None:
                                proj.put(idx, pr)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def from_env(device: str | torch.device = "cpu") -> Team | None:
    """Join the team of this torchrun launch; None when the process was not started by torchrun.

    The first call initializes the default process group (nccl for a CUDA ``device``, placed on
    ``cuda:LOCAL_RANK``; gloo otherwise); later calls in the same process reuse it.

    Raises:
        UsageError: a CUDA device is asked for and this machine has too few GPUs for its ranks.
    """
    global _TEAM
    if not launched():
        return None
    world, rank, local = (int(os.environ[v]) for v in _ENV)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {str(device)!r} asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
        if local >= count:
            raise UsageError(
                f"rank {rank} has LOCAL_RANK {local} but this machine shows {count} GPU(s): "
                f"start at most {count} processes per machine (torchrun --nproc-per-node {count})"
            )
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if _TEAM is not None and _TEAM.device == dev:
        return _TEAM
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=_timeout())
        atexit.register(_destroy)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise UsageError(
            f"the process group ({dist.get_rank()} of {dist.get_world_size()}) does not match "
            f"RANK={rank} WORLD_SIZE={world}"
        )
    group = (
        None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=_timeout())
    )
    _TEAM = Team(rank=rank, world=world, local_rank=local, device=dev, group=group)
    return _TEAM
