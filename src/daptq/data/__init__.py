"""Expert demonstrations on disk: generation (scripted Meta-World experts, DART noise), streaming reads."""

from daptq.data.format import FORMAT_VERSION, Episode, EpisodeDataset, open_dataset, read_shard
from daptq.data.stats import compute_stats

__all__ = [
    "FORMAT_VERSION",
    "Episode",
    "EpisodeDataset",
    "compute_stats",
    "generate_dataset",
    "open_dataset",
    "read_shard",
    "rollout_episode",
]


def __getattr__(name: str):
    # Imported lazily so `python -m daptq.data.generate` does not find its module already imported (runpy
    # warning) and reading a dataset never loads the simulator.
    if name in ("generate_dataset", "rollout_episode"):
        from daptq.data import generate

        return getattr(generate, name)
    raise AttributeError(f"module 'daptq.data' has no attribute {name!r}")
