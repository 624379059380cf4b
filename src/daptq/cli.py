"""The ``daptq`` command: a thin layer over the Python API (each subcommand calls one public function)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from daptq.cli_args import (
    MAX_IMAGE_SIZE,
    MAX_SEED,
    float_in,
    image_size_int,
    int_choice,
    int_in,
    nonempty,
    nonnegative_int,
    positive_int,
    seed_int,
    workers_int,
)
from daptq.envs.tasks import task_name
from daptq.paths import check_input_dir, check_input_file, check_output_dir

MAX_TRAJECTORIES = 10_000  # calibration trajectories: the paper uses 512
MAX_STEPS = 100_000  # per episode: Meta-World's own limit is 500


def _cmd_demo(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")  # before the run, not after it
    if args.toy:
        from daptq.demo_toy import run_toy_demo

        run_toy_demo(out_dir=args.out)
        return 0
    import dataclasses

    from daptq.demo import FULL, QUICK, run_demo

    settings = dataclasses.replace(QUICK if args.quick else FULL, context_w4a8=args.w4a8_context)
    run_demo(args.out, settings, workers=args.workers)
    return 0


# `daptq eval` runs batched on every core by default: that agrees with the one-env, one-worker path in
# outcomes and within the trajectory tolerance of docs/evaluation.md (3e-7 m measured), in far less time.
DEFAULT_ENVS_PER_WORKER = 4
MAX_DEFAULT_WORKERS = 8  # each worker holds its own policies and envs: more cost memory for little


def default_workers() -> int:
    """One evaluation worker per usable core (each runs one torch thread), at most ``MAX_DEFAULT_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_WORKERS))


def _check_suite_options(args: argparse.Namespace) -> None:
    """--suite, --tasks and --camera against the suite's declaration, before any work (exit 2 naming them)."""
    from daptq.envs.suite import get_suite

    try:
        suite = get_suite(args.suite)
    except ValueError as exc:
        raise ValueError(f"--suite: {exc}") from None
    for option, check, value in (
        ("--tasks", suite.check_tasks, args.tasks),
        ("--camera", suite.check_camera, args.camera),
    ):
        if value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"{option}: {exc}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    _check_suite_options(args)
    check_output_dir(args.out, "--out")
    if args.reference_cache is not None:
        check_output_dir(args.reference_cache, "--reference-cache")
    elif not args.no_reference_cache and not args.open_loop:
        from daptq.eval.cache import default_cache_dir

        check_output_dir(
            default_cache_dir(),
            "the reference cache (choose one with --reference-cache or --no-reference-cache)",
        )
    if args.open_loop is not None:
        check_input_dir(args.open_loop, "--open-loop")
    if args.open_loop:
        import json

        from daptq.eval import open_loop_eval

        result = open_loop_eval(
            args.model, args.open_loop, args.tasks, args.split, args.max_episodes, args.out
        )
        print(json.dumps(result["overall"], indent=2))
        return 0
    from daptq.eval import evaluate
    from daptq.eval.cache import default_cache_dir
    from daptq.eval.summary import format_summary

    summary = evaluate(
        args.model,
        args.reference,
        args.tasks,
        args.episodes,
        args.seed_start,
        default_workers() if args.workers is None else args.workers,
        args.out,
        args.resume,
        args.max_steps,
        image_size=args.image_size,
        camera=args.camera,
        divergence_threshold=args.divergence_threshold,
        hf_cutoff=args.hf_cutoff,
        progress=not args.no_progress,
        reference_cache=None if args.no_reference_cache else (args.reference_cache or default_cache_dir()),
        reseed_floor=not args.no_reseed_floor,
        envs_per_worker=args.envs_per_worker,
        backend=args.backend,
        ray_address=args.ray_address,
        suite=args.suite,
    )
    print(format_summary(summary))
    print(f"results in {args.out} (report: daptq report {args.out})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    for run in args.runs:
        check_input_dir(run, "run directory")
    if args.out is not None:
        check_output_dir(args.out, "--out")
    elif len(args.runs) > 1:
        raise ValueError("--out DIR is required when reporting several runs")
    else:  # the report goes into the run directory itself
        check_output_dir(args.runs[0], "run directory", named=False)
    if args.gif is not None and not (args.gif[1].isdigit() and int(args.gif[1]) <= MAX_SEED):
        raise ValueError(f"--gif TASK SEED: SEED must be an integer in [0, {MAX_SEED}], got {args.gif[1]!r}")
    from daptq.eval import render_rollout_gif, write_report

    report = write_report(args.runs, args.out, args.paths)
    print(f"wrote {report}")
    if args.gif:
        task, seed = args.gif
        print(f"wrote {render_rollout_gif(args.runs[0], task, int(seed))}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.action == "generate":
        from daptq.data.generate import main as generate_main

        generate_main(args.rest)
    elif args.action == "add-cameras":
        from daptq.data.add_cameras import main as add_cameras_main

        add_cameras_main(args.rest)
    else:
        from daptq.envs.speed import main as speed_main

        speed_main(args.rest)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from daptq.train.__main__ import main as train_main

    train_main(args.rest)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    check_output_dir(args.out, "--out")
    from daptq.deploy.export import export_policy

    try:
        out = export_policy(
            args.model, args.out, args.format, args.w4a8_kernel, args.overwrite, args.float_convs
        )
    except (FileExistsError, ValueError) as err:
        print(f"daptq export: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load it as onnx:{out})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from daptq.deploy.bench import BASE_VARIANTS, run_bench, to_markdown, write_report

    variants = args.variants
    if variants == ["all"]:
        variants = [v for v in BASE_VARIANTS if args.compile or not v.endswith("-compile")]
    report = run_bench(
        args.models,
        variants,
        rounds=args.rounds,
        calls_per_round=args.calls,
        warmup=args.warmup,
        threads=args.threads[0] if len(args.threads) == 1 else args.threads,
        group_size=args.group_size,
        cache=Path(args.cache),
        roofline=args.roofline,
        profile=args.profile,
    )
    print(to_markdown(report))
    if args.out:
        write_report(report, Path(args.out))
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    if args.asymmetric and args.symmetric_range is not None:
        raise ValueError("--symmetric-range applies to symmetric grids; it contradicts --asymmetric")
    if args.config is not None:
        check_input_file(args.config, "--config")
    rollout = ("--rollout-episodes", "--rollout-mix", "--rollout-max-steps")
    given = [o for o in rollout if getattr(args, o[2:].replace("-", "_")) is not None]
    if given and args.calibration_from_policy is None:
        raise ValueError(f"{given[0]} applies to --calibration-from-policy, which is not given")
    check_output_dir(args.out, "--out")
    from daptq.methods.workflow import parse_size, quantize_from_args, stage_table
    from daptq.models.streaming import resolve_device

    resolve_device(args.device)  # --device cuda without CUDA: a clear error before any work
    if args.max_memory is not None:
        parse_size(args.max_memory, "--max-memory")

    try:
        out = quantize_from_args(args)
    except OSError as err:  # the calibration cache is made on first use, so it is checked only then
        from daptq.data.calibration import default_cache_dir

        cache = default_cache_dir().absolute()
        where = Path(err.filename).absolute() if isinstance(err.filename, str) else None
        related = where is not None and (where == cache or cache in where.parents or where in cache.parents)
        if args.calibration is None and related:
            raise ValueError(
                f"the calibration cache {cache}: {err.strerror or err} (point DAPTQ_CACHE_DIR at a writable "
                "directory, or give --calibration)"
            ) from None
        raise
    print(stage_table(out))
    print(f"wrote {out} (inspect: daptq inspect {out}; evaluate: daptq eval {out})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from daptq.methods.workflow import inspect_text

    print(inspect_text(args.directory))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from daptq.methods.workflow import methods_text

    print(methods_text())
    return 0


def _comma_list(convert, what: str):
    """``4,8,16`` -> a tuple, each item through ``convert`` (argparse names ``what`` in the error)."""

    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"{what}: an empty item in {text!r}")
        return tuple(convert(t) for t in items)

    parse.__name__ = "list"
    return parse


def _add_daptq_budget_options(q) -> None:
    """DA-PTQ ``budget`` options (dest ``method_<DAPTQConfig field>``; docs/methods.md, "Budget options")."""
    q.add_argument(
        "--a-bits-choices",
        dest="method_activation_choices",
        type=_comma_list(int_choice((4, 8, 16), "activation bits"), "--a-bits-choices"),
        metavar="4,8,16",
        help="daptq --avg-bits: choose each layer's activation width from these (16: float), priced by the "
        "drift-weighted Fisher of the output perturbation",
    )
    q.add_argument(
        "--a-mode",
        dest="method_activation_mode",
        choices=["dynamic_per_token", "static_per_tensor"],
        help="daptq --a-bits-choices: per-token dynamic (default) or calibrated static activation scales",
    )
    q.add_argument(
        "--formats",
        dest="method_formats",
        type=_comma_list(str, "--formats"),
        metavar="F,...",
        help="daptq --avg-bits: candidate weight formats, e.g. 2g32,4g128,8pc,16; terng64/bing128 "
        "(ternary/binary); 'sub2' (below 2 bits: avg 1.5 feasible) or 'grouped'",
    )
    q.add_argument(
        "--latency-weight",
        dest="method_latency_weight",
        type=float_in(0),
        help="daptq --avg-bits: objective += this x latency (MiB read, + compute at the activation width)",
    )
    q.add_argument(
        "--latency-compute",
        dest="method_latency_compute",
        type=float_in(0),
        help="daptq: weight of the compute term in the latency model (default 1: A4 costs 1/4 of A16)",
    )
    q.add_argument(
        "--act-cost-weight",
        dest="method_activation_cost_weight",
        type=float_in(0),
        help="daptq --a-bits-choices: multiplier of the activation cost beside the weight cost (default 1)",
    )
    q.add_argument(
        "--reestimate-rounds",
        dest="method_reestimate_rounds",
        type=int_in(0, 10),
        help="daptq --avg-bits: re-estimate sensitivities on the model rounded as allocated and re-solve, "
        "this many times (docs/daptq.md, 'Interactions')",
    )


def _add_quantize_parser(sub) -> None:
    from daptq.quant.spec import ACTIVATION_BITS, WEIGHT_BITS

    q = sub.add_parser(
        "quantize", help="quantize a policy with a method and write a quantized policy directory"
    )
    q.add_argument("model", type=nonempty, help="model spec: ref:<name> or toy:...")
    q.add_argument("--method", required=True, help="a registered method (see `daptq methods`)")
    q.add_argument("--config", help="YAML/JSON method config (its fields; CLI spec flags are then refused)")
    q.add_argument(
        "--w-bits",
        type=int_choice(WEIGHT_BITS, "weight bits"),
        help="weight bits (2, 3, 4, 8; 16 keeps weights float)",
    )
    q.add_argument(
        "--a-bits",
        type=int_choice((*ACTIVATION_BITS, 16), "activation bits"),
        help="activation bits (4, 8; 16 or absent: float activations)",
    )
    q.add_argument(
        "--group-size", type=int_in(2), help="per-group weights with this group size >= 2 (else per-channel)"
    )
    q.add_argument("--asymmetric", action="store_true", help="affine (asymmetric) weight grid")
    q.add_argument("--observer", choices=["minmax", "percentile", "mse"], help="weight range observer")
    q.add_argument(
        "--avg-bits",
        type=float_in(0, 16, lo_open=True, hi_open=True),
        help="average bits per weight in (0, 16), scales counted (qvla; daptq: its budget preset)",
    )
    _add_daptq_budget_options(q)
    q.add_argument(
        "--symmetric-range",
        choices=["restricted", "full", "full_exact"],
        help="symmetric grid convention (default: the method's measured choice per bit width)",
    )
    q.add_argument(
        "--include-encoders", action="store_true", help="also quantize the vision/language encoders"
    )
    q.add_argument(
        "--rotate",
        dest="method_rotation",
        action="store_const",
        const="hadamard",
        help="fold randomized Hadamard rotations into the weights before rounding, where the adapter "
        "declares them exact (rtn, gptq; docs/methods.md, 'Rotations')",
    )
    q.add_argument(
        "--step-scales",
        dest="method_step_scales",
        action="store_const",
        const=True,
        help="static activation scales per denoising step for the action head (rtn, gptq, daptq; needs "
        "static activations: a --config with mode static_per_tensor, or daptq's --a-mode static_per_tensor; "
        "docs/methods.md)",
    )
    q.add_argument(
        "--calibration",
        metavar="PATH",
        help="calibration data: a LeRobotDataset (v2.1/v3.0), a directory of .npz/.safetensors episodes "
        "(docs/models.md) or a daptq dataset with a 'calib' split (default: daptq's cache)",
    )
    q.add_argument(
        "--calib-key",
        action="append",
        metavar="FIELD=KEY",
        help="LeRobot feature for image/state/actions, e.g. image=observation.images.wrist (repeatable)",
    )
    q.add_argument(
        "--trajectories",
        type=int_in(1, MAX_TRAJECTORIES),
        default=64,
        help="calibration trajectories (paper: 512)",
    )
    q.add_argument(
        "--calib-tasks", nargs="+", type=task_name, help="calibrate on these tasks only (default: all)"
    )
    q.add_argument("--calib-seed", type=seed_int, default=0, help="seed of the calibration sampler")
    q.add_argument(
        "--calibration-from-policy",
        metavar="DIR",
        help="calibrate on the states this policy (a first quantized directory, or any model spec) reaches: "
        "closed-loop rollouts on calibration seeds, labelled with MODEL's actions (docs/methods.md)",
    )
    q.add_argument(
        "--rollout-episodes",
        type=int_in(1, MAX_TRAJECTORIES),
        help="--calibration-from-policy: episodes per task (default: --trajectories over the tasks)",
    )
    q.add_argument(
        "--rollout-mix",
        type=float_in(0, 1, hi_open=True),
        help="--calibration-from-policy: fraction of samples from the expert calibration set (default 0)",
    )
    q.add_argument(
        "--rollout-max-steps",
        type=int_in(1, MAX_STEPS),
        help="--calibration-from-policy: step limit per rollout episode (default: the suite's per task)",
    )
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument(
        "--self-contained",
        action="store_true",
        help="store every tensor in --out, so loading needs no base checkpoint (default: only what changed)",
    )
    q.add_argument(
        "--sequential",
        action="store_true",
        help="calibrate and round block by block (daptq.methods.sequential; every method: rtn, gptq, "
        "smoothquant, awq, quantvla, qvla, daptq)",
    )
    q.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="refuse to start when the memory estimate exceeds SIZE (bytes, or with K/M/G suffix)",
    )
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where calibration runs")
    q.set_defaults(func=_cmd_quantize)
    ins = sub.add_parser(
        "inspect", help="what a quantized policy directory holds (per module role, spec, bytes)"
    )
    ins.add_argument("directory", type=nonempty)
    ins.set_defaults(func=_cmd_inspect)
    me = sub.add_parser("methods", help="list the registered quantization methods and their configs")
    me.set_defaults(func=_cmd_methods)


def _cmd_sweep(args: argparse.Namespace) -> int:
    if args.config is not None:
        check_input_file(args.config, "--config")
    from daptq.methods.workflow import config_from_options
    from daptq.sweep import run_sweep

    config = config_from_options(
        args.method,
        config_path=args.config,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        group_size=args.group_size,
        asymmetric=args.asymmetric,
        include_encoders=args.include_encoders,
    )
    calibration = None
    if args.calibration is not None:
        from daptq.data.episodes import policy_calibration

        def calibration(policy):
            return policy_calibration(policy, args.calibration, args.trajectories)

    from daptq.eval.cache import default_cache_dir

    cache = None if args.no_reference_cache else (args.reference_cache or default_cache_dir())
    payload = run_sweep(
        args.model, config, args.out, by=args.by, groups=args.groups, tasks=args.tasks,
        episodes=args.episodes, split=args.split, workers=args.workers or default_workers(),
        envs_per_worker=args.envs_per_worker, max_steps=args.max_steps, reference_cache=cache,
        calibration=calibration, estimates=args.estimates, progress=not args.no_progress,
    )  # fmt: skip
    from daptq.sweep import sweep_table

    print(sweep_table(payload))
    print(f"wrote {args.out}/sweep.json, sweep.md, sweep.png")
    return 0


def _add_sweep_parser(sub) -> None:
    from daptq.quant.spec import ACTIVATION_BITS, WEIGHT_BITS
    from daptq.sweep import GROUPINGS

    sw = sub.add_parser(
        "sweep",
        help="quantize one component/block/part at a time (and unions a+b), evaluate each paired against FP",
    )
    sw.add_argument("model", type=nonempty, help="float model spec (ref:..., cogact:..., torch:...)")
    sw.add_argument("--method", required=True, help="a registered method with one spec (rtn, gptq, ...)")
    sw.add_argument("--config", help="YAML/JSON method config (instead of the bit-width options)")
    sw.add_argument("--w-bits", type=int_choice(WEIGHT_BITS, "weight bits"), help="weight bits")
    sw.add_argument(
        "--a-bits", type=int_choice((*ACTIVATION_BITS, 16), "activation bits"), help="activation bits"
    )
    sw.add_argument("--group-size", type=int_in(2), help="per-group weights with this group size")
    sw.add_argument("--asymmetric", action="store_true", help="affine (asymmetric) weight grid")
    sw.add_argument("--include-encoders", action="store_true", help="sweep the vision/language encoders too")
    sw.add_argument(
        "--by", choices=GROUPINGS, default="component", help="group granularity (default component)"
    )
    sw.add_argument(
        "--groups", nargs="+", type=nonempty, help="groups to sweep; a+b is a union (default: all)"
    )
    sw.add_argument("--tasks", nargs="+", type=task_name, help="task names (default: all)")
    sw.add_argument("--episodes", type=positive_int, default=10, help="paired episodes (seeds) per task")
    sw.add_argument("--split", default="val", help="seed split (default val; eval is for reports)")
    sw.add_argument("--workers", type=workers_int, help="worker processes (default: one per usable core)")
    sw.add_argument("--envs-per-worker", type=workers_int, default=DEFAULT_ENVS_PER_WORKER)
    sw.add_argument("--max-steps", type=int_in(1, MAX_STEPS), help="step limit per episode")
    sw.add_argument("--estimates", action="store_true", help="also DA-PTQ's estimate per group")
    sw.add_argument("--calibration", metavar="PATH", help="calibration data (as for daptq quantize)")
    sw.add_argument("--trajectories", type=int_in(1, MAX_TRAJECTORIES), default=64)
    cache = sw.add_mutually_exclusive_group()
    cache.add_argument("--reference-cache", metavar="DIR", help="cached reference rollouts")
    cache.add_argument("--no-reference-cache", action="store_true")
    sw.add_argument("--out", required=True, help="sweep directory (resumable)")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=_cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    from daptq import __version__

    parser = argparse.ArgumentParser(
        prog="daptq", description="Drift-aware post-training quantization for VLA robot policies."
    )
    parser.add_argument("--version", action="version", version=f"daptq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="the main job: RTN, GPTQ and DA-PTQ at 2.5 bits on the bundled VLA, paired closed loop, report",
    )
    demo.add_argument(
        "--quick", action="store_true", help="a smoke run: 3 tasks x 2 episodes, 1 worker (about 3 minutes)"
    )
    demo.add_argument("--out", default="runs/demo", help="quantized directories, runs, table and report")
    demo.add_argument(
        "--w4a8-context", action="store_true", help="add DA-PTQ paper at W4A8 as a context row (+25%% time)"
    )
    demo.add_argument("--workers", type=workers_int, help="evaluation worker processes (default 2)")
    demo.add_argument(
        "--toy", action="store_true", help="the old toy-MLP quantization demo instead (seconds, no robot)"
    )
    demo.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("eval", help="closed-loop evaluation, paired against a reference policy; resumable")
    ev.add_argument(
        "model", type=nonempty, help="model spec: ref:<name>, a `daptq quantize` directory, or toy:..."
    )
    ev.add_argument("--reference", type=nonempty, help="full-precision model spec to pair every episode with")
    ev.add_argument(
        "--suite",
        type=nonempty,
        default="metaworld",
        help="benchmark suite: metaworld (default), libero (the libero extra), or a registered one",
    )
    ev.add_argument(
        "--tasks",
        nargs="+",
        type=nonempty,
        help="task names or task families of the suite (default: all its tasks, e.g. the MT10 tasks)",
    )
    ev.add_argument("--episodes", type=positive_int, default=10, help="episodes (seeds) per task")
    ev.add_argument(
        "--seed-start", type=seed_int, help="first seed (default: the start of the 'eval' seed split)"
    )
    ev.add_argument(
        "--workers",
        type=workers_int,
        help="worker processes, this one included "
        f"(default: one per usable core, at most {MAX_DEFAULT_WORKERS})",
    )
    ev.add_argument(
        "--envs-per-worker",
        type=workers_int,
        default=DEFAULT_ENVS_PER_WORKER,
        help="environments each worker steps in lockstep, one batched policy call per step "
        f"(default {DEFAULT_ENVS_PER_WORKER}; 1: one environment, one policy call per episode and re-plan)",
    )
    ev.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local process pool (default) or Ray actors (pip install 'daptq[ray]')",
    )
    ev.add_argument(
        "--ray-address", type=nonempty, help="join this Ray cluster (e.g. auto, ray://head:10001)"
    )
    ev.add_argument("--out", default="runs/eval", help="run directory")
    ev.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    ev.add_argument(
        "--max-steps", type=int_in(1, MAX_STEPS), help="step limit per episode (default: per-task limit)"
    )
    ev.add_argument("--image-size", type=image_size_int, help=f"pixels, 8 to {MAX_IMAGE_SIZE}")
    ev.add_argument("--camera", type=nonempty, help="camera(s) of the suite's scene, comma-separated")
    ev.add_argument(
        "--divergence-threshold", type=float_in(0, lo_open=True), default=0.02, help="metres (default 0.02)"
    )
    ev.add_argument(
        "--hf-cutoff",
        type=float_in(0, 0.5, lo_open=True),
        default=0.25,
        help="high-frequency cutoff, cycles per step, in (0, 0.5]",
    )
    ev.add_argument("--no-progress", action="store_true")
    cache = ev.add_mutually_exclusive_group()
    cache.add_argument(
        "--reference-cache",
        metavar="DIR",
        help="cached reference rollouts (default: ~/.cache/daptq/reference-rollouts, or $XDG_CACHE_HOME)",
    )
    cache.add_argument("--no-reference-cache", action="store_true", help="compute every reference rollout")
    ev.add_argument(
        "--no-reseed-floor",
        action="store_true",
        help="skip the FP reseed floor (the reference against itself with another sampling seed)",
    )
    ev.add_argument("--open-loop", metavar="DATASET", help="open-loop action error on recorded demos")
    ev.add_argument("--split", type=nonempty, default="val", help="dataset split for --open-loop")
    ev.add_argument("--max-episodes", type=positive_int, help="episodes per task for --open-loop")
    ev.set_defaults(func=_cmd_eval)

    rep = sub.add_parser("report", help="report.md with tables and plots from one or several run directories")
    rep.add_argument("runs", nargs="+", help="run directories written by `daptq eval`")
    rep.add_argument("--out", help="output directory (required for several runs)")
    rep.add_argument(
        "--paths", type=nonnegative_int, default=3, help="episodes whose end-effector paths are plotted"
    )
    rep.add_argument("--gif", nargs=2, metavar=("TASK", "SEED"), help="also render one episode as a GIF")
    rep.set_defaults(func=_cmd_report)

    exp = sub.add_parser("export", help="export a policy as ONNX Runtime graphs (load it as onnx:OUT)")
    exp.add_argument("model", type=nonempty, help="model spec: ref:<name> or a `daptq quantize` directory")
    exp.add_argument("--format", default="onnx", choices=["onnx"])
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument(
        "--w4a8-kernel",
        default="int8",
        choices=["int8", "emulate"],
        help="int8: ONNX Runtime's W4A8 kernel (accuracy_level 4); emulate: daptq's exact rounding, fp32",
    )
    exp.add_argument("--overwrite", action="store_true")
    exp.add_argument(
        "--float-convs",
        action="store_true",
        help="allow quantized convs (--include-encoders): fp32 conv on the dequantized weight, activation "
        "rounding emulated (no integer conv kernel); without it such a policy is refused",
    )
    exp.set_defaults(func=_cmd_export)

    bench = sub.add_parser("bench", help="latency per call and per action, peak memory, weight bytes")
    bench.add_argument(
        "models",
        nargs="+",
        help="what `daptq eval` takes (ref:<name>, toy:..., a `daptq quantize` directory: as evaluated and "
        "packed, onnx:DIR) or cogact-d2048 (random weights); ratios to the first",
    )
    bench.add_argument(
        "--variants",
        nargs="+",
        help="instead, daptq's own recipes of each ref:/cogact-d2048 model: 'all' or some of torch-fp32 "
        "torch-bf16 torch-w4a8-fake torch-w4-packed torch-w4-packed-compile ort-fp32 ort-w4a8 ort-w4a8-pc",
    )
    bench.add_argument(
        "--compile", action="store_true", help="with --variants all: also torch-w4-packed-compile"
    )
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument("--calls", type=int, default=2, help="timed calls per variant per round")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument(
        "--threads", type=int, nargs="+", default=[1], help="intra-op threads; several: all rows at each"
    )
    bench.add_argument(
        "--roofline",
        action="store_true",
        help="with --variants: measure this machine's fp32/int8 GEMM rates and bandwidth in the same run and "
        "report each row beside the time its operations and weight bytes allow",
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="with --variants: where each ORT variant's call goes (per op type, session overhead, Python) "
        "and its time per graph optimization level",
    )
    bench.add_argument("--group-size", type=int, default=128, help="largest W4 group")
    bench.add_argument("--cache", default="runs/bench_cache", help="where the exported variants are written")
    bench.add_argument("--out", help="write OUT.json and OUT.md")
    bench.set_defaults(func=_cmd_bench)
    _add_quantize_parser(sub)
    _add_sweep_parser(sub)

    # `data` and `train` hand their arguments to the modules' own parsers (`daptq train --help` lists them).
    data = sub.add_parser(
        "data",
        help="make expert demonstrations (generate), add camera views to them by replay (add-cameras), "
        "or time the renderer (speed)",
    )
    data.add_argument("action", choices=["generate", "add-cameras", "speed"])
    data.add_argument("rest", nargs=argparse.REMAINDER, help="options of the action (see --help)")
    data.set_defaults(func=_cmd_data)

    train = sub.add_parser("train", help="train the reference VLA on a dataset", add_help=False)
    train.add_argument("rest", nargs=argparse.REMAINDER, help="training options (see daptq train --help)")
    train.set_defaults(func=_cmd_train)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe raises nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (an embedding host)
        pass


def _exit_status(exc: SystemExit) -> int:
    return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``daptq`` command; its exit status (2: bad input, an ``error:`` line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from daptq.eval.runner import set_process_defaults

    set_process_defaults()  # headless rendering, offline hub: before any subcommand imports MuJoCo
    try:
        if argv[:1] == ["train"]:  # argparse's REMAINDER cannot start with an option such as --help
            args = argparse.Namespace(command="train", rest=argv[1:], func=_cmd_train)
        else:
            args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed its usage error (or --help): its status, not an exception
        return _exit_status(exc)
    from daptq.eval.store import RunDirectoryLocked

    try:
        return args.func(args)
    except SystemExit as exc:  # the parsers of `data` and `train`
        return _exit_status(exc)
    except BrokenPipeError:  # `daptq inspect DIR | head`: the reader left; nothing more to say
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of whatever was running
        print(f"daptq {args.command}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT
    except OSError as err:  # a file the checks could not foresee (a disk full, a permission changed mid-run)
        where = f"{err.filename}: " if err.filename is not None else ""
        print(f"daptq {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return 2
    except (ValueError, NotImplementedError, RunDirectoryLocked) as err:
        print(f"daptq {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
