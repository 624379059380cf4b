"""``python -m daptq.train``: train the reference VLA (the body of ``daptq train``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from daptq.cli_args import cameras, float_in, int_in, nonnegative_int, positive_int, seed_int
from daptq.envs.tasks import task_name
from daptq.paths import check_input_dir, check_output_dir
from daptq.train.trainer import TrainConfig, train

MAX_THREADS = 1024
MAX_BATCH_SIZE = 8192  # beyond this a CPU step runs out of memory before it finishes
MAX_NOISE_DRAWS = 256


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="", out="", max_steps=1)
    p = argparse.ArgumentParser(prog="daptq train", description="Train the reference VLA on CPU.")
    p.add_argument(
        "--arch",
        choices=["reference", "smolvla"],
        default="reference",
        help="reference: the Meta-World reference VLA (CogACT's shape); smolvla: the LIBERO reference VLA "
        "(SmolVLA's layout, daptq.models.libero_smolvla; on CPUs without bf16 units use --precision fp32)",
    )
    p.add_argument("--data", required=True, help="dataset root written by `daptq data`")
    p.add_argument("--out", required=True, help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--cache", default=None, help="frozen-encoder feature cache (default: DATA-features)")
    p.add_argument("--init", default=None, help="fine-tune this checkpoint (directory or ref:<name>)")
    p.add_argument(
        "--camera",
        type=cameras,
        default=None,
        help="camera(s) of the model, comma-separated (default: the dataset's); with --init, adds views",
    )
    p.add_argument(
        "--tasks", nargs="+", type=task_name, default=None, help="train on these tasks only (default: all)"
    )
    p.add_argument(
        "--time-budget-min",
        type=float_in(0, lo_open=True),
        default=None,
        help="stop cleanly and save after this long",
    )
    p.add_argument(
        "--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps"
    )
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH_SIZE), default=d.batch_size)
    p.add_argument(
        "--n-noise",
        type=int_in(1, MAX_NOISE_DRAWS),
        default=d.n_noise,
        help="noise draws per backbone forward",
    )
    p.add_argument("--lr", type=float_in(0, lo_open=True), default=d.lr)
    p.add_argument("--warmup-steps", type=nonnegative_int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay)
    p.add_argument("--ema-decay", type=float_in(0, 1, hi_open=True), default=d.ema_decay)
    p.add_argument("--checkpoint-every-min", type=float_in(0, lo_open=True), default=d.checkpoint_every_min)
    p.add_argument("--val-every", type=positive_int, default=d.val_every)
    p.add_argument("--seed", type=seed_int, default=d.seed)
    p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=d.threads, help="torch CPU threads")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=d.precision, help="autocast dtype on CPU")
    p.add_argument("--allow-incomplete", action="store_true", help="use the shards written so far (pilots)")
    return p


def check_paths(args: dict) -> None:
    """The dataset, the checkpoint to fine-tune and the outputs, checked before any work starts."""
    check_input_dir(args["data"], "--data")
    check_output_dir(args["out"], "--out")
    if args["cache"] is not None:
        check_output_dir(args["cache"], "--cache")
    init = args["init"]
    if init is not None and init.startswith("ref:"):
        from daptq.models.reference import CHECKPOINTS_DIR

        name = init[len("ref:") :]
        if not name or "/" in name or name.startswith(".") or not (CHECKPOINTS_DIR / name).is_dir():
            available = sorted(p.name for p in CHECKPOINTS_DIR.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"--init {init}: no bundled reference VLA {name!r}; available: {available}"
            )
    elif init is not None:
        from daptq.models.reference import CONFIG_FILE, WEIGHTS_FILE

        missing = [
            n for n in (CONFIG_FILE, WEIGHTS_FILE) if not (check_input_dir(init, "--init") / n).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"--init {init}: not a reference VLA checkpoint ({', '.join(missing)} missing)"
            )


def main(argv: Sequence[str] | None = None) -> None:
    args = vars(build_parser().parse_args(argv))
    check_paths(args)
    camera = args.pop("camera")
    if args.pop("arch") == "smolvla":
        from daptq.train.smolvla import train_smolvla

        train_smolvla(TrainConfig(**args, model={"camera": camera} if camera else {}))
        return
    train(TrainConfig(**args, model={"camera": camera} if camera else {}))


if __name__ == "__main__":
    main()
