#!/usr/bin/env python3
"""PRESET=sp8192 on SP8192 against SP8192 with CaseOps, at CPU scale: the same text, the same training tokens,
bpb charged on the same bytes.

Builds from one text sample two datasets with data/build_shards.py: SP8192 (a tokenizer trained on the plain
training documents) and CaseOps SP8192 (--caseops: one trained on their transform, its operators reserved).
Both write the validation byte sidecar, so both scores charge each validation document's original UTF-8
bytes. Then it trains PRESET=sp8192 at presets_cpu.py's CPU shape on each for the same steps and batch, and
prints a Markdown table. CPU scale is a proxy: a few million tokens, a 128-wide model.

  python tests/benchmarks/caseops_cpu.py --text-dir ../shared/data/text \\
      --out tests/benchmarks/results/caseops_cpu_<date>.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from presets_cpu import ROOT, SHAPE, emit, machine, run  # tests/benchmarks is on sys.path when run as a script


def build(args, work: Path) -> dict[str, tuple[Path, Path, dict]]:
    """Both datasets (built once, kept in `work`) and their manifests."""
    texts = sorted(Path(args.text_dir).glob("*.jsonl"))
    val = [t for t in texts if "val" in t.name]
    train = [t for t in texts if t not in val]
    out = {}
    for name, flag in (("sp8192", "--byte-sidecar"), ("sp8192_caseops", "--caseops")):
        data, tok = work / name, work / f"{name}.model"
        if not (data / "manifest.json").exists():
            subprocess.run([sys.executable, str(ROOT / "data/build_shards.py"), "--input", *map(str, train),
                            "--val-input", *map(str, val), "--tokenizer", str(tok), "--train-tokenizer", "8192",
                            flag, "--output", str(data), "--no-progress"], check=True)
        out[name] = (data, tok, json.loads((data / "manifest.json").read_text()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-dir", required=True, help="*.jsonl texts; files named *val* are the validation split")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", default="/tmp/caseops_cpu")
    ap.add_argument("--out", help="write the Markdown table here")
    args = ap.parse_args()
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data = build(args, work)
    rows = [(run("sp8192", d, tok, 8192, args.steps, work, name), m) for name, (d, tok, m) in data.items()]
    tokens = args.steps * SHAPE["TRAIN_BATCH_TOKENS"]
    lines = [f"# SP8192 vs SP8192 + CaseOps at CPU scale ({machine()})", "",
             f"PRESET=sp8192 on each, the same text, {args.steps} steps x {SHAPE['TRAIN_BATCH_TOKENS']} tokens = "
             f"{tokens:,} training tokens; shape {', '.join(f'{k}={v}' for k, v in SHAPE.items())}. Both charge "
             "bpb from a byte sidecar: the validation documents' original UTF-8 bytes (the scored cut drops "
             "each stream's last partial window, so the totals differ by that tail). A CPU-scale proxy.", "",
             "| data | val tokens | val bytes scored | bytes/token | params | ms/step | pre-quant val_bpb | "
             "int6 roundtrip val_bpb | model bytes | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r, m in rows:
        val = m["splits"]["val"]
        lines.append(f"| {r['preset']} | {val['tokens']:,} | {r['val_bytes']:,} | "
                     f"{m['byte_sidecar']['bytes'] / (val['tokens'] - val['documents']):.3f} | {r['params']:,} | "
                     f"{r['step_ms']:.0f} | {r['prequant']:.4f} | {r['roundtrip']:.4f} | {r['bytes']:,} | "
                     f"{r['minutes']:.1f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
