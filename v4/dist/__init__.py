"""Multi-device inference over torch.distributed: tensor, expert and data parallel.

- `parallel`: the layout (ParallelConfig) and what one rank holds (RankPlacement);
- `shard`: which slice of each checkpoint tensor a rank reads;
- `comm`: the thin communicator over torch.distributed that the backend's process group serves
  (gloo on CPU, NCCL on CUDA, HCCL on Ascend);
- `moe`: expert-parallel dispatch and combine;
- `plan_step` / `runner` / `engine`: rank 0's step plan, the tensor-parallel runner, the
  data-parallel front and the worker loop;
- `launch`: one process per device, spawned locally or started by torchrun.

Importing this package imports nothing beyond torch.
"""

from .parallel import ParallelConfig, RankPlacement

__all__ = ["ParallelConfig", "RankPlacement"]
