"""``python -m daptq.train``: train the reference VLA (the body of ``daptq train``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from daptq.train.trainer import TrainConfig, train


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="", max_steps=1)
    p = argparse.ArgumentParser(prog="python -m daptq.train", description="Train the reference VLA on CPU.")
    p.add_argument("--data", required=True, help="dataset root written by `daptq data`")
    p.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--cache", default=None, help="frozen-encoder feature cache (default: DATA-features)")
    p.add_argument("--init", default=None, help="fine-tune this checkpoint (directory or ref:<name>)")
    p.add_argument(
        "--camera",
        default=None,
        help="camera(s) of the model, comma-separated (default: the dataset's); with --init, adds views",
    )
    p.add_argument("--tasks", nargs="+", default=None, help="train on these tasks only (default: all)")
    p.add_argument(
        "--time-budget-min", type=float, default=None, help="stop cleanly and save after this long"
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--n-noise", type=int, default=d.n_noise, help="noise draws per backbone forward")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--checkpoint-every-min", type=float, default=d.checkpoint_every_min)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision, help="autocast dtype on CPU")
    p.add_argument("--allow-incomplete", action="store_true", help="use the shards written so far (pilots)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    camera = args.pop("camera")
    train(TrainConfig(**args, model={"camera": camera} if camera else {}))


if __name__ == "__main__":
    main()
