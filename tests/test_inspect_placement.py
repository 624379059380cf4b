"""``daptq inspect`` shows every module's role, stack, block, stream and spec (issue #24 section 5), recorded
at quantize time from the adapter's QuantizableModule; records written before keep reading. A quantized
directory's ``info().recipe`` is set for every family (one mechanism: ``ChunkedPolicy.recorded_recipe``)."""

from __future__ import annotations

import json

import pytest

from daptq.methods.rtn import RTNConfig
from daptq.methods.workflow import config_from_options, inspect_text, quantize_to_directory
from daptq.models.quantized import load_quantized_policy
from daptq.models.record import ModuleRecord, QuantRecord
from daptq.models.registry import load_policy


def _rows(text: str) -> dict[str, list[str]]:
    """The Modules table's rows by module name, cells stripped."""
    table = text.split("## Modules")[1].split("\n## ")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "rtn-w8"
    return quantize_to_directory("ref:metaworld-mt10", config_from_options("rtn", w_bits=8), out)


def test_inspect_shows_placement_of_reference_modules(ref_dir):
    adapter = load_policy("ref:metaworld-mt10").adapter
    expected = {m.name: m for m in adapter.quantizable_modules()}
    rows = _rows(inspect_text(ref_dir))
    rows.pop("**total**")
    assert rows and set(rows) <= set(expected)
    for name, row in rows.items():
        m = expected[name]
        assert row["role"] == m.role
        assert row["stack"] == (m.stack or "-") and row["stream"] == (m.stream or "-")
        assert row["block"] == ("-" if m.block is None else str(m.block)), name
        assert row["spec"].startswith("W8")
    assert any(r["block"] == "1" and r["stack"] != "-" for r in rows.values())  # blocks are recorded


def test_quantized_reference_directory_reports_its_recipe(ref_dir):
    info = load_quantized_policy(ref_dir).info()
    assert info.recipe is not None and info.recipe["method"] == "rtn" and info.recipe["w_bits"] == 8
    assert load_policy("ref:metaworld-mt10").info().recipe is None


def test_inspect_shows_placement_on_tiny_cogact(tmp_path):
    from daptq.models.cogact.testing import write_tiny_run

    run = write_tiny_run(tmp_path / "run")
    spec = f"cogact:{run}"
    out = quantize_to_directory(spec, RTNConfig(), tmp_path / "q")
    expected = {m.name: m for m in load_policy(spec).adapter.quantizable_modules()}
    rows = _rows(inspect_text(out))
    rows.pop("**total**")
    assert rows
    for name, row in rows.items():
        m = expected[name]
        assert (row["role"], row["stack"], row["stream"]) == (m.role, m.stack or "-", m.stream or "-")
        assert row["block"] == ("-" if m.block is None else str(m.block)), name
    assert {r["stack"] for r in rows.values()} - {"-"}, "no module placed in a stack"
    assert load_quantized_policy(out).info().recipe["method"] == "rtn"


def test_module_record_placement_round_trips_and_old_records_read(ref_dir):
    qconfig = json.loads((ref_dir / "quantization_config.json").read_text())
    record = QuantRecord.from_dict(qconfig["record"])
    m = next(m for m in record.modules.values() if m.block is not None)
    assert ModuleRecord.from_dict(m.to_dict()) == m
    old = {k: v for k, v in m.to_dict().items() if k not in ("block", "stack", "stream")}
    legacy = ModuleRecord.from_dict(old)  # a record written before placement was recorded
    assert (legacy.block, legacy.stack, legacy.stream) == (None, None, None)
    assert "stack" not in legacy.to_dict()  # written only when set: the old form round-trips as it was
    with pytest.raises(ValueError, match="ModuleRecord.block"):
        ModuleRecord.from_dict({**old, "block": -1})
