#!/usr/bin/env python3
"""Does every preset fit the 16,000,000-byte cap at full size? Codec table, full-size proof, trained estimate.

1. Codecs: the quantization benchmark's CPU-trained model (4 layers, 256 wide, SP1024, 300 steps; cached in
   --quant-work), quantized with each preset's quantization settings; every codec train_gpt.py has, plus for
   comparison `lrzip -z` (#1855's ZPAQ, a system binary) and PPMd (pyppmd, when installed), on every group
   and transform: bytes, seconds to compress and to decompress.
2. Full size: train_gpt.py itself, per preset, at the preset's full shape: 2 steps of a tiny batch, then the
   real Hessians, GPTQ, packing and cap fit, with the compressed code size. Near-init weights.
3. Trained estimate: bytes per value of each group of (1), scaled to the full-size artifact's value counts.

  python tests/benchmarks/size_fit_cpu.py --text-dir ../shared/data/text \\
      --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --out tests/benchmarks/results/size_fit_cpu_<date>.md
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]
import quant_schemes_cpu as qs  # noqa: E402
import train_gpt as tg  # noqa: E402
from presets_cpu import build  # noqa: E402

CAP = 16_000_000
QUANT_KEYS = [s.name for s in tg.HPARAMS if s.group == "quantization"]
# The full-size runs: the preset's shape, a tiny batch, 2 steps, no TTT or sliding pass (sizes only).
FULL = dict(ITERATIONS=2, WARMUP_STEPS=0, TRAIN_SEQ_LEN=256, TRAIN_SEQ_SCHEDULE="", EVAL_SEQ_LEN=256,
            TRAIN_BATCH_TOKENS=2048, GPTQ_CALIB_BATCHES=4, MAX_WALLCLOCK_SECONDS=0, GPTQ_RESERVE_SECONDS=0, VAL_LOSS_EVERY=0,
            TTT_ENABLED=0, SLIDING_WINDOW_ENABLED=0, COMPILE=0, EVAL_BATCH_SEQS=16)


PRESETS = [p for p in tg.PRESETS if p != "sp8192"]  # one run per configuration: sp8192 is pr1855's other name


def quant_settings(preset: str) -> dict:
    return {k: v for k, v in tg.PRESETS[preset].items() if k in QUANT_KEYS}


def trained_entries(args, work: Path) -> dict[str, dict]:
    """{preset: entries}: the benchmark model quantized with each preset's quantization settings."""
    data = qs.build_data(args, work)
    trained = qs.train(data, args, work)
    h, ctx, model, _, _ = qs.setup(data, args)
    model.load_state_dict(trained["state"], strict=True)
    loader = tg.DistributedTokenLoader(f"{data}/fineweb_train_*.bin", 0, 1, ctx.device, h.VOCAB_SIZE, h.SEED)
    clock = tg.Clock(ctx)
    clock.start()
    with tg.fp32_matmuls():
        hess = tg.collect_hessians(model, loader, h, ctx, clock, tg.Budget(h))
        return {p: tg.quantize_state(model, hess, qs.hparams(data, args, **quant_settings(p)), ctx)
                for p in PRESETS}


def lrzip(raw: bytes) -> tuple[int, float, float]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "g"
        path.write_bytes(raw)
        t0 = time.perf_counter()
        subprocess.run(["lrzip", "-z", "-q", "-f", str(path)], check=True, capture_output=True)
        t1 = time.perf_counter()
        path.unlink()
        subprocess.run(["lrzip", "-d", "-q", "-f", f"{path}.lrz"], check=True, capture_output=True)
        assert path.read_bytes() == raw
        return (Path(f"{path}.lrz")).stat().st_size, t1 - t0, time.perf_counter() - t1


def ppmd(raw: bytes) -> tuple[int, float, float]:
    """PPMd var. H, order 2, with the length stored (4 bytes): pyppmd's one-shot var. I round trip failed on
    5 of our 26 group/transform streams (48 bytes too many, or 'Corrupted input data')."""
    import pyppmd
    t0 = time.perf_counter()
    enc = pyppmd.Ppmd7Encoder(2, 1 << 26)
    stream = enc.encode(raw) + enc.flush()
    t1 = time.perf_counter()
    assert pyppmd.Ppmd7Decoder(2, 1 << 26).decode(stream, len(raw)) == raw
    return len(stream) + 4, t1 - t0, time.perf_counter() - t1


def codec_rows(entries: dict) -> list[tuple]:
    """(group, values, transform, codec, bytes, compress s, decompress s) for every combination."""
    rows = []
    for g, items in tg.group_tensors(entries).items():
        for tr in tg.TRANSFORMS[items[0].t.element_size()]:
            raw = tg.encode_group(items, tr)
            for name in tg.available_codecs():
                c = tg._codec(name)
                t0 = time.perf_counter()
                stream = c.compress(raw)
                t1 = time.perf_counter()
                assert c.decompress(stream) == raw
                rows.append((g, len(raw), tr, name, len(stream), t1 - t0, time.perf_counter() - t1))
            if shutil.which("lrzip"):
                rows.append((g, len(raw), tr, "lrzip -z", *lrzip(raw)))
            if importlib.util.find_spec("pyppmd"):
                rows.append((g, len(raw), tr, "ppmd", *ppmd(raw)))
            print(rows[-1], flush=True)
    return rows


def full_size(preset: str, data: Path, tok: Path, vocab: int, work: Path) -> dict:
    """One full-shape run of train_gpt.py (a copy of today's file) up to its packed artifact."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({k: str(v) for k, v in FULL.items()}, PRESET=preset, DATA_PATH=str(data), TOKENIZER_PATH=str(tok),
               VOCAB_SIZE=str(vocab), RUN_ID=f"full_{preset}", ARTIFACT_PATH=str(work / f"full_{preset}.ptz"))
    t0 = time.time()
    r = subprocess.run([sys.executable, "train_gpt.py"], cwd=work, env=env, capture_output=True, text=True)
    log = (work / "logs" / f"full_{preset}.txt").read_text()
    if r.returncode:
        sys.exit(f"{preset} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    grab = lambda pat: re.search(pat, log, re.M)  # noqa: E731
    entries = tg.read_artifact(str(work / f"full_{preset}.ptz"))[2]
    values = {g: sum(it.t.numel() for it in items) for g, items in tg.group_tensors(entries).items()}
    groups = {g: int(b) for g, b in re.findall(r"(\S+?)=\w+/\w+:(\d+)", grab(r"^compression: .*")[0])}
    return dict(preset=preset, params=int(grab(r"model_params:(\d+)")[1]), values=values, groups=groups,
                header=int(grab(r"header:(\d+)")[1]), model=int(grab(r"^Serialized model \S+: (\d+)")[1]),
                code=int(grab(r"^Code size \(compressed\): (\d+)")[1]),
                raw_code=int(grab(r"^Code size \(uncompressed\): (\d+)")[1]),
                fit=[m for m in re.findall(r"^size_fit: .*", log, re.M)], minutes=(time.time() - t0) / 60)


def estimate(run: dict, small: dict) -> dict:
    """Each group's bytes per value on the trained small model, times the full-size value count."""
    report = tg.pack(small, {}, {})[1]
    est = {g: round(n * report[g]["bytes"] / report[g]["values"]) if g in report else run["groups"][g]
           for g, n in run["values"].items()}
    return dict(groups=est, model=sum(est.values()) + run["header"])


def render(rows_by_preset: dict, runs: list[dict], ests: dict, args) -> str:
    out = [f"# Bytes at full size: codecs, the cap fit per preset, a trained estimate ({platform.node()}, "
           f"{os.cpu_count()} cores, {datetime.date.today()})", "",
           f"Command: `python tests/benchmarks/size_fit_cpu.py --text-dir {args.text_dir_arg} --tokenizer "
           f"{args.tokenizer_arg}`. torch {torch.__version__}.", "",
           "## 1. Codecs on a CPU-trained model's groups", "",
           "The quantization benchmark's model (4 layers, 256 wide, SP1024, 300 steps on real text), quantized "
           "with each preset's quantization settings. Bytes per group and transform; seconds to compress / "
           "decompress on this machine (ZPAQ with one thread per 4 MiB: one here). Bold: the smallest.", ""]
    for preset, rows in rows_by_preset.items():
        codecs = list(dict.fromkeys(r[3] for r in rows))
        out += [f"### {preset} quantization ({', '.join(f'{k}={v}' for k, v in quant_settings(preset).items()) or 'defaults'})",
                "", "| group | transform | raw bytes | " + " | ".join(codecs) + " |",
                "|---|---|---|" + "---|" * len(codecs)]
        for key in dict.fromkeys((r[0], r[2]) for r in rows):
            cells = [r for r in rows if (r[0], r[2]) == key]
            best = min(r[4] for r in cells)
            fmt = lambda r: (f"**{r[4]:,}**" if r[4] == best else f"{r[4]:,}") + f" ({r[5]:.2f}/{r[6]:.2f} s)"  # noqa: E731
            out.append(f"| {key[0]} | {key[1]} | {cells[0][1]:,} | " + " | ".join(fmt(r) for r in cells) + " |")
        totals = {c: sum(min(r[4] for r in rows if r[3] == c and r[0] == g) for g in dict.fromkeys(r[0] for r in rows))
                  for c in codecs}
        picked = sum(min(r[4] for r in rows if r[0] == g and r[3] in tg.CODECS) for g in dict.fromkeys(r[0] for r in rows))
        out += ["", "Best transform per group, one codec for all groups: "
                + ", ".join(f"{c} {n:,}" for c, n in totals.items())
                + f"; train_gpt.py's per-group choice: **{picked:,}**.", ""]
    out += ["## 2. Full size on CPU, and the trained estimate", "",
            f"train_gpt.py per preset at its full shape ({', '.join(f'{k}={v}' for k, v in FULL.items())}; SP8192 "
            "tokenizer trained on the sample by data/build_shards.py). The code counted is the compressed wrapper "
            "of the file as run. Near-init weights compress unlike trained ones: the estimate scales each "
            "group's bytes per value on the trained model of section 1 (same preset's quantization) to the "
            "full-size value counts.", "",
            "| preset | params | code (raw -> shipped) | model bytes (near init) | headroom / fit | "
            "trained estimate | estimated headroom | minutes |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        est = ests[run["preset"]]
        head = CAP - run["code"] - run["model"]
        fit = "; ".join(f.removeprefix("size_fit: ") for f in run["fit"] if "pruned" in f or "over by" in f)
        out.append(f"| {run['preset']} | {run['params']:,} | {run['raw_code']:,} -> {run['code']:,} | {run['model']:,} "
                   f"| {fit or f'{head:,} under'} | {est['model']:,} | {CAP - run['code'] - est['model']:,} "
                   f"| {run['minutes']:.1f} |")
    out += ["", "Per group (full size near init -> trained estimate):", ""]
    for run in runs:
        est = ests[run["preset"]]["groups"]
        out.append(f"- {run['preset']}: " + ", ".join(
            f"{g} {run['values'][g]:,} values {run['groups'][g]:,} -> {est[g]:,}" for g in run["values"]))
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-dir", required=True, help="*.jsonl texts; files named *val* are the validation split")
    ap.add_argument("--tokenizer", required=True, help="the published SP1024 .model")
    ap.add_argument("--val-docs", type=int, default=60)
    ap.add_argument("--work", default="/tmp/size_fit_cpu")
    ap.add_argument("--quant-work", default="/tmp/quant_schemes_cpu", help="the quantization benchmark's cache")
    ap.add_argument("--out", help="write the Markdown report here")
    args = ap.parse_args()
    args.text_dir_arg, args.tokenizer_arg = args.text_dir, args.tokenizer
    args.text_dir, args.tokenizer = os.path.abspath(args.text_dir), os.path.abspath(args.tokenizer)
    args.out = args.out and os.path.abspath(args.out)
    work, qwork = Path(args.work), Path(args.quant_work)
    for d in (work / "logs", qwork / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    os.chdir(qwork)
    small = trained_entries(args, qwork)
    rows = {p: codec_rows(e) for p, e in small.items()}
    data = build(args, work)
    shutil.copy(ROOT / "train_gpt.py", work / "train_gpt.py")  # the file as it is now, whatever edits follow
    vocab = {p: tg.Hyperparameters({"PRESET": p}).VOCAB_SIZE for p in PRESETS}
    runs = [full_size(p, *data[f"sp{vocab[p]}"], work) for p in PRESETS]
    ests = {r["preset"]: estimate(r, small[r["preset"]]) for r in runs}
    text = render(rows, runs, ests, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
