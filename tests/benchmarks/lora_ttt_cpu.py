#!/usr/bin/env python3
"""Score-first TTT variants on one artifact at CPU scale, and the projected 8xH100 time of LoRA TTT.

Part 1 (runs): trains one PRESET=sp8192 model at CPU scale on real text (SP1024 data and tokenizer), then
evaluates the same artifact with EVAL_ARTIFACT, one train_gpt.py process per method: (a) sliding window,
(b) chunk TTT, (c) LoRA TTT without a phase at the default and a larger LoRA LR, (d) LoRA + 1 phase and
(e) LoRA + 3 phases at the better of the two. Prints (and with --out writes) a Markdown table of val_bpb,
its delta against (a), and the TTT / whole-evaluation wall times. Every method scores the same targets.
--later-rows runs instead (d) at --lr-large and, each alone on top of it, one later record's change: (f)
learned asymmetric logit softcaps (#1945), (g) a TTT context 1.25x the training length (#1953), (h) no Q/V
adapters (#1953/#2014), (i) no K adapter (#2135); deltas against (d), no part 2.

Part 2 (no run): `lora_ttt_cost` counts the FLOPs of TTT_MODE=lora as train_gpt.py schedules it (DocPlan's
length-sorted batches, a 48-token chunk re-running a window padded to lora_row_lengths, the pauses' SGD),
and `project_8xh100` turns them into seconds on 8 H100s at a stated MFU for the full-size sp8192 shape.

CPU scale is a proxy: a 128-wide model trained on ~1M tokens, windows of 256 tokens, a few dozen documents.

  python tests/benchmarks/lora_ttt_cpu.py --text-dir ../shared/data/text \\
      --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --out tests/benchmarks/results/lora_ttt_cpu_<date>.md
  python tests/benchmarks/lora_ttt_cpu.py ... --projection-only   # part 2 only (seconds)
  python tests/benchmarks/lora_ttt_cpu.py ... --later-rows --out .../lora_ttt_later_rows_cpu_<date>.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATE = "2026-11-29"
# PRESET=sp8192's architecture (11 layers, loops 3-5 twice more, lanes from 8, MLP 4x, XSA everywhere, gates)
# at CPU scale. EMA 0.99: the preset's 0.9965 would trail 200 steps by far (presets_cpu.py does the same).
SHAPE = dict(PRESET="sp8192", NUM_LAYERS=11, MODEL_DIM=128, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=1024,
             TRAIN_SEQ_LEN=256, EVAL_SEQ_LEN=256, EVAL_STRIDE=64, TRAIN_BATCH_TOKENS=4096, WARMUP_STEPS=1,
             MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=50, EMA_DECAY=0.99, COMPILE=0, EVAL_BATCH_SEQS=64)
# Evaluation settings every evaluation run sets explicitly (the artifact stores the training run's, and a
# re-evaluation adopts what is not set). The budget is off: on CPU a pass runs past 600 s, and TTT would stop
# adapting. Scale-dependent settings scaled to the 256-token context; the rest is #1855's (the table's defaults):
# chunk 48, rank 80, alpha 144, beta1 0, beta2 0.99, WD 0.5, warm-start A, global SGD LR 1e-3, 1 epoch.
# Pauses: a cosine chunk of 4 rows of 256 in steps of 8 rows (full size: 32,768 = 16 rows of 2048, steps of
# 32). Chunk mode: chunks of 4 rows of 256 (full size: 16 of 2048), 3 epochs, so ~18 chunks here.
EVAL = dict(EVAL_BUDGET_SECONDS=1e9, TTT_EVAL_SEQ_LEN=256, TTT_BATCH_SIZE=8, TTT_CHUNK_SIZE=48,
            GLOBAL_TTT_CHUNK_TOKENS=1024, GLOBAL_TTT_BATCH_SEQS=8, TTT_CHUNK_TOKENS=1024)
LOGDIR, ARTIFACT = "logs", "lora_ttt.int6.ptz"
LATER_TTT_LEN = SHAPE["TRAIN_SEQ_LEN"] * 5 // 4  # (g): #1953's 2560 is 1.25 x 2048


# ---------------------------------------------------------------------------------------------------------
# Part 1: the CPU runs
# ---------------------------------------------------------------------------------------------------------

def select_val(args, work: Path) -> tuple[Path, list[int]]:
    """The first --val-docs documents of the validation files with at most --max-doc-tokens SP1024 tokens
    (BOS included): one long document would make its batch of TTT_BATCH_SIZE rows run all its chunks."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    out, lengths = work / "val_selected.jsonl", []
    with out.open("w") as f:
        for path in sorted(Path(args.text_dir).glob("*val*.jsonl")):
            for line in open(path):
                if not line.strip() or len(lengths) >= args.val_docs:
                    continue
                n = len(sp.encode(json.loads(line)["text"])) + 1
                if n <= args.max_doc_tokens:
                    f.write(line if line.endswith("\n") else line + "\n")
                    lengths.append(n)
    return out, lengths


def build(args, work: Path) -> tuple[Path, list[int]]:
    val, lengths = select_val(args, work)
    train = [t for t in sorted(Path(args.text_dir).glob("*.jsonl")) if "val" not in t.name]
    data, stamp = work / "sp1024", json.dumps(dict(val=lengths, train=[str(t.resolve()) for t in train]))
    done = work / "selection.json"  # what the shards (and the artifact trained on them) were built from
    if not (data / "fineweb_val_000000.bin").exists() or not done.exists() or done.read_text() != stamp:
        (work / ARTIFACT).unlink(missing_ok=True)
        subprocess.run([sys.executable, str(ROOT / "data/build_shards.py"), "--input", *map(str, train),
                        "--val-input", str(val), "--tokenizer", str(args.tokenizer), "--output", str(data),
                        "--no-progress"], check=True)
        done.write_text(stamp)
    return data, lengths


def child_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def run_train_gpt(name: str, env_extra: dict, base: dict, work: Path, threads: int) -> tuple[str, float, float]:
    """Runs train_gpt.py; returns its log (prefixed FAILED on an error), wall and CPU seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({k: str(v) for k, v in (base | env_extra).items()}, RUN_ID=name)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0, c0 = time.perf_counter(), child_cpu()
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], cwd=work, env=env, capture_output=True,
                       text=True)
    took, cpu = time.perf_counter() - t0, child_cpu() - c0
    log_path = work / LOGDIR / f"{name}.txt"
    log = log_path.read_text() if log_path.exists() else ""
    if r.returncode:
        tail = "\n".join((log or r.stdout).splitlines()[-40:])
        print(f"{name} FAILED (rc {r.returncode}):\n{tail}\n{r.stderr[-3000:]}", file=sys.stderr)
    return (log if not r.returncode else f"FAILED rc={r.returncode}\n" + log + r.stderr), took, cpu


def grab(pat: str, log: str, cast=float):
    m = re.findall(pat, log, re.M)
    return cast(m[-1]) if m else None


METRICS = {"sliding": "final_int6_sliding_window", "chunk": "legal_ttt", "lora": "quantized_ttt_phased"}


def parse_eval(log: str, kind: str) -> dict:
    name = METRICS[kind]
    m = re.findall(rf"^{name}_exact val_loss:([\d.]+) val_bpb:([\d.]+)", log, re.M)
    row = dict(loss=float(m[-1][0]) if m else None, bpb=float(m[-1][1]) if m else None,
               ttt_s=grab(r"^ttt_eval_time:([\d.]+)s", log), final_s=grab(r"^final_eval_time:([\d.]+)s", log),
               roundtrip=grab(r"^final_int6_roundtrip_exact val_loss:[\d.]+ val_bpb:([\d.]+)", log),
               plan=grab(r"^(ttt_phased: .*)$", log, str), phases=re.findall(r"^(ttp[pr]: .*)$", log, re.M),
               failed=log.startswith("FAILED"))
    if kind == "sliding":  # its own pass time: the eval_time of the non-exact line
        row["pass_s"] = (grab(rf"^{name} val_loss:[\d.]+ val_bpb:[\d.]+ stride:\d+ eval_time:(\d+)ms", log)
                         or 0) / 1000
    else:
        row["pass_s"] = row["ttt_s"]
    return row


def methods(lr_small: float, lr_large: float, prefix: int, later: bool = False):
    """(label, kind, env) of each evaluation; (d)/(e) get their LR once (c) has picked it (None here).
    later: (d) at lr_large, then each later record's change alone on top of it."""
    lora = dict(TTT_ENABLED=1, TTT_MODE="lora", SLIDING_WINDOW_ENABLED=0, PHASED_TTT_PREFIX_DOCS=prefix)
    if later:
        d = lora | dict(PHASED_TTT_NUM_PHASES=1, TTT_LORA_LR=lr_large)
        return [(f"(d) LoRA TTT + 1 phase, LR {lr_large:g}", "lora", d),
                ("(f) + ASYM_LOGIT_RESCALE=1 (#1945)", "lora", d | dict(ASYM_LOGIT_RESCALE=1)),
                (f"(g) + TTT_EVAL_SEQ_LEN={LATER_TTT_LEN} (#1953)", "lora",
                 d | dict(TTT_EVAL_SEQ_LEN=LATER_TTT_LEN)),
                ("(h) + TTT_Q_LORA=0 TTT_V_LORA=0 (#1953, #2014)", "lora",
                 d | dict(TTT_Q_LORA=0, TTT_V_LORA=0)),
                ("(i) + TTT_K_LORA=0 (#2135)", "lora", d | dict(TTT_K_LORA=0))]
    return [("(a) sliding window", "sliding", dict(TTT_ENABLED=0, SLIDING_WINDOW_ENABLED=1)),
            ("(b) chunk TTT", "chunk", dict(TTT_ENABLED=1, TTT_MODE="chunk", SLIDING_WINDOW_ENABLED=0)),
            (f"(c) LoRA TTT, no phase, LR {lr_small:g}", "lora", lora | dict(PHASED_TTT_NUM_PHASES=0,
                                                                              TTT_LORA_LR=lr_small)),
            (f"(c) LoRA TTT, no phase, LR {lr_large:g}", "lora", lora | dict(PHASED_TTT_NUM_PHASES=0,
                                                                              TTT_LORA_LR=lr_large)),
            ("(d) LoRA TTT + 1 phase", "lora", lora | dict(PHASED_TTT_NUM_PHASES=1, TTT_LORA_LR=None)),
            ("(e) LoRA TTT + 3 phases", "lora", lora | dict(PHASED_TTT_NUM_PHASES=3, TTT_LORA_LR=None))]


def cpu_part(args, work: Path) -> tuple[list[str], dict]:
    (work / LOGDIR).mkdir(parents=True, exist_ok=True)
    data, lengths = build(args, work)
    base = SHAPE | dict(DATA_PATH=data, TOKENIZER_PATH=Path(args.tokenizer).resolve())
    artifact = work / ARTIFACT
    train_log, train_s, train_cpu = ("", 0.0, 0.0)
    if not artifact.exists() or args.retrain:
        train_log, train_s, train_cpu = run_train_gpt(
            "train", dict(ITERATIONS=args.steps, ARTIFACT_PATH=artifact, TTT_ENABLED=0,
                          SLIDING_WINDOW_ENABLED=0), base, work, args.threads)
        print(f"training: {train_s / 60:.1f} min, {train_cpu / 60:.1f} CPU min", flush=True)
        if train_log.startswith("FAILED"):
            sys.exit("training failed")
    elif (work / LOGDIR / "train.txt").exists():
        train_log = (work / LOGDIR / "train.txt").read_text()
    prefix = args.prefix_docs or len(lengths) // 2
    rows, lr = [], None
    for label, kind, env in methods(args.lr_small, args.lr_large, prefix, args.later_rows):
        if "TTT_LORA_LR" in env and env["TTT_LORA_LR"] is None:
            env = env | dict(TTT_LORA_LR=lr)
            label += f", LR {lr:g}"
        run_id = ("later_" if args.later_rows else "") + re.sub(r"\W+", "_", label).strip("_").lower()
        log, took, cpu = run_train_gpt(run_id, EVAL | env | dict(EVAL_ARTIFACT=artifact), base, work,
                                       args.threads)
        row = parse_eval(log, kind) | dict(label=label, kind=kind, minutes=took / 60, cpu_min=cpu / 60, env=env,
                                           tail="\n".join(log.splitlines()[-25:]))
        rows.append(row)
        print(f"{label}: val_bpb {row['bpb']} ttt {row['ttt_s']} s final {row['final_s']} s "
              f"({took / 60:.1f} min, {cpu / 60:.1f} CPU min)", flush=True)
        if label.startswith("(c)") and row["bpb"] is not None and (lr is None or row["bpb"] < best):
            lr, best = env["TTT_LORA_LR"], row["bpb"]
    if lr is None:
        lr = args.lr_small
    info = dict(lengths=lengths, prefix=prefix, lr=lr, train_s=train_s, train_cpu=train_cpu, train_log=train_log,
                data=data)
    return rows, info


def table(rows: list[dict]) -> list[str]:
    ref = rows[0]["bpb"]
    out = [f"| method | val_loss | val_bpb | delta vs {rows[0]['label'].split()[0]} | pass time (s) | "
           "final_eval_time (s) | run: min (CPU min) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        run = f"{r['minutes']:.1f} ({r['cpu_min']:.1f})"
        if r["bpb"] is None:
            out.append(f"| {r['label']} | failed | | | | | {run} |")
            continue
        delta = "" if r is rows[0] or ref is None else f"{r['bpb'] - ref:+.4f}"
        out.append(f"| {r['label']} | {r['loss']:.4f} | {r['bpb']:.4f} | {delta} | {r['pass_s'] or 0:.1f} | "
                   f"{r['final_s'] or 0:.1f} | {run} |")
    return out


# ---------------------------------------------------------------------------------------------------------
# Part 2: FLOPs of TTT_MODE=lora, as train_gpt.py schedules it, and the projected 8xH100 time
# ---------------------------------------------------------------------------------------------------------

def per_token_flops(d: int, heads: int, kv_heads: int, mlp_mult: float, passes: int, vocab: int,
                    rank: int, sites=("q", "k", "v", "o", "mlp")) -> tuple[float, float]:
    """Forward FLOPs per token (2 per multiply-add) of the dense matrices (17 layer passes + tied head) and
    of the LoRA adapters (rank r on each site per layer pass, with A: d -> r and B: r -> out, and the head's).
    Embeddings, norms, gates, rotary, XSA and the softcapped cross-entropy are left out (< 1%)."""
    kvd = kv_heads * (d // heads)
    out = dict(q=d, k=kvd, v=kvd, o=d, mlp=d)
    dense = passes * (d * d + 2 * d * kvd + d * d + 2 * d * int(mlp_mult * d)) + d * vocab
    lora = passes * sum(rank * (d + out[s]) for s in sites) + rank * (d + vocab)
    return 2.0 * dense, 2.0 * lora


def attn_flops(T: int, d: int, passes: int) -> float:
    """Forward FLOPs of causal attention over one row of T tokens: QK^T and AV, 2 T^2 d each per layer pass,
    halved by the causal kernels (flash / cuDNN skip the masked blocks)."""
    return passes * 2.0 * T * T * d


def doc_plan(lengths, *, context: int, chunk: int, batch: int, phases: int, prefix_docs: int,
             global_epochs: int):
    """train_gpt.py's own DocPlan (longest first, batches, pauses, the ranks' shares) and row lengths for
    documents of these lengths, laid end to end."""
    sys.path.insert(0, str(ROOT))
    import train_gpt as tg
    h = tg.Hyperparameters({k: str(v) for k, v in dict(
        TTT_EVAL_SEQ_LEN=context, TTT_CHUNK_SIZE=chunk, TTT_BATCH_SIZE=batch, PHASED_TTT_NUM_PHASES=phases,
        PHASED_TTT_PREFIX_DOCS=prefix_docs, GLOBAL_TTT_EPOCHS=global_epochs, RUN_ID="projection").items()})
    L = np.asarray(lengths, dtype=np.int64)
    lengths_ = tg.lora_row_lengths(h)
    return tg, tg.DocPlan(np.stack([np.cumsum(L) - L, L], axis=1), h, lengths_), lengths_


def lora_ttt_cost(lengths, *, d: int, heads: int, kv_heads: int, mlp_mult: float, passes: int, vocab: int,
                  context: int, chunk: int = 48, batch: int = 64, rank: int = 80, world: int = 8,
                  phases: int = 3, prefix_docs: int = 2500, global_batch_seqs: int = 32,
                  global_chunk_tokens: int = 32_768, global_epochs: int = 1, bwd_mult: float = 1.0,
                  sites=("q", "k", "v", "o", "mlp")) -> dict:
    """FLOPs of one TTT_MODE=lora pass as train_gpt.py runs it on `world` ranks.

    Scoring: batch q holds TTT_BATCH_SIZE documents (one per row, all rows computed, finished or not); its
    chunk c re-runs the window of min((c+1)*chunk, context) tokens ending at the chunk's end, padded to the
    next lora row length, forward, then (all but the batch's last chunk) backward. The backward is counted as
    bwd_mult x the dense forward (1: activation gradients only, the base weights take no gradient; 2: as if
    they did, the usual "3x forward"), 2x the adapters' forward (their input and weight gradients) and 2x
    the attention forward. The plan is train_gpt.DocPlan's: within each phase its rank_batches share the
    batches out, and ranks meet only at the pauses: `critical` is the sum over phases of the busiest rank's
    work; max(total / world, longest_batch) is the time with perfect balance.
    Pauses: SGD on every document scored so far (cut into rows of <= context targets of one document), in
    global batches of global_batch_seqs rows padded to the context (each rank: ceil(seqs / world) rows),
    forward + backward with weight gradients (3x forward), per cosine chunk of global_chunk_tokens targets."""
    dense, lora = per_token_flops(d, heads, kv_heads, mlp_mult, passes, vocab, rank, sites)
    tg, plan, Ls = doc_plan(lengths, context=context, chunk=chunk, batch=batch, phases=phases,
                            prefix_docs=prefix_docs, global_epochs=global_epochs)
    docs, ends, n_batches = plan.docs[:, 1], plan.ends, plan.n_batches
    # the cost of a batch whose longest document has n chunks, for every n: cumulative over chunks
    n_max = -(-int(docs[0]) // chunk)
    T = np.array([tg.row_length(Ls, min((c + 1) * chunk, context)) for c in range(n_max)], dtype=float)
    fwd = T * (dense + lora) + np.array([attn_flops(int(t), d, passes) for t in T])
    bwd = T * (bwd_mult * dense + 2 * lora) + 2 * np.array([attn_flops(int(t), d, passes) for t in T])
    cum = np.cumsum(fwd + bwd)
    chunks = -(-docs[::batch] // chunk)  # per batch: its first document is its longest
    batch_flops = batch * (cum[chunks - 1] - bwd[chunks - 1])  # the last chunk is scored, not trained on
    critical, steps = 0.0, 0  # the busiest rank's FLOPs and scoring steps (forward, backward, Adam)
    for lo, hi in plan.segments():
        shares = [plan.rank_batches(lo, hi, world, r) for r in range(world)]
        busiest = max(shares, key=lambda qs: batch_flops[qs].sum())
        critical, steps = critical + batch_flops[busiest].sum(), steps + int(chunks[busiest].sum())
    # pauses
    rows_per_rank = -(-global_batch_seqs // world)
    step_flops = rows_per_rank * (3 * context * dense + 3 * attn_flops(context, d, passes))
    pause_steps = []
    for e in ends:
        pieces = tg.doc_pieces(plan.scored(e), context)[:, 1]
        starts = np.cumsum(pieces) - pieces
        _, per_chunk = np.unique(starts // global_chunk_tokens, return_counts=True)
        pause_steps.append(int(global_epochs * np.sum(-(-per_chunk // global_batch_seqs))))
    return dict(docs=len(docs), targets=int(docs.sum()), batches=n_batches, ends=ends,
                longest_batch=float(batch_flops.max()), scoring_steps=steps,
                fwd_dense_per_token=dense, fwd_lora_per_token=lora,
                row_tokens=float(batch * np.sum(np.cumsum(T)[chunks - 1])),
                total=float(batch_flops.sum()), critical=float(critical),
                pause_steps=pause_steps, pause_flops_per_rank=float(sum(pause_steps) * step_flops))


FULL = dict(d=512, heads=8, kv_heads=4, mlp_mult=4.0, passes=17, vocab=8192, context=2048, chunk=48, batch=64,
            rank=80, world=8, global_batch_seqs=32, global_chunk_tokens=32_768)
H100_BF16 = 989e12
RECORD_LORA_S, RECORD_PAUSE_S = (380, 424), (75, 84)  # #1855's logs


def project_8xh100(lengths, phases: int = 3, prefix_docs: int = 2500, mfu: float = 0.35,
                   bwd_mult: float = 1.0) -> dict:
    """Seconds of the full-size sp8192 LoRA TTT pass on 8 H100s at `mfu` of 989 TFLOP/s bf16 per GPU."""
    c = lora_ttt_cost(lengths, phases=phases, prefix_docs=prefix_docs, bwd_mult=bwd_mult, **FULL)
    rate = mfu * H100_BF16
    balanced = max(c["total"] / FULL["world"], c["longest_batch"])
    return c | dict(lora_s=c["critical"] / rate, lora_balanced_s=balanced / rate,
                    pause_s=c["pause_flops_per_rank"] / rate)


def length_distributions(sample_sp1024: list[int], sample_bytes: list[int], n_targets: int, n_docs: int,
                         bytes_per_token: float) -> dict[str, np.ndarray]:
    """Document target counts for the full validation set (n_targets in about n_docs documents):
    log-normal with the record's mean and the sample's log-spread; the sample's shape scaled to the same
    mean; the sample as it is, tokens = bytes / bytes_per_token (its documents are longer than the mean)."""
    s = np.asarray(sample_sp1024, dtype=float)
    sigma = float(np.std(np.log(s)))
    mean = n_targets / n_docs
    q = (np.arange(n_docs) + 0.5) / n_docs
    from statistics import NormalDist
    z = np.array([NormalDist().inv_cdf(p) for p in q])
    lognormal = np.exp(math.log(mean) - sigma ** 2 / 2 + sigma * z)

    def fit(x):  # integer lengths >= 2 summing to n_targets
        x = np.maximum(np.round(x * n_targets / x.sum()), 2).astype(np.int64)
        x[np.argmax(x)] += n_targets - x.sum()
        return x

    tiled = np.resize(s, n_docs)
    as_is = np.asarray(sample_bytes, dtype=float) / bytes_per_token
    k = int(round(n_targets / as_is.mean()))
    return {f"log-normal (mean {mean:.0f}, sigma {sigma:.2f} of the sample's log-lengths)": fit(lognormal),
            f"sample's shape scaled to mean {mean:.0f}": fit(tiled),
            f"sample as is ({as_is.mean():.0f} tokens/doc at {bytes_per_token} B/token; {k:,} docs)":
                fit(np.resize(as_is, k))}


def sample_lengths(args) -> tuple[list[int], list[int]]:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
    toks, nbytes = [], []
    for path in sorted(Path(args.text_dir).glob("*val*.jsonl")):
        for line in open(path):
            if line.strip():
                text = json.loads(line)["text"]
                toks.append(len(sp.encode(text)) + 1)
                nbytes.append(len(text.encode("utf-8")))
    return toks, nbytes


def projection_part(args) -> list[str]:
    toks, nbytes = sample_lengths(args)
    dists = length_distributions(toks, nbytes, args.full_targets, args.full_docs, args.bytes_per_token)
    c = lora_ttt_cost(next(iter(dists.values())), **FULL)
    out = [f"Full size: PRESET=sp8192 (d 512, MLP 4x, 8 heads / 4 KV, 17 layer passes, vocab 8192), "
           f"TTT_EVAL_SEQ_LEN 2048, chunk 48, batch 64 per rank, rank 80 on q,k,v,o,mlp + head, 8 ranks; "
           f"{args.full_targets:,} targets. Forward per row token: dense {c['fwd_dense_per_token'] / 1e6:.1f} "
           f"MFLOP + LoRA {c['fwd_lora_per_token'] / 1e6:.1f} MFLOP + causal attention 2·T·d per layer pass "
           f"(T = row length; {attn_flops(2048, 512, 17) / 2048 / 1e6:.1f} MFLOP at T = 2048). Backward: "
           f"base weights take no gradient, so 1x the dense forward (activation gradients), 2x the adapters', "
           f"2x attention's (the \"3x forward\" column counts the dense backward at 2x). Pauses: SGD with "
           f"weight gradients (3x forward), 4 rows of 2048 per rank per step. Seconds at MFU "
           f"{args.mfu_low:.0%} / {args.mfu_high:.0%} of 989 TFLOP/s per H100. Sample: {len(toks)} validation "
           f"documents of {args.text_dir}, SP1024 mean {np.mean(toks):.0f} / median {np.median(toks):.0f} "
           f"tokens.", "",
           "| length distribution | docs | median | max | row tokens / target | scoring steps / rank | LoRA s "
           "(schedule) | LoRA s (balanced) | LoRA s, 3x forward | 3 phases s (steps) | 1 phase s | total s | "
           "MFU implied by 380-424 s | schedule at that MFU, s | pause ms/step implied by 75-84 s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, L in dists.items():
        lo = [project_8xh100(L, 3, mfu=m) for m in (args.mfu_high, args.mfu_low)]
        p1 = [project_8xh100(L, 1, mfu=m) for m in (args.mfu_high, args.mfu_low)]
        x3 = [project_8xh100(L, 3, mfu=m, bwd_mult=2.0) for m in (args.mfu_high, args.mfu_low)]
        rng = lambda key, rs: f"{rs[0][key]:.0f}-{rs[1][key]:.0f}"
        tot = [r["lora_s"] + r["pause_s"] for r in lo]
        balanced = lo[0]["lora_balanced_s"] * args.mfu_high * H100_BF16  # FLOPs on the busiest rank
        mfu = [balanced / (t * H100_BF16) for t in RECORD_LORA_S]
        steps = sum(lo[0]["pause_steps"])
        out.append(f"| {name} | {len(L):,} | {int(np.median(L))} | {int(L.max()):,} | "
                   f"{lo[0]['row_tokens'] / lo[0]['targets']:.1f} | {lo[0]['scoring_steps']:,} | "
                   f"{rng('lora_s', lo)} | "
                   f"{rng('lora_balanced_s', lo)} | {rng('lora_s', x3)} | {rng('pause_s', lo)} "
                   f"({steps:,}) | {rng('pause_s', p1)} | {tot[0]:.0f}-{tot[1]:.0f} | "
                   f"{mfu[1]:.0%}-{mfu[0]:.0%} | {RECORD_LORA_S[0] * lo[0]['critical'] / balanced:.0f}-"
                   f"{RECORD_LORA_S[1] * lo[0]['critical'] / balanced:.0f} | {RECORD_PAUSE_S[0] / steps * 1e3:.0f}-"
                   f"{RECORD_PAUSE_S[1] / steps * 1e3:.0f} |")
    out += ["", f"Records (#1855): LoRA pass {RECORD_LORA_S[0]}-{RECORD_LORA_S[1]} s + 3 phases "
            f"{RECORD_PAUSE_S[0]}-{RECORD_PAUSE_S[1]} s; the records' TTT timers 315-545 s. \"LoRA s (schedule)\" "
            "is train_gpt.py's (DocPlan.rank_batches: in each phase, batches longest first to the least loaded "
            "rank; ranks meet only at the pauses): the busiest rank's work; \"balanced\" is total / 8 (a work "
            "queue's, as #1855's counters), and the implied MFU is of its FLOPs. Per-step overheads (launches, the pauses' "
            "all-reduce) are not counted."]
    return out


def cpu_flops_line(rows: list[dict], info: dict) -> list[str]:
    """The same count at the CPU shape: what rate the CPU LoRA runs reached."""
    out = []
    for r in rows:
        if r["kind"] != "lora" or not r["ttt_s"]:
            continue
        env = EVAL | r["env"]
        sites = tuple(s for s in ("q", "k", "v", "o", "mlp") if int(env.get(f"TTT_{s.upper()}_LORA", 1)))
        c = lora_ttt_cost(info["lengths"], d=128, heads=4, kv_heads=2, mlp_mult=4.0, passes=17, vocab=1024,
                          context=env["TTT_EVAL_SEQ_LEN"], chunk=48, batch=EVAL["TTT_BATCH_SIZE"], rank=80,
                          world=1, phases=int(env["PHASED_TTT_NUM_PHASES"]), prefix_docs=info["prefix"],
                          global_batch_seqs=EVAL["GLOBAL_TTT_BATCH_SEQS"],
                          global_chunk_tokens=EVAL["GLOBAL_TTT_CHUNK_TOKENS"], sites=sites)
        flops = c["total"] + c["pause_flops_per_rank"]
        out.append(f"{r['label']}: {c['row_tokens']:,.0f} row tokens for {c['targets']:,} targets "
                   f"({c['row_tokens'] / c['targets']:.1f}x), {flops / 1e12:.2f} TFLOP counted, "
                   f"{flops / r['ttt_s'] / 1e9:.1f} GFLOP/s over its {r['ttt_s']:.0f} s.")
    return out


def git_head() -> str:
    """The commit, whether train_gpt.py differs from it, and the sha256 of the file the runs read."""
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "train_gpt.py"], cwd=ROOT).returncode
    sha = hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()[:12]
    return f"{r.stdout.strip() or '?'}{' + uncommitted changes' if dirty else ''}, sha256 {sha}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-dir", required=True, help="*.jsonl texts; files named *val* are the validation split")
    ap.add_argument("--tokenizer", required=True, help="the published SP1024 .model")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--val-docs", type=int, default=40, help="validation documents scored by every method")
    ap.add_argument("--max-doc-tokens", type=int, default=768, help="longer validation documents are skipped")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (1: shared cores)")
    ap.add_argument("--prefix-docs", type=int, default=0, help="PHASED_TTT_PREFIX_DOCS (0: half the documents)")
    ap.add_argument("--lr-small", type=float, default=1e-4, help="TTT_LORA_LR: #1855's")
    ap.add_argument("--lr-large", type=float, default=1e-3)
    ap.add_argument("--work", default="/tmp/lora_ttt_cpu")
    ap.add_argument("--retrain", action="store_true", help="train again even if --work holds an artifact")
    ap.add_argument("--projection-only", action="store_true")
    ap.add_argument("--later-rows", action="store_true", help="(d) and the later records' changes (f)-(i) only")
    ap.add_argument("--full-targets", type=int, default=47_851_520, help="#1855's validation targets")
    ap.add_argument("--full-docs", type=int, default=50_000)
    ap.add_argument("--bytes-per-token", type=float, default=3.73, help="SP8192's")
    ap.add_argument("--mfu-low", type=float, default=0.35)
    ap.add_argument("--mfu-high", type=float, default=0.40)
    ap.add_argument("--out", help="write the Markdown here")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    title = ("Later records' LoRA TTT changes at CPU scale" if args.later_rows else
             "Score-first TTT variants at CPU scale, and LoRA TTT's projected 8xH100 time")
    lines = [f"# {title} ({platform.node()}, {os.cpu_count()} cores, {DATE})", "",
             f"Command: `python {' '.join(sys.argv)}` (train_gpt.py: {git_head()}).", ""]
    if not args.projection_only:
        t0 = time.perf_counter()
        rows, info = cpu_part(args, work)
        L = np.array(info["lengths"])
        tl = info["train_log"]
        step_ms = grab(r"step_avg:([\d.]+)ms", tl) or 0
        post_ema = grab(r"^DIAGNOSTIC post_ema val_loss:[\d.]+ val_bpb:([\d.]+)", tl) or 0
        trained = (f"{info['train_s'] / 60:.1f} min ({info['train_cpu'] / 60:.1f} CPU min), " if info["train_s"]
                   else "the cached artifact's run, ")
        long = int((L > SHAPE["TRAIN_SEQ_LEN"]).sum())
        about = (f"Every row: TTT_LORA_LR={args.lr_large:g}, 1 phase. (g): {long} of the {len(L)} documents have "
                 f"more than {SHAPE['TRAIN_SEQ_LEN']} targets, the only ones whose windows (and pause rows) can "
                 f"see more context. pass time: `ttt_eval_time` (" if args.later_rows else
                 f"(d) and (e) use TTT_LORA_LR={info['lr']:g}, the better of (c). pass time: the sliding pass "
                 f"(a), `ttt_eval_time` (b-e; ")
        lines += [f"One artifact, {args.steps} training steps x {SHAPE['TRAIN_BATCH_TOKENS']} tokens; shape "
                  f"{', '.join(f'{k}={v}' for k, v in SHAPE.items())}. Every evaluation sets "
                  f"{', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in EVAL.items())}"
                  f" and EVAL_ARTIFACT; the rest is the preset's (#1855's TTT settings). Validation: the first "
                  f"{len(L)} documents of <= {args.max_doc_tokens} SP1024 tokens, {L.sum():,} tokens "
                  f"(median {int(np.median(L))}, max {L.max()}); PHASED_TTT_PREFIX_DOCS={info['prefix']}. "
                  f"Training: {trained}step_avg {step_ms:.0f} ms, post-EMA val_bpb {post_ema:.4f}, int6 "
                  f"roundtrip {rows[0]['roundtrip'] or 0:.4f}.", "",
                  *table(rows), "",
                  f"{about}lora mode from the first scored token, after the warm-up). "
                  f"Total wall time {(time.perf_counter() - t0) / 60:.1f} min, CPU time "
                  f"{child_cpu() / 60:.1f} min ({args.threads} thread(s) per run: OMP_NUM_THREADS).", ""]
        plans = [f"- {r['label']}: `{r['plan']}`" + "".join(f" `{p}`" for p in r["phases"])
                 for r in rows if r["plan"]]
        lines += ["Plans and pauses:", *plans, "", *[f"- {x}" for x in cpu_flops_line(rows, info)], ""]
        for r in rows:
            if r["failed"] or r["bpb"] is None:
                lines += [f"{r['label']} failed; log tail:", "```", r["tail"], "```", ""]
    if not args.later_rows:
        lines += ["## Projected 8xH100 time of the full-size LoRA TTT pass", "", *projection_part(args)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
