"""Paired closed-loop evaluation: rollouts against the full-precision reference, metrics, a resumable runner
and reports. See docs/evaluation.md for the definition of every metric."""

from daptq.eval.runner import evaluate

__all__ = ["evaluate", "open_loop_eval", "render_rollout_gif", "write_report"]


def __getattr__(name: str):
    # Lazy: the report pulls in matplotlib, the open-loop mode the dataset reader; evaluation needs neither.
    if name == "write_report":
        from daptq.eval.report import write_report

        return write_report
    if name == "open_loop_eval":
        from daptq.eval.open_loop import open_loop_eval

        return open_loop_eval
    if name == "render_rollout_gif":
        from daptq.eval.gif import render_rollout_gif

        return render_rollout_gif
    raise AttributeError(f"module 'daptq.eval' has no attribute {name!r}")
