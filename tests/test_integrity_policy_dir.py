"""Quantized policy directories under careless or hostile use: outputs that are not daptq's are never
replaced, every behaviour-deciding field is checksummed, base chains end, torn saves recover, and bases
daptq does not bundle are pinned by their files' sha256 (or left out with --self-contained)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from daptq import atomic
from daptq.cli import main
from daptq.integrity import signed
from daptq.methods.rtn import RTNConfig
from daptq.methods.workflow import quantize_to_directory
from daptq.models import quantized as qdir
from daptq.models.registry import load_policy
from daptq.quant import QuantSpec, WeightSpec

SPEC = QuantSpec(WeightSpec(4, granularity="per_group", group_size=8))
W8 = QuantSpec(WeightSpec(8))


def _actions(policy, n=6):
    """``n`` closed-loop actions for a fixed observation and seed (public Policy API only)."""
    policy.reset(seed=3)
    obs = {"state": np.array([0.1, 0.6, 0.2, 0.5], np.float32), "instruction": "push the puck"}
    return np.stack([policy.select_action(obs) for _ in range(n)])


def _quantize_cli(out, *extra):
    argv = ["quantize", "toy", "--method", "rtn", "--w-bits", "4", "--group-size", "8", "--out", str(out)]
    return main([*argv, *extra])


@pytest.fixture
def saved(tmp_path):
    return quantize_to_directory("toy", RTNConfig(spec=SPEC), tmp_path / "q")


def _edit_json(path, fn, resign=False):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(signed(obj) if resign else obj))


def _resign_files(directory):
    """Re-record config.json's sha256 in quantization_config.json (what a careful forger would do)."""
    q = directory / qdir.QUANT_CONFIG_FILE
    _edit_json(
        q,
        lambda o: o["files"].update(
            {qdir.BASE_CONFIG_FILE: qdir.sha256_file(directory / qdir.BASE_CONFIG_FILE)}
        ),
        resign=True,
    )


# ---- 1. data loss ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [
        {"config.json": '{"format": "daptq-run"}', "episodes.jsonl": "{}\n"},  # an eval run
        {"config.json": '{"model_type": "bert"}', "model.safetensors": "weights"},  # a HF model directory
        {"config.json": "{}"},  # a project folder with a config
        {"quantization_config.json": '{"quant_method": "gptq"}', "model.safetensors": "x"},  # another tool's
    ],
)
def test_quantize_never_replaces_a_directory_daptq_did_not_write(tmp_path, capsys, files):
    user = tmp_path / "user"
    user.mkdir()
    for name, text in files.items():
        (user / name).write_text(text)
    assert _quantize_cli(user) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "refusing to replace" in err and str(user) in err
    assert {p.name: p.read_text() for p in user.iterdir()} == files


def test_quantize_refuses_a_policy_directory_holding_a_users_file(saved, capsys):
    (saved / "notes.md").write_text("mine")
    assert _quantize_cli(saved) == 2
    assert "notes.md" in capsys.readouterr().err
    assert (saved / "notes.md").read_text() == "mine"


def test_quantize_replaces_its_own_directory_and_an_empty_one(saved, tmp_path):
    assert _quantize_cli(saved) == 0
    (tmp_path / "empty").mkdir()
    assert _quantize_cli(tmp_path / "empty") == 0
    assert qdir.is_quantized_policy_dir(tmp_path / "empty")


def test_output_may_not_be_a_source(saved, tmp_path):
    with pytest.raises(ValueError, match="model being read"):
        qdir.check_policy_out(saved, [str(saved)])
    with pytest.raises(ValueError, match="model being read"):
        qdir.check_policy_out(tmp_path, [f"cogact:{saved}"])  # the output would hold the source


def test_marker_is_checked_not_just_present(tmp_path):
    (tmp_path / qdir.QUANT_CONFIG_FILE).write_text('{"format": "something-else"}')
    assert not qdir.is_quantized_policy_dir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / qdir.BASE_CONFIG_FILE).write_text("{}")
    assert not qdir.is_quantized_policy_dir(tmp_path / "c")


# ---- 2. unchecked fields --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edit",
    [
        lambda q: q["modules"]["net.0"]["spec"].update(activation={"bits": 8}),  # an activation spec
        lambda q: q["record"]["config"].update(method="gptq"),  # the record lies about the method
        lambda q: q["record"].update(method="gptq"),
    ],
)
def test_edited_layout_or_record_is_refused(saved, edit):
    _edit_json(saved / qdir.QUANT_CONFIG_FILE, edit)
    with pytest.raises(ValueError, match="content checksum mismatch"):
        load_policy(str(saved))
    with pytest.raises(ValueError, match="content checksum mismatch"):
        qdir.read_quantized_policy_config(saved)


def test_inspect_refuses_an_edited_record(saved, capsys):
    def lie(q):
        for m in q["modules"].values():
            m["spec"]["weight"]["bits"] = 2

    _edit_json(saved / qdir.QUANT_CONFIG_FILE, lie)
    assert main(["inspect", str(saved)]) == 2
    assert "content checksum mismatch" in capsys.readouterr().err


def test_missing_files_key_with_a_flipped_tensor_byte_is_refused(saved):
    _edit_json(saved / qdir.QUANT_CONFIG_FILE, lambda q: q.pop("files"), resign=True)
    data = bytearray((saved / qdir.TENSORS_FILE).read_bytes())
    data[-3] ^= 0x10
    (saved / qdir.TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="'files'"):
        load_policy(str(saved))


def test_resigned_one_field_edit_is_a_clear_error(saved):
    """bits 4 -> 8 with every checksum recomputed: an error naming the layer, not a RuntimeError."""
    _edit_json(
        saved / qdir.QUANT_CONFIG_FILE,
        lambda q: q["modules"]["net.0"]["spec"]["weight"].update(bits=8),
        resign=True,
    )
    with pytest.raises(ValueError, match=r"net\.0"):
        load_policy(str(saved))


def test_loader_names_only_a_registered_function(saved):
    def hostile(q):
        q["modules"]["net.0"] = {"loader": "daptq.eval.runner:_git", "weight_shape": [32, 12]}

    _edit_json(saved / qdir.QUANT_CONFIG_FILE, hostile, resign=True)
    with pytest.raises(ValueError, match="not a registered loader"):
        load_policy(str(saved))


def test_base_specs_naming_each_other_are_refused(tmp_path):
    a = quantize_to_directory("toy", RTNConfig(spec=SPEC), tmp_path / "a")
    b = quantize_to_directory("toy", RTNConfig(spec=W8), tmp_path / "b")
    for here, other in ((a, b), (b, a)):
        _edit_json(here / qdir.BASE_CONFIG_FILE, lambda c, o=other: c["base_model"].update(spec=str(o)))
        _resign_files(here)
    with pytest.raises(ValueError, match="leads back to itself"):
        load_policy(str(a))


def test_base_chain_deeper_than_the_limit_is_refused(tmp_path):
    dirs = [quantize_to_directory("toy", RTNConfig(spec=SPEC), tmp_path / f"d{i}") for i in range(6)]
    for here, nxt in zip(dirs, dirs[1:], strict=False):
        _edit_json(here / qdir.BASE_CONFIG_FILE, lambda c, n=nxt: c["base_model"].update(spec=str(n)))
        _resign_files(here)
    with pytest.raises(ValueError, match="nest more than"):
        load_policy(str(dirs[0]))


def test_version_1_directories_are_refused_clearly(saved):
    _edit_json(saved / qdir.QUANT_CONFIG_FILE, lambda q: q.update(format_version=1), resign=True)
    with pytest.raises(ValueError, match="format_version 1 is not supported"):
        load_policy(str(saved))


# ---- 3. torn saves --------------------------------------------------------------------------------------
def test_save_dying_mid_swap_without_exchange_keeps_the_old_directory(saved, monkeypatch):
    before = _actions(load_policy(str(saved)))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_rename, calls = os.rename, []

    def dying(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new directory's rename into place, after the old one moved aside
            raise OSError("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", dying)
    with pytest.raises(OSError, match="killed"):
        quantize_to_directory("toy", RTNConfig(spec=W8), saved)
    monkeypatch.undo()
    np.testing.assert_array_equal(_actions(load_policy(str(saved))), before)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["q"]


def test_exchange_swap_replaces_the_directory(saved):
    """Where renameat2 exchange works the swap never leaves the target missing; the content is the new one."""
    after = quantize_to_directory("toy", RTNConfig(spec=W8), saved)
    assert load_policy(str(after)).quant_record.config["spec"]["weight"]["bits"] == 8
    assert sorted(p.name for p in saved.parent.iterdir()) == ["q"]


_KILL_AT_SWAP = textwrap.dedent(
    """
    import os, signal, sys
    from daptq import atomic
    from daptq.methods.rtn import RTNConfig
    from daptq.methods.workflow import quantize_to_directory
    from daptq.quant import QuantSpec, WeightSpec

    mode = sys.argv[2]
    if mode == "rename":
        atomic._exchange = lambda a, b: False
        real = os.rename
        def rename(src, dst):
            real(src, dst)
            if ".daptq-old-" in os.fspath(dst):  # the old directory moved aside, the new one not in place
                os.kill(os.getpid(), signal.SIGKILL)
        atomic.os.rename = rename
    else:
        real_rmtree = atomic.shutil.rmtree
        def rmtree(path, *a, **k):  # called on the swapped-out old directory right after the exchange
            os.kill(os.getpid(), signal.SIGKILL)
        atomic.shutil.rmtree = rmtree
    quantize_to_directory("toy", RTNConfig(spec=QuantSpec(WeightSpec(8))), sys.argv[1])
    """
)


@pytest.mark.parametrize("mode", ["rename", "exchange"])
def test_sigkill_at_the_swap_point_is_recovered(saved, mode):
    before = _actions(load_policy(str(saved)))
    proc = subprocess.run([sys.executable, "-c", _KILL_AT_SWAP, str(saved), mode], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    hidden = [p for p in saved.parent.iterdir() if p.name.startswith(".q.daptq-")]
    assert hidden  # the killed save left its temp / backup directories
    if mode == "rename":
        assert not saved.exists()  # torn: the old directory is hidden, the new one not in place
        np.testing.assert_array_equal(_actions(load_policy(str(saved))), before)  # load restores it
    else:
        assert load_policy(str(saved)).quant_record.config["spec"]["weight"]["bits"] == 8
    quantize_to_directory("toy", RTNConfig(spec=SPEC), saved)  # a later save cleans every leftover
    assert sorted(p.name for p in saved.parent.iterdir()) == ["q"]


def test_leftovers_of_a_live_writer_are_left_alone(saved):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = saved.parent / f".q.daptq-tmp-{sleeper.pid}-abcd"
        live.mkdir()
        quantize_to_directory("toy", RTNConfig(spec=W8), saved)
        assert live.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    atomic.recover_directory(saved)
    assert not live.exists()


# ---- issue 24 section 5: bases daptq does not bundle ----------------------------------------------------
@pytest.fixture
def external(tmp_path, monkeypatch):
    """A ``file:PATH`` source registered like an external family (``cogact:PATH``): a toy architecture whose
    weights live in a user's safetensors file; with ``weights=False`` it builds the architecture alone."""
    from daptq import sources

    src = tmp_path / "base" / "weights.safetensors"
    src.parent.mkdir()
    base = load_policy("toy:seed=7")
    save_file({k: v.contiguous() for k, v in base.model.state_dict().items()}, src)
    calls = []

    def load(spec, weights=True):
        calls.append(weights)
        policy = load_policy("toy:seed=99")
        if weights:
            policy.model.load_state_dict(load_file(spec[len("file:") :]))
        return policy

    monkeypatch.setattr(sources, "_registered", {**sources._registered, "file": load})
    return f"file:{src}", src, calls


def test_external_base_is_recorded_by_its_files(tmp_path, external):
    spec, src, _ = external
    out = quantize_to_directory(spec, RTNConfig(spec=SPEC), tmp_path / "q")
    base = json.loads((out / qdir.BASE_CONFIG_FILE).read_text())["base_model"]
    assert base["source"]["files"] == {"weights.safetensors": qdir.sha256_file(src)}
    assert base["self_contained"] is False
    before = _actions(load_policy(str(out)))
    assert "centre" not in load_file(out / qdir.TENSORS_FILE)  # equal to the base's: not copied
    # a changed base is an error at load, never a silent mix
    tensors = load_file(src)
    tensors["centre"] = tensors["centre"] + 0.01
    save_file(tensors, src)
    with pytest.raises(ValueError, match="changed since it was quantized"):
        load_policy(str(out))
    src.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_policy(str(out))
    assert before.shape == (6, 4)


def test_self_contained_needs_no_base(tmp_path, external):
    spec, src, calls = external
    out = quantize_to_directory(spec, RTNConfig(spec=SPEC), tmp_path / "q", self_contained=True)
    before = _actions(load_policy(str(out)))
    src.unlink()  # the base checkpoint is gone: the directory holds every tensor
    calls.clear()
    np.testing.assert_array_equal(_actions(load_policy(str(out))), before)
    assert calls == [False]  # the source built its architecture only (weights=False)
    policy = qdir.load_quantized_policy(out, base_factory=lambda: load_policy("toy:seed=5"))
    np.testing.assert_array_equal(_actions(policy), before)
    stored = load_file(out / qdir.TENSORS_FILE)
    assert "centre" in stored and "half_extent" in stored


def test_cli_self_contained_on_a_bundled_base(tmp_path):
    out = tmp_path / "sc"
    assert _quantize_cli(out, "--self-contained") == 0
    stored = load_file(out / qdir.TENSORS_FILE)
    assert "centre" in stored  # unchanged base tensors are stored too
    assert json.loads((out / qdir.BASE_CONFIG_FILE).read_text())["base_model"]["self_contained"] is True
    assert _quantize_cli(tmp_path / "d") == 0
    expected = _actions(load_policy(str(tmp_path / "d")))
    np.testing.assert_array_equal(_actions(load_policy(str(out))), expected)


def test_external_base_without_files_asks_for_self_contained():
    with pytest.raises(ValueError, match="self-contained"):
        qdir.base_source_files("mystery:thing", object())
    assert (
        qdir.base_source_files("ref:metaworld-mt10") is None and qdir.base_source_files("toy:seed=1") is None
    )


def test_missing_directory_beside_a_live_writers_backup_says_what_happened(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".q.daptq-old-{sleeper.pid}-abcd").mkdir()
        with pytest.raises(
            FileNotFoundError, match=rf"backup of the previous version, process {sleeper.pid} running"
        ):
            qdir.read_quantized_policy_config(tmp_path / "q")
        assert (tmp_path / f".q.daptq-old-{sleeper.pid}-abcd").is_dir()  # a live writer's: left alone
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- bases that run code --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["module", "file"])
def test_a_directory_cannot_make_daptq_run_code(saved, tmp_path, monkeypatch, kind):
    """A directory from elsewhere naming a code-running base (``torch:os:system?command=...``, or any .py
    on the machine) is refused before anything is imported, unless this user quantized that spec here."""
    monkeypatch.setenv("DAPTQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DAPTQ_TRUST_BASE_CODE", raising=False)
    marker = tmp_path / "PWNED"
    if kind == "module":
        spec = f"torch:os:system?command=touch+{marker}"
    else:
        evil = tmp_path / "evil.py"
        evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef build(**k):\n    raise SystemExit\n")
        spec = f"torch:{evil}:build"
    _edit_json(saved / qdir.BASE_CONFIG_FILE, lambda c: c["base_model"].update(spec=spec))
    _resign_files(saved)
    with pytest.raises(ValueError, match="runs Python code"):
        load_policy(str(saved))
    assert not marker.exists()


def test_trust_is_for_the_spec_and_file_content_this_user_quantized(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPTQ_CACHE_DIR", str(tmp_path / "cache"))
    code = tmp_path / "mine.py"
    code.write_text("def build(**k):\n    pass\n")
    spec = f"torch:{code}:build"
    with pytest.raises(ValueError, match="runs Python code"):
        qdir._check_code_base(tmp_path, spec, trusted=False)
    qdir.trust_base_code(spec)  # what `daptq quantize torch:...` records
    qdir._check_code_base(tmp_path, spec, trusted=False)
    code.write_text("def build(**k):\n    import os\n")  # other code under the same name
    with pytest.raises(ValueError, match="runs Python code"):
        qdir._check_code_base(tmp_path, spec, trusted=False)
    qdir._check_code_base(tmp_path, spec, trusted=True)
    qdir._check_code_base(tmp_path, "toy:seed=1", trusted=False)  # data-only sources need no trust


def test_deeply_nested_config_is_a_clear_error(saved):
    (saved / qdir.QUANT_CONFIG_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(str(saved))
    assert not qdir.is_quantized_policy_dir(saved)


def test_load_policy_of_a_missing_path_names_a_live_save(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".q.daptq-tmp-{sleeper.pid}-abcd").mkdir()
        with pytest.raises(
            FileNotFoundError, match=rf"new version being written, process {sleeper.pid} running"
        ):
            load_policy(str(tmp_path / "q"))
    finally:
        sleeper.kill()
        sleeper.wait()
