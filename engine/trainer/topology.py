"""Where this process sits in the job: global rank, node, local rank.

The deepspeed launcher (one per node, or one over a hostfile) sets ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` for every process, plus ``CROSS_RANK`` /
``CROSS_SIZE`` (this node's index and the number of nodes) and ``LOCAL_SIZE``.
The engine uses the global rank for everything shared (only global rank 0 writes
the run's files, checkpoints are collective) and the node only to describe the
job and check that every node sees the same ``run.output_dir``.
"""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass


class SharedStorageError(RuntimeError):
    """Some ranks do not see the files rank 0 writes into run.output_dir."""


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    node_rank: int
    num_nodes: int
    host: str

    @classmethod
    def from_env(cls) -> "Topology":
        env = os.environ
        world = int(env.get("WORLD_SIZE", "1"))
        local_size = int(env.get("LOCAL_SIZE", env.get("LOCAL_WORLD_SIZE", world)))
        rank = int(env.get("RANK", "0"))
        # torchrun names the node GROUP_RANK and gives no node count: ranks / ranks per node
        node = int(env.get("CROSS_RANK", env.get("GROUP_RANK", rank // max(local_size, 1))))
        nodes = int(env.get("CROSS_SIZE", max(world // max(local_size, 1), 1)))
        return cls(rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")), local_size=local_size,
                   node_rank=node, num_nodes=nodes, host=socket.gethostname())

    def tag(self) -> str:
        """A short name for log lines of ranks other than 0: ``rank 3 (node 1, local rank 1 on host-b)``."""
        return f"rank {self.rank} (node {self.node_rank}, local rank {self.local_rank} on {self.host})"

    def describe(self) -> str:
        if self.num_nodes > 1:
            return (f"{self.world_size} rank(s) on {self.num_nodes} nodes ({self.local_size} per node; "
                    f"rank 0 on {self.host})")
        return f"{self.world_size} rank(s)"


def check_shared_output_dir(output_dir: str, topo: Topology) -> None:
    """On several nodes, make sure every rank reads what rank 0 writes into ``output_dir``.

    Checkpoints are written by every rank into one folder and read back by every rank on resume, and
    ``latest`` is moved by rank 0 alone: a folder that is local to each node would split a run's
    checkpoint in pieces. Rank 0 writes a random token; a rank that cannot read it back stops the run.
    """
    import torch.distributed as dist  # here, not at the top: the launcher checks run before torch loads

    if topo.num_nodes <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    token = [secrets.token_hex(8) if topo.rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(output_dir, f".shared-storage-check-{token[0]}")
    if topo.rank == 0:
        with open(path, "w", encoding="utf-8") as f:
            f.write(token[0])
    dist.barrier()
    try:
        with open(path, "r", encoding="utf-8") as f:
            seen = f.read() == token[0]
    except OSError:
        seen = False
    hosts = [None] * topo.world_size
    dist.all_gather_object(hosts, (topo.rank, topo.host, seen))
    dist.barrier()
    if topo.rank == 0:
        os.remove(path)
    blind = [(r, h) for r, h, ok in hosts if not ok]
    if blind:
        where = ", ".join(f"rank {r} on {h}" for r, h in blind[:8])
        raise SharedStorageError(
            f"run.output_dir '{output_dir}' is not shared by all nodes: {where} cannot read a file rank 0 "
            f"wrote there. Checkpoints are written and read by every rank, so the folder must be on storage "
            f"every node mounts at the same path (NFS, Lustre, ...): set run.output_dir to such a path "
            f"(docs/multinode.md)")


def init_distributed(timeout=None) -> None:
    """``deepspeed.init_distributed`` (NCCL on GPU, gloo on CPU, rendezvous from the launcher's environment),
    then the clean-up of what DeepSpeed's CPU backend leaves behind (``release_shared_memory_names``)."""
    # deepspeed here, not at the top: it loads only once the recipe was checked (engine/train.py).
    import deepspeed
    import torch.distributed as dist

    if timeout is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(timeout=timeout)
    dist.barrier()  # every rank has finished DeepSpeed's set-up, including the mapping of the others' buffers
    release_shared_memory_names(dist.get_rank())


def release_shared_memory_names(rank: int) -> None:
    """Remove this rank's ``/dev/shm`` name of DeepSpeed's CPU all-reduce buffer.

    On the CPU accelerator DeepSpeed creates one 66 MB shared-memory file per rank
    (``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``) and never unlinks it, so
    every CPU run leaves its buffers in RAM after it ends, until /dev/shm fills up. Once all ranks have
    mapped each other's buffers (after the set-up, behind a barrier) the names are no longer needed:
    unlinking them keeps the mappings working and frees the memory when the processes exit, however they
    exit. A no-op where the file does not exist (GPU runs).
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    path = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
