"""Environment: cluster detection, process group, seeding."""
from dist_train.env.cluster import ClusterEnv, detect
from dist_train.env.process_group import process_group
from dist_train.env.seed import seed_everything

__all__ = ["ClusterEnv", "detect", "process_group", "seed_everything"]
