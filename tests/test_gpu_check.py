"""tests/benchmarks/gpu_check.py (issue 30), the check a lent GPU runs: its dry run takes every part
through the code the GPU run takes (tiny shapes, eager, CPU); the pieces that shape its numbers are checked
here."""
import importlib.util
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import ROOT

GC_PATH = ROOT / "tests" / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", GC_PATH)
gc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gc)
THEIRS = gc.PREPARED / "pr549" / "train_gpt.py"


def sections(report: str) -> dict[str, tuple[str, dict[str, str]]]:
    """part -> (outcome, {measure: value})"""
    out = {}
    for block in report.split("\n## ")[1:]:
        name = block.split(":")[0]
        if name not in gc.PARTS:
            continue
        outcome = re.search(r"Outcome: (.*)\.", block)
        rows = [r for r in re.findall(r"^\| (.+?) \| (.+?) \|$", block, re.M)
                if r[0] not in ("measure", "---")]
        out[name] = (outcome.group(1) if outcome else "", dict(rows))
    return out


def number(value: str) -> float:
    return float(value.split(";")[0].split(" ")[0].replace(",", ""))


def row(rows: dict, start: str) -> str:
    hits = [v for k, v in rows.items() if k.startswith(start)]
    assert len(hits) == 1, (start, list(rows))
    return hits[0]


def test_dry_run_measures_every_part(tmp_path):
    r = subprocess.run([sys.executable, str(GC_PATH), "--dry-run", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    [report] = tmp_path.glob("cpu_dry_run_*.md")
    assert list(tmp_path.glob("cpu_dry_run_*_logs.txt"))
    parts = sections(report.read_text())
    assert list(parts) == list(gc.PARTS)
    outcomes = {k: v[0] for k, v in parts.items()}
    assert outcomes == dict.fromkeys(gc.PARTS, "done") | (
        {} if THEIRS.exists() else {"train_theirs": "skipped: nothing to time"}), outcomes
    caveats = report.read_text().split("## Caveats")[1]  # the device's own: a dry run's, no H200's
    assert "- A dry run: tiny shapes on the CPU." in caveats and "H200" not in caveats
    projected = re.findall(r"^- (\w+): (.+?): ", report.read_text().split("## Projections")[1], re.M)
    assert len(projected) == len(gc.PROJECTIONS)
    assert all(n == part and k.startswith(start) for (n, k), (part, start) in zip(projected, gc.PROJECTIONS))
    pr549, sp8192 = parts["train_pr549"][1], parts["train_sp8192"][1]
    for rows, states in ((pr549, ("plain",)), (sp8192, ("plain", "looped"))):
        assert not any(k.startswith("looped") for k in rows) or "looped" in states
        for s in states:
            assert number(row(rows, f"{s} step ms")) > 0 and number(row(rows, f"{s} tokens/s")) > 0
            assert "%" in row(rows, f"{s} model TFLOP/s")
        assert number(row(rows, "steps in 588 s")) > 0
    # the looped step is timed with the loop on (sp8192: 17 layer passes, not 11); pr549 never loops
    h = tg.Hyperparameters(dict(PRESET="sp8192"))
    looped = h.NUM_LAYERS + h.NUM_LOOPS * (h.LOOP_END - h.LOOP_START + 1)
    assert number(row(sp8192, "looped layer passes")) == looped > h.NUM_LAYERS
    plain = number(row(sp8192, "plain layer passes"))
    assert plain == h.NUM_LAYERS == number(row(pr549, "plain layer passes"))
    ev, lora = parts["eval_pr549"][1], parts["lora_sp8192"][1]
    for measure in ("sliding windows/s", "sliding, full", "chunk TTT tokens/s", "chunk TTT, full"):
        assert number(row(ev, measure)) > 0
    assert number(row(lora, "documents/s")) > 0 and number(row(lora, "LoRA TTT, full split")) > 0
    for q in ("quant_pr549", "quant_sp8192"):
        rows = parts[q][1]
        assert number(row(rows, "GPTQ solve s")) > 0 and number(row(rows, "Hessians s per batch")) > 0
        model, code, total = (number(v) for v in re.findall(r"[\d,]+", row(rows, "artifact bytes")))
        assert model + code == total <= tg.DEFAULTS["SIZE_CAP_BYTES"]
    theirs = parts["train_theirs"][1]
    if not THEIRS.exists():
        assert "run --prepare" in row(theirs, "skipped")
        return
    # the same model: every setting both scripts read is ours, so the parameter counts agree
    assert row(theirs, "params") == row(pr549, "params")
    assert row(theirs, "attention (theirs)").startswith(("sdpa", "fa3"))
    ratio = re.search(r"ours/theirs .*: ([\d.]+)\*\* \(([\d.]+) ms / ([\d.]+) ms\)", report.read_text())
    assert ratio and float(ratio[1]) == pytest.approx(float(ratio[2]) / float(ratio[3]), abs=1e-3)


def test_out_of_time_parts_are_reported(tmp_path):
    """Past the budget the parts are stopped, each says so, the report is written and the exit is non-zero."""
    r = subprocess.run([sys.executable, str(GC_PATH), "--dry-run", "--budget", "0.5", "--out-dir",
                        str(tmp_path), "--parts", "quant_pr549", "train_pr549"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 1
    [report] = tmp_path.glob("cpu_dry_run_*.md")
    parts = sections(report.read_text())
    assert {k: v[0] for k, v in parts.items()} == {"quant_pr549": "not timed: out of time",
                                                   "train_pr549": "not timed: out of time"}


def test_doc_stream_holds_the_lengths_it_is_given():
    lengths = gc.sample_doc_lengths(300, 812.5)
    assert lengths.mean() == pytest.approx(812.5, rel=0.01) and lengths.min() >= 2
    real = tg.find_docs(torch.from_numpy(tg.read_shard(str(ROOT / "data/sample/fineweb_val_000000.bin"))
                                         .astype(np.int64)))[:, 1]
    # the shape of the real distribution survives the scaling: the same spread relative to the mean
    assert np.std(lengths) / lengths.mean() == pytest.approx(np.std(real) / real.mean(), rel=0.35)
    val, val_bytes = gc.doc_stream(lengths, 8192, "cpu")
    docs = tg.find_docs(val)
    assert docs[:, 1].tolist() == lengths.tolist() and val.numel() == lengths.sum() + 1
    assert int((val == tg.BOS_ID).sum()) == len(lengths) and val_bytes.sum() == val.numel()


@pytest.mark.parametrize("preset,looping", [("pr549", False), ("sp8192", False), ("sp8192", True)])
def test_step_flops_match_torch_flop_counter(preset, looping):
    """The MFU's FLOPs: the matrix products torch counts in a forward and backward of the same tokens (on the
    CPU it counts no attention kernel), plus causal attention's 6 T^2 d per row and layer pass."""
    from torch.utils.flop_counter import FlopCounterMode
    h = tg.Hyperparameters(dict(PRESET=preset, COMPILE="0", **{k: str(v) for k, v in gc.TINY_SHAPE.items()}))
    model = tg.build_model(h, tg.Context(h))
    model.looping = looping
    x = torch.randint(0, h.VOCAB_SIZE, (2, h.TRAIN_SEQ_LEN))
    with FlopCounterMode(display=False) as counter:
        model(x, x).mean().backward()
    assert set(map(str, counter.get_flop_counts()["Global"])) == {"aten.mm"}
    attention = 6 * len(model.order()) * x.numel() * h.TRAIN_SEQ_LEN * h.MODEL_DIM
    counted = counter.get_total_flops() + attention
    assert gc.step_flops(model, h, x.numel()) == pytest.approx(counted, rel=0.005)


def test_prepare_refuses_another_script(tmp_path):
    fake = tmp_path / gc.PR549_RECORD
    fake.parent.mkdir(parents=True)
    fake.write_text("print('not the record')\n")
    prepare = [sys.executable, str(GC_PATH), "--prepare"]
    r = subprocess.run(prepare + [str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and f"not PR #549's record script ({gc.PR549_SHA256})" in r.stderr
    r = subprocess.run(prepare + [str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert r.returncode == 1 and "no such file (give a checkout of openai/parameter-golf)" in r.stderr
