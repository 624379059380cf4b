"""The policy-source resolver: registered prefixes, lazily imported built-ins, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from daptq import sources
from daptq.models.toy import ToyPolicy


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(sources, "_registered", {})


def test_builtin_specs_resolve(clean_registry):
    assert isinstance(sources.load_policy("toy"), ToyPolicy)
    policy = sources.load_policy(
        "toy:seed=3", onnx_threads=2
    )  # an option the toy does not take is not passed
    assert isinstance(policy, ToyPolicy) and policy.config.seed == 3
    assert set(sources.available_sources()) >= {"ref", "toy", "onnx", "cogact"}


def test_registered_source_gets_the_spec_and_its_options(clean_registry):
    calls = []

    def loader(spec, onnx_threads=1):
        calls.append((spec, onnx_threads))
        return ToyPolicy()

    sources.register_source("mine", loader)
    assert isinstance(sources.load_policy("mine:abc", onnx_threads=3, unused=1), ToyPolicy)
    assert calls == [("mine:abc", 3)]
    assert "mine" in sources.available_sources()
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("mine", loader)
    with pytest.raises(ValueError, match="already registered"):
        sources.register_source("toy", loader)  # a built-in is taken too
    sources.register_source("toy", loader, replace=True)
    sources.load_policy("toy:seed=1")
    assert calls[-1] == ("toy:seed=1", 1)
    with pytest.raises(ValueError, match="prefix must be"):
        sources.register_source("Bad Prefix", loader)


def test_unknown_prefix_lists_the_registered_ones(clean_registry, tmp_path):
    registered = ", ".join(sorted(sources.BUILTIN_SOURCES))
    assert {"cogact", "gr00t", "lerobot", "onnx", "openvla-oft", "ref", "torch", "toy"} <= set(
        sources.BUILTIN_SOURCES
    )
    with pytest.raises(ValueError, match=rf"unknown source 'hub'; registered: {registered}$"):
        sources.load_policy("hub:org/model")
    with pytest.raises(FileNotFoundError, match="nor an existing directory"):
        sources.load_policy(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="non-empty string"):
        sources.load_policy("")


def test_a_directory_goes_to_the_quantized_policy_loader(clean_registry, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        sources, "_import", lambda target: lambda spec: seen.append((target, spec)) or "policy"
    )
    assert sources.load_policy(str(tmp_path)) == "policy"
    assert seen == [(sources.DIRECTORY_SOURCE, str(tmp_path))]


def test_importing_sources_imports_no_model_code():
    code = (
        "import sys, daptq.sources as s\n"
        "heavy = ('daptq.models', 'daptq.deploy', 'daptq.methods', 'torch')\n"
        "bad = [m for m in sys.modules if m.startswith(heavy)]\n"
        "assert not bad, bad\n"
        "assert s._registered == {}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_registry_load_policy_delegates(clean_registry):
    from daptq.models.registry import load_policy

    assert isinstance(load_policy("toy:seed=2"), ToyPolicy)
    with pytest.raises(ValueError, match="registered:"):
        load_policy("nope:x")
