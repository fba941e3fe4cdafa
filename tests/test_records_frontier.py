"""records/tool.py on the frontier's own logs: one fixture per log format of the #549 -> #2135 lineage, cut from
the seed logs of the records (tests/fixtures/records/frontier/README.md says which), every value below as the
log states it."""
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONTIER = ROOT / "tests" / "fixtures" / "records" / "frontier"
spec = importlib.util.spec_from_file_location("records_tool", ROOT / "records" / "tool.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)

SUM = "sum of final_*/TTT metrics' eval_time (excludes load and compile)"
TIMER = "total_eval_time, from the first scored token"
# file: (seed, steps, train_time_ms, claimed metric, val_loss, val_bpb, code bytes counted, total, eval s, its source)
FORMATS = {
    # #549: step:N/M lines, rounded metric lines each followed by an _exact twin, chunk TTT
    "pr549_seed1337.log": (1337, 7179, 600128, "legal_ttt_exact", 1.88976776, 1.11922988, 89458, 15977386,
                           6.562 + 74.066 + 410.268, SUM),
    # #1060: GPTQ calibrated on training data after the loop
    "pr1060_seed1337.log": (1337, 6709, 586090, "final_int6_sliding_window_exact", 1.87728338, 1.1118359, 96398,
                            15973962, 6.393 + 78.358, SUM),
    # #1218 file log: Hyperparameters: block, then the source, versions + nvidia-smi; N/M lines in minutes
    "pr1218_seed42.log": (42, 5967, 590022, "final_int6_sliding_window_exact", 2.52523582, 1.0974384, 68207,
                          15915268, 5.122 + 65.493, SUM),
    # #1413: quantized / quantized_sliding_window at full precision, legal_ttt_exact with its eval_time
    "pr1413_seed0.log": (0, 5082, 588035, "legal_ttt_exact", 2.79517119, 1.08209788, 16719, 15991018,
                         7.815 + 83.62 + 293.43, SUM),
    # #1493: chunk TTT named quantized_ttt
    "pr1493_seed42.log": (42, 4550, 588047, "quantized_ttt_exact", 2.79180191, 1.08079352, 16630, 15991930,
                          25.515 + 120.961 + 366.525, SUM),
    # #1530 file log with a Source code: banner; LoRA TTT without phases, timed by total_eval_time
    "pr1530_train2.txt": (2, 4847, 587072, "quantized_ttt_lora_exact", 2.77493185, 1.07426259, 26845, 15984798,
                          313.0, TIMER),
    # #1610: a unix time before every line; one pause without phase numbers
    "pr1610_train0.txt": (0, 4832, 587091, "quantized_ttt_phased_exact", 2.76951521, 1.07216564, 28599,
                          15996697, 500.1, TIMER),
    # #1855: three phases, lrzip decompression before each evaluation
    "pr1855_seed42.log": (42, 4945, 599592, "quantized_ttt_phased_exact", 2.31944212, 1.05989454, 31999,
                          15897259, 508.8, TIMER),
    # #2135: n-gram precompute inside the TTT timer, one phase
    "pr2135/train_seed42.log": (42, 5001, 599672, "quantized_ttt_phased_exact", 2.311159, 1.05610947, 37155,
                                15947490, 540.1, TIMER),
}


def parse(name: str, edit=lambda text: text) -> dict:
    return tool.parse_log(edit((FRONTIER / name).read_text()))


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_parses_to_the_numbers_its_log_states(name):
    seed, steps, train_ms, metric, loss, bpb, code, total, eval_s, source = FORMATS[name]
    r = parse(name)
    assert (r["status"], r["problems"], r["unknown_metrics"]) == ("complete", [], [])
    assert (r["seed"], r["steps"], r["train_time_ms"], r["stop_reason"]) == (seed, steps, train_ms, "wallclock_cap")
    assert r["legal_metric"] == {"name": metric, "val_loss": loss, "val_bpb": bpb, **(
        {"eval_time_ms": 293430} if name.startswith("pr1413") else {})}  # #1413 prints no rounded twin
    assert (r["sizes"]["code"], r["sizes"]["total"]) == (code, total)
    assert r["eval_time_s"] == pytest.approx(eval_s) and r["eval_time_source"] == source
    assert r["train"] and r["val"] and set(r["diagnostics"]) == {"post_ema"}  # pre-quantization: never claimed


def test_the_1218_lineage_header_step_lines_and_byte_lines():
    r = parse("pr1218_seed42.log")
    assert r["env"]["pytorch"] == "2.11.0+cu130" and len(r["env"]["gpus"]) == 8 and r["env"]["source_lines"] == 3
    assert r["config"]["world_size"] == 8 and r["config"]["logfile"] == "logs/42.txt" and r["hparams"] == {}
    # train_time: 9.1m and tok/s: 7955783 at step 5500: the mean step is batch / tok/s
    assert r["train"][-1] == {"step": 5500, "train_loss": 2.567, "tok_s": 7955783, "step_avg_ms": 98.85,
                              "train_time_ms": round(5500 * 98.85)}
    assert [(v["step"], v["val_bpb"]) for v in r["val"]] == [(0, 3.6152), (4000, 1.1621), (5967, 1.1053)]
    assert r["final"]["final_int6_roundtrip_exact"] == {"val_loss": 2.56767905, "val_bpb": 1.11588374}
    assert r["diagnostics"]["post_ema"] == {"val_loss": 2.54059689, "val_bpb": 1.10411414, "eval_time_ms": 1741}
    assert r["gptq"]["reserve_ms"] == 10_000 and r["calibration_end_ms"] == 590022 + 8200
    r = parse("pr1530_train2.txt")  # the Source code: banner between rules
    assert r["env"]["pytorch"] == "2.9.1+cu128" and r["env"]["source_lines"] == 3 and r["config"]["seed"] == 2
    assert r["sizes"]["code_raw"] == 116694 and r["sizes"]["model"] == 15957953


def test_phased_ttt_the_eval_split_and_the_unix_time_prefix():
    r = parse("pr1855_seed42.log")
    assert [(p["phase"], p["gd"], p["pause_s"]) for p in r["ttt"]["pauses"]] == [(1, 833, 16.6), (2, 1666, 29.8),
                                                                                 (3, 2500, 38.0)]
    assert r["ttt"]["phased"]["boundaries"] == [833, 1666, 2500] and r["calibration_end_ms"] == 599592 + 4700
    assert r["eval_parts"] == {"decompress": 44.4, "roundtrip": 49.995, "TTT compile warm-up": 137.6,
                               "TTT global SGD": 84.4, "TTT scoring": round(508.785 - 84.4, 3)}
    r = parse("pr2135/train_seed42.log")
    assert r["eval_parts"] == {"roundtrip": 10.347, "TTT compile warm-up": 91.1, "n-gram precompute": 200.89,
                               "TTT global SGD": 24.6, "TTT scoring": round(540.111 - 200.89 - 24.6, 3)}
    r = parse("pr1610_train0.txt")
    assert r["ttt"]["pauses"] == [{"phase": 1, "of": 1, "pd": 2448, "gd": 2000, "start_s": 251.3, "end_s": 301.1,
                                   "pause_s": 49.8}]
    assert not any(u[:1].isdigit() for u in r["unparsed"])  # the time prefix is gone from every line


def test_an_unknown_metric_line_is_reported_never_claimed(tmp_path, capsys):
    line = "quantized_ttt_ngram val_loss:2.20000000 val_bpb:1.00000000 eval_time:1000ms"
    r = parse("pr1855_seed42.log", lambda t: t.replace("total_eval_time", f"{line}\nwibble:x y\ntotal_eval_time"))
    assert r["unknown_metrics"] == ["quantized_ttt_ngram", "quantized_ttt_ngram_exact"]
    assert r["legal_metric"]["val_bpb"] == 1.05989454 and r["unparsed"][-1] == "wibble:x y"
    folder = frontier_folder(tmp_path)
    (folder / "train_seed42.log").write_text((folder / "train_seed42.log").read_text() + line + "\n")
    tool.main(["check", str(folder)])
    out = capsys.readouterr().out
    assert "WARN  seed 42: metric names not in the allowed list (not claimable): ['quantized_ttt_ngram', " in out


@pytest.mark.parametrize("name, cut, missing", [
    ("pr1855_seed42.log", "quantized_ttt_phased val_loss", "no quantized_ttt_phased_exact line"),
    ("pr1530_train2.txt", "quantized_ttt_lora val_loss", "no quantized_ttt_lora_exact line"),
    ("pr549_seed1337.log", "legal_ttt_exact", "legal_ttt has no legal_ttt_exact line"),
])
def test_a_frontier_log_cut_before_its_ttt_score_is_truncated(name, cut, missing):
    r = parse(name, lambda t: "\n".join(x for x in t.splitlines() if cut not in x))
    assert r["status"] == "truncated" and missing in r["problems"]


def frontier_folder(tmp_path: Path) -> Path:
    """#2135's three seed logs and submission.json. Its train_gpt.py is not ours to ship: a stand-in of the size
    the logs state (Code size (uncompressed): 191274) takes its place; check reads only its size and imports."""
    folder = tmp_path / "2026-05-01_SP8192_PR2130Base_Calib32"
    shutil.copytree(FRONTIER / "pr2135", folder)
    stand_in = "# stand-in for #2135's train_gpt.py\n"
    (folder / "train_gpt.py").write_text(stand_in + "#" * (191274 - len(stand_in) - 1) + "\n")
    return folder


def test_check_on_a_frontier_folder_passes_every_rule_it_can_verify_but_the_one_it_broke(tmp_path, capsys):
    """#2135 (05-01) passes everything check can recompute, except that GPTQ's Hessians came from training data
    after the 600 s cap: loop end + 6.9 s (frontier.md §3.3: #1868 re-ran to prove Hessians end by 600 s)."""
    assert tool.main(["check", str(frontier_folder(tmp_path))]) == 1
    out = capsys.readouterr().out
    fails = [x for x in out.splitlines() if x.startswith("FAIL")]
    assert fails == [f"FAIL  seed {s}: GPTQ calibration ended at {ms} ms <= 600000 (training clock)"
                     for s, ms in ((0, 599608 + 6900), (314, 599593 + 6900), (42, 599672 + 6900))]
    for text in ["a record needs 3 seeds: found 3", "seed 42: logged uncompressed code size 191274 == train_gpt.py "
                 "size 191274", "seed 42: compressed model 15910335 + code 37155 == logged total 15947490",
                 "seed 0: training ended at 599608 ms <= 600000", "seed 0: evaluation 567.1 s <= 600 s [" + TIMER,
                 "final metric used: quantized_ttt_phased_exact", "all seeds ran one configuration",
                 "submission.json val_bpb 1.05650768 == mean legal val_bpb 1.05650768",
                 "submission.json bytes_total 15947490 == max over seeds", "submission.json compliance matches"]:
        assert f"PASS  {text}" in out
    assert ("WARN  seed 42: the total counts 37,155 compressed code bytes; with train_gpt.py as shipped (191,274 "
            "bytes) it is 16,101,609 (over the cap)") in out


def test_the_progression_rule_between_frontier_rows(tmp_path, capsys):
    """#2135 against #1855 (its README's baseline) on the fixtures' per-seed val_bpb."""
    prev = tmp_path / "prev"
    prev.mkdir()
    shutil.copy(FRONTIER / "pr1855_seed42.log", prev / "train_seed42.log")
    (prev / "train_seed0.log").write_text((FRONTIER / "pr1855_seed42.log").read_text().replace(
        "seed: 42", "seed: 0").replace("val_bpb:1.05989454 eval_time:508785ms", "val_bpb:1.06124613 eval_time:1ms"))
    tool.main(["check", str(frontier_folder(tmp_path)), "--against", str(prev)])
    out = capsys.readouterr().out
    prev_mean = (1.05989454 + 1.06124613) / 2
    assert f"prev {prev_mean:.8f} (n=2), new 1.05650768 (n=3)" in out and "PASS  vs prev, progression rule" in out


def test_a_folder_with_its_logs_in_logs_and_compare_with_the_eval_split(tmp_path, capsys):
    folder = tmp_path / "rec"
    (folder / "logs").mkdir(parents=True)
    shutil.copy(FRONTIER / "pr1530_train2.txt", folder / "logs" / "train2.txt")  # #1530 and #1610 keep them there
    assert [r["seed"] for r in tool.load_runs(folder)] == [2]
    plots = tmp_path / "plots"
    tool.main(["compare", str(FRONTIER / "pr1855_seed42.log"), str(folder), "--plots", str(plots)])
    rows = {line.split("  ")[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["eval: TTT global SGD s"][-2:] == ["84.4", "–"]
    assert rows["eval: TTT compile warm-up s"][-3:] == ["137.6", "135.0", "-2.6"]
    assert rows["TTT bpb"][-3:] == ["1.05989454", "1.07426259", "+0.01436805"]
    assert sorted(p.name for p in plots.iterdir()) == ["eval_time_split.png", "step_time_vs_step.png",
                                                       "train_loss_vs_step.png", "train_loss_vs_time.png",
                                                       "val_bpb_vs_step.png"]
