"""quantize / export / eval of small models open no network socket (loopback and Unix sockets aside).

Two views of the same run in a fresh interpreter: Python's audit hooks (``socket.connect``,
``socket.getaddrinfo``: what Python code does), and, where ``strace`` is installed, the system calls of
every thread and child (what native libraries do: ONNX Runtime's Linux build resolves and posts to its
telemetry host from C++, about 10 s after its first session, unless ``ORT_DISABLE_TELEMETRY`` was set before
it loaded). CI does not need strace: that test is skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

# nscd's Unix socket is not matched: glibc asks it for user names (getpwuid) as well as for host names.
# Telemetry uploads start ~10 s after ONNX Runtime's first session (measured with ORT 1.31); the probe
# stays alive past that so an uploader would be seen. A wait, not a timing assertion.
TELEMETRY_WAIT_S = 16

PROBE = textwrap.dedent(
    """
    import json, os, socket, sys, tempfile, time
    from pathlib import Path

    LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}
    events = []

    def hook(event, args):
        if event == "socket.getaddrinfo":
            host = args[0].decode() if isinstance(args[0], bytes) else args[0]
            if host not in LOOPBACK:
                events.append([event, repr(host)])
        elif event == "socket.connect":
            address = args[1]
            host = address[0] if isinstance(address, tuple) else None
            if host is not None and host not in LOOPBACK and not str(host).startswith("127."):
                events.append([event, repr(address)])
        elif event in ("socket.gethostbyname", "socket.gethostbyaddr"):
            events.append([event, repr(args)])

    sys.addaudithook(hook)
    out = Path(tempfile.mkdtemp())
    import numpy as np
    import torch

    # export first, through the Python API (no CLI process defaults): the library protects itself
    from daptq.deploy import OnnxPolicy, export_reference_policy
    from daptq.models.reference import ReferencePolicy, ReferenceVLA, ReferenceVLAConfig

    cfg = ReferenceVLAConfig(
        image_size=32, d_model=32, n_layer=1, n_head=2, dit_d_model=32, dit_n_layer=1, dit_n_head=2
    )
    policy = OnnxPolicy(export_reference_policy(ReferencePolicy(ReferenceVLA(cfg)), out / "onnx"))
    policy.reset(seed=0)
    obs = {"image": np.zeros((32, 32, 3), np.uint8), "state": np.zeros(4, np.float32), "instruction": "reach"}
    policy.select_action(obs)
    started = time.monotonic()

    from daptq.cli import main

    assert main(["quantize", "toy", "--method", "rtn", "--w-bits", "4", "--out", str(out / "q")]) == 0
    assert main([
        "eval", str(out / "q"), "--tasks", "reach", "--episodes", "1", "--workers", "1",
        "--envs-per-worker", "1", "--max-steps", "8", "--no-reference-cache", "--no-reseed-floor",
        "--no-progress", "--out", str(out / "run"),
    ]) == 0
    time.sleep(max(0.0, float(sys.argv[1]) - (time.monotonic() - started)))
    print("EVENTS " + json.dumps(events))
    """
)


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORT_", "RAY_USAGE", "HF_HUB_OFFLINE"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _events(stdout: str) -> list:
    lines = [line for line in stdout.splitlines() if line.startswith("EVENTS ")]
    assert lines, stdout[-2000:]
    return json.loads(lines[-1][len("EVENTS ") :])


def test_python_level_sockets_only_loopback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "0"], capture_output=True, text=True, env=_env(), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _events(proc.stdout) == []


_NON_LOOPBACK = re.compile(
    r"connect\(\d+, \{sa_family=AF_INET6?, (?!.*(?:127\.\d+\.\d+\.\d+|\"::1\"))|htons\(53\)"
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_no_native_dns_or_connections(tmp_path):
    if subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True).returncode != 0:
        pytest.skip("strace cannot trace here (ptrace not permitted)")
    log = tmp_path / "strace.log"
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(log)]
        + [sys.executable, "-c", PROBE, str(TELEMETRY_WAIT_S)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _events(proc.stdout) == []
    bad = [line for line in log.read_text().splitlines() if _NON_LOOPBACK.search(line)]
    assert bad == [], "\n".join(bad[:10])
