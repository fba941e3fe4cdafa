"""End to end on CPU: train -> calibrate -> pack -> reload -> roundtrip, sliding and legal TTT."""
import hashlib
import importlib.util
import json
import os
import re

import numpy as np
import pytest

import train_gpt as tg
from conftest import ROOT, metric, run_script, tiny_env


def shipped_code() -> bytes:
    """The one-line program a record of train_gpt.py ships, whose size the run counts."""
    return tg.wrap_code((ROOT / "train_gpt.py").read_text())


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    env = tiny_env(tiny_tokenizer, tiny_data, ITERATIONS=30, VAL_LOSS_EVERY=10, DUMP_TOKEN_NLL=d / "nll.npy")
    r = run_script(d, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return d, env, (d / "logs" / "tiny.txt").read_text()


def test_validation_loss_falls(trained):
    _, _, log = trained
    vals = [float(v) for v in re.findall(r"^step:\d+/30 val_loss:([\d.]+)", log, re.M)]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.3, vals


def test_log_has_lineage_lines_and_proves_bytes(trained):
    d, _, log = trained
    for pat in (r"^model_params:\d+", r"^hparam:SEED=7$", r"^attention_backend:sdpa", r"^ema:applying EMA weights$",
                r"^rope_base:10000\.00 rope_scaling:ntk1024 rope_dims:4 train_seq_len:32$",
                r"^gptq:calibration end train_time:\d+ms tokens:\d+", r"^final_int6_roundtrip_exact ", r"^quant_gap val_bpb:",
                r"^final_int6_sliding_window val_loss:[\d.]+ val_bpb:[\d.]+ stride:8 eval_time:\d+ms",
                r"^legal_ttt_exact ", r"^final_eval_time:"):
        assert re.search(pat, log, re.M), pat
    total = int(re.search(r"^Total submission size int6\+\w+: (\d+) bytes", log, re.M).group(1))
    assert total == os.path.getsize(d / "final_model.int6.ptz") + len(shipped_code())
    raw = int(re.search(r"^Code size \(uncompressed\): (\d+) bytes", log, re.M).group(1))
    assert raw == os.path.getsize(ROOT / "train_gpt.py")
    assert log.startswith('"""Parameter Golf training script')


def test_eval_artifact_reproduces_numbers(trained, tmp_path):
    """README's re-evaluation command, with only the data paths set: the artifact's evaluation settings (the
    tiny run's EVAL_SEQ_LEN=32, stride 8, TTT chunks ...) are used, and every logged number is reproduced."""
    d, env, log = trained
    env = {k: env[k] for k in ("DATA_PATH", "TOKENIZER_PATH")}
    env.update(EVAL_ARTIFACT=str(d / "final_model.int6.ptz"), RUN_ID="re", DUMP_TOKEN_NLL=str(tmp_path / "nll.npy"))
    r = run_script(tmp_path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    relog = (tmp_path / "logs" / "re.txt").read_text()
    for name in ("final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact"):
        assert metric(relog, name) == metric(log, name)
    gap = re.compile(r"^quant_gap val_bpb:\S+$", re.M)
    assert gap.findall(relog) == gap.findall(log) != []
    assert re.search(r"^eval_setting:from_artifact .*EVAL_SEQ_LEN=32 EVAL_STRIDE=8", relog, re.M)
    assert "step:" not in relog.split("=" * 100)[-1]  # no training happened
    a, b = np.load(d / "nll.npy"), np.load(tmp_path / "nll.npy")
    assert a.dtype == np.float32 and np.array_equal(a, b) and (a > 0).all()


def test_eval_artifact_explicit_setting_wins_and_is_logged(trained, tmp_path):
    """An evaluation setting set explicitly overrides the artifact's, says so, and the quant gap (measured
    at the run's EVAL_SEQ_LEN) is not printed for another evaluation."""
    d, env, log = trained
    env = dict(DATA_PATH=env["DATA_PATH"], TOKENIZER_PATH=env["TOKENIZER_PATH"], EVAL_SEQ_LEN="16", EVAL_STRIDE="8", RUN_ID="re16",
               EVAL_ARTIFACT=str(d / "final_model.int6.ptz"), TTT_ENABLED="0")
    r = run_script(tmp_path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    relog = (tmp_path / "logs" / "re16.txt").read_text()
    assert re.search(r"^eval_setting:EVAL_SEQ_LEN=16 set explicitly; the run used 32$", relog, re.M)
    assert re.search(r"^eval_setting:TTT_ENABLED=False set explicitly; the run used True$", relog, re.M)
    assert re.search(r"^quant_gap:n/a \(prequant scored \d+ targets at EVAL_SEQ_LEN=32\)$", relog, re.M)
    assert "legal_ttt_exact" not in relog.split("=" * 100)[-1] and metric(relog, "final_int6_roundtrip") != metric(log, "final_int6_roundtrip")


def records_tool():
    spec = importlib.util.spec_from_file_location("records_tool", ROOT / "records" / "tool.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_records_tool_reads_our_log(trained):
    """records/tool.py parses a real log of this script: complete, with the legal metric and byte total."""
    tool = records_tool()
    _, _, log = trained
    run = tool.parse_log(log)
    assert run["status"] == "complete", run.get("problems")
    assert run["legal_metric"]["name"] == "legal_ttt_exact"
    assert run["legal_metric"]["val_bpb"] == metric(log, "legal_ttt_exact")[1]
    assert run["sizes"]["total"] <= 16_000_000
    assert run["env"]["source_sha256"] == hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()


def test_records_tool_packages_and_checks_a_real_log(trained, tmp_path, capsys):
    """`new` on a real log: it ships the counted wrapper as train_gpt.py and the script beside it, the log matches
    them byte for byte, one configuration, and every rule passes but the record's own: one seed is not three,
    and a tiny run is not on 8×H100 (without nvidia-smi the log cannot say, a WARN)."""
    tool = records_tool()
    d, _, log = trained
    args = ["new", str(d / "logs" / "tiny.txt"), "--name", "tiny", "--author", "a", "--github-id", "a", "--date",
            "2026-01-01", "--records-dir", str(tmp_path / "records"), "--top-level", str(tmp_path / "submission.json")]
    assert tool.main(args) == 1
    out = capsys.readouterr().out
    folder = tmp_path / "records" / "2026-01-01_tiny"
    assert (folder / "train_gpt.py").read_bytes() == shipped_code()
    assert (folder / "train_gpt_readable.py").read_bytes() == (ROOT / "train_gpt.py").read_bytes()
    assert "PASS  seed 7: the script source in the log is train_gpt.py or train_gpt_readable.py" in out
    assert "PASS  train_gpt.py decompresses byte for byte to train_gpt_readable.py without comments and " \
           "docstrings" in out
    assert "PASS  train_gpt.py needs nothing outside its folder" in out
    hardware = tool._hardware(tool.parse_log(log))  # None on a machine without nvidia-smi
    fails = ["FAIL  a record needs 3 seeds: found 1"]
    unknown = "WARN  seed 7: hardware unknown (no nvidia-smi GPU lines in the log); a record runs on 8×H100"
    if hardware is None:
        assert unknown in out
    else:
        fails.append(f"FAIL  seed 7: ran on {hardware} with world_size 1; a record runs on 8×H100")
    assert [x for x in out.splitlines() if x.startswith("FAIL")] == fails, out
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["bytes_total"] == os.path.getsize(d / "final_model.int6.ptz") + len(shipped_code())
    assert sub["compliance"]["score_first_ttt"] and not sub["compliance"]["three_seeds"]
    assert sub["hardware"] == hardware
    assert sub["compliance"]["hardware_8xh100"] is (None if hardware is None else False)


def test_records_tool_reads_an_eval_only_log(trained, tmp_path):
    """EVAL_ARTIFACT re-scores a saved model: parse calls it an evaluation-only run, not an unfinished one,
    and new refuses it as a seed log before writing anything."""
    tool = records_tool()
    d, env, log = trained
    art = str(d / "final_model.int6.ptz")
    r = run_script(tmp_path, dict(env, EVAL_ARTIFACT=art, RUN_ID="re", DUMP_TOKEN_NLL=""))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tool.parse_log((tmp_path / "logs" / "re.txt").read_text())
    assert (run["kind"], run["status"], run["problems"]) == ("eval_only", "complete", [])
    assert run["eval_model"] == art and run["invalid"] == []
    assert run["legal_metric"]["val_bpb"] == metric(log, "legal_ttt_exact")[1]
    args = ["new", str(tmp_path / "logs" / "re.txt"), "--name", "re", "--author", "a", "--github-id", "a",
            "--records-dir", str(tmp_path / "records"), "--top-level", str(tmp_path / "submission.json")]
    with pytest.raises(SystemExit, match="a record needs the training log"):
        tool.main(args)
    assert not (tmp_path / "records").exists() and not (tmp_path / "submission.json").exists()
