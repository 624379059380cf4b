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
