"""Tests for records/tool.py: parse, new, check, compare and the significance test.

Fixtures: hand-written logs in tests/fixtures/records/ (our format, the lineage's console format, cut
short, crashed, malformed), and record folders generated here from synthetic logs in our format.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "records"
spec = importlib.util.spec_from_file_location("records_tool", ROOT / "records" / "tool.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

RULE = "=" * 100
BPB_PER_NAT = 1.11922988 / 1.88976776  # sp1024 val set: val_bpb / val_loss


def fixture(name):
    return tool.parse_log((FIX / name).read_text(errors="replace"))


# ---------------------------------------------------------------------------------- parse
def test_parse_our_format():
    r = fixture("ours_complete.txt")
    assert r["status"] == "complete" and r["problems"] == [] and r["unparsed"] == []
    assert r["env"]["python"] == "3.11.7" and r["env"]["pytorch"] == "2.9.1+cpu" and r["env"]["gpus"] == []
    assert r["hparams"]["SEED"] == 1337 and r["hparams"]["VE_LAYERS"] == "9,10" and r["seed"] == 1337
    assert r["config"]["attention_backend"] == "sdpa" and r["config"]["active_layers"] == "[2, 3]"
    assert r["config"]["tokenizer_kind"] == "sentencepiece" and r["warmup_steps"] == 2
    assert [p["step"] for p in r["train"]] == list(range(1, 13))
    assert r["train"][-1] == {"step": 12, "train_loss": 5.441, "train_time_ms": 5800, "step_avg_ms": 483.33, "tok_s": 8474}
    assert [(v["step"], v["val_bpb"]) for v in r["val"]] == [(0, 4.105), (6, 3.5596), (12, 3.2338)]
    assert (r["steps"], r["iterations"], r["stop_reason"], r["step_avg_ms"]) == (12, 12, "iterations", 483.33)
    assert r["events"]["swa"] == {"step": 8} and r["events"]["ema_swa"] == {"swa_weight": 0.5, "swa_count": 3}
    assert r["gptq"]["reserve_ms"] == 1000 and r["gptq"]["quantized"] == 24 and r["gptq"]["quantized_s"] == 1.3
    assert r["calibration_end_ms"] == 5800 + 912 and r["gptq"]["calibration_end_tokens"] == 32768
    assert r["sizes"] == {"model": 318211, "codec": "int6+lzma", "code": 61234, "total": 379445}
    assert r["quant_gap_bpb"] == 0.012345
    # the script source above the rule contains a fake result line; it must not count
    assert r["final"]["final_int6_sliding_window_exact"] == {"val_loss": 5.44021785, "val_bpb": 3.22204911}
    assert r["final"]["final_int6_sliding_window"]["stride"] == 64
    assert r["legal_metric"] == {"name": "legal_ttt_exact", "val_loss": 5.42880012, "val_bpb": 3.21529117}
    assert len(r["ttt"]["chunks"]) == 2 and r["ttt"]["start"]["chunks"] == 2 and r["ttt"]["done"]["elapsed_s"] == 8.4
    assert (r["final_eval_time_s"], r["eval_budget_s"], r["eval_time_s"]) == (21.7, 600.0, 21.7)


def test_parse_lineage_console_format():
    r = fixture("lineage_sliding.log")
    assert r["status"] == "complete" and r["env"] is None and r["hparams"] == {}
    assert r["seed"] == 42 and r["log_path"].startswith("logs/0b7e3c1a")
    assert (r["steps"], r["stop_reason"], r["train_time_ms"]) == (6701, "wallclock_cap", 586100)
    assert r["peak_memory_mib"] == {"allocated": 22846, "reserved": 22894}
    assert r["diagnostics"]["post_ema"]["val_bpb"] == 1.1319
    assert r["sizes"]["model_raw"] == 106235254 and r["sizes"]["total"] == 15976000
    # train-data GPTQ runs after the loop: its end on the training clock is loop end + calibration time
    assert r["calibration_end_ms"] == 586100 + 6800
    assert r["legal_metric"]["name"] == "final_int6_sliding_window_exact"
    assert r["eval_time_s"] == pytest.approx(6.4 + 78.4) and "sum" in r["eval_time_source"]
    assert len(r["unparsed"]) == 2 and r["unparsed"][0].startswith("W0329")  # torchrun noise is kept


def test_parse_truncated_log():
    r = fixture("ours_truncated.txt")
    assert r["status"] == "truncated" and r["legal_metric"] is None
    assert any("training did not finish" in p for p in r["problems"])
    assert len(r["train"]) == 4 and r["unparsed"] == ["step:5/12 train_loss:6.22"]  # half-written last line


def test_parse_log_cut_inside_header():
    r = tool.parse_log("print('hello')\n" + RULE + "\nRunning Python 3.11.7\n")
    assert r["status"] == "truncated" and "log ends inside its header" in r["problems"]


def test_parse_crashed_log():
    r = fixture("ours_crashed.txt")
    assert r["status"] == "crashed"
    assert r["error"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert "final_int6_roundtrip_exact" in r["final"] and "final_int6_sliding_window" not in r["final"]


def test_parse_malformed_lines_are_kept_not_fatal():
    r = fixture("malformed.txt")
    assert r["status"] == "truncated" and r["seed"] == 7 and [p["step"] for p in r["train"]] == [3]
    assert "this is not a log" in r["unparsed"] and "step:abc/12 train_loss:nan" in r["unparsed"]
    assert r["unknown_metrics"] == ["final_int6_preq_ttt_exact"]  # flagged, never the claimed metric
    assert r["legal_metric"]["name"] == "final_int6_roundtrip_exact"
    assert tool.parse_log("")["status"] == "truncated"


def test_parse_cli_prints_json_without_matplotlib():
    code = ("import runpy, sys; sys.argv = ['tool.py', 'parse', sys.argv[1]]\n"
            "try: runpy.run_path(sys.argv[0].replace('tool.py', 'records/tool.py'), run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('matplotlib' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code, str(FIX / "lineage_sliding.log")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["seed"] == 42 and out.stderr.strip() == "False"


# --------------------------------------------------------------------------- significance
# Published per-seed legal val_loss of PR #549 (TTT) and PR #1019; #1019's submission.json states
# Welch t=-11.8339, df=3.3063 for the plain difference of means.
PR549 = [1.88976776, 1.89110239, 1.88919190]
PR1019 = [1.88276292, 1.88156874, 1.88220393]


def reference_p(prev, new, margin):
    """Independent one-sided Welch p-value: t statistic, Welch–Satterthwaite df, Student t tail."""
    n1, n2 = len(prev), len(new)
    m1, m2 = sum(prev) / n1, sum(new) / n2
    v1 = sum((x - m1) ** 2 for x in prev) / (n1 - 1) / n1
    v2 = sum((x - m2) ** 2 for x in new) / (n2 - 1) / n2
    t = (m1 - m2 - margin) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    return t, df, stats.t.sf(t, df)


def test_welch_reproduces_published_numbers():
    w = tool.welch(PR549, PR1019, margin=0.0)
    assert w["t"] == pytest.approx(11.8339, abs=1e-3) and w["df"] == pytest.approx(3.3063, abs=1e-3)
    w = tool.welch(PR549, PR1019)  # the rule: at least 0.005 nats better
    t, df, p = reference_p(PR549, PR1019, 0.005)
    assert w["delta_nats"] == pytest.approx(0.00784215, abs=1e-8)
    assert (w["t"], w["df"], w["p"]) == pytest.approx((t, df, p), rel=1e-9)
    assert 0.009 < w["p"] < 0.01 and w["significant"]  # a close call, but it passes


@pytest.mark.parametrize("prev,new,significant", [
    ([1.900, 1.901, 1.899], [1.880, 1.881, 1.879], True),        # 0.020 better, tight: clearly passes
    ([1.900, 1.910, 1.890], [1.895, 1.905, 1.885], False),       # overlapping samples
    ([1.9000, 1.9001, 1.8999], [1.8960, 1.8961, 1.8959], False),  # 0.004 better: below the margin
    ([1.90, 1.91], [1.95, 1.96], False),                          # worse
])
def test_welch_known_answers(prev, new, significant):
    w = tool.welch(prev, new)
    t, df, p = reference_p(prev, new, 0.005)
    assert (w["t"], w["df"], w["p"]) == pytest.approx((t, df, p), rel=1e-6)
    assert w["significant"] is significant and (w["p"] < 0.01) is significant


def test_welch_needs_two_seeds_each():
    w = tool.welch([1.9], [1.8, 1.81])
    assert not w["significant"] and w["p"] is None and "at least 2 seeds" in tool.welch_text(w)


# ------------------------------------------------------------------------- new and check
CODE = b"# tiny stand-in for train_gpt.py\nprint('hi')\n" * 40


def our_log(seed, loss, *, code=len(CODE), model=15_000_000, train_ms=590_123, calib_ms=598_000,
            gptq_ms=599_100, eval_s=512.3, metric="legal_ttt_exact"):
    """A complete log in our format with the given outcome (few lines, same templates as the script)."""
    bpb = loss * BPB_PER_NAT
    lines = ["source = 1", RULE, "Running Python 3.11.7", "Running PyTorch 2.9.1+cu128",
             "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |", RULE,
             f"hparam:SEED={seed}", "hparam:TTT_ENABLED=1", "attention_backend:fa3", f"seed:{seed}",
             "gptq:reserving 10000ms from training budget, effective=590000ms",
             "step:0/20000 val_loss:6.9310 val_bpb:4.1049 train_time:0ms step_avg:0.01ms",
             "step:1/20000 train_loss:6.9320 train_time:131ms step_avg:131.00ms tok_s:6003300",
             f"step:6800/20000 train_loss:1.9400 train_time:{train_ms}ms step_avg:86.78ms tok_s:9062000",
             f"step:6800/20000 val_loss:1.9130 val_bpb:1.1330 train_time:{train_ms}ms step_avg:86.78ms",
             f"stopping_early: wallclock_cap train_time:{train_ms}ms step:6800/20000",
             "peak memory allocated: 22846 MiB reserved: 22894 MiB",
             f"gptq:calibration start train_time:{train_ms}ms",
             f"gptq:calibration end train_time:{calib_ms}ms tokens:50331648 layers:66 elapsed:7.9s",
             "gptq:quantized 66 matrices in 12.0s", f"gptq:done train_time:{gptq_ms}ms",
             f"Serialized model int6+lzma: {model} bytes", f"Code size: {code} bytes",
             f"Total submission size int6+lzma: {model + code} bytes",
             f"final_int6_sliding_window_exact val_loss:{loss + 0.004:.8f} val_bpb:{(loss + 0.004) * BPB_PER_NAT:.8f}",
             f"{metric} val_loss:{loss:.8f} val_bpb:{bpb:.8f}", f"final_eval_time:{eval_s:.1f}s budget:600s"]
    return "\n".join(lines) + "\n"


def make_logs(tmp, name, losses, seeds=(1337, 42, 2025), **kw):
    d = tmp / name
    d.mkdir()
    paths = []
    for seed, loss in zip(seeds, losses):
        (p := d / f"run_{seed}.txt").write_text(our_log(seed, loss, **kw))
        paths.append(str(p))
    return paths


@pytest.fixture
def project(tmp_path):
    (tmp_path / "train_gpt.py").write_bytes(CODE)
    prev = tmp_path / "records" / "2026-01-01_Prev"
    prev.mkdir(parents=True)
    for p in make_logs(tmp_path, "prev_logs", PR549):
        Path(p).rename(prev / Path(p).name)
    (prev / "submission.json").write_text(json.dumps({"name": "Prev", "val_bpb": 1.1}))
    return tmp_path


def new_record(project, losses, name="Better Model", **kw):
    logs = make_logs(project, "runs_" + name.replace(" ", ""), losses, **kw)
    args = ["new", *logs, "--name", name, "--author", "A. Golfer", "--github-id", "agolfer", "--date", "2026-02-02",
            "--blurb", "Blurb.", "--script", str(project / "train_gpt.py"), "--records-dir", str(project / "records"),
            "--top-level", str(project / "submission.json"), "--against", str(project / "records" / "2026-01-01_Prev")]
    rc = tool.main(args)
    return rc, project / "records" / f"2026-02-02_{name.replace(' ', '_')}"


def test_new_creates_record_and_check_passes(project, capsys):
    better = [x - 0.012 for x in PR549]
    rc, folder = new_record(project, better)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "submission.json", "train_gpt.py",
                                                        "train_seed1337.log", "train_seed2025.log", "train_seed42.log"]
    assert (folder / "train_gpt.py").read_bytes() == CODE
    sub = json.loads((folder / "submission.json").read_text())
    bpbs = [x * BPB_PER_NAT for x in better]
    assert sub["val_bpb"] == pytest.approx(sum(bpbs) / 3, abs=1e-8)
    assert sub["val_bpb_std"] == pytest.approx(stats.tstd(bpbs), abs=1e-8)
    assert sub["seed_results"]["42"]["val_loss"] == pytest.approx(better[1], abs=1e-8)
    assert sub["bytes_total"] == 15_000_000 + len(CODE) and sub["seeds"] == [1337, 42, 2025]
    assert (sub["name"], sub["author"], sub["github_id"], sub["date"], sub["metric"]) == (
        "Better Model", "A. Golfer", "agolfer", "2026-02-02", "legal_ttt_exact")
    assert sub["hardware"] == "1×NVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.9.1+cu128"
    assert sub["delta_vs_baseline_nats"] == pytest.approx(-0.012, abs=1e-8) and sub["p_value"] < 0.01
    readme = (folder / "README.md").read_text()
    assert "| 42 | 6,800 |" in readme and f"{sub['val_bpb']:.8f}" in readme
    top = json.loads((project / "submission.json").read_text())
    assert top["record"] == "records/2026-02-02_Better_Model" and top["val_bpb"] == sub["val_bpb"]
    assert "RESULT: PASS" in out and "p=" in out and "t=" in out and "df=" in out


def test_check_warns_on_last_step_just_past_600s(project, capsys):
    rc, folder = new_record(project, [x - 0.012 for x in PR549], train_ms=600_128, calib_ms=None)
    out = capsys.readouterr().out
    assert rc == 0 and "WARN  seed 42: training ended at 600128 ms, 128 ms past 600 s" in out


def test_check_warns_when_the_gptq_solve_ends_past_600s(project, capsys):
    """Calibration inside the cap is a rule; a solve (no data read) past it is tolerated, so only a warning."""
    rc, folder = new_record(project, [x - 0.012 for x in PR549], gptq_ms=600_900)
    out = capsys.readouterr().out
    assert rc == 0 and "WARN  seed 42: GPTQ finished at 600900 ms <= 600000" in out
    assert "PASS  seed 42: GPTQ calibration ended at 598000 ms" in out


@pytest.mark.parametrize("kw,losses,reason", [
    ({}, [x - 0.003 for x in PR549], "Welch"),                             # better, but not by 0.005 nats
    ({"model": 16_000_001 - len(CODE)}, None, "total 16000001 bytes <= 16,000,000"),
    ({"code": len(CODE) + 1}, None, "logged code size"),
    ({"train_ms": 601_150}, None, "training ended at 601150 ms"),
    ({"calib_ms": 600_200}, None, "GPTQ calibration ended at 600200 ms"),
    ({"eval_s": 600.4}, None, "evaluation 600.4 s <= 600 s"),
])
def test_check_fails_rule(project, capsys, kw, losses, reason):
    rc, folder = new_record(project, losses or [x - 0.012 for x in PR549], **kw)
    out = capsys.readouterr().out
    assert rc == 1 and "RESULT: FAIL" in out
    assert any(line.startswith("FAIL") and reason in line for line in out.splitlines()), out


def test_check_catches_edited_folder(project, capsys):
    rc, folder = new_record(project, [x - 0.012 for x in PR549])
    assert rc == 0
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_bpb"] -= 0.001  # e.g. claiming a non-legal number
    (folder / "submission.json").write_text(json.dumps(sub))
    (folder / "train_seed7.log").write_text((folder / "train_seed42.log").read_text())  # duplicate seed
    (folder / "train_gpt.py").write_bytes(CODE + b"\n")
    capsys.readouterr()
    assert tool.main(["check", str(folder)]) == 1
    fails = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert any("seeds distinct: [1337, 2025, 42, 42]" in f for f in fails)
    assert any("submission.json val_bpb" in f for f in fails)
    assert any("logged code size" in f for f in fails)


def test_check_fails_on_truncated_seed_log_and_unknown_metric_warns(project, capsys):
    rc, folder = new_record(project, [x - 0.012 for x in PR549], metric="legal_ttt_exact")
    (folder / "train_seed2025.log").write_text(our_log(2025, 1.87).split("final_int6_sliding")[0])
    with open(folder / "train_seed42.log", "a") as f:
        f.write("final_prequant_ttt_exact val_loss:1.5 val_bpb:0.9\n")
    capsys.readouterr()
    assert tool.main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  train_seed2025.log: truncated" in out
    assert "WARN  seed 42: metric names not in the allowed list" in out


def test_new_refuses_bad_inputs(project):
    logs = make_logs(project, "dup", [1.88, 1.881], seeds=(5, 5))
    base = ["--name", "X", "--author", "a", "--github-id", "a", "--script", str(project / "train_gpt.py"),
            "--records-dir", str(project / "records"), "--top-level", str(project / "submission.json")]
    with pytest.raises(SystemExit, match="own seed"):
        tool.main(["new", *logs, *base])
    with pytest.raises(SystemExit, match="incomplete"):
        tool.main(["new", str(FIX / "ours_truncated.txt"), *base])
    (no_total := project / "no_total.txt").write_text(
        "".join(line for line in our_log(9, 1.88).splitlines(True) if not line.startswith("Total")))
    with pytest.raises(SystemExit, match="no 'Total submission size' line"):
        tool.main(["new", str(no_total), *base])


# -------------------------------------------------------------------------------- compare
def test_compare_table_and_plots(project, tmp_path, capsys):
    runs = [str(FIX / "ours_complete.txt"), str(FIX / "lineage_sliding.log")]
    assert tool.main(["compare", *runs, "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "ours_complete" in text.splitlines()[0] and "Δ" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("steps"))
    assert row.split() == ["steps", "12", "6,701", "+6,689"]
    assert "legal_ttt_exact" in text and "final_int6_sliding_window_exact" in text
    prev = project / "records" / "2026-01-01_Prev"
    assert tool.main(["compare", "--markdown", str(prev), *runs, "--plots", str(tmp_path / "plots")]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| metric | run_1337 | run_2025 | Δ |") and md[1].startswith("| --- |")
    val_loss = next(line for line in md if line.startswith("| val_loss"))
    assert val_loss.startswith("| val_loss (metric) | 1.88976776 | 1.88919190 | -0.00057586 |")
    assert any(line.startswith("- run_1337: ") for line in md)
    for name in ("train_loss_vs_step.png", "train_loss_vs_time.png", "val_bpb_vs_step.png"):
        png = tmp_path / "plots" / name
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        import matplotlib.image
        assert matplotlib.image.imread(png).shape[:2] == (500, 800)
