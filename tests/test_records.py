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

import train_gpt as tg

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


def test_parse_crash_ends_with_our_error_line():
    """train_gpt.py ends a crashed log with its traceback and one 'error: Type: message' line (other ranks:
    'rank N: error: ...'). It names the exception even when the type does not end in Error, and alone marks
    the log as crashed."""
    head = (FIX / "ours_complete.txt").read_text().split("gptq:calibration start")[0]
    tb = 'Traceback (most recent call last):\n  File "train_gpt.py", line 2240, in <module>\n    main()\n'
    r = tool.parse_log(head + tb + "KeyboardInterrupt\nerror: KeyboardInterrupt: \n")
    assert r["status"] == "crashed" and r["error"] == "KeyboardInterrupt"
    assert r["unparsed"][-1].strip() == "KeyboardInterrupt"  # the traceback stays in the log, unparsed
    torchrun = "[rank0]: torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 1 failed\n"
    r = tool.parse_log(head + tb + "ValueError: bad shape\nerror: ValueError: bad shape (4, 2)\n" + torchrun)
    assert r["status"] == "crashed" and r["error"] == "ValueError: bad shape (4, 2)"  # not torchrun's echo
    rank3 = "rank 3: error: RuntimeError: NCCL watchdog timeout\n"
    r = tool.parse_log(head + rank3)  # rank 0 logged nothing
    assert r["status"] == "crashed" and r["error"] == "rank 3: RuntimeError: NCCL watchdog timeout"
    r = tool.parse_log(head + rank3 + tb + "ValueError: x\nerror: ValueError: x\nrank 5: error: OSError: y\n")
    assert r["error"] == "ValueError: x"  # rank 0's exception, whichever rank wrote first or last


INVALID = ["run_invalid: training and GPTQ ended at 182263ms, past the 120000ms cap by 62263ms: "
           "not a valid submission",
           "run_invalid: GPTQ without Hessians: calibration took 0/16 batches (train_time 598000ms, deadline "
           "590000ms); falls back to clip-search rounding"]
SHORT = ("calibration_short: batches:3/16 deadline:590000ms "
         "(GPTQ_RESERVE_SECONDS too small for GPTQ_CALIB_BATCHES?)")


def test_parse_run_invalid_and_short_calibration():
    r = tool.parse_log(our_log(1, 1.88, extra=[SHORT, *INVALID]))
    assert r["invalid"] == [x.removeprefix("run_invalid: ") for x in INVALID]
    assert r["gptq"]["calibration_short"] == SHORT.removeprefix("calibration_short: ") and r["unparsed"] == []
    assert r["status"] == "complete"  # whole, but invalid: new refuses it and check fails it (tests below)
    assert tool.parse_log(our_log(1, 1.88))["invalid"] == []


def eval_only_log(seed, loss, artifact="/runs/final_model.int6.ptz"):
    """What EVAL_ARTIFACT=<artifact> logs: header and hparams, eval_model, the final metrics; no training."""
    full = our_log(seed, loss, hparams=[f"hparam:EVAL_ARTIFACT={artifact}"])
    head, tail = full.split("attention_backend:fa3\n")
    finals = "final_int6_roundtrip " + tail.split("final_int6_roundtrip ", 1)[1]
    return head + f"eval_model:{artifact} rope_base:10000.00\n" + finals


def test_parse_eval_only_log():
    r = tool.parse_log(eval_only_log(42, 1.88))
    assert (r["kind"], r["status"], r["problems"], r["unparsed"]) == ("eval_only", "complete", [], [])
    assert r["eval_model"] == "/runs/final_model.int6.ptz" and r["train"] == [] and r["steps"] is None
    assert r["legal_metric"]["name"] == "legal_ttt_exact" and r["eval_time_s"] == 512.3 and r["seed"] == 42
    cut = tool.parse_log(eval_only_log(42, 1.88).split("final_eval_time")[0])  # a cut one is still cut
    assert cut["status"] == "truncated" and cut["problems"] == ["no final_eval_time line"]
    # a training log carries the empty hparam, and is a training log
    r = tool.parse_log(our_log(42, 1.88, hparams=["hparam:EVAL_ARTIFACT="]))
    assert (r["kind"], r["status"]) == ("train", "complete")
    assert fixture("lineage_sliding.log")["kind"] == "train"


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
    w = tool.welch(PR549, PR1019, 0.0, 0.01)
    assert w["t"] == pytest.approx(11.8339, abs=1e-3) and w["df"] == pytest.approx(3.3063, abs=1e-3)
    w = tool.welch(PR549, PR1019, 0.005, 0.01)  # the README's rule: at least 0.005 nats better
    t, df, p = reference_p(PR549, PR1019, 0.005)
    assert w["delta"] == pytest.approx(0.00784215, abs=1e-8)
    assert (w["t"], w["df"], w["p"]) == pytest.approx((t, df, p), rel=1e-9)
    assert 0.009 < w["p"] < 0.01 and w["significant"]  # a close call, but it passes


def seed_runs(bpb, loss=None):
    return [{"legal_metric": {"val_bpb": b, "val_loss": v}} for b, v in zip(bpb, loss or [b / BPB_PER_NAT for b in bpb])]


@pytest.mark.parametrize("prev,new,new_loss,published_p", [
    # README leaderboard rows (PR #1902's chain): #1769 (5 seeds) vs #1736, "p=0.063"; #1514 vs #1493, "p=0.020"
    ([1.06610, 1.06473, 1.06563], [1.06356801, 1.0641313, 1.06466993, 1.06509678, 1.06516558],
     [2.32748105, 2.32871372, 2.32989245, 2.33082656, 2.33097712], 0.063),
    ([1.08079, 1.08103, 1.08118], [1.07928348, 1.07996676, 1.08024795], [2.78790132, 2.78966630, 2.79039264], 0.020),
])
def test_progression_rule_reproduces_the_leaderboard_p_values(prev, new, new_loss, published_p):
    tests = tool.significance(prev, seed_runs(new, new_loss))
    assert round(tests["progression"]["p"], 3) == published_p and tests["progression"]["significant"]
    assert tests["progression"]["margin"] == 0.0
    # the README's rule would have rejected both accepted rows: its margin is 0.005 nats in the new record's bpb
    bpb_per_nat = sum(b / v for b, v in zip(new, new_loss)) / len(new)
    assert tests["readme"]["margin"] == pytest.approx(0.005 * bpb_per_nat, rel=1e-12)
    assert tests["readme"]["p"] > 0.25 and not tests["readme"]["significant"]


@pytest.mark.parametrize("prev,new,significant", [
    ([1.900, 1.901, 1.899], [1.880, 1.881, 1.879], True),        # 0.020 better, tight: clearly passes
    ([1.900, 1.910, 1.890], [1.895, 1.905, 1.885], False),       # overlapping samples
    ([1.9000, 1.9001, 1.8999], [1.8960, 1.8961, 1.8959], False),  # 0.004 better: below the margin
    ([1.90, 1.91], [1.95, 1.96], False),                          # worse
])
def test_welch_known_answers(prev, new, significant):
    w = tool.welch(prev, new, 0.005, 0.01)
    t, df, p = reference_p(prev, new, 0.005)
    assert (w["t"], w["df"], w["p"]) == pytest.approx((t, df, p), rel=1e-6)
    assert w["significant"] is significant and (w["p"] < 0.01) is significant


def test_welch_needs_two_seeds_each():
    w = tool.welch([1.9], [1.8, 1.81], 0.0, 0.25)
    assert not w["significant"] and w["p"] is None and "at least 2 seeds" in tool.welch_text(w)


# ------------------------------------------------------------------------- new and check
CODE = b"# tiny stand-in for train_gpt.py\nprint('hi')\n" * 40


def our_log(seed, loss, *, code=len(CODE), model=15_000_000, train_ms=590_123, calib_ms=598_000,
            gptq_ms=599_100, eval_s=512.3, metric="legal_ttt_exact", source=CODE, hparams=(), gpus=8,
            gpu="NVIDIA H100 80GB HBM3", world_size=8, extra=(), sliding=True, ttt=(), ttt_s=None):
    """A complete log in our format with the given outcome (few lines, same templates as the script);
    `extra` lines go after GPTQ, where the script reports what went wrong in the run. sliding=False is
    SLIDING_WINDOW_ENABLED=False (its hparam line, no sliding lines); `ttt` lines are the TTT pass's own, before
    its metric, and `ttt_s` adds the ttt_eval_time line after it."""
    bpb, sw = loss * BPB_PER_NAT, loss + 0.004
    base = metric.removesuffix("_exact")
    lines = [source.decode(), RULE, "Running Python 3.11.7", "Running PyTorch 2.9.1+cu128",
             *[f"|   {i}  {gpu}          On  |   00000000:{18 + i}:00.0 Off |" for i in range(gpus)], RULE,
             f"hparam:RUN_ID=rec_seed{seed}", f"hparam:SEED={seed}",
             f"hparam:TTT_ENABLED={metric in tool.SCORE_FIRST_TTT}",
             *hparams, *["hparam:SLIDING_WINDOW_ENABLED=False"] * (not sliding),
             "attention_backend:fa3", f"world_size:{world_size} grad_accum_steps:1", f"seed:{seed}",
             "gptq:reserving 10000ms from training budget, effective=590000ms",
             "step:0/20000 val_loss:6.9310 val_bpb:4.1049 train_time:0ms step_avg:0.01ms",
             "step:1/20000 train_loss:6.9320 train_time:131ms step_avg:131.00ms tok_s:6003300",
             f"step:6800/20000 train_loss:1.9400 train_time:{train_ms}ms step_avg:86.78ms tok_s:9062000",
             f"step:6800/20000 val_loss:1.9130 val_bpb:1.1330 train_time:{train_ms}ms step_avg:86.78ms",
             f"stopping_early: wallclock_cap train_time:{train_ms}ms step:6800/20000",
             "peak memory allocated: 22846 MiB reserved: 22894 MiB",
             f"gptq:calibration start train_time:{train_ms}ms",
             f"gptq:calibration end train_time:{calib_ms}ms tokens:50331648 layers:66 elapsed:7.9s",
             "gptq:quantized 66 matrices in 12.0s", f"gptq:done train_time:{gptq_ms}ms", *extra,
             f"Serialized model int6+pergroup: {model} bytes", f"Code size (uncompressed): {len(source)} bytes",
             f"Code size (compressed): {code} bytes",
             f"Total submission size int6+pergroup: {model + code} bytes",
             "final_int6_roundtrip val_loss:1.9200 val_bpb:1.1371 eval_time:7000ms",
             "final_int6_roundtrip_exact val_loss:1.92000000 val_bpb:1.13712000",
             *[f"final_int6_sliding_window val_loss:{sw:.4f} val_bpb:{sw * BPB_PER_NAT:.4f} stride:64 eval_time:80000ms",
               f"final_int6_sliding_window_exact val_loss:{sw:.8f} val_bpb:{sw * BPB_PER_NAT:.8f}"] * sliding,
             *ttt, f"{base} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:400000ms",
             f"{metric} val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
             *([] if ttt_s is None else [f"ttt_eval_time:{ttt_s:.1f}s budget:600s"]),
             f"final_eval_time:{eval_s:.1f}s budget:600s"]
    return "\n".join(lines) + "\n"


# TTT_MODE=lora (the sp8192 preset): no sliding pass; per-document LoRA TTT with 3 global SGD pauses, its own
# progress lines, and quantized_ttt_phased as the score-first metric, timed from "beginning TTT eval timer".
LORA_TTT = ["beginning TTT eval timer",
            "ttt_phased: total_docs:50000 prefix_docs:2496 suffix_docs:47504 num_phases:3 "
            "boundaries:[832, 1664, 2496] batches:782",
            "ttp: b1/782 rl:2.3012 rb:1.0678 (this rank's) gd:0 t:10.2s",
            *[x for p, t in ((1, 40.1), (2, 95.0), (3, 150.4))
              for x in (f"ttpp: phase:{p}/3 gd:{832 * p} t:{t}s", f"ttpr: phase:{p}/3 t:{t + 25.2:.1f}s")],
            "ttp: b500/782 rl:2.2801 rb:1.0598 (this rank's) gd:3 t:300.0s"]
LORA_STOP = "ttt:budget_stop batch:641/782 elapsed:480.2s projected:612.9s budget:600s"


def lora_log(seed, loss, *, hparams=(), ttt=LORA_TTT, ttt_s=401.5, sliding=False, **kw):
    """our_log of a TTT_MODE=lora run (SLIDING_WINDOW_ENABLED=False unless sliding)."""
    return our_log(seed, loss, metric="quantized_ttt_phased_exact", hparams=["hparam:TTT_MODE=lora", *hparams],
                   ttt=ttt, ttt_s=ttt_s, sliding=sliding, **kw)


def make_logs(tmp, name, losses, seeds=(1337, 42, 2025), make=None, **kw):
    d = tmp / name
    d.mkdir()
    paths = []
    for seed, loss in zip(seeds, losses):
        (p := d / f"run_{seed}.txt").write_text((make or our_log)(seed, loss, **kw))
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


def new_record(project, losses, name="Better Model", rule=(), script=None, **kw):
    logs = make_logs(project, "runs_" + name.replace(" ", ""), losses, **kw)
    args = ["new", *logs, "--name", name, "--author", "A. Golfer", "--github-id", "agolfer", "--date", "2026-02-02",
            "--blurb", "Blurb.", "--script", str(script or project / "train_gpt.py"), "--records-dir",
            str(project / "records"), "--top-level", str(project / "submission.json"),
            "--against", str(project / "records" / "2026-01-01_Prev"), *rule]
    rc = tool.main(args)
    return rc, project / "records" / f"2026-02-02_{name.replace(' ', '_')}"


def lines(out, level):
    return [line for line in out.splitlines() if line.startswith(level)]


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
    assert sub["seed_results"]["42"] == {
        "val_loss": pytest.approx(better[1], abs=1e-8), "val_bpb": pytest.approx(bpbs[1], abs=1e-8),
        "artifact_bytes": 15_000_000 + len(CODE), "model_bytes": 15_000_000, "code_bytes": len(CODE), "steps": 6800,
        "step_avg_ms": 86.78, "train_time_ms": 590_123, "eval_time_s": 512.3}
    assert sub["bytes_total"] == 15_000_000 + len(CODE) and sub["seeds"] == [1337, 42, 2025]
    assert (sub["name"], sub["author"], sub["github_id"], sub["date"], sub["metric"], sub["track"]) == (
        "Better Model", "A. Golfer", "agolfer", "2026-02-02", "legal_ttt_exact", "10min_16mb")
    assert sub["hardware"] == "8×NVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.9.1+cu128"
    assert sub["compliance"] == {"artifact_under_16mb": True, "train_under_600s": True,
                                 "gptq_calibration_under_600s": True, "eval_under_600s": True, "score_first_ttt": True,
                                 "logs_complete": True, "same_config_all_seeds": True, "code_bytes_match_logs": True,
                                 "three_seeds": True, "hardware_8xh100": True}
    sig = sub["significance"]
    assert sub["delta_vs_baseline_bpb"] == pytest.approx(-0.012 * BPB_PER_NAT, abs=1e-8)
    assert sig["rule_applied"] == "progression" and sig["progression"]["passed"] and sig["readme"]["passed"]
    assert sig["readme"]["p"] < 0.01 and sig["progression"]["p"] < sig["readme"]["p"]
    readme = (folder / "README.md").read_text()
    assert "| 42 | 6,800 |" in readme and f"{sub['val_bpb']:.8f}" in readme and "progression rule" in readme
    top = json.loads((project / "submission.json").read_text())
    assert top["record"] == "records/2026-02-02_Better_Model" and top["val_bpb"] == sub["val_bpb"]
    assert "RESULT: PASS" in out and "p=" in out and "t=" in out and "df=" in out
    assert lines(out, "WARN") == [] and lines(out, "FAIL") == []
    assert "PASS  a record needs 3 seeds: found 3" in out
    assert "PASS  seed 42: ran on 8×NVIDIA H100 80GB HBM3 with world_size 8; a record runs on 8×H100" in out


def test_check_reports_both_rules_and_applies_the_one_in_force(project, capsys):
    """0.003 nats better and tight: enough for the organizers' p < 0.25 chain, not for the README's margin."""
    rc, folder = new_record(project, [x - 0.003 for x in PR549])
    out = capsys.readouterr().out
    assert rc == 0, out
    applied = [x for x in lines(out, "PASS") if "progression rule" in x]
    assert len(applied) == 1 and "APPLIED, default: the rule in force" in applied[0] and "need p < 0.25" in applied[0]
    info = lines(out, "INFO")
    assert len(info) == 1 and "readme rule" in info[0] and "not applied" in info[0] and "need p < 0.01" in info[0]
    against = ["check", str(folder), "--against", str(project / "records" / "2026-01-01_Prev")]
    assert tool.main([*against, "--rule", "readme"]) == 1
    out = capsys.readouterr().out
    assert any("readme rule" in x and "APPLIED, chosen with --rule" in x for x in lines(out, "FAIL"))
    assert any("progression rule" in x and "not applied" in x for x in lines(out, "INFO"))
    assert tool.main([*against, "--rule", "systems"]) == 0
    out = capsys.readouterr().out
    assert len(lines(out, "INFO")) == 2 and any("waived for a systems-only change" in x for x in lines(out, "WARN"))
    rc, folder = new_record(project, [x + 0.001 for x in PR549], name="Worse")  # worse fails even the lenient rule
    assert rc == 1 and any("progression rule" in x for x in lines(capsys.readouterr().out, "FAIL"))


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


@pytest.mark.parametrize("kw,losses,reason,fact", [
    ({"rule": ["--rule", "readme"]}, [x - 0.003 for x in PR549], "readme rule", ("significance", "readme", "passed")),
    ({"model": 16_000_001 - len(CODE)}, None, "total 16000001 bytes <= 16,000,000", ("compliance", "artifact_under_16mb")),
    ({"train_ms": 601_150}, None, "training ended at 601150 ms", ("compliance", "train_under_600s")),
    ({"calib_ms": 600_200}, None, "GPTQ calibration ended at 600200 ms", ("compliance", "gptq_calibration_under_600s")),
    ({"eval_s": 600.4}, None, "evaluation 600.4 s <= 600 s", ("compliance", "eval_under_600s")),
    ({}, [PR549[0] - 0.012], "a record needs 3 seeds: found 1", ("compliance", "three_seeds")),
    ({"gpus": 1}, None, "seed 42: ran on 1×NVIDIA H100 80GB HBM3 with world_size 8; a record runs on 8×H100",
     ("compliance", "hardware_8xh100")),
    ({"gpu": "NVIDIA A100-SXM4-80GB"}, None, "seed 42: ran on 8×NVIDIA A100-SXM4-80GB",
     ("compliance", "hardware_8xh100")),
    ({"world_size": 1}, None, "seed 42: ran on 8×NVIDIA H100 80GB HBM3 with world_size 1;",  # 1 GPU of 8 used
     ("compliance", "hardware_8xh100")),
])
def test_check_fails_rule(project, capsys, kw, losses, reason, fact):
    rc, folder = new_record(project, losses or [x - 0.012 for x in PR549], **kw)
    out = capsys.readouterr().out
    assert rc == 1 and "RESULT: FAIL" in out
    assert any(reason in line for line in lines(out, "FAIL")), out
    value = json.loads((folder / "submission.json").read_text())  # submission.json states the failure too
    for key in fact:
        value = value[key]
    assert value is False


def test_check_warns_when_the_hardware_is_unknown(project, capsys):
    """A log without nvidia-smi GPU lines (a console log, a CPU run) cannot show 8×H100: a WARN for reviewers,
    and submission.json claims nothing about it."""
    rc, folder = new_record(project, [x - 0.012 for x in PR549], gpus=0)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert lines(out, "WARN") == [f"WARN  seed {s}: hardware unknown (no nvidia-smi GPU lines in the log); "
                                  "a record runs on 8×H100" for s in (1337, 2025, 42)]
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["hardware"] is None and sub["compliance"]["hardware_8xh100"] is None
    mixed = [tool.parse_log(our_log(1, 1.9)), tool.parse_log(our_log(2, 1.9, gpus=0))]
    assert tool._hardware_of(mixed) == "8×NVIDIA H100 80GB HBM3 / unknown"  # every seed's, not the first's
    assert tool._all_hardware_ok(mixed) is None


def test_check_fails_eval_only_and_invalid_logs_and_warns_on_short_calibration(project, capsys):
    rc, folder = new_record(project, [x - 0.012 for x in PR549], extra=[SHORT])
    out = capsys.readouterr().out
    assert rc == 0 and lines(out, "WARN") == [f"WARN  seed {s}: GPTQ calibrated on fewer batches than "
                                              f"configured ({SHORT})" for s in (1337, 2025, 42)]
    (folder / "train_seed2025.log").write_text(eval_only_log(2025, 1.87))
    log = folder / "train_seed42.log"
    log.write_text(log.read_text().replace("gptq:done", "\n".join([*INVALID, "gptq:done"])))
    assert tool.main(["check", str(folder)]) == 1
    fails = lines(capsys.readouterr().out, "FAIL")
    assert {"FAIL  a record needs 3 seeds: found 2", *[f"FAIL  train_seed42.log: {x}" for x in INVALID],
            "FAIL  train_seed2025.log: an evaluation-only run (EVAL_ARTIFACT=/runs/final_model.int6.ptz); "
            "a record needs the training log"} <= set(fails), fails
    assert not any("training did not finish" in f for f in fails)


def test_check_catches_edited_folder(project, capsys):
    rc, folder = new_record(project, [x - 0.012 for x in PR549])
    assert rc == 0
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_bpb"] -= 0.001  # e.g. claiming a non-legal number
    sub["compliance"]["eval_under_600s"] = False
    (folder / "submission.json").write_text(json.dumps(sub))
    (folder / "train_seed7.log").write_text((folder / "train_seed42.log").read_text())  # duplicate seed
    (folder / "train_gpt.py").write_bytes(CODE + b"\n")
    log = folder / "train_seed2025.log"
    log.write_text(log.read_text().replace("hparam:SEED=2025", "hparam:SEED=2025\nhparam:MATRIX_LR=0.03"))
    capsys.readouterr()
    assert tool.main(["check", str(folder)]) == 1
    fails = lines(capsys.readouterr().out, "FAIL")
    assert any("seeds distinct: [1337, 2025, 42, 42]" in f for f in fails)
    assert any("submission.json val_bpb" in f for f in fails)
    assert any("logged code size" in f for f in fails) and any("the script source in the log is" in f for f in fails)
    assert any("all seeds ran one configuration (differs: MATRIX_LR: None in train_seed1337.log, 0.03 in "
               "train_seed2025.log)" in f for f in fails)
    assert any("compliance matches the logs (claims {'eval_under_600s': False, 'same_config_all_seeds': True, "
               "'code_bytes_match_logs': True}, the logs say {'eval_under_600s': True, 'same_config_all_seeds': False, "
               "'code_bytes_match_logs': False})" in f for f in fails)


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


def test_check_needs_nothing_outside_the_folder(project, capsys):
    """An import that resolves to the repository around the folder fails; a helper in the folder is a warning
    (its bytes are not in the logged code size); the standard library and installed packages pass."""
    script = b"import json, numpy\nimport importlib\nimport mylib\nfrom helper import f\nimportlib.import_module('plugins.x')\n"
    (project / "mylib.py").write_text("X = 1\n")
    (project / "plugins").mkdir()
    (project / "plugins" / "x.py").write_text("")
    (project / "my_script.py").write_bytes(script)
    rc, folder = new_record(project, [x - 0.012 for x in PR549], script=project / "my_script.py",
                            code=len(script), source=script)
    out = capsys.readouterr().out
    assert rc == 1, out
    fail = [x for x in lines(out, "FAIL") if "needs nothing outside its folder" in x]
    assert fail == [f"FAIL  train_gpt.py needs nothing outside its folder (imports from the repository: "
                    f"mylib ({project / 'mylib.py'}), plugins ({project / 'plugins'}))"]
    (folder / "helper.py").write_text("import data.build\n")  # a helper that reaches out again
    (project / "data").mkdir()
    (project / "data" / "build.py").write_text("")
    assert tool.main(["check", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "data (" in next(x for x in lines(out, "FAIL") if "needs nothing outside" in x)
    assert any("imports helpers from its folder (helper.py, 18 bytes)" in x for x in lines(out, "WARN"))


def test_our_train_gpt_needs_nothing_outside_its_folder(tmp_path):
    """The repo's train_gpt.py, placed as a record next to the rest of this repository, imports none of it."""
    folder = tmp_path / "records" / "track_10min_16mb" / "x"
    folder.mkdir(parents=True)
    (folder / "train_gpt.py").write_bytes((ROOT / "train_gpt.py").read_bytes())
    for name in ("data", "tests", "records"):
        for f in (ROOT / name).glob("*.py"):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
            (tmp_path / f.name).write_bytes(f.read_bytes())  # as if each were importable from the root too
    assert tool.folder_imports(folder) == ([], [])
    assert {"numpy", "torch", "sentencepiece", *tg.CODEC_PACKAGES.values()} <= tool._imports(folder / "train_gpt.py")


NEW_ARGS = ["--name", "X", "--author", "a", "--github-id", "a"]


def refuse(project, logs, match, script=None):
    base = [*NEW_ARGS, "--script", str(script or project / "train_gpt.py"), "--records-dir", str(project / "records"),
            "--top-level", str(project / "submission.json")]
    before = sorted((project / "records").iterdir())
    with pytest.raises(SystemExit, match=match) as e:
        tool.main(["new", *logs, *base])
    assert sorted((project / "records").iterdir()) == before  # nothing written
    return str(e.value)


def test_new_refuses_bad_inputs(project):
    refuse(project, make_logs(project, "dup", [1.88, 1.881], seeds=(5, 5)), "own seed")
    refuse(project, [str(FIX / "ours_truncated.txt")], "incomplete")
    msg = refuse(project, [str(FIX / "ours_crashed.txt")], "incomplete")
    assert "ours_crashed.txt: crashed (torch.OutOfMemoryError: CUDA out of memory" in msg  # exception first
    (project / "empty").mkdir()
    refuse(project, [str(project / "empty")], "no run logs in")


def test_new_refuses_eval_only_and_invalid_runs(project):
    """An EVAL_ARTIFACT log re-scores a saved model: it is no seed log. A run the script declared invalid
    (run_invalid:) is refused with its reasons, one line per log, before anything is written."""
    (ev := project / "eval.txt").write_text(eval_only_log(42, 1.88))
    msg = refuse(project, [str(ev)], "evaluation-only logs are not seed logs")
    art = "/runs/final_model.int6.ptz"  # eval_only_log's
    assert msg.splitlines()[1:] == [f"  {ev}: an evaluation-only run (EVAL_ARTIFACT={art}); "
                                    "a record needs the training log"]
    logs = make_logs(project, "invalid", [1.88, 1.881], extra=INVALID)
    msg = refuse(project, logs, "the script declared these runs invalid")
    reasons = "; ".join(x.removeprefix("run_invalid: ") for x in INVALID)
    assert msg.splitlines()[1:] == [f"  {p}: run_invalid: {reasons}" for p in logs]
    assert not (project / "submission.json").exists()


def snapshot(root):
    """Every path under root, with the bytes of each file."""
    return {str(p.relative_to(root)): p.is_file() and p.read_bytes() for p in sorted(root.rglob("*"))}


def test_new_dry_run_writes_nothing_and_prints_the_submission(project, capsys):
    (project / "submission.json").write_text('{"record": "records/2026-01-01_Prev"}\n')
    logs = make_logs(project, "runs", [x - 0.012 for x in PR549])
    args = ["new", *logs, *NEW_ARGS, "--date", "2026-02-02", "--script", str(project / "train_gpt.py"),
            "--records-dir", str(project / "records"), "--top-level", str(project / "submission.json"),
            "--against", str(project / "records" / "2026-01-01_Prev")]
    before = snapshot(project)
    assert tool.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert snapshot(project) == before
    folder = project / "records" / "2026-02-02_X"
    assert out.startswith(f"dry run, nothing written; would create {folder}/ with:\n"
                          f"  train_gpt.py ({len(CODE):,} bytes)\n")
    for seed, log in zip((1337, 42, 2025), logs):
        assert f"  train_seed{seed}.log ({Path(log).stat().st_size:,} bytes, a copy of {log})\n" in out
    assert "  submission.json (" in out and "  README.md (" in out
    assert f"would refresh {project / 'submission.json'} from {folder / 'submission.json'}\n" in out
    printed = out.split(f"\n{folder / 'submission.json'}:\n", 1)[1]
    assert tool.main(args) == 0  # the real run writes exactly what the dry run showed
    assert printed == (folder / "submission.json").read_text()
    assert json.loads((project / "submission.json").read_text())["record"] == "records/2026-02-02_X"
    with pytest.raises(SystemExit, match=r"exists \(a record folder is never overwritten\)"):
        tool.main([*args, "--dry-run"])  # and neither would a dry run pretend it could be


LOG = "{p}/runs/run_1337.txt"
NEW = ["new", LOG, *NEW_ARGS, "--script", "{p}/train_gpt.py", "--records-dir", "{p}/records", "--top-level",
       "{p}/submission.json"]
PREV = "{p}/records/2026-01-01_Prev"
NOT_A_RECORD = f"--against {LOG}: must be a record folder or its submission.json"


@pytest.mark.parametrize("argv,message", [
    (["parse", "{p}/missing.txt"], "{p}/missing.txt: no such file or folder"),
    (["parse", "{p}/runs"], "{p}/runs: must be a log file"),
    (["check", "{p}/records/missing"], "{p}/records/missing: no such file or folder"),
    (["check", LOG], f"{LOG}: must be a record folder"),
    (["check", PREV, "--against", LOG], NOT_A_RECORD),
    (["check", PREV, "--against", "{p}/nowhere"], "--against {p}/nowhere: no such file or folder"),
    (["check", PREV, "--against", "{p}/empty"], "--against {p}/empty: no seed logs and no readable"),
    (["compare", LOG, "{p}/missing.txt"], "{p}/missing.txt: no such file or folder"),
    (["new", "{p}/missing.txt", *NEW[2:]], "{p}/missing.txt: no such file or folder"),
    ([*NEW, "--against", LOG], NOT_A_RECORD),
    ([*NEW, "--script", "{p}/nope.py"], "--script {p}/nope.py: no such file or folder"),
    ([*NEW, "--top-level", "{p}/no/sub.json"], "--top-level {p}/no/sub.json: its folder does not exist"),
])
def test_bad_paths_are_one_line_errors(project, capsys, argv, message):
    """A missing path, or one of the wrong kind: one 'error: ' line on stderr, exit status 2, nothing
    written."""
    make_logs(project, "runs", [1.88])
    (project / "empty").mkdir()
    before = snapshot(project)
    assert tool.main([a.format(p=project) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message.format(p=project)}") and err.count("\n") == 1, err
    assert snapshot(project) == before


def test_cli_error_is_one_line_and_exit_status_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "records" / "tool.py"), "check", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {tmp_path / 'x'}: no such file or folder\n")


def test_new_refuses_seeds_with_different_configurations(project):
    """#2124: a record's seeds are one configuration. Seed, run id and output paths may differ; nothing else."""
    a = make_logs(project, "a", [1.88], seeds=(1,), hparams=["hparam:MATRIX_LR=0.025", "hparam:ARTIFACT_PATH=a.ptz"])
    b = make_logs(project, "b", [1.881], seeds=(2,), hparams=["hparam:MATRIX_LR=0.03", "hparam:ARTIFACT_PATH=b.ptz"])
    msg = refuse(project, a + b, "different configurations")
    assert "MATRIX_LR: 0.025 in run_1.txt, 0.03 in run_2.txt" in msg and "ARTIFACT_PATH" not in msg
    c = make_logs(project, "c", [1.881], seeds=(3,), hparams=["hparam:MATRIX_LR=0.025"], source=CODE[:-1] + b"#")
    assert "script source (sha256)" in refuse(project, a + c, "different configurations")


def test_new_refuses_a_log_without_its_final_lines(project):
    full = our_log(9, 1.88)
    cut = {"no_end.txt": full.rsplit("final_eval_time", 1)[0],                   # the last line is gone
           "mid_metric.txt": full.rsplit("legal_ttt_exact", 1)[0],               # cut between a metric's two lines
           "no_ttt.txt": full.split("legal_ttt ")[0] + "final_eval_time:300.0s budget:600s\n"}
    for name, text in cut.items():
        (project / name).write_text(text)
    msg = refuse(project, [str(project / n) for n in cut], "incomplete runs")
    assert "no_end.txt: truncated (no final_eval_time line)" in msg
    assert "mid_metric.txt: truncated (legal_ttt has no legal_ttt_exact line; no legal_ttt_exact line" in msg
    assert "no_ttt.txt: truncated (no legal_ttt_exact line)" in msg  # TTT_ENABLED=True promised it
    lineage = (FIX / "lineage_sliding.log").read_text() + "legal_ttt val_loss:1.8700 val_bpb:1.1075 eval_time:400000ms\n"
    (project / "lineage_cut.log").write_text(lineage)
    assert "legal_ttt has no legal_ttt_exact line" in refuse(project, [str(project / "lineage_cut.log")], "incomplete")


def test_new_refuses_logs_whose_bytes_do_not_match_the_script(project):
    """#1835: the byte total is recomputed from the script file; the log must agree with it byte for byte."""
    wrong_size = make_logs(project, "size", [1.88], code=len(CODE) + 1)
    assert f"logged code size {len(CODE) + 1} == " in refuse(project, wrong_size, "--script must be the file that ran")
    other = CODE[:-1] + b"#"  # same size, other content
    assert "the script source in the log is" in refuse(project, make_logs(project, "src", [1.88], source=other),
                                                       "do not match")
    (edited := project / "edited.txt").write_text(our_log(9, 1.88).replace("Total submission size int6+pergroup: ",
                                                                          "Total submission size int6+pergroup: 1"))
    assert f"compressed model 15000000 + code {len(CODE)} == logged total 1" in refuse(project, [str(edited)],
                                                                                          "do not match")


# ------------------------------------------------------------------ shipped code: our one-line wrapper
@pytest.fixture(scope="module")
def ours():
    """train_gpt.py as written, and the one-line wrapper a record ships (its logged code size)."""
    src = (ROOT / "train_gpt.py").read_bytes()
    return src, tg.wrap_code(src.decode())


def test_new_ships_our_wrapper_beside_the_readable_source_and_check_proves_them_one_program(project, ours, capsys):
    src, shipped = ours
    (project / "mine.py").write_bytes(src)
    rc, folder = new_record(project, [x - 0.012 for x in PR549], script=project / "mine.py", code=len(shipped),
                            source=src)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (folder / "train_gpt.py").read_bytes() == shipped and (folder / tool.READABLE).read_bytes() == src
    assert json.loads((folder / "submission.json").read_text())["bytes_total"] == 15_000_000 + len(shipped)
    assert f"PASS  seed 42: logged code size {len(shipped)} == train_gpt.py size {len(shipped)}" in out
    assert "PASS  train_gpt.py decompresses byte for byte to train_gpt_readable.py without comments and " \
           "docstrings" in out
    assert (f"PASS  imported, train_gpt.py resolves every preset ({', '.join(tg.PRESETS)}) as "
            "train_gpt_readable.py does") in out
    assert "PASS  train_gpt.py needs nothing outside its folder" in out
    assert lines(out, "FAIL") == [] and lines(out, "WARN") == []
    # a run launched from the wrapper logs the wrapper as its source: the same files prove it
    r = tool.parse_log(our_log(7, 1.9, code=len(shipped), source=shipped))
    assert (r["sizes"]["code_raw"], r["sizes"]["code"]) == (len(shipped), len(shipped))  # the lineage's two lines
    assert all(ok for ok, _ in tool.byte_checks(r, {"train_gpt.py": shipped, tool.READABLE: src}))


def test_check_fails_a_wrapper_that_is_not_its_readable_source(project, ours, capsys):
    """A shipped wrapper of another program (one preset value changed) fails both proofs, naming the preset."""
    src, shipped = ours
    (project / "mine.py").write_bytes(src)
    _, folder = new_record(project, [x - 0.012 for x in PR549], script=project / "mine.py", code=len(shipped),
                           source=src)
    capsys.readouterr()
    other = src.replace(b"MATRIX_LR=0.026,", b"MATRIX_LR=0.027,", 1)
    assert other != src
    (folder / "train_gpt.py").write_bytes(tg.wrap_code(other.decode()))
    assert tool.check(folder, None) == 1
    fails = lines(capsys.readouterr().out, "FAIL")
    assert any("decompresses byte for byte" in f for f in fails), fails
    differs = [p for p, values in tg.PRESETS.items() if values.get("MATRIX_LR") == 0.026]  # pr1855 and its rows
    assert len(differs) == 5 and any(f"as train_gpt_readable.py does (differs: {differs})" in f for f in fails), fails


def test_new_refuses_our_script_when_the_log_counts_its_readable_bytes(project, ours):
    """Our script counts its wrapper: a log whose code size is the readable file's is not from this script."""
    src, shipped = ours
    (project / "mine.py").write_bytes(src)
    logs = make_logs(project, "raw", [1.88], code=len(src), source=src)
    msg = refuse(project, logs, "--script must be the file that ran", script=project / "mine.py")
    assert f"logged code size {len(src)} == " in msg and f"size {len(shipped)}" in msg


# ------------------------------------------------------------------ TTT_MODE=lora, SLIDING_WINDOW_ENABLED
def without(text, *prefixes):
    """The log without the lines that start with any of the prefixes."""
    return "".join(x for x in text.splitlines(keepends=True) if not x.startswith(prefixes))


def test_parse_lora_mode_log():
    """TTT_MODE=lora, SLIDING_WINDOW_ENABLED=False: whole without a sliding line; quantized_ttt_phased_exact is
    the claimed score-first metric; its pass's lines land in "ttt"; its eval time is ttt_eval_time (the records'
    reading, from the first scored token)."""
    r = tool.parse_log(lora_log(42, 1.88))
    assert (r["status"], r["problems"], r["unparsed"], r["unknown_metrics"]) == ("complete", [], [], [])
    assert r["hparams"]["TTT_MODE"] == "lora" and r["hparams"]["SLIDING_WINDOW_ENABLED"] is False
    assert r["legal_metric"] == {"name": "quantized_ttt_phased_exact", "val_loss": 1.88,
                                 "val_bpb": pytest.approx(1.88 * BPB_PER_NAT, abs=1e-8)}
    assert "final_int6_sliding_window_exact" not in r["final"] and "legal_ttt_exact" not in r["final"]
    assert r["final"]["quantized_ttt_phased"]["eval_time_ms"] == 400000
    ttt = r["ttt"]
    assert ttt["timer_started"] and ttt["chunks"] == [] and "budget_stop" not in ttt
    assert ttt["phased"] == {"total_docs": 50000, "prefix_docs": 2496, "suffix_docs": 47504, "num_phases": 3,
                             "boundaries": [832, 1664, 2496], "batches": 782}
    assert ttt["pauses"][0] == {"phase": 1, "of": 3, "gd": 832, "start_s": 40.1, "end_s": 65.3, "pause_s": 25.2}
    assert [(p["phase"], p["gd"], p["pause_s"]) for p in ttt["pauses"]] == [(1, 832, 25.2), (2, 1664, 25.2),
                                                                           (3, 2496, 25.2)]
    assert ttt["batches"] == [{"batch": 1, "of": 782, "rl": 2.3012, "rb": 1.0678, "gd": 0, "t_s": 10.2},
                              {"batch": 500, "of": 782, "rl": 2.2801, "rb": 1.0598, "gd": 3, "t_s": 300.0}]
    assert (r["ttt_eval_time_s"], r["eval_time_s"], r["final_eval_time_s"]) == (401.5, 401.5, 512.3)
    assert r["eval_time_source"] == "ttt_eval_time, from the first scored token"
    assert tool.parse_log(our_log(42, 1.88, ttt_s=380.0))["eval_time_source"] == "final_eval_time"  # chunk mode
    # the NLL dump's line, with its order file (train_gpt.py now) or without (before), is parsed, never config
    dump = "dump_token_nll:/runs/nll.npy order:/runs/nll.order.npy targets:62021632\n"
    r = tool.parse_log(lora_log(42, 1.88).replace("final_eval_time", dump + "final_eval_time"))
    assert r["dump"] == {"nll": "/runs/nll.npy", "order": "/runs/nll.order.npy", "targets": 62021632}
    assert r["status"] == "complete" and r["unparsed"] == []
    old_line = "dump_token_nll:x.npy targets:5\n"
    r = tool.parse_log(eval_only_log(42, 1.88).replace("final_eval_time", old_line + "final_eval_time"))
    assert r["dump"] == {"nll": "x.npy", "order": None, "targets": 5} and "targets" not in r["config"]
    assert tool.parse_log(our_log(42, 1.88))["dump"] is None


def test_new_packages_a_lora_record_and_check_passes(project, capsys):
    rc, folder = new_record(project, [x - 0.012 for x in PR549], make=lora_log)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert lines(out, "WARN") == [] and lines(out, "FAIL") == []
    assert "PASS  final metric used: quantized_ttt_phased_exact" in out
    assert ("PASS  seed 42: evaluation 401.5 s <= 600 s [ttt_eval_time, from the first scored token] "
            "(TTT pass 401.5 s [ttt_eval_time])" in out)
    assert ("PASS  seed 42: everything from reading the artifact 512.3 s <= 600 s [final_eval_time; the records' "
            "timer leaves it out]" in out)
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["metric"] == "quantized_ttt_phased_exact" and sub["compliance"]["score_first_ttt"] is True
    assert sub["seed_results"]["42"]["eval_time_s"] == 401.5 and sub["seed_results"]["42"]["ttt_eval_time_s"] == 401.5
    bpb = f"{(PR549[1] - 0.012) * BPB_PER_NAT:.8f}"
    assert f"| 42 | 6,800 | 86.78 | 590.1 | – | {bpb} | **{bpb}** |" in (folder / "README.md").read_text()
    # seeds of both modes claim different metrics: refused
    logs = make_logs(project, "mixed_a", [1.88], seeds=(1,)) + make_logs(project, "mixed_b", [1.88], seeds=(2,),
                                                                         make=lora_log)
    msg = refuse(project, logs, "seeds disagree on the final metric")
    assert "run_1.txt: legal_ttt_exact, run_2.txt: quantized_ttt_phased_exact" in msg


def test_lora_log_without_its_metric_is_missing_it(project):
    full = lora_log(9, 1.88)
    r = tool.parse_log(without(full, "quantized_ttt_phased_exact"))
    assert r["status"] == "truncated" and r["problems"] == [
        "quantized_ttt_phased has no quantized_ttt_phased_exact line", "no quantized_ttt_phased_exact line"]
    assert r["legal_metric"]["name"] == "final_int6_roundtrip_exact"  # never a rounded or missing metric
    # no TTT metric line at all: TTT_ENABLED with TTT_MODE=lora promised it (legal_ttt_exact is not asked for)
    r = tool.parse_log(without(full, "quantized_ttt_phased"))
    assert r["problems"] == ["no quantized_ttt_phased_exact line"]
    r = tool.parse_log(without(full, "quantized_ttt_phased", "beginning TTT", "ttt_phased", "ttp"))  # hparams alone
    assert r["ttt"] == {"chunks": []} and r["problems"] == ["no quantized_ttt_phased_exact line"]
    # a lineage log (no hparams) whose phased TTT pass began must end with its metric too
    lineage = (FIX / "lineage_sliding.log").read_text() + "\n".join(LORA_TTT[:3]) + "\n"
    assert tool.parse_log(lineage)["problems"] == ["no quantized_ttt_phased_exact line"]
    cut = {"no_metric.txt": without(full, "quantized_ttt_phased_exact"),
           "mid_metric.txt": full.rsplit("quantized_ttt_phased_exact", 1)[0]}
    for name, text in cut.items():
        (project / name).write_text(text)
    msg = refuse(project, [str(project / n) for n in cut], "incomplete runs")
    assert "no_metric.txt: truncated (quantized_ttt_phased has no quantized_ttt_phased_exact line; " \
           "no quantized_ttt_phased_exact line)" in msg
    assert "mid_metric.txt: truncated (quantized_ttt_phased has no quantized_ttt_phased_exact line; " \
           "no quantized_ttt_phased_exact line; no final_eval_time line)" in msg


@pytest.mark.parametrize("make,stop,parsed,warning", [
    (lora_log, LORA_STOP, {"batch": 641, "of": 782, "elapsed_s": 480.2, "projected_s": 612.9, "budget_s": 600},
     "TTT stopped early at batch 641/782 to stay in budget"),
    (our_log, "ttt:budget_stop chunk:3/1893 elapsed:560.1s projected:601.3s budget:600s",  # chunk mode, as before
     {"chunk": 3, "of": 1893, "elapsed_s": 560.1, "projected_s": 601.3, "budget_s": 600},
     "TTT stopped early at chunk 3/1893 to stay in budget"),
])
def test_check_warns_on_a_ttt_budget_stop(project, capsys, make, stop, parsed, warning):
    rc, folder = new_record(project, [x - 0.012 for x in PR549], make=make,
                            ttt=[*(LORA_TTT if make is lora_log else ()), stop])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert lines(out, "WARN") == [f"WARN  seed {s}: {warning}" for s in (1337, 2025, 42)]
    r = tool.parse_log((folder / "train_seed42.log").read_text())
    assert r["ttt"]["budget_stop"] == parsed and r["status"] == "complete" and r["unparsed"] == []


def test_required_metrics_follow_the_hparams():
    """Sliding is required unless SLIDING_WINDOW_ENABLED=False; the TTT metric is TTT_MODE's. A log without
    those hparams (before they existed) is chunk mode with sliding on."""
    full = our_log(9, 1.88)
    assert "SLIDING_WINDOW_ENABLED" not in full and "TTT_MODE" not in full
    r = tool.parse_log(without(full, "final_int6_sliding_window"))
    assert r["status"] == "truncated" and r["problems"] == ["no final_int6_sliding_window_exact line"]
    chunk_on = our_log(9, 1.88, hparams=["hparam:TTT_MODE=chunk", "hparam:SLIDING_WINDOW_ENABLED=True"])
    assert tool.parse_log(without(chunk_on, "final_int6_sliding_window"))["problems"] == [
        "no final_int6_sliding_window_exact line"]
    r = tool.parse_log(our_log(9, 1.88, hparams=["hparam:TTT_MODE=chunk"], sliding=False))
    assert (r["status"], r["legal_metric"]["name"]) == ("complete", "legal_ttt_exact")
    r = tool.parse_log(lora_log(9, 1.88, sliding=True))  # lora mode, no SLIDING_WINDOW_ENABLED line: sliding on
    assert tool.required_metrics(r) == [
        "final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "quantized_ttt_phased_exact"]
    assert r["status"] == "complete" and r["legal_metric"]["name"] == "quantized_ttt_phased_exact"
    assert tool.parse_log(without(lora_log(9, 1.88, sliding=True), "final_int6_sliding_window"))["problems"] == [
        "no final_int6_sliding_window_exact line"]
    r = tool.parse_log(our_log(9, 1.88, hparams=["hparam:TTT_MODE=sgd"]))
    assert r["problems"] == ["TTT_MODE=sgd: not a mode this tool knows (chunk, lora)"]


def test_compare_shows_the_phased_ttt_metric(tmp_path):
    (tmp_path / "chunk.txt").write_text(our_log(1, 1.88, ttt_s=380.0))
    (tmp_path / "lora.txt").write_text(lora_log(1, 1.87))
    runs = [r for p in ("chunk.txt", "lora.txt") for r in tool.load_runs(tmp_path / p)]
    md = tool.compare_table(runs, markdown=True).splitlines()
    rows = {cells[0]: cells[1:] for line in md[2:] if line.startswith("| ")
            for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert md[0] == "| metric | chunk | lora | Δ |"
    assert rows["TTT bpb"] == [f"{1.88 * BPB_PER_NAT:.8f}", f"{1.87 * BPB_PER_NAT:.8f}", f"{-0.01 * BPB_PER_NAT:+.8f}"]
    assert rows["sliding bpb"][1] == "–" and rows["metric"] == ["legal_ttt_exact", "quantized_ttt_phased_exact", ""]
    assert rows["TTT eval time s"] == ["380.0", "401.5", "+21.5"] and rows["eval time s"] == ["512.3", "401.5", "-110.8"]


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


def test_lora_eval_budget_is_the_ttt_timer_and_the_whole_evaluation_warns(project, capsys):
    """A lora run whose TTT pass fits but whose load + compile warm-up + TTT exceed 600 s: PASS on the
    records' timer, WARN on final_eval_time; a TTT pass over 600 s FAILs."""
    rc, _ = new_record(project, [x - 0.012 for x in PR549], name="Slow Warmup", make=lora_log, eval_s=655.0)
    out = capsys.readouterr().out
    assert rc == 0 and lines(out, "FAIL") == [], out
    warns = [x for x in lines(out, "WARN") if "everything from reading the artifact 655.0 s <= 600 s" in x]
    assert len(warns) == 3, out
    rc, _ = new_record(project, [x - 0.012 for x in PR549], name="Slow TTT", make=lora_log, ttt_s=601.0,
                       eval_s=700.0)
    out = capsys.readouterr().out
    assert rc != 0 and len([x for x in lines(out, "FAIL") if "evaluation 601.0 s <= 600 s" in x]) == 3, out
