#!/usr/bin/env python3
"""PRESET=pr549 vs PRESET=sp8192 on the same real text for the same training tokens, at CPU scale.

Builds SP1024 shards (the published tokenizer) and SP8192 shards (a tokenizer trained here on the same
training documents) from one text sample, then trains each preset with the same small width, sequence
length, batch and step count, and prints a Markdown table of their val_bpb (tokenizer-independent: both
count the same validation bytes). Every other setting is the preset's. CPU scale is a proxy: a few
million tokens, a 128-wide model; the 8xH100 ranking needs the real run.

  python tests/benchmarks/presets_cpu.py --text-dir ../shared/data/text \\
      --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --out tests/benchmarks/results/presets_cpu_<date>.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The same CPU-scale shape for both presets: 11 layers (so the preset's loop 3-5 and lanes from 8 are real).
SHAPE = dict(NUM_LAYERS=11, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, TRAIN_SEQ_LEN=256, EVAL_SEQ_LEN=256,
             EVAL_STRIDE=256, TRAIN_BATCH_TOKENS=4096, WARMUP_STEPS=1, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0,
             TRAIN_LOG_EVERY=50, TTT_ENABLED=0, EMA_DECAY=0.99, COMPILE=0, EVAL_BATCH_SEQS=64)


def build(args, work: Path) -> dict[str, tuple[Path, Path, int]]:
    texts = sorted(Path(args.text_dir).glob("*.jsonl"))
    val = [t for t in texts if "val" in t.name]
    train = [t for t in texts if t not in val]
    common = ["--input", *map(str, train), "--val-input", *map(str, val), "--val-docs", str(args.val_docs), "--no-progress"]
    out = {}
    for vocab, tok, extra in ((1024, Path(args.tokenizer), []), (8192, work / "sp8192.model", ["--train-tokenizer", "8192"])):
        data = work / f"sp{vocab}"
        if not (data / "fineweb_val_000000.bin").exists():
            subprocess.run([sys.executable, str(ROOT / "data/build_shards.py"), *common, "--tokenizer", str(tok),
                            "--output", str(data), *extra], check=True)
        out[f"sp{vocab}"] = (data, tok, vocab)
    return out


def run(preset: str, data: Path, tok: Path, vocab: int, steps: int, work: Path, name: str = "") -> dict:
    """train_gpt.py with `preset` at SHAPE on `data`; the parsed log, under `name` (default: the preset)."""
    name = name or preset
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({k: str(v) for k, v in SHAPE.items()}, PRESET=preset, DATA_PATH=str(data), TOKENIZER_PATH=str(tok),
               VOCAB_SIZE=str(vocab), ITERATIONS=str(steps), RUN_ID=f"bench_{name}")
    if preset == "pr549":  # its 3500 of ~7,200 steps at 8xH100 ~ the last half; sp8192 warms down by fraction
        env["WARMDOWN_ITERS"] = str(steps // 2)
    t0 = datetime.datetime.now()
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=work, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return parse(name, (work / "logs" / f"bench_{name}.txt").read_text(), datetime.datetime.now() - t0)


def parse(preset: str, log: str, took: datetime.timedelta) -> dict:
    grab = lambda pat: float(re.findall(pat, log, re.M)[-1])  # the last match: step_avg over the whole run
    return dict(preset=preset, params=int(grab(r"^model_params:(\d+)")),
                val_bytes=int(grab(r"^val_bpb:byte_\w+(?::enabled files:\d+)? bytes:(\d+)")),
                step_ms=grab(r"^step:\d+/\d+ train_loss:[\d.]+ train_time:\d+ms step_avg:([\d.]+)ms tok_s"),
                prequant=grab(r"^DIAGNOSTIC post_ema val_loss:[\d.]+ val_bpb:([\d.]+)"),
                roundtrip=grab(r"^final_int6_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)"),
                bytes=int(grab(r"^Serialized model int6\+\w+: (\d+) bytes")),
                minutes=took.total_seconds() / 60)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-dir", required=True, help="*.jsonl texts; files named *val* are the validation split")
    ap.add_argument("--tokenizer", required=True, help="the published SP1024 .model")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--val-docs", type=int, default=60, help="leading validation documents scored (the same for both)")
    ap.add_argument("--work", default="/tmp/presets_cpu")
    ap.add_argument("--out", help="write the Markdown table here")
    args = ap.parse_args()
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data = build(args, work)
    rows = [run("pr549", *data["sp1024"], args.steps, work), run("sp8192", *data["sp8192"], args.steps, work)]
    tokens = args.steps * SHAPE["TRAIN_BATCH_TOKENS"]
    lines = [f"# PRESET=pr549 vs PRESET=sp8192 at CPU scale ({machine()})", "",
             f"Same text, {args.steps} steps x {SHAPE['TRAIN_BATCH_TOKENS']} tokens = {tokens:,} training tokens each; "
             f"shape {', '.join(f'{k}={v}' for k, v in SHAPE.items())}; the rest is each preset's. "
             "val_bpb counts the same validation bytes for both tokenizers. A CPU-scale proxy, not the 8xH100 result.",
             "", "| preset | params | ms/step | pre-quant val_bpb | int6 roundtrip val_bpb | model bytes | minutes |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['params']:,} | {r['step_ms']:.0f} | {r['prequant']:.4f} | {r['roundtrip']:.4f} | "
              f"{r['bytes']:,} | {r['minutes']:.1f} |" for r in rows]
    emit(lines, args.out)


def machine() -> str:
    """Where and when a result was measured, for its heading."""
    return f"{platform.node()}, {os.cpu_count()} cores, {datetime.date.today()}"


def emit(lines: list[str], out: str | None):
    """Print the Markdown, and write it to `out` if given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
