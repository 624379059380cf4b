from daptq.demo_toy import run_toy_demo


def test_toy_demo_runs_and_reloads_bit_exact(tmp_path, capsys):
    summary = run_toy_demo(tmp_path)
    w8, w4 = summary["results"]["W8 per-channel"], summary["results"]["W4 group-32"]
    assert w8["reload_bit_exact"] and w4["reload_bit_exact"]
    assert w8["model_output_sqnr_db"] > w4["model_output_sqnr_db"] + 10
    assert w4["model_output_sqnr_db"] > 15
    assert all(r["weight_sqnr_db"] > 35 for r in w8["layers"])
    assert w4["quant_bytes"] < 0.3 * w4["fp16_bytes"] and w8["quant_bytes"] < 0.52 * w8["fp16_bytes"]
    assert len(w8["layers"]) == 4
    assert "| **total** |" in capsys.readouterr().out


def test_cli_demo_toy_option_runs_the_toy_demo(tmp_path, capsys):
    from daptq.cli import main

    assert main(["demo", "--toy", "--out", str(tmp_path / "toy")]) == 0
    assert "| **total** |" in capsys.readouterr().out
    assert (tmp_path / "toy" / "w4_group32").is_dir()


def test_cli_demo_runs_the_vla_demo_with_its_options(tmp_path, monkeypatch):
    import daptq.demo
    from daptq.cli import main

    calls = []
    monkeypatch.setattr(
        daptq.demo, "run_demo", lambda out, settings, workers=None: calls.append((out, settings, workers))
    )
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--workers", "3"]) == 0
    assert main(["demo"]) == 0
    assert calls == [(str(tmp_path / "d"), daptq.demo.QUICK, 3), ("runs/demo", daptq.demo.FULL, None)]
