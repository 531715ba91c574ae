"""One render on several processes (GPUs or machines): ``torch.distributed`` under torchrun.

See :mod:`.cluster` (process group, waits, errors) and ``pipelines/stages.py`` (which stage
splits how). A single process is a world of one (:meth:`Cluster.solo`): the same code path.
"""
from .cluster import Cluster, ClusterError, DEFAULT_TIMEOUT, Layout, Member, env_world_size, frame_share, rank_share, timeout_from_env, window_owners

__all__ = ["Cluster", "ClusterError", "DEFAULT_TIMEOUT", "Layout", "Member", "rank_share", "env_world_size", "frame_share", "timeout_from_env", "window_owners"]
