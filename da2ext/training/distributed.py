"""One domain learned by several processes with torch.distributed (torchrun).

    torchrun --nproc-per-node 2 -m da2ext train --data data/digits/mnist --workdir runs

Each process takes its share of every epoch's images (a DistributedSampler
seeded with the run's seed, so an epoch's order depends on the seed and the
epoch alone and a resumed run sees the batches an uninterrupted one would),
and DistributedDataParallel averages the gradients of what the method trains:
the frozen backbone holds no parameter that requires a gradient, so for da2
only the adaptors, shifts and head cross the network each step. `--batch-size`
is per process. Evaluation is split over the processes and its sums added up.
Process 0 alone writes checkpoints, metrics and domain files (atomically, as
always); every process resumes from the same checkpoint. A process that dies
makes the others fail at their next collective, within the group's timeout.

For a loop of one's own, the same pieces: DistributedRun.from_environment(),
run.wrap(module), run.train_loader(loader, seed), run.val_loader(loader),
run.all_reduce_sum(tensor), run.is_main.

Backends: nccl for CUDA devices, gloo on the CPU.
"""
import datetime
import os

import torch

__all__ = ["DistributedRun", "ShardSampler"]

DEFAULT_TIMEOUT_S = 300


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world_size, ... of a dataset, in order: each process's
    share of an evaluation, with no index repeated (DistributedSampler pads)."""

    def __init__(self, dataset, rank, world_size):
        self.length, self.rank, self.world_size = len(dataset), rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.length, self.world_size))


class DistributedRun(object):
    """This process's place in a torch.distributed group (rank, world_size, device)."""

    def __init__(self, rank, world_size, device):
        self.rank, self.world_size, self.device = int(rank), int(world_size), torch.device(device)

    @property
    def is_main(self):
        """Process 0: the one that writes files and prints."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, device="cpu", timeout_s=DEFAULT_TIMEOUT_S):
        """The group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT), joined here; None when this process was not started
        by torchrun. A CUDA device becomes cuda:LOCAL_RANK; nccl then, else gloo."""
        if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
            return None
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError("this torch was built without torch.distributed")
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def wrap(self, module):
        """DistributedDataParallel over `module`'s parameters that require gradients
        (frozen ones are not synchronised); buffers are not broadcast every step
        (a frozen backbone's are the same everywhere). Submodules with a
        `statistics_group` (da2ext.nn.LowRankConvBranch) normalise over the group's batch."""
        import inspect
        from torch.nn.parallel import DistributedDataParallel
        import torch.distributed as dist
        # Modules normalising with their batch's statistics (da2's late branches) take the whole group's batch,
        # so that N processes learn what one process learns over the same global batches.
        for submodule in module.modules():
            if hasattr(submodule, "statistics_group"):
                submodule.statistics_group = dist.group.WORLD
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        options = inspect.signature(DistributedDataParallel.__init__).parameters
        # Newer torch names the switch forward_sync_buffers (broadcast_buffers is deprecated there).
        switch = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
        return DistributedDataParallel(module, device_ids=device_ids, **{switch: False})

    def train_loader(self, loader, seed):
        """`loader`'s dataset and batch size (per process), this process's share of
        each epoch in the order DistributedSampler(seed) gives; call
        loader.sampler.set_epoch(epoch) before each epoch."""
        sampler = torch.utils.data.distributed.DistributedSampler(
            loader.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=int(seed))
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                                           num_workers=loader.num_workers)

    def val_loader(self, loader):
        """`loader`'s dataset, this process's share of it (ShardSampler), in order."""
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size,
                                           sampler=ShardSampler(loader.dataset, self.rank, self.world_size),
                                           num_workers=loader.num_workers)

    def all_reduce_sum(self, tensor):
        """`tensor` summed over the processes, in place; returns it."""
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self):
        import torch.distributed as dist
        dist.barrier()

    def close(self, wait=True):
        """Leave the group (at the end of a command). wait: first wait until every
        process gets here (a process that tears its group down while another still
        works can make gloo abort it); False after an error, when the others may
        never get here."""
        import torch.distributed as dist
        if not dist.is_initialized():
            return
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()
