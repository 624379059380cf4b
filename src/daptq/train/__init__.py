"""Training the reference VLA: cached frozen-encoder features, then a time-budgeted CPU training loop.

``TrainConfig`` and ``train`` are imported lazily so that ``python -m daptq.train.features`` (or
``.closed_loop``) does not find its own module already imported (a runpy warning).
"""

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    if name in __all__:
        from daptq.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'daptq.train' has no attribute {name!r}")
