"""Parameter Golf training script: 11-layer GQA GPT -> full-GPTQ int6 artifact -> sliding + score-first TTT.

Launch: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (CUDA, bf16, compile, NCCL), or
`python train_gpt.py` as one process (CPU: fp32, SDPA, no compile). Sections in pipeline order: config ->
runtime -> data -> tokenizer/bpb/scoring -> model -> optimizers -> training -> quantize/pack -> TTT -> main.
"""
from __future__ import annotations

import ast
import base64
import contextlib
import copy
import dataclasses
import datetime
import difflib
import glob
import hashlib
import importlib
import io
import itertools
import json
import lzma
import math
import os
import struct
import subprocess
import sys
import time
import tokenize
import traceback
import uuid
import zlib
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

# Every setting, once: (env var, default, doc[, domain]), by group. The type is the default's (11 is an int,
# 11.0 a float); the domain is a tuple of choices, ">0", ">=0" or an interval "[lo,hi]"/"(lo,hi)". The
# defaults are PR #549's (README: "Where we differ"); PRESET swaps in another record's values, and an env
# var wins over both. The model group shapes the model: the artifact stores it.
SETTINGS = {
    "data": [
        ("DATA_PATH", "./data/datasets/fineweb10B_sp1024", "fineweb_{train,val}_*.bin shards"),
        ("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model"),
    ],
    "model": [
        ("VOCAB_SIZE", 1024, "the tokenizer's (uint16 ids)", "[1,65535]"),
        ("NUM_LAYERS", 11, "transformer blocks", ">0"),
        ("MODEL_DIM", 512, "residual width", ">0"),
        ("NUM_HEADS", 8, "query heads", ">0"),
        ("NUM_KV_HEADS", 4, "key/value heads", ">0"),
        ("MLP_MULT", 3.0, "MLP width / MODEL_DIM"),
        ("LOGIT_SOFTCAP", 30.0, "cap * tanh(logit / cap)"),
        ("ROPE_BASE", 10000.0, "RoPE base"),
        ("ROPE_SCALING", "ntk1024", "ntk1024: #549's base past 1024 tokens", ("ntk1024", "none")),
        ("ROPE_DIMS", 16, "rotated head dims (even)"),
        ("LN_SCALE", True, "block input * 1/sqrt(layer + 1)"),
        ("QK_GAIN_INIT", 1.5, "initial query gain"),
        ("XSA_LAST_N", 4, "layers with exclusive self-attention", ">=0"),
        ("BIGRAM_VOCAB_SIZE", 1536, "BigramHash buckets (0: off)", ">=0"),
        ("BIGRAM_DIM", 128, "BigramHash width"),
        ("VE_LAYERS", "9,10", "layers with value embeddings"),
        ("VE_DIM", 128, "value-embedding width"),
        ("SMEAR_GATE", "static", "#549's, or #1851's BOS-masked", ("static", "bos", "off")),
        ("SPARSE_ATTN_GATE_ENABLED", False, "head gates on x[:12] (#1787)"),
        ("SPARSE_ATTN_GATE_SCALE", 1.0, "their logit scale"),
        ("SKIP_GATES_ENABLED", False, "skips as a learned lerp (#1218)"),
        ("NUM_LOOPS", 0, "extra passes over LOOP_START..LOOP_END", ">=0"),
        ("LOOP_START", 3, "first looped layer", ">=0"),
        ("LOOP_END", 5, "last looped layer"),
        ("PARALLEL_START_LAYER", 0, "first two-lane layer (0: off)", ">=0"),
    ],
    "optimizer": [
        ("MATRIX_LR", 0.025, "Muon, banks"),
        ("SCALAR_LR", 0.025, "AdamW, scalars and small matrices"),
        ("TIED_EMBED_LR", 0.035, "AdamW, embedding tables"),
        ("TIED_EMBED_INIT_STD", 0.005, "tied embedding init"),
        ("MUON_MOMENTUM", 0.99, "after the warm-up"),
        ("MUON_MOMENTUM_WARMUP_START", 0.92, "at step 0"),
        ("MUON_MOMENTUM_WARMUP_STEPS", 1500, "linear warm-up steps"),
        ("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations", ">0"),
        ("MUON_ROW_NORMALIZE", False, "MuonEq-R (#1285)"),
        ("MUON_POLAR_EXPRESS", False, "Polar Express (#1787)"),
        ("MUON_WD", 0.04, "weight decay: banks"),
        ("EMBED_WD", 0.04, "embedding tables"),
        ("ADAM_WD", 0.04, "scalars and small matrices"),
        ("BETA1", 0.9, "AdamW beta1"),
        ("BETA2", 0.95, "AdamW beta2"),
        ("ADAM_EPS", 1e-8, "AdamW eps"),
        ("GRAD_CLIP_NORM", 0.3, "global, after averaging ranks (<= 0: off)"),
    ],
    "schedule": [
        ("TRAIN_SEQ_LEN", 2048, "also resolves ntk1024's base", ">0"),
        ("TRAIN_SEQ_SCHEDULE", "", "L@share,...: length L until that share of training (#2014)"),
        ("SEQ_CHANGE_WARMUP_STEPS", 0, "LR ramp over this many steps after a length change", ">=0"),
        ("TRAIN_BATCH_TOKENS", 786_432, "per step, all ranks", ">0"),
        ("ITERATIONS", 9000, "step cap", ">=0"),
        ("WARMUP_STEPS", 20, "compile warm-up, undone", ">=0"),
        ("WARMDOWN_ITERS", 3500, "LR warmdown steps (as time when capped)", ">=0"),
        ("WARMDOWN_FRAC", 0.0, "or share of training (set one)", "[0,1]"),
        ("MIN_LR", 0.0, "LR multiplier floor", "[0,1]"),
        ("ENABLE_LOOPING_AT", 0.35, "share of training, then layers loop", "[0,1]"),
        ("MAX_WALLCLOCK_SECONDS", 600.0, "training + GPTQ budget (<= 0: none)"),
        ("GPTQ_RESERVE_SECONDS", 12.0, "its end: EMA, Hessians, GPTQ"),
        ("EMA_DECAY", 0.997, "EMA: the final weights", "(0,1)"),
        ("SWA_WEIGHT", 0.0, "(1 - w) EMA + w SWA", "[0,1]"),
        ("SWA_EVERY", 50, "steps per SWA snapshot", ">0"),
        ("SWA_START_LR", 0.2, "snapshots below this LR multiplier"),
        ("VAL_LOSS_EVERY", 4000, "steps per validation (0: last)", ">=0"),
        ("TRAIN_LOG_EVERY", 500, "steps per log line (0: first 10)", ">=0"),
    ],
    "quantization": [
        ("GPTQ_CALIB_BATCHES", 16, "per-rank batches for Hessians", ">=0"),
        ("GPTQ_BLOCK_SIZE", 128, "columns per block", ">0"),
        ("GPTQ_DAMP", 0.01, "share of mean diag(H)"),
        ("MATRIX_BITS", 6, "attention/MLP codes (int8 storage)", "[2,8]"),
        ("EMBED_BITS", 8, "tied embedding codes", "[2,8]"),
        ("ATTN_CLIP_SIGMAS", 0.0, "SDClip k (0: clip search)", ">=0"),
        ("MLP_CLIP_SIGMAS", 0.0, "SDClip k (0: clip search)", ">=0"),
        ("EMBED_CLIP_SIGMAS", 0.0, "SDClip k (0: clip search)", ">=0"),
        ("AWQ_LITE_GROUP_TOP_K", 0, "int8 64-column groups: the model's most salient", ">=0"),
        ("LQER_RANK", 4, "error correction rank (0: off)", ">=0"),
        ("LQER_TOP_K", 3, "matrices it corrects", ">=0"),
        ("LQER_ASYM_GROUP", 64, "values per int4 scale of its B factor", ">0"),
        ("SIZE_CAP_BYTES", 16_000_000, "code + artifact (decimal)", ">0"),
        ("ARTIFACT_PATH", "final_model.int6.ptz", "written before evaluation"),
    ],
    "evaluation": [
        ("EVAL_ARTIFACT", "", "evaluate it instead of training"),
        ("EVAL_SEQ_LEN", 2048, "window", ">0"),
        ("EVAL_STRIDE", 64, "sliding-window stride", ">0"),
        ("EVAL_BATCH_SEQS", 32, "windows per batch", ">0"),
        ("EVAL_BUDGET_SECONDS", 600.0, "TTT stops adapting before it"),
        ("SLIDING_WINDOW_ENABLED", True, "the sliding-window pass"),
        ("ASYM_LOGIT_RESCALE", False, "learned softcaps for logits > 0 and <= 0 (#1923), TTT-trained"),
        ("DUMP_TOKEN_NLL", "", "X.npy: the last pass's NLLs (+ X.order.npy)"),
    ],
    "ttt": [
        ("TTT_ENABLED", True, "score-first TTT, the last pass"),
        ("TTT_MODE", "chunk", "#549's chunked SGD or #1855's LoRA", ("chunk", "lora")),
        # chunk mode: the stream in chunks, each scored by sliding windows, then trained on
        ("TTT_OPTIMIZER", "sgd", "#549's, or #734's", ("sgd", "adamw")),
        ("TTT_LR", 0.002, "cosine over chunks"),
        ("TTT_EPOCHS", 3, "per scored chunk", ">=0"),
        ("TTT_CHUNK_TOKENS", 32_768, "tokens per chunk", ">0"),
        ("TTT_FREEZE_BLOCKS", 0, "first blocks frozen", ">=0"),
        ("TTT_MOMENTUM", 0.9, "SGD momentum"),
        ("TTT_BATCH_SEQS", 32, "per step, all ranks", ">0"),
        ("TTT_GRAD_CLIP", 1.0, "grad-norm clip (<= 0: off)"),
        # lora mode: each document scored in chunks, each then trained on by its own adapters
        ("TTT_EVAL_SEQ_LEN", 2048, "a document's context (longer ones slide)", ">0"),
        ("TTT_CHUNK_SIZE", 48, "targets per score-then-train step", ">0"),
        ("TTT_SHORT_SCORE_FIRST_STEPS", "", "N:C,...: chunks of C for documents of <= N tokens"),
        ("TTT_BATCH_SIZE", 64, "documents adapted together, per rank", ">0"),
        ("TTT_LORA_RANK", 80, "adapter rank", ">0"),
        ("TTT_LORA_ALPHA", 144.0, "adapter scale: alpha / rank"),
        ("TTT_LORA_LR", 1e-4, "Adam LR"),
        ("TTT_LOCAL_LR_MULT", 1.0, "its multiplier (#1953)", ">0"),
        ("TTT_BETA1", 0.0, "Adam beta1", "[0,1)"),
        ("TTT_BETA2", 0.99, "Adam beta2", "[0,1)"),
        ("TTT_WEIGHT_DECAY", 0.5, "AdamW weight decay", ">=0"),
        ("TTT_WARM_START_A", True, "A carries over (B resets)"),
        ("TTT_Q_LORA", True, "adapt queries"),
        ("TTT_K_LORA", True, "adapt keys"),
        ("TTT_V_LORA", True, "adapt values"),
        ("TTT_O_LORA", True, "adapt attention outputs"),
        ("TTT_MLP_LORA", True, "adapt MLP outputs"),
        ("PHASED_TTT_NUM_PHASES", 3, "global SGD pauses (0: none)", ">=0"),
        ("PHASED_TTT_PREFIX_DOCS", 2500, "documents scored by the last pause", ">=0"),
        ("GLOBAL_TTT_LR", 1e-3, "pause SGD LR, cosine over chunks"),
        ("GLOBAL_TTT_MOMENTUM", 0.9, "pause SGD momentum"),
        ("GLOBAL_TTT_EPOCHS", 1, "pause epochs per chunk", ">=0"),
        ("GLOBAL_TTT_CHUNK_TOKENS", 32_768, "pause tokens per cosine step", ">0"),
        ("GLOBAL_TTT_BATCH_SEQS", 32, "pause rows per step, all ranks", ">0"),
        ("GLOBAL_TTT_GRAD_CLIP", 1.0, "pause grad-norm clip (<= 0: off)"),
    ],
    "runtime": [
        ("PRESET", "pr549", "a key of PRESETS"),
        ("RUN_ID", "", "log name (empty: a UUID)"),
        ("SEED", 1337, "init and shard order"),
        ("COMPILE", "auto", "auto: on CUDA", ("auto", "0", "1")),
    ],
}


Setting = namedtuple("Setting", "group name default doc domain", defaults=(None,))
HPARAMS = [Setting(group, *row) for group, rows in SETTINGS.items() for row in rows]
DEFAULTS = {s.name: s.default for s in HPARAMS}
MODEL_KEYS = tuple(s.name for s in HPARAMS if s.group == "model")
# What evaluation reads (TTT trains on TRAIN_SEQ_LEN rows; the schedule must end there): the artifact stores
# it, so a re-evaluation scores as the run did.
EVAL_KEYS = tuple(s.name for s in HPARAMS if s.group in ("evaluation", "ttt") and s.name not in
                  ("EVAL_ARTIFACT", "DUMP_TOKEN_NLL")) + ("TRAIN_SEQ_LEN", "TRAIN_SEQ_SCHEDULE")
# The accepted records we reproduce, each on the last (README: Presets, with what each lacks).
SP8192 = dict(  # the SP8192 stack of PR #1394 -> #1493 -> #1787/#1855 and its LoRA TTT, on plain SP8192 data
        DATA_PATH="./data/datasets/fineweb10B_sp8192", VOCAB_SIZE=8192,
        TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe.model", MLP_MULT=4.0, ROPE_SCALING="none",
        QK_GAIN_INIT=5.0, XSA_LAST_N=11, BIGRAM_VOCAB_SIZE=0, VE_LAYERS="", SMEAR_GATE="bos",
        SPARSE_ATTN_GATE_ENABLED=True, SPARSE_ATTN_GATE_SCALE=0.5, SKIP_GATES_ENABLED=True, NUM_LOOPS=2,
        PARALLEL_START_LAYER=8, ITERATIONS=20000, WARMDOWN_ITERS=0, WARMDOWN_FRAC=0.85, MIN_LR=0.10,
        MATRIX_LR=0.026, SCALAR_LR=0.02, TIED_EMBED_LR=0.03, MUON_MOMENTUM=0.97, MUON_ROW_NORMALIZE=True,
        MUON_POLAR_EXPRESS=True, MUON_WD=0.095, EMBED_WD=0.085, ADAM_WD=0.02, BETA2=0.99, EMA_DECAY=0.9965,
        VAL_LOSS_EVERY=0, EMBED_BITS=7, ATTN_CLIP_SIGMAS=13.0, MLP_CLIP_SIGMAS=11.5, EMBED_CLIP_SIGMAS=14.0,
        SLIDING_WINDOW_ENABLED=False, TTT_MODE="lora", TTT_LR=0.005)  # TTT_LR: #1493's, for TTT_MODE=chunk
PR1855 = SP8192 | dict(  # CaseOps data: python data/cached_challenge_fineweb.py --variant sp8192_caseops
    DATA_PATH="./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
    TOKENIZER_PATH="./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
PR1945 = PR1855 | dict(ASYM_LOGIT_RESCALE=True, AWQ_LITE_GROUP_TOP_K=1)
PR1953 = PR1945 | dict(QK_GAIN_INIT=5.25, EVAL_SEQ_LEN=2560, TTT_EVAL_SEQ_LEN=2560, TTT_Q_LORA=False,
                       TTT_V_LORA=False, TTT_LOCAL_LR_MULT=0.75)
PR2014 = PR1953 | dict(TRAIN_SEQ_LEN=3072, TRAIN_SEQ_SCHEDULE="1024@0.1,2048@0.7,3072@1.0",
                       SEQ_CHANGE_WARMUP_STEPS=32, EVAL_SEQ_LEN=2048,  # 2048: the others' validation cut
                       TTT_EVAL_SEQ_LEN=3072, TTT_SHORT_SCORE_FIRST_STEPS="256:8,2000:24", TTT_BATCH_SIZE=24,
                       PHASED_TTT_NUM_PHASES=1)
PR2135 = PR1945 | dict(AWQ_LITE_GROUP_TOP_K=0, MATRIX_LR=0.028, GPTQ_CALIB_BATCHES=32, LQER_ASYM_GROUP=32,
                       EVAL_SEQ_LEN=2560, TTT_EVAL_SEQ_LEN=2560, TTT_LORA_LR=8e-5, TTT_WEIGHT_DECAY=2.0,
                       TTT_K_LORA=False, PHASED_TTT_NUM_PHASES=1)
# The CPU demo (README: Quick start): the default stack, CPU-sized, minutes on the shipped data/sample.
DEMO = dict(DATA_PATH="./data/sample", TOKENIZER_PATH="./data/sample/fineweb_1024_bpe.model", NUM_LAYERS=4,
            MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, XSA_LAST_N=2, VE_LAYERS="2,3", TRAIN_SEQ_LEN=256,
            EVAL_SEQ_LEN=256, TRAIN_BATCH_TOKENS=8192, WARMUP_STEPS=2, WARMDOWN_ITERS=0, WARMDOWN_FRAC=0.4,
            MUON_MOMENTUM_WARMUP_STEPS=50, MAX_WALLCLOCK_SECONDS=180.0, EMA_DECAY=0.95, VAL_LOSS_EVERY=100,
            TRAIN_LOG_EVERY=25, TTT_CHUNK_TOKENS=16384)
PRESETS = {"pr549": {}, "sp8192": SP8192, "pr1855": PR1855, "pr1945": PR1945, "pr1953": PR1953,
           "pr2014": PR2014, "pr2135": PR2135, "demo": DEMO}  # pr549: the defaults
# An unknown env var is refused when it is a typo of a setting, or starts with a setting's first word
# (TTT_GRAD_STEPS) but not one other tools use too (NUM_THREADS, MAX_JOBS), or a lineage prefix we lack.
SHARED_PREFIXES = ("NUM_", "MAX_", "MIN_", "DATA_", "RUN_", "MODEL_", "ENABLE_", "SIZE_")
FOREIGN_PREFIXES = ("QAT_", "LATE_QAT")
TYPO_SIMILARITY = 0.85  # difflib ratio: NUM_LAYER/NUM_LAYERS 0.95, WORLD_SIZE/VOCAB_SIZE 0.6
OWN_PREFIXES = tuple(sorted({n.split("_")[0] + "_" for n in DEFAULTS if "_" in n} - set(SHARED_PREFIXES)))
GATE_WINDOW = 12  # the bos SmearGate and the sparse attention gate read the first 12 dims, as the records


def unknown_settings(env) -> list[str]:
    out = []
    for k in sorted(set(env) - set(DEFAULTS)):
        close = difflib.get_close_matches(k, list(DEFAULTS), 1, TYPO_SIMILARITY)
        if close or k.startswith(OWN_PREFIXES + FOREIGN_PREFIXES):
            out.append(f"{k} (a typo of {close[0]}?)" if close else k)
    return out


def out_of_domain(value, domain) -> str:
    """Why `value` is outside `domain`, or "" if it is inside."""
    if isinstance(domain, tuple):
        return "" if value in domain else f"must be one of {domain}"
    if domain[0] == ">":
        ok = value > 0 or (domain == ">=0" and value == 0)
    else:
        lo, hi = (float(x) for x in domain[1:-1].split(","))
        low_ok = lo <= value if domain[0] == "[" else lo < value
        ok = low_ok and (value <= hi if domain[-1] == "]" else value < hi)
    return "" if ok else f"must be {domain}" if domain[0] == ">" else f"must be in {domain}"


def _parse(s: Setting, raw: str):
    typ = type(s.default)
    try:
        if typ is bool:
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError(raw)
            return raw.strip().lower() in ("1", "true")
        return typ(raw)
    except ValueError:
        raise ValueError(f"{s.name}={raw!r} is not a valid {typ.__name__}") from None


def parse_pairs(name: str, text: str, sep: str, types: tuple) -> list[tuple]:
    """'a<sep>b,...' -> [(a, b), ...]: positive, the a's increasing (TRAIN_SEQ_SCHEDULE: 1024@0.1,2048@1)."""
    try:
        pairs = [tuple(t(v) for t, v in zip(types, item.split(sep), strict=True))
                 for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: must be comma-separated pairs a{sep}b") from None
    firsts = [a for a, _ in pairs]
    if any(a <= 0 or b <= 0 for a, b in pairs) or firsts != sorted(set(firsts)):
        raise ValueError(f"{name}={text!r}: values must be > 0, the first of each pair increasing")
    return pairs


class Hyperparameters:
    """Reads every setting from the environment when constructed, validates, and fails naming the variable."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        unknown = unknown_settings(env)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}: not read by this script")
        preset = env.get("PRESET", DEFAULTS["PRESET"])
        if preset not in PRESETS:
            raise ValueError(f"PRESET={preset!r}: must be one of {tuple(PRESETS)}")
        for s in HPARAMS:
            value = _parse(s, env[s.name]) if s.name in env else PRESETS[preset].get(s.name, s.default)
            setattr(self, s.name, value)
        self.RUN_ID = self.RUN_ID or str(uuid.uuid4())
        self.explicit = set(env) & set(DEFAULTS)  # set in the environment, not by default or preset
        self.update({})

    def update(self, values: dict):
        """Sets values (e.g. an artifact's model shape), re-validates and re-derives dependent fields."""
        for name, value in values.items():
            setattr(self, name, value)
        for s in HPARAMS:
            why = out_of_domain(getattr(self, s.name), s.domain) if s.domain else ""
            if why:
                raise ValueError(f"{s.name}={getattr(self, s.name)!r}: {why} ({s.doc})")
        try:
            self.ve_layers = [int(v) for v in self.VE_LAYERS.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"VE_LAYERS={self.VE_LAYERS!r}: must be comma-separated layer indices") from None
        schedule = parse_pairs("TRAIN_SEQ_SCHEDULE", self.TRAIN_SEQ_SCHEDULE, "@", (int, float))
        self.seq_schedule = schedule or [(self.TRAIN_SEQ_LEN, 1.0)]  # (length, share of training it ends at)
        self.short_chunks = parse_pairs("TTT_SHORT_SCORE_FIRST_STEPS", self.TTT_SHORT_SCORE_FIRST_STEPS, ":",
                                        (int, int))  # (document tokens, chunk size)
        self._validate()
        self.head_dim = self.MODEL_DIM // self.NUM_HEADS
        self.mlp_hidden = int(self.MLP_MULT * self.MODEL_DIM)
        # PR #549 stretched the base NTK-style from a hard-coded 1024 tokens to each call's length; we resolve
        # it once at TRAIN_SEQ_LEN (22,081.79 at 2048 with 16 dims) and use it at every length, eval included.
        base, d = self.ROPE_BASE, self.ROPE_DIMS
        stretch = self.ROPE_SCALING == "ntk1024" and self.TRAIN_SEQ_LEN > 1024
        self.rope_base = base * (self.TRAIN_SEQ_LEN / 1024) ** (d / (d - 2)) if stretch else base
        # Depth recurrence: layers a..b run 1 + NUM_LOOPS times once looping is on (0,1,2,3,4,5,3,4,5,3,4,5,6)
        a, b = self.LOOP_START, self.LOOP_END
        layers = list(range(self.NUM_LAYERS))
        looped = layers[:a] + layers[a:b + 1] * (1 + self.NUM_LOOPS) + layers[b + 1:]
        self.loop_order = looped if self.NUM_LOOPS else layers
        v = len(self.loop_order)
        self.n_skips = min(v // 2, v - v // 2)  # U-Net skips of the longest (looped) order

    def _validate(self):
        """The rules relating several settings (each setting's own domain is in its row)."""
        def need(ok, name, why):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {why}")
        hd = self.MODEL_DIM // self.NUM_HEADS
        need(self.MODEL_DIM % self.NUM_HEADS == 0, "MODEL_DIM", "must be divisible by NUM_HEADS")
        need(self.NUM_HEADS % self.NUM_KV_HEADS == 0, "NUM_HEADS", "must be divisible by NUM_KV_HEADS")
        need(self.MODEL_DIM >= GATE_WINDOW, "MODEL_DIM", f"gates read the first {GATE_WINDOW} dims")
        need(0 <= self.ROPE_DIMS <= hd and self.ROPE_DIMS % 2 == 0, "ROPE_DIMS", f"must be even, <= {hd}")
        need(self.ROPE_DIMS != 2 or self.ROPE_SCALING == "none", "ROPE_DIMS",
             "ntk1024 scaling needs ROPE_DIMS > 2 (exponent d/(d-2)); set ROPE_SCALING=none")
        need(self.XSA_LAST_N <= self.NUM_LAYERS, "XSA_LAST_N", "must be <= NUM_LAYERS")
        need(self.BIGRAM_VOCAB_SIZE != 1, "BIGRAM_VOCAB_SIZE", "0 (off) or >= 2 (one bucket is reserved)")
        ve = self.ve_layers
        need(all(0 <= i < self.NUM_LAYERS for i in ve) and len(set(ve)) == len(ve), "VE_LAYERS",
             f"indices must be distinct and in [0, {self.NUM_LAYERS})")
        need(self.NUM_LOOPS == 0 or self.LOOP_START <= self.LOOP_END < self.NUM_LAYERS, "LOOP_END",
             "must be in [LOOP_START, NUM_LAYERS)")
        # Lanes are the model's contiguous tail: decoder layers only, after any looped layer.
        p = self.PARALLEL_START_LAYER
        tail = self.NUM_LAYERS // 2 <= p < self.NUM_LAYERS and (not self.NUM_LOOPS or p > self.LOOP_END)
        need(p == 0 or tail, "PARALLEL_START_LAYER",
             "0 (off) or a decoder layer (>= NUM_LAYERS // 2) after LOOP_END")
        need(not (self.WARMDOWN_FRAC and self.WARMDOWN_ITERS), "WARMDOWN_FRAC",
             "and WARMDOWN_ITERS both set: choose one (set the other to 0)")
        need(0 <= self.GPTQ_RESERVE_SECONDS < self.MAX_WALLCLOCK_SECONDS or self.MAX_WALLCLOCK_SECONDS <= 0,
             "GPTQ_RESERVE_SECONDS", "must be below MAX_WALLCLOCK_SECONDS")
        need(self.AWQ_LITE_GROUP_TOP_K == 0 or min(self.MATRIX_BITS, self.EMBED_BITS) < 8,
             "AWQ_LITE_GROUP_TOP_K", "promotes column groups to int8: needs MATRIX_BITS or EMBED_BITS < 8")
        need(self.EVAL_STRIDE <= self.EVAL_SEQ_LEN, "EVAL_STRIDE", "must be <= EVAL_SEQ_LEN")
        need(self.TTT_CHUNK_SIZE <= self.TTT_EVAL_SEQ_LEN, "TTT_CHUNK_SIZE", "must be <= TTT_EVAL_SEQ_LEN")
        need(all(c <= self.TTT_EVAL_SEQ_LEN for _, c in self.short_chunks), "TTT_SHORT_SCORE_FIRST_STEPS",
             "chunk sizes must be <= TTT_EVAL_SEQ_LEN")
        (last, end), shares = self.seq_schedule[-1], [f for _, f in self.seq_schedule]
        need(last == self.TRAIN_SEQ_LEN and end == 1.0 and shares == sorted(set(shares)),
             "TRAIN_SEQ_SCHEDULE", "shares must increase to 1.0, where the length is TRAIN_SEQ_LEN")
        need(not self.DUMP_TOKEN_NLL or self.SLIDING_WINDOW_ENABLED or self.TTT_ENABLED, "DUMP_TOKEN_NLL",
             "dumps the sliding or TTT pass: enable one")

    def items(self):
        return [(s.name, getattr(self, s.name)) for s in HPARAMS]


def model_config(h: Hyperparameters) -> dict:
    """The artifact's model settings. RoPE is pinned to the resolved base, so a reload at any TRAIN_SEQ_LEN
    rebuilds the model that was trained."""
    return {k: getattr(h, k) for k in MODEL_KEYS} | {"ROPE_BASE": h.rope_base, "ROPE_SCALING": "none"}


# ----------------------------------------------------------------------------------------------
# Runtime: processes, logging, compilation, the training clock
# ----------------------------------------------------------------------------------------------

class Context:
    """Process-group facts plus rank-0 logging to logs/<RUN_ID>.txt."""

    def __init__(self, h: Hyperparameters):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if 8 % self.world != 0:
            raise ValueError(f"WORLD_SIZE={self.world} must divide 8 (grad_accum_steps = 8 // WORLD_SIZE)")
        self.grad_accum = 8 // self.world
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        self.compile = h.COMPILE == "1" or (h.COMPILE == "auto" and self.cuda)
        self.act_dtype = torch.bfloat16 if self.cuda else torch.float32
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.set_float32_matmul_precision("high")  # TF32, except where fp32_matmuls() turns it off
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                    device_id=self.device if self.cuda else None)
        self.master = self.rank == 0
        self.logfile = f"logs/{h.RUN_ID}.txt"  # rank 0 writes it (the other ranks only their crash)
        if self.master:
            os.makedirs("logs", exist_ok=True)
            print(self.logfile)

    def log(self, msg: str = "", console: bool = True):
        if not self.master:
            return
        if console:
            print(msg, flush=True)
        with open(self.logfile, "a", encoding="utf-8") as f:
            print(msg, file=f)

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.cuda else torch.autocast("cpu", enabled=False)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def max_across(self, value: float) -> float:
        """The largest `value` over ranks: one small all-reduce, read on the host (waits for the GPU)."""
        if not dist.is_initialized():
            return value
        t = torch.tensor(float(value), device=self.device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank (keeps collective decisions in lockstep)."""
        return self.max_across(float(flag)) > 0


# Graphs per rank: the train step per length and loop state, the eval batch, lora TTT's row lengths and the
# pause step (every eval path pads to fixed shapes); the margin makes an unforeseen shape a logged
# recompile instead of a fallback to eager.
RECOMPILE_LIMIT = 32


def compile_model(model: nn.Module, ctx: Context):
    if not ctx.compile:
        return model
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    return torch.compile(model, dynamic=False, fullgraph=True)


def log_compiled_graphs(ctx: Context, when: str):
    if ctx.compile:
        from torch._dynamo.utils import counters
        breaks = sum(counters["graph_break"].values())
        ctx.log(f"compile:graphs:{counters['stats']['unique_graphs']} graph_breaks:{breaks} "
                f"recompile_limit:{torch._dynamo.config.cache_size_limit} after:{when}")


@contextlib.contextmanager
def fp32_matmuls():
    """TF32 off: Hessian sums and the GPTQ solve need full fp32 mantissas."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


class Clock:
    """Training wall clock in ms, paused around validation. ms() reads the host clock without waiting for
    the GPU; start, pause and synced_ms() wait, so judged times are finished work."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.total, self.t0 = 0.0, None  # ms until the last pause; the running start (None: paused)

    def start(self):
        self.ctx.sync()
        self.t0 = time.perf_counter()

    def pause(self):
        self.ctx.sync()
        self.total += 1000 * (time.perf_counter() - self.t0)
        self.t0 = None

    def ms(self) -> float:
        return self.total + (1000 * (time.perf_counter() - self.t0) if self.t0 is not None else 0.0)

    def synced_ms(self) -> float:
        self.ctx.sync()
        return self.ms()


PROGRESS_SECONDS = 30.0  # the longest any phase is silent (slow machines): progress lines are due by time


class Progress:
    """When a progress line is due: when the caller's cadence says so, or PROGRESS_SECONDS after the last."""

    def __init__(self):
        self.last = time.perf_counter()

    def due(self, cadence: bool = False) -> bool:
        now = time.perf_counter()
        if cadence or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            return True
        return False


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def rank_span(n: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of this rank's contiguous share of n items, split as np.array_split does."""
    base, extra = divmod(n, world)
    return rank * base + min(rank, extra), base + (rank < extra)


def rank_share(rows: np.ndarray, ctx: Context) -> np.ndarray:
    start, count = rank_span(len(rows), ctx.rank, ctx.world)
    return rows[start:start + count]


# ----------------------------------------------------------------------------------------------
# Data: challenge shards (256 x int32 header, magic 20240520, version 1, uint16 tokens)
# ----------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION = 20240520, 1
HEADER_BYTES = 1024
BOS_ID = 1  # every document starts with it (the challenge tokenizers' bos_id; data/build_shards.py checks)
GET_DATA = ("get the published shards and tokenizers: python data/cached_challenge_fineweb.py "
            "--variant sp1024 (or sp8192, sp8192_caseops); or build them from any text: "
            "python data/build_shards.py --help")
VAL_SHARDS = "fineweb_val_[0-9]*.bin"
SIDECAR_SHARDS = "fineweb_val_bytes_*.bin"  # the byte sidecar: one uint16 per validation token (CaseOps)


def shard_length(path: str) -> int:
    """A shard's token count, checked against its header and its file size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path}: no such file")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"shard {path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path}: magic/version {header[0]}/{header[1]}, "
                         f"expected {SHARD_MAGIC}/{SHARD_VERSION}")
    n = int(header[2])
    if n <= 0:
        raise ValueError(f"shard {path}: header says {n} tokens (empty shard)")
    if size != HEADER_BYTES + 2 * n:
        raise ValueError(f"shard {path}: {size} bytes, not {HEADER_BYTES + 2 * n} ({n} tokens): truncated?")
    return n


def read_shard(path: str) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", count=shard_length(path), offset=HEADER_BYTES)


def load_data_shard(path: str, vocab_size: int) -> np.ndarray:
    tokens = read_shard(path)
    top = int(tokens.max())
    if top >= vocab_size:
        raise ValueError(f"shard {path}: token id {top} >= VOCAB_SIZE {vocab_size} (wrong tokenizer/vocab?)")
    return tokens  # uint16; widened per batch, not per shard


def list_shards(pattern: str) -> list[str]:
    # Sorted by file name only, so the order never depends on how DATA_PATH is spelled.
    files = sorted(glob.glob(pattern), key=lambda p: (os.path.basename(p), p))
    if not files:
        raise FileNotFoundError(f"no shard matches {pattern} (DATA_PATH): {GET_DATA}")
    return files


class TokenStream:
    """Endless token stream over shards; each pass visits the shards in a SEED-dependent order."""

    def __init__(self, pattern: str, vocab_size: int, seed: int):
        self.files = list_shards(pattern)
        self.vocab_size, self.seed = vocab_size, seed
        self.epoch, self.order = -1, []  # passes started; shards left in this pass
        self.tokens, self.pos = None, 0
        self._next_epoch()

    def _next_epoch(self):
        self.epoch += 1
        self.order = list(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files)))
        self._load_next()

    def _load_next(self):
        if not self.order:
            return self._next_epoch()
        self.tokens, self.pos = load_data_shard(self.files[self.order.pop(0)], self.vocab_size), 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self._load_next()
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Each call takes world*(local+1) tokens; rank r gets the r-th span, so ranks see disjoint slices
    and the sequence of spans is the same for any world size (8 ranks == 1 rank with accumulation)."""

    def __init__(self, pattern: str, rank: int, world_size: int, device, vocab_size: int, seed: int):
        self.rank, self.world_size = rank, world_size
        self.device = device
        self.stream = TokenStream(pattern, vocab_size, seed)

    def next_batch(self, local_tokens: int, seq_len: int) -> tuple[Tensor, Tensor]:
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span:(self.rank + 1) * span]
        chunk = torch.from_numpy(chunk.astype(np.int64))
        x, y = chunk[:-1].view(-1, seq_len), chunk[1:].view(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_byte_sidecar(val_files: list[str]) -> np.ndarray | None:
    """The validation byte sidecar: fineweb_val_bytes_N.bin beside each fineweb_val_N.bin, the same header,
    then for each token the original UTF-8 bytes it stands for. None where the validation shards have none."""
    folder = os.path.dirname(val_files[0])
    found = sorted(glob.glob(os.path.join(folder, SIDECAR_SHARDS)))
    if not found:
        return None
    want = [os.path.join(folder, os.path.basename(f).replace("_val_", "_val_bytes_")) for f in val_files]
    if found != sorted(want):
        raise ValueError(f"byte sidecar shards {found} do not pair with the validation shards {val_files}")
    for f, side in zip(val_files, want):
        if shard_length(f) != shard_length(side):
            raise ValueError(f"byte sidecar {side} has {shard_length(side)} values for the {shard_length(f)} "
                             f"tokens of {f}")
    return np.concatenate([read_shard(side) for side in want])


# ----------------------------------------------------------------------------------------------
# Tokenizer, exact bits per byte, and scoring windows of the validation stream
# ----------------------------------------------------------------------------------------------

def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TOKENIZER_PATH={path}: no such file; {GET_DATA}")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except RuntimeError as e:
        raise ValueError(f"TOKENIZER_PATH={path}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer {path} has vocab {sp.vocab_size()} but VOCAB_SIZE={vocab_size}")
    return sp


def check_manifest(h: Hyperparameters, ctx: Context):
    """The shards' manifest (DATA_PATH/manifest.json, from the data/ scripts) names the tokenizer that made
    them: with another, val_bpb would be wrong without any error. It also counts the validation tokens."""
    with open(h.TOKENIZER_PATH, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    path = os.path.join(h.DATA_PATH, "manifest.json")
    ctx.log(f"tokenizer_sha256:{digest} manifest:{path if os.path.isfile(path) else 'none'}")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        tok, val_tokens = m["tokenizer"], m["splits"]["val"]["tokens"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a shard manifest ({e!r}); rebuild it or remove it") from None
    if tok["sha256"] != digest:
        raise ValueError(f"TOKENIZER_PATH={h.TOKENIZER_PATH} (sha256 {digest[:12]}) is not the tokenizer of "
                         f"the shards in DATA_PATH: {path} names {tok['file']} (sha256 {tok['sha256'][:12]})")
    have = sum(map(shard_length, list_shards(f"{h.DATA_PATH}/{VAL_SHARDS}")))
    if have != val_tokens:
        raise ValueError(f"DATA_PATH={h.DATA_PATH}: the validation shards hold {have} tokens, {path} says "
                         f"{val_tokens}: a shard is missing or foreign")
    if m.get("byte_sidecar") and not glob.glob(f"{h.DATA_PATH}/{SIDECAR_SHARDS}"):
        raise ValueError(f"DATA_PATH={h.DATA_PATH}: {path} lists a byte sidecar, but no {SIDECAR_SHARDS} is "
                         "there")


def validation_cut(n_tokens: int, seq_len: int) -> int:
    """Tokens kept of the validation stream: whole seq_len windows of targets, plus the first token."""
    usable = ((n_tokens - 1) // seq_len) * seq_len  # lineage rule: drop the < seq_len tail
    if usable <= 0:
        raise ValueError(f"the validation shards hold {n_tokens} tokens, < EVAL_SEQ_LEN+1={seq_len + 1}")
    return usable + 1


def build_sentencepiece_luts(sp, vocab_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token UTF-8 byte counts: a leading '▁' is one byte unless the previous token is a boundary."""
    n = max(sp.vocab_size(), vocab_size)
    base_bytes = np.zeros(n, dtype=np.int16)
    has_space = np.zeros(n, dtype=np.bool_)
    is_boundary = np.ones(n, dtype=np.bool_)
    for t in range(sp.vocab_size()):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        is_boundary[t] = False
        if sp.is_byte(t):
            base_bytes[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            has_space[t], piece = True, piece[1:]
        base_bytes[t] = len(piece.encode("utf-8"))
    return (torch.tensor(base_bytes, device=device), torch.tensor(has_space, device=device),
            torch.tensor(is_boundary, device=device))


def target_bytes(prev: Tensor, tgt: Tensor, luts) -> Tensor:
    base_bytes, has_space, is_boundary = luts
    return base_bytes[tgt].to(torch.float64) + (has_space[tgt] & ~is_boundary[prev]).to(torch.float64)


def token_bytes(tokens: Tensor, luts) -> Tensor:
    """(N,) int32: the bytes charged when each token of a stream is predicted (the first never is: 0)."""
    return F.pad(target_bytes(tokens[:-1], tokens[1:], luts).to(torch.int32), (1, 0))


CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")  # data/caseops.py: TITLE ALLCAPS CAPNEXT ESC


def load_validation(h: Hyperparameters, ctx: Context, sp) -> tuple[Tensor, Tensor]:
    """The validation stream and the UTF-8 bytes charged when each of its tokens is predicted: from the byte
    sidecar where there is one (CaseOps: the original text's bytes, 0 for operators), else from the LUTs."""
    files = list_shards(f"{h.DATA_PATH}/{VAL_SHARDS}")
    tokens = np.concatenate([load_data_shard(f, h.VOCAB_SIZE) for f in files])
    sidecar, n = load_byte_sidecar(files), validation_cut(tokens.size, h.EVAL_SEQ_LEN)
    val_tokens = torch.from_numpy(tokens[:n].astype(np.int64)).to(ctx.device)
    if sidecar is not None:
        val_bytes = torch.from_numpy(sidecar[:n].astype(np.int32)).to(ctx.device)
        if val_bytes[val_tokens == BOS_ID].any():
            raise ValueError(f"DATA_PATH={h.DATA_PATH}: the byte sidecar charges bytes to BOS: misaligned")
    elif any(sp.piece_to_id(op) != sp.unk_id() for op in CASEOPS_OPERATORS):
        raise ValueError(f"TOKENIZER_PATH={h.TOKENIZER_PATH} is a CaseOps tokenizer, but DATA_PATH="
                         f"{h.DATA_PATH} has no byte sidecar {SIDECAR_SHARDS} (the LUTs would charge 3 bytes "
                         f"per operator); {GET_DATA}")
    else:
        val_bytes = token_bytes(val_tokens, build_sentencepiece_luts(sp, h.VOCAB_SIZE, ctx.device))
    kind = f"byte_sidecar:enabled files:{len(files)}" if sidecar is not None else "byte_luts"
    ctx.log(f"val_bpb:{kind} bytes:{int(val_bytes[1:].sum())}")
    return val_tokens, val_bytes


class BpbMeter:
    """float64 sums of NLL, target count and bytes; val_bpb = loss_sum / (ln 2 * bytes)."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, nll: Tensor, nbytes: Tensor, mask: Tensor):
        """Adds the positions where mask is true (NLLs and the bytes their targets are charged) as device
        sums: no host sync."""
        w, nbytes = mask.to(torch.float64), nbytes.to(torch.float64)
        self.sums += torch.stack(((nll.to(torch.float64) * w).sum(), w.sum(), (nbytes * w).sum()))

    def result(self, reduce: bool = True) -> tuple[float, float]:
        s = self.sums.clone()
        if reduce and dist.is_initialized():
            dist.all_reduce(s)
        loss, count, nbytes = s.tolist()
        return loss / max(count, 1), loss / (math.log(2) * max(nbytes, 1))


class TokenDump:
    """DUMP_TOKEN_NLL=X.npy: each target's NLL; X.order.npy: the index of the scoring step that scored it
    (targets scored together share it; 0 everywhere for a pass that does not adapt), so anyone can check
    that no score depends on a token scored later. Each target is scored once, on one rank: the sums of
    zeros elsewhere are exact."""

    def __init__(self, n_targets: int, device):
        self.nll = torch.zeros(n_targets, device=device)
        self.order = torch.zeros(n_targets, dtype=torch.int64, device=device)

    def add(self, idx: Tensor, mask: Tensor, nll: Tensor, step: int):
        self.nll.index_put_((idx,), torch.where(mask, nll.detach().float(), 0.0), accumulate=True)
        self.order.index_put_((idx,), torch.where(mask, step, 0), accumulate=True)

    def save(self, path: str, ctx):
        if dist.is_initialized():
            dist.all_reduce(self.nll)
            dist.all_reduce(self.order)
        if ctx.master:
            root = path[:-4] if path.endswith(".npy") else path
            np.save(root + ".npy", self.nll.cpu().numpy().astype(np.float32))
            np.save(root + ".order.npy", self.order.cpu().numpy())
            ctx.log(f"dump_token_nll:{root}.npy order:{root}.order.npy targets:{self.nll.numel()}")


def sliding_windows(n_targets: int, window: int, stride: int) -> np.ndarray:
    """Rows (start, score_from, score_to) over target indices (target j is token j+1 given tokens <= j).
    The first window scores all its targets, later ones their last `stride`; a final window ending
    exactly at the stream's end scores what is left. Every target is scored exactly once."""
    if n_targets <= window:
        return np.array([[0, 0, n_targets]], dtype=np.int64)
    starts = np.arange(0, n_targets - window + 1, stride, dtype=np.int64)
    rows = np.stack([starts, starts + window - stride, starts + window], axis=1)
    rows[0, 1] = 0
    if rows[-1, 2] < n_targets:
        rows = np.concatenate([rows, [[n_targets - window, rows[-1, 2], n_targets]]])
    return rows


def score_windows(model_fn, val_tokens: Tensor, wins: np.ndarray, h, ctx, val_bytes, meter: BpbMeter,
                  dump: TokenDump | None, step: int = 0):
    """Scores windows of EVAL_SEQ_LEN tokens into `meter`, and per target into `dump`. Every batch has
    EVAL_BATCH_SEQS rows (padded with windows (0, 0, 0) that score nothing), so every eval path runs one
    compiled graph; masks apply as sums on the device, so no batch waits for the host."""
    B, L = h.EVAL_BATCH_SEQS, min(h.EVAL_SEQ_LEN, val_tokens.numel() - 1)
    padded = np.zeros((ceil_div(len(wins), B) * B, 3), dtype=np.int64)
    padded[:len(wins)] = wins
    padded = torch.from_numpy(padded).to(ctx.device)
    pos, progress = torch.arange(L, device=ctx.device), Progress()
    with torch.inference_mode():
        for b in range(0, len(padded), B):
            if progress.due():
                ctx.log(f"eval_progress windows:{b}/{len(wins)} (this rank's)")
            w = padded[b:b + B]
            idx = w[:, :1] + pos
            x, y = val_tokens[idx], val_tokens[idx + 1]  # (B, L)
            with ctx.autocast():
                nll = model_fn(x, y)
            mask = (idx >= w[:, 1:2]) & (idx < w[:, 2:3])
            meter.add(nll, val_bytes[idx + 1], mask)
            if dump is not None:
                dump.add(idx, mask, nll, step)


def eval_windows(model_fn, val_tokens: Tensor, wins: np.ndarray, h, ctx, val_bytes, dump=None):
    """(val_loss, val_bpb) over all ranks, each scoring its share of `wins`."""
    meter = BpbMeter(ctx.device)
    score_windows(model_fn, val_tokens, rank_share(wins, ctx), h, ctx, val_bytes, meter, dump)
    return meter.result()


def eval_val(model_fn, val_tokens: Tensor, h, ctx, val_bytes: Tensor) -> tuple[float, float]:
    """Non-sliding: the stream tiled into EVAL_SEQ_LEN windows that score all their targets."""
    L = min(h.EVAL_SEQ_LEN, val_tokens.numel() - 1)
    starts = np.arange((val_tokens.numel() - 1) // L, dtype=np.int64) * L
    wins = np.stack([starts, starts, starts + L], axis=1)
    return eval_windows(model_fn, val_tokens, wins, h, ctx, val_bytes)


def eval_val_sliding(model_fn, val_tokens: Tensor, h, ctx, val_bytes, dump=None) -> tuple[float, float]:
    wins = sliding_windows(val_tokens.numel() - 1, h.EVAL_SEQ_LEN, h.EVAL_STRIDE)
    return eval_windows(model_fn, val_tokens, wins, h, ctx, val_bytes, dump)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def _pick_attention(device) -> tuple[str, object]:
    """FA3, else FA2, else SDPA. Any failure falls through: FlashAttention-4 installs `flash_attn` without
    flash_attn_func, and a build for another torch can raise anything on import."""
    if device.type == "cuda":
        for mod, name in (("flash_attn_interface", "fa3"), ("flash_attn", "fa2")):
            try:
                return name, getattr(importlib.import_module(mod), "flash_attn_func")
            except Exception:
                pass
    return "sdpa", None


ATTN_BACKEND, _FLASH_FN = "sdpa", None


def set_attention_backend(device) -> str:
    global ATTN_BACKEND, _FLASH_FN
    ATTN_BACKEND, _FLASH_FN = _pick_attention(device)
    return ATTN_BACKEND


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B,T,H,D), k/v (B,T,Hkv,D) -> (B,T,H,D); GQA handled by the kernel."""
    if _FLASH_FN is not None:  # flash kernels take bf16 only; autocast does not cover them
        out = _FLASH_FN(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, lse)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


def pin_sdpa_kernels(h: Hyperparameters) -> str:
    """CUDA SDPA: only the fused kernels (cuDNN, flash), as the reference pins them. Probed once (forward +
    backward, this model's heads, bf16): where they cannot run (pre-Ampere), torch's choice is restored."""
    sdp = torch.backends.cuda
    sdp.enable_cudnn_sdp(True)
    sdp.enable_flash_sdp(True)
    sdp.enable_mem_efficient_sdp(False)
    sdp.enable_math_sdp(False)
    try:
        q = torch.randn(1, 128, h.NUM_HEADS, h.head_dim, device="cuda", dtype=torch.bfloat16).requires_grad_()
        kv = torch.randn(1, 128, h.NUM_KV_HEADS, h.head_dim, device="cuda", dtype=torch.bfloat16)
        causal_attention(q, kv, kv).sum().backward()
        fallback = ""
    except RuntimeError as e:
        sdp.enable_mem_efficient_sdp(True)
        sdp.enable_math_sdp(True)
        fallback = f" fallback:{str(e).splitlines()[0][:120]!r}"
    return (f"sdp_backends:cudnn={sdp.cudnn_sdp_enabled()} flash={sdp.flash_sdp_enabled()} "
            f"mem_efficient={sdp.mem_efficient_sdp_enabled()} math={sdp.math_sdp_enabled()}{fallback}")


class Rotary(nn.Module):
    """Partial RoPE on the first `dims` dims with an explicit base: identical at every sequence length."""

    def __init__(self, dims: int, base: float):
        super().__init__()
        self.dims = dims
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims),
                             persistent=False)

    def cos_sin(self, T: int) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(T, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        return freqs.cos(), freqs.sin()

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 0:
            return x
        cos, sin = self.cos_sin(x.size(1))
        cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
        half = self.dims // 2
        a, b = x[..., :half], x[..., half:self.dims]
        return torch.cat((a * cos + b * sin, b * cos - a * sin, x[..., self.dims:]), dim=-1)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention: remove from each head's output its component along its own token's value."""
    B, T, H, D = y.shape
    yg = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (yg - (yg * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


def previous_token(x: Tensor) -> Tensor:
    return F.pad(x[:, :-1], (0, 0, 1, 0))


def adapt(ad, key: str, inp: Tensor, out: Tensor) -> Tensor:
    """out plus the TTT adapter `key`'s correction from inp, where the layer's adapters `ad` have one (None:
    the plain model). The adapted forward is the model's own, so no gate or lane can be missed."""
    return out if ad is None or key not in ad else out + ad[key](inp)


class SmearGate(nn.Module):
    """PR #549's: out_t = (1-g) x_t + g x_{t-1} on the normed embedding, g = sigmoid(gate) per channel (a BOS
    sees the previous document's last token)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        x, g = rms_norm(x), torch.sigmoid(self.gate).to(x.dtype)
        return (1 - g) * x + g * previous_token(x)


class BosSmearGate(nn.Module):
    """PR #1851's: x_t += lam * sigmoid(w . x_t[:12]) * x_{t-1} on the raw embedding, then the norm; nothing
    flows into a BOS. lam starts at 0: the identity."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(GATE_WINDOW))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        g = self.lam.to(x.dtype) * torch.sigmoid(x[..., :GATE_WINDOW] @ self.gate.to(x.dtype))
        return rms_norm(x + (g * (ids != BOS_ID))[..., None] * previous_token(x))


def build_smear(h: Hyperparameters) -> nn.Module | None:
    make = {"static": lambda: SmearGate(h.MODEL_DIM), "bos": BosSmearGate, "off": lambda: None}
    return make[h.SMEAR_GATE]()


def bigram_hash(ids: Tensor, buckets: int) -> Tensor:
    """Bucket of (prev, cur); the last bucket is reserved for position 0 (no previous token)."""
    h = torch.bitwise_xor(36313 * ids[:, 1:], 27191 * ids[:, :-1]) % (buckets - 1)
    return torch.cat((torch.full_like(ids[:, :1], buckets - 1), h), dim=1)


class ScaledEmbedding(nn.Module):
    """scale * proj(embed(ids)): BigramHash's table (ids: bigram buckets) and the value embeddings'."""

    def __init__(self, vocab: int, dim: int, out_dim: int, scale: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, ids: Tensor) -> Tensor:
        return self.scale * self.proj(self.embed(ids))


# Each layer's six matrices, in Block's argument order, live in four banks (Muon orthogonalizes them in
# batches, sharded over ranks); all that needs the layout reads it here. A row: the lineage's name
# (blocks.{i}.{name}.weight); the bank, where layer i's matrix is bank[slot * NUM_LAYERS + i]; the site,
# the input it reads, whose X^T X is its GPTQ Hessian; the (out, in) shape; the init (zero: silent at step 0).
Slot = namedtuple("Slot", "name bank slot site shape init")
BANK_SLOTS = (Slot("attn.c_q", "qo_bank", 0, "attn.qkv", ("dim", "dim"), "orthogonal"),
              Slot("attn.c_k", "kv_bank", 0, "attn.qkv", ("kv_dim", "dim"), "orthogonal"),
              Slot("attn.c_v", "kv_bank", 1, "attn.qkv", ("kv_dim", "dim"), "orthogonal"),
              Slot("attn.proj", "qo_bank", 1, "attn.proj", ("dim", "dim"), "zero"),
              Slot("mlp.fc", "mlp_up_bank", 0, "mlp.fc", ("hidden", "dim"), "orthogonal"),
              Slot("mlp.proj", "mlp_down_bank", 0, "mlp.proj", ("dim", "hidden"), "zero"))
BANKS = tuple(dict.fromkeys(s.bank for s in BANK_SLOTS))  # qo_bank, kv_bank, mlp_up_bank, mlp_down_bank
LM_HEAD_SITE = "tok_emb"  # the lm-head's input: the tied embedding's GPTQ Hessian is taken on its output side


def slots_of(bank: str) -> list[Slot]:
    return sorted((s for s in BANK_SLOTS if s.bank == bank), key=lambda s: s.slot)


class Block(nn.Module):
    """Pre-norm block; its matrices live in the GPT's banks and arrive as arguments."""

    def __init__(self, h: Hyperparameters, layer: int):
        super().__init__()
        d = h.MODEL_DIM
        self.layer, self.hd = layer, h.head_dim
        self.nh, self.nkv = h.NUM_HEADS, h.NUM_KV_HEADS
        self.use_xsa = layer >= h.NUM_LAYERS - h.XSA_LAST_N
        self.ln_s = 1.0 / math.sqrt(layer + 1) if h.LN_SCALE else 1.0
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.q_gain = nn.Parameter(torch.full((h.NUM_HEADS,), h.QK_GAIN_INIT))
        # PR #1787's sparse output gate: per head sigmoid(scale * W x[:12]); W = 0 halves the output at init
        gated = h.SPARSE_ATTN_GATE_ENABLED
        self.attn_gate = nn.Parameter(torch.zeros(h.NUM_HEADS, GATE_WINDOW)) if gated else None
        self.gate_scale = h.SPARSE_ATTN_GATE_SCALE
        self.site = {s.site: f"blocks.{layer}.{s.site}" for s in BANK_SLOTS}  # Hessian keys of its inputs

    def attn(self, x, wq, wk, wv, wo, ve, rotary, observe, ad=None):
        B, T, _ = x.shape
        observe(self.site["attn.qkv"], x)
        q = adapt(ad, "q", x, F.linear(x, wq.to(x.dtype))).view(B, T, self.nh, self.hd)
        k = adapt(ad, "k", x, F.linear(x, wk.to(x.dtype))).view(B, T, self.nkv, self.hd)
        v = adapt(ad, "v", x, F.linear(x, wv.to(x.dtype)))
        if ve is not None:
            v = v + ve
        v = v.view(B, T, self.nkv, self.hd)
        q, k = rotary(rms_norm(q)), rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v)
        if self.use_xsa:
            y = xsa(y, v)
        if self.attn_gate is not None:
            gate = self.gate_scale * F.linear(x[..., :GATE_WINDOW], self.attn_gate.to(x.dtype))  # (B, T, H)
            y = y * torch.sigmoid(gate)[..., None]
        y = y.reshape(B, T, self.nh * self.hd)
        observe(self.site["attn.proj"], y)
        return adapt(ad, "o", y, F.linear(y, wo.to(y.dtype)))

    def mlp(self, x, wup, wdown, observe, ad=None):
        observe(self.site["mlp.fc"], x)
        u = F.leaky_relu(F.linear(x, wup.to(x.dtype)), negative_slope=0.5).square()
        observe(self.site["mlp.proj"], u)
        out = F.linear(u, wdown.to(u.dtype))
        return adapt(ad, "mlp", out, out)  # #1855's MLP adapter reads the MLP's output

    def forward(self, x, x0, w, ve, rotary, observe, ad=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.ln_s, *w[:4], ve, rotary, observe,
                                                        ad)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.ln_s, *w[4:], observe, ad)

    def lanes(self, lane0, lane1, x0, w, ve, rotary, observe, ad, resid, post):
        """Two-lane parallel residual (PR #1530): attention reads lane 0 (mixed with x0), the MLP lane 1, in
        parallel; lane k keeps resid[k] of itself and takes post[0, k] of attention and post[1, k] of MLP."""
        mix, dt = self.resid_mix.to(lane0.dtype), lane0.dtype
        x = rms_norm(mix[0] * lane0 + mix[1] * x0) * self.ln_s
        a = self.attn_scale.to(dt) * self.attn(x, *w[:4], ve, rotary, observe, ad)
        m = self.mlp_scale.to(dt) * self.mlp(rms_norm(lane1) * self.ln_s, *w[4:], observe, ad)
        r, p = resid.to(dt), post.to(dt)
        return r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m


def _no_observe(name: str, x: Tensor):
    pass


class GPT(nn.Module):
    """Tied-embedding GQA GPT with U-Net skips; its matrices live in the banks of BANK_SLOTS. Layers run in
    `order()`: plain, or with a range looped once `looping` is set (a Python flag, so the compiled model
    keeps one graph per value). Layers from PARALLEL_START_LAYER run as two lanes."""

    def __init__(self, h: Hyperparameters):
        super().__init__()
        n, d = h.NUM_LAYERS, h.MODEL_DIM
        kvd = h.NUM_KV_HEADS * h.head_dim
        self.softcap = h.LOGIT_SOFTCAP
        self.tok_emb = nn.Embedding(h.VOCAB_SIZE, d)
        buckets = h.BIGRAM_VOCAB_SIZE
        self.bigram = ScaledEmbedding(buckets, h.BIGRAM_DIM, d, 0.05) if buckets else None
        self.smear = build_smear(h)
        dims = {"dim": d, "kv_dim": kvd, "hidden": h.mlp_hidden}
        for bank in BANKS:  # (slots * n, out, in)
            out, inp = slots_of(bank)[0].shape
            setattr(self, bank, nn.Parameter(torch.empty(len(slots_of(bank)) * n, dims[out], dims[inp])))
        self.blocks = nn.ModuleList(Block(h, i) for i in range(n))
        self.ve_slot = {layer: k for k, layer in enumerate(h.ve_layers)}  # layer -> its VE scale
        self.ve_shared = ScaledEmbedding(h.VOCAB_SIZE, h.VE_DIM, kvd, 0.1) if h.ve_layers else None
        self.ve_layer_scales = nn.Parameter(torch.ones(len(h.ve_layers))) if h.ve_layers else None
        self.plain_order, self.loop_order = list(range(n)), h.loop_order
        self.looping = False
        self.skip_weights = nn.Parameter(torch.ones(h.n_skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(h.n_skips, d)) if h.SKIP_GATES_ENABLED else None
        self.par_start = h.PARALLEL_START_LAYER
        self.n_lane_layers = n - self.par_start if self.par_start else 0
        lanes = self.n_lane_layers  # PR #1530's inits
        self.lane_resid = nn.Parameter(torch.full((lanes, 2), 1.1)) if lanes else None
        self.lane_post = nn.Parameter(torch.ones(lanes, 2, 2)) if lanes else None
        self.rotary = Rotary(h.ROPE_DIMS, h.rope_base)
        self.observe = _no_observe  # replaced during Hessian collection
        self.logit_caps = None  # ASYM_LOGIT_RESCALE: (cap of logits > 0, of the rest), on the eval model only
        self.act_dtype = torch.float32  # residual stream dtype: bf16 under CUDA autocast (build_model)
        self._init_weights(h)

    @torch.no_grad()
    def _init_weights(self, h: Hyperparameters):
        nn.init.normal_(self.tok_emb.weight, std=h.TIED_EMBED_INIT_STD)
        n = h.NUM_LAYERS
        for s in BANK_SLOTS:
            init = nn.init.orthogonal_ if s.init == "orthogonal" else nn.init.zeros_
            for W in getattr(self, s.bank)[s.slot * n:(s.slot + 1) * n]:
                init(W)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.embed.weight)
            nn.init.orthogonal_(self.bigram.proj.weight)
        if self.ve_shared is not None:
            nn.init.normal_(self.ve_shared.embed.weight, std=0.01)
            nn.init.orthogonal_(self.ve_shared.proj.weight)

    def banks(self) -> list[nn.Parameter]:
        return [getattr(self, b) for b in BANKS]

    def layer_weights(self, i: int) -> tuple[Tensor, ...]:
        n = len(self.blocks)
        return tuple(getattr(self, s.bank)[s.slot * n + i] for s in BANK_SLOTS)

    def order(self) -> list[int]:
        return self.loop_order if self.looping else self.plain_order

    def embed(self, ids: Tensor) -> Tensor:
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(bigram_hash(ids, self.bigram.embed.num_embeddings))
        x = self.smear(x, ids) if self.smear is not None else rms_norm(x)
        return x.to(self.act_dtype)  # the fp32 embeddings would keep the stream fp32

    def add_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        """U-Net skip j: x + w*s, or with gates the lerp of PR #1218 (half each at init)."""
        s = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + s
        return torch.lerp(s, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))

    def block_args(self, i: int, ve: Tensor | None, ad) -> tuple:
        """Layer i's matrices, its scaled value embedding (or None), the rotary, the Hessian observer and its
        TTT adapters (or None)."""
        ve_i = ve * self.ve_layer_scales[self.ve_slot[i]] if i in self.ve_slot else None
        return self.layer_weights(i), ve_i, self.rotary, self.observe, ad

    def hidden(self, ids: Tensor, lora=None) -> Tensor:
        """The encoder is the first half of the (looped) layer order and keeps each output; the decoder takes
        them back as U-Net skips, last first. Lane layers are the decoder's tail (_validate): there the skip
        goes to lane 0, and the output is the lanes' mean. Adapters: one set per position in the order."""
        x = x0 = self.embed(ids)
        ve = self.ve_shared(ids) if self.ve_shared is not None else None
        order = self.order()
        half = len(order) // 2
        enc, dec = order[:half], order[half:]
        ads = list(lora.layers) if lora is not None else [None] * len(order)
        skips = []
        for v, i in enumerate(enc):
            x = self.blocks[i](x, x0, *self.block_args(i, ve, ads[v]))
            skips.append(x)
        split = len(dec) - self.n_lane_layers
        for j, i in enumerate(dec[:split]):
            if skips:
                x = self.add_skip(j, x, skips.pop())
            x = self.blocks[i](x, x0, *self.block_args(i, ve, ads[half + j]))
        if not self.n_lane_layers:
            return rms_norm(x)
        lane0 = lane1 = x
        for j, i in enumerate(dec[split:], split):
            if skips:
                lane0 = self.add_skip(j, lane0, skips.pop())
            k = i - self.par_start
            lane0, lane1 = self.blocks[i].lanes(lane0, lane1, x0, *self.block_args(i, ve, ads[half + j]),
                                                self.lane_resid[k], self.lane_post[k])
        return rms_norm(0.5 * (lane0 + lane1))

    def forward(self, ids: Tensor, targets: Tensor, lora=None) -> Tensor:
        """Per-token NLL (B, T) in fp32; training takes its mean, evaluation sums the scored positions.
        `lora`: TTT's Adapters, one document per row."""
        h = self.hidden(ids, lora)
        self.observe(LM_HEAD_SITE, h)  # the tied embedding's GPTQ Hessian comes from its output side
        logits = F.linear(h, self.tok_emb.weight.to(h.dtype))
        if lora is not None:
            logits = logits + lora.head(h)
        logits, cap = logits.float(), self.softcap
        if self.logit_caps is not None:  # a cap per sign; both at LOGIT_SOFTCAP give the line below's values
            cap = torch.where(logits > 0, self.logit_caps[0], self.logit_caps[1])
        logits = cap * torch.tanh(logits / cap)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


class LoRA(nn.Module):
    """A low-rank correction per batch row (one document each): x (R, T, n_in) -> alpha/rank * x A^T B^T with
    A (R, rank, n_in), B (R, n_out, rank). B is zero after every reset: the correction starts at exactly 0."""

    def __init__(self, rows: int, n_in: int, n_out: int, rank: int, alpha: float):
        super().__init__()
        self.scale, self.bound = alpha / rank, 1.0 / math.sqrt(n_in)
        self.A = nn.Parameter(torch.zeros(rows, rank, n_in))
        self.B = nn.Parameter(torch.zeros(rows, n_out, rank))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.transpose(1, 2).to(x.dtype)) @ self.B.transpose(1, 2).to(x.dtype) * self.scale


LORA_SITES = ("q", "k", "v", "o", "mlp")  # each switched on by TTT_{Q,K,V,O,MLP}_LORA


class Adapters(nn.Module):
    """TTT's adapters for `rows` documents: those of LORA_SITES switched on, for each position in the layer
    order (a looped layer adapts separately on each pass, as in #1855), and the lm head's."""

    def __init__(self, model: GPT, h: Hyperparameters, rows: int):
        super().__init__()
        d, kvd = h.MODEL_DIM, h.NUM_KV_HEADS * h.head_dim
        out = {"q": d, "k": kvd, "v": kvd, "o": d, "mlp": d}
        on = [k for k in LORA_SITES if getattr(h, f"TTT_{k.upper()}_LORA")]
        r, a = h.TTT_LORA_RANK, h.TTT_LORA_ALPHA
        self.layers = nn.ModuleList(nn.ModuleDict({k: LoRA(rows, d, out[k], r, a) for k in on})
                                    for _ in model.order())
        self.head = LoRA(rows, d, h.VOCAB_SIZE, r, a)

    @torch.no_grad()
    def reset(self, keep_a: bool, seed: int):
        """B = 0 (the plain model again); A uniform in +-1/sqrt(n_in) from `seed` unless kept (warm start)."""
        gen = torch.Generator(self.head.A.device).manual_seed(seed)
        for m in self.modules():
            if isinstance(m, LoRA):
                m.B.zero_()
                if not keep_a:
                    m.A.uniform_(-m.bound, m.bound, generator=gen)


# ----------------------------------------------------------------------------------------------
# Optimizers: Muon on the banks (Parallel Muon across ranks), AdamW on embeddings and scalars
# ----------------------------------------------------------------------------------------------

NS_QUINTIC = ((3.4445, -4.7750, 2.0315),)  # one tuple, every iteration (the lineage's Muon)
# Polar Express (Amsel et al. 2025; PR #1787): a minimax-optimal tuple per iteration, the last repeating.
NS_POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def zeropower_via_newtonschulz5(G: Tensor, steps: int, coeffs=NS_QUINTIC) -> Tensor:
    """Batched quintic Newton-Schulz: approximately U V^T for each matrix of a (B, M, N) stack."""
    X = G.bfloat16() if G.is_cuda else G.float()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def muon_direction(g: Tensor, buf: Tensor, momentum: float, steps: int, coeffs, row_normalize: bool):
    """Nesterov momentum (updates buf), optionally MuonEq-R (PR #1285: each update row at unit norm), then
    Newton-Schulz."""
    buf.mul_(momentum).add_(g)
    u = g + momentum * buf
    if row_normalize:
        u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(u.dtype)
    return zeropower_via_newtonschulz5(u, steps, coeffs)


class ParallelMuon:
    """Each rank owns a slice of every bank: reduce-scatter grads -> momentum + NS5 on the slice ->
    all-gather updates, in `comm_dtype` (bf16 on CUDA, as the reference) and asynchronously: bank i's
    all-gather overlaps bank i+1's Newton-Schulz. One process: the slice is the whole bank. The calls go
    launch_reduce -> finish_reduce -> step."""

    def __init__(self, banks: list[nn.Parameter], h: Hyperparameters, world: int,
                 comm_dtype: torch.dtype = torch.float32):
        self.banks, self.world = banks, world
        self.wd, self.steps = h.MUON_WD, h.MUON_BACKEND_STEPS
        self.coeffs = NS_POLAR_EXPRESS if h.MUON_POLAR_EXPRESS else NS_QUINTIC
        self.row_normalize, self.comm_dtype = h.MUON_ROW_NORMALIZE, comm_dtype
        self.pad = [(-b.size(0)) % world for b in banks]
        self.shards: list[Tensor] = []
        self.pending: list = []
        self.momentum = [torch.zeros((b.size(0) + p) // world, *b.shape[1:], device=b.device)
                         for b, p in zip(banks, self.pad)]

    def launch_reduce(self):
        """Starts averaging the bank grads across ranks into this rank's slices."""
        self.shards, self.pending = [], []
        for b, pad in zip(self.banks, self.pad):
            if self.world == 1:
                self.shards.append(b.grad)
                continue
            g = torch.cat((b.grad, b.grad.new_zeros(pad, *b.shape[1:]))) if pad else b.grad
            g = g.to(self.comm_dtype).contiguous()
            out = g.new_empty(g.size(0) // self.world, *g.shape[1:])
            self.pending.append(dist.reduce_scatter_tensor(out, g, async_op=True))
            self.shards.append(out)

    def finish_reduce(self) -> Tensor:
        """Waits for the reduce-scatters (on the stream, not the host); returns the slices' squared norm."""
        for work in self.pending:
            work.wait()
        if self.world > 1:
            self.shards = [s.float() / self.world for s in self.shards]
        return sum(s.square().sum() for s in self.shards)

    @torch.no_grad()
    def step(self, lr: float, momentum: float, clip_coef: Tensor):
        updates = []
        for b, g, buf in zip(self.banks, self.shards, self.momentum):
            u = muon_direction(g * clip_coef, buf, momentum, self.steps, self.coeffs, self.row_normalize)
            if self.world > 1:
                u = u.to(self.comm_dtype).contiguous()
                full = u.new_empty(u.size(0) * self.world, *u.shape[1:])
                updates.append((b, full, dist.all_gather_into_tensor(full, u, async_op=True)))
            else:
                updates.append((b, u, None))
        for b, u, work in updates:
            if work is not None:
                work.wait()
            scale = max(1.0, b.size(-2) / b.size(-1)) ** 0.5
            b.mul_(1 - lr * self.wd).sub_(u[:b.size(0)].float(), alpha=lr * scale)


def muon_momentum(h: Hyperparameters, step: int) -> float:
    """Linear warm-up from MUON_MOMENTUM_WARMUP_START to MUON_MOMENTUM over MUON_MOMENTUM_WARMUP_STEPS."""
    frac = min(step / h.MUON_MOMENTUM_WARMUP_STEPS, 1.0) if h.MUON_MOMENTUM_WARMUP_STEPS else 1.0
    return (1 - frac) * h.MUON_MOMENTUM_WARMUP_START + frac * h.MUON_MOMENTUM


def flat_grads(params: list[Tensor]) -> Tensor:
    """All gradients in one buffer (zeros for a parameter without one) so a rank joins one all-reduce."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def set_grads(params: list[Tensor], flat: Tensor):
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def split_params(model: GPT) -> tuple[list, list, list]:
    banks = model.banks()
    tables = [m.embed.weight for m in (model.bigram, model.ve_shared) if m is not None]
    embeds = [model.tok_emb.weight] + tables
    taken = {id(p) for p in banks + embeds}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    return banks, embeds, scalars


class Optimizers:
    """All optimizer state plus the step: global grad-norm clipping after cross-rank averaging, so that
    N ranks take exactly the step one rank with N-fold accumulation would."""

    def __init__(self, model: GPT, h: Hyperparameters, world: int):
        self.h, self.world = h, world
        banks, embeds, scalars = split_params(model)
        comm = torch.bfloat16 if banks[0].is_cuda else torch.float32  # fp32 on gloo: N ranks == 1 rank
        self.muon = ParallelMuon(banks, h, world, comm)
        self.adam = torch.optim.AdamW(  # fused: no per-step host read of the step count
            [dict(params=embeds, lr=h.TIED_EMBED_LR, base_lr=h.TIED_EMBED_LR, weight_decay=h.EMBED_WD),
             dict(params=scalars, lr=h.SCALAR_LR, base_lr=h.SCALAR_LR, weight_decay=h.ADAM_WD)],
            betas=(h.BETA1, h.BETA2), eps=h.ADAM_EPS, fused=True)
        self.adam_params = [p for g in self.adam.param_groups for p in g["params"]]

    def step(self, step: int, lr_mult: float):
        h = self.h
        self.muon.launch_reduce()
        flat = flat_grads(self.adam_params)
        work = dist.all_reduce(flat, async_op=True) if self.world > 1 else None
        bank_sq = self.muon.finish_reduce()
        if self.world > 1:
            dist.all_reduce(bank_sq)  # the slices are disjoint: their squares sum to the full norm
            work.wait()
            flat /= self.world
        norm = (bank_sq + flat.float().square().sum()).sqrt()
        clip = h.GRAD_CLIP_NORM > 0
        coef = (h.GRAD_CLIP_NORM / (norm + 1e-6)).clamp(max=1.0) if clip else torch.ones_like(norm)
        set_grads(self.adam_params, flat * coef)
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        self.adam.step()
        self.muon.step(h.MATRIX_LR * lr_mult, muon_momentum(h, step), coef)
        return norm

    def state(self):
        muon = [m.clone() for m in self.muon.momentum]
        return {"adam": copy.deepcopy(self.adam.state_dict()), "muon": muon}

    def load_state(self, s):
        self.adam.load_state_dict(s["adam"])
        for m, saved in zip(self.muon.momentum, s["muon"]):
            m.copy_(saved)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def training_frac(h: Hyperparameters, step: int, elapsed_ms: float, budget_ms: float) -> float:
    """How far training is: the wall clock's share of the budget when capped, else step / ITERATIONS."""
    return elapsed_ms / budget_ms if budget_ms > 0 else step / max(h.ITERATIONS, 1)


def lr_multiplier(h: Hyperparameters, step: int, elapsed_ms: float, budget_ms: float) -> float:
    """Linear warmdown, floored at MIN_LR, over: 1) WARMDOWN_FRAC (the frontier's) of training; 2) none;
    3) WARMDOWN_ITERS steps before ITERATIONS, uncapped; 4) capped, the time WARMDOWN_ITERS steps take at
    the mean step time so far (the lineage's)."""
    if h.WARMDOWN_FRAC:
        left = 1 - training_frac(h, step, elapsed_ms, budget_ms)
        return max(min(1.0, left / h.WARMDOWN_FRAC), h.MIN_LR)
    if h.WARMDOWN_ITERS == 0:
        return 1.0
    if budget_ms <= 0:
        return max(min(1.0, max(h.ITERATIONS - step, 0) / h.WARMDOWN_ITERS), h.MIN_LR)
    warmdown_ms = h.WARMDOWN_ITERS * elapsed_ms / max(step, 1)
    remaining = max(budget_ms - elapsed_ms, 0.0)
    return max(remaining / warmdown_ms if remaining <= warmdown_ms else 1.0, h.MIN_LR)


def train_seq_len(h: Hyperparameters, frac: float) -> int:
    """The training sequence length at this share of training (TRAIN_SEQ_SCHEDULE; #2014's progressive
    context). Tokens per step stay TRAIN_BATCH_TOKENS: a longer length means fewer rows."""
    return next((L for L, end in h.seq_schedule if frac < end), h.TRAIN_SEQ_LEN)


def seq_change_ramp(h: Hyperparameters, steps_at_length: int) -> float:
    """#2014's LR ramp, (k + 1) / SEQ_CHANGE_WARMUP_STEPS at the k-th step after a length change."""
    w = h.SEQ_CHANGE_WARMUP_STEPS
    return min(1.0, (steps_at_length + 1) / w) if w else 1.0


def local_batch_tokens(h: Hyperparameters, ctx: Context) -> int:
    per = ctx.world * ctx.grad_accum
    for L, _ in h.seq_schedule:
        if h.TRAIN_BATCH_TOKENS % (per * L):
            raise ValueError(f"TRAIN_BATCH_TOKENS={h.TRAIN_BATCH_TOKENS} must be a multiple of "
                             f"world_size*grad_accum*TRAIN_SEQ_LEN={per * L} (sequence length {L})")
    return h.TRAIN_BATCH_TOKENS // per


def train_step(model_c, loader, opt: Optimizers, h, ctx, step: int, lr_mult: float, seq_len: int) -> Tensor:
    local = local_batch_tokens(h, ctx)
    total = 0.0
    for _ in range(ctx.grad_accum):
        x, y = loader.next_batch(local, seq_len)
        with ctx.autocast():
            loss = model_c(x, y).mean()
        (loss / ctx.grad_accum).backward()
        total += loss.detach()
    opt.step(step, lr_mult)
    for p in opt.muon.banks + opt.adam_params:
        p.grad = None
    return total / ctx.grad_accum  # a tensor: reading it would sync the GPU every step


class WeightAverages:
    """EMA of every parameter after each step: the final weights, as PR #549 used. With SWA_WEIGHT = w > 0,
    also the mean of snapshots late in warmdown, and the final weights are (1 - w) * EMA + w * SWA."""

    def __init__(self, model: nn.Module, h: Hyperparameters):
        self.params = list(model.parameters())
        self.h = h
        self.ema = [p.detach().float().clone() for p in self.params]
        self.swa = [torch.zeros_like(e) for e in self.ema] if h.SWA_WEIGHT > 0 else []
        self.swa_count = 0

    @torch.no_grad()
    def update(self, step: int, lr_mult: float, ctx: Context):
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - self.h.EMA_DECAY)
        if self.swa and lr_mult < self.h.SWA_START_LR and step % self.h.SWA_EVERY == 0:
            if self.swa_count == 0:
                ctx.log(f"swa:start step:{step}")
            torch._foreach_add_(self.swa, [p.detach().float() for p in self.params])
            self.swa_count += 1

    @torch.no_grad()
    def apply(self, ctx: Context):
        w = self.h.SWA_WEIGHT if self.swa_count else 0.0
        for i, p in enumerate(self.params):
            p.copy_((1 - w) * self.ema[i] + (w / self.swa_count) * self.swa[i] if w else self.ema[i])
        ctx.log(f"ema_swa:blend swa_weight:{w} swa_count:{self.swa_count}" if w else
                "ema:applying EMA weights")


def compile_warmup(model, model_c, loader_fn, h, ctx):
    """WARMUP_STEPS real steps compile the step at each training length, again with the loop on (the timed
    run compiles nothing), then weights, optimizer state and the data stream are restored."""
    opt = Optimizers(model, h, ctx.world)
    if h.WARMUP_STEPS == 0:
        return opt, loader_fn()
    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state()
    loader = loader_fn()
    lengths = [L for L, _ in h.seq_schedule]
    for looping, L in itertools.product((False, True) if h.NUM_LOOPS else (False,), lengths):
        model.looping = looping
        for i in range(h.WARMUP_STEPS):
            train_step(model_c, loader, opt, h, ctx, i, 1.0, L)
            ctx.log(f"{'loop_' if looping else ''}warmup_step:{i + 1}/{h.WARMUP_STEPS}"
                    + (f" seq_len:{L}" if len(lengths) > 1 else ""))
    model.looping = False
    model.load_state_dict(saved_model)
    opt.load_state(saved_opt)
    return opt, loader_fn()


# The training budget (MAX_WALLCLOCK_SECONDS), on one clock that pauses only for validation: 1. steps,
# until one more would end past Budget.train_ms (the cap less GPTQ_RESERVE_SECONDS); 2. the EMA becomes the
# weights; 3. Hessian calibration, until Budget.calibration_deadline(); 4. the GPTQ solve, timed before
# training, ends by the cap (Budget.over_cap). Packing reads no data and comes after (frontier.md §3.3).
CLOCK_SYNC_EVERY = 10  # training steps between the host syncs where all ranks agree on the elapsed time
SLOW_STEP_WINDOW = 4  # clock syncs whose slowest step is the stop plan's margin (a stall, the loop switch)
STALL_FACTOR = 10  # syncs every step from where CLOCK_SYNC_EVERY steps, one of them 10x slower, could overrun
GPTQ_SOLVE_MARGIN = 1.25  # calibration leaves 1.25x the timed GPTQ solve (real Hessians can be slower)
CALIB_BATCH_MARGIN = 1.5  # ... and takes no batch that would end past the deadline at 1.5x the mean so far


class Budget:
    """The training clock's plan in ms (no cap: ITERATIONS steps, no deadline). Ranks agree on the elapsed
    time every CLOCK_SYNC_EVERY steps, and every step once CLOCK_SYNC_EVERY + STALL_FACTOR of the slowest
    recent steps would end past train_ms; between syncs it is extrapolated at the agreed mean step time, so
    every rank uses the same LR and stop step. A step starts only if the slowest recent step would end within
    train_ms: the stop is at most one step late (more only if several steps before the per-step syncs are
    together over STALL_FACTOR times slower than the recent ones)."""

    def __init__(self, h: Hyperparameters, gptq_ms: float = 0.0):
        capped = h.MAX_WALLCLOCK_SECONDS > 0
        self.cap_ms = 1000 * h.MAX_WALLCLOCK_SECONDS if capped else 0.0
        self.train_ms = 1000 * (h.MAX_WALLCLOCK_SECONDS - h.GPTQ_RESERVE_SECONDS) if capped else 0.0
        self.reserve_ms = 1000 * h.GPTQ_RESERVE_SECONDS
        self.gptq_ms = gptq_ms
        self.stop_at, self.next_sync = h.ITERATIONS, CLOCK_SYNC_EVERY
        self.agreed_ms, self.agreed_step = 0.0, 0
        self.step_ms = deque(maxlen=SLOW_STEP_WINDOW)  # mean ms per step between recent syncs

    def elapsed(self, step: int) -> float:
        return self.agreed_ms * step / self.agreed_step if self.agreed_step else 0.0

    def agree(self, step: int, ms: float):
        """All ranks read `ms` (the max over ranks) after `step` steps; plans the next sync or the stop."""
        self.step_ms.append((ms - self.agreed_ms) / (step - self.agreed_step))
        self.agreed_ms, self.agreed_step = ms, step
        slowest, left = max(self.step_ms), self.train_ms - ms
        if self.train_ms and left < slowest:
            self.stop_at = min(self.stop_at, step)
        near = self.train_ms and left < (CLOCK_SYNC_EVERY + STALL_FACTOR) * slowest
        self.next_sync = step + (1 if near else CLOCK_SYNC_EVERY)

    def calibration_deadline(self) -> float:
        return self.cap_ms - GPTQ_SOLVE_MARGIN * self.gptq_ms if self.cap_ms else math.inf

    def over_cap(self, ms: float) -> float:
        return ms - self.cap_ms if 0 < self.cap_ms < ms else 0.0


Trained = namedtuple("Trained", "model_c loader clock")  # calibration goes on with the stream and the clock


def validate(model_c, step: int, clock: Clock, h, ctx, val_tokens: Tensor, val_bytes) -> float:
    """A validation pass off the training clock; returns the clock's reading."""
    clock.pause()
    vl, vb = eval_val(model_c, val_tokens, h, ctx, val_bytes)
    ms = clock.ms()
    ctx.log(f"step:{step}/{h.ITERATIONS} val_loss:{vl:.4f} val_bpb:{vb:.4f} "
            f"train_time:{ms:.0f}ms step_avg:{ms / max(step, 1):.2f}ms")
    clock.start()
    return ms


def train_model(model: GPT, h: Hyperparameters, ctx: Context, budget: Budget, val_tokens: Tensor, val_bytes):
    """The timed loop. The GPU is waited for only at the clock syncs (and on logged steps); the LR and the
    loop switch follow the budget's agreed time, the same on every rank."""
    model_c = compile_model(model, ctx)
    loader_fn = lambda: DistributedTokenLoader(f"{h.DATA_PATH}/fineweb_train_*.bin", ctx.rank, ctx.world,
                                               ctx.device, h.VOCAB_SIZE, h.SEED)
    opt, loader = compile_warmup(model, model_c, loader_fn, h, ctx)
    log_compiled_graphs(ctx, "warmup")
    averages = WeightAverages(model, h)
    if budget.cap_ms:
        ctx.log(f"gptq:reserving {budget.reserve_ms:.0f}ms from training budget, "
                f"effective={budget.train_ms:.0f}ms")
        ctx.log(f"gptq_solve_estimate:{budget.gptq_ms:.0f}ms")
    clock, step, progress = Clock(ctx), 0, Progress()
    seq_len, changed_at = train_seq_len(h, 0.0), -h.SEQ_CHANGE_WARMUP_STEPS  # no ramp at the start
    clock.start()
    while True:
        last_step = step == budget.stop_at
        should_validate = last_step or (h.VAL_LOSS_EVERY and step % h.VAL_LOSS_EVERY == 0)
        if should_validate:
            ms = validate(model_c, step, clock, h, ctx, val_tokens, val_bytes)
        if last_step:
            if step < h.ITERATIONS:
                ctx.log(f"stopping_early: wallclock_cap train_time:{ms:.0f}ms step:{step}/{h.ITERATIONS}")
            break
        elapsed = budget.elapsed(step)  # extrapolated from the last clock sync, the same on every rank
        frac = training_frac(h, step, elapsed, budget.train_ms)
        if h.NUM_LOOPS and not model.looping and frac >= h.ENABLE_LOOPING_AT:
            model.looping = True
            ctx.log(f"layer_loop:enabled step:{step} frac:{frac:.3f} order:{model.loop_order}")
        if (length := train_seq_len(h, frac)) != seq_len:
            seq_len, changed_at = length, step
            ctx.log(f"train_seq_len:switch step:{step} frac:{frac:.3f} seq_len:{seq_len}")
        lr_mult = lr_multiplier(h, step, elapsed, budget.train_ms) * seq_change_ramp(h, step - changed_at)
        train_loss = train_step(model_c, loader, opt, h, ctx, step, lr_mult, seq_len)
        step += 1
        averages.update(step, lr_mult, ctx)
        if step == budget.next_sync:
            budget.agree(step, ctx.max_across(clock.synced_ms()))
        should_log = step <= 10 or (h.TRAIN_LOG_EVERY and step % h.TRAIN_LOG_EVERY == 0)
        if progress.due(should_log):  # rank 0 logs: no collective inside
            loss = train_loss.item()  # waits for the step, so the time below is finished work
            ms = clock.ms()
            tok_s = step * h.TRAIN_BATCH_TOKENS / max(ms / 1000, 1e-9)
            ctx.log(f"step:{step}/{h.ITERATIONS} train_loss:{loss:.4f} train_time:{ms:.0f}ms "
                    f"step_avg:{ms / step:.2f}ms tok_s:{tok_s:.0f}")
    if ctx.cuda:
        ctx.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    log_compiled_graphs(ctx, "training")
    averages.apply(ctx)
    model.looping = h.NUM_LOOPS > 0  # calibration and every evaluation run the looped model
    return Trained(model_c, loader, clock)


# ----------------------------------------------------------------------------------------------
# Quantize and pack: Hessians on training data inside the budget, full GPTQ int6, byte-capped artifact
# ----------------------------------------------------------------------------------------------

CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
PASSTHROUGH_MAX = 65_536  # tensors this small (scales, gates, small projections) stay fp16
AWQ_GROUP = 64  # AWQ-lite promotes 64-column groups


def unbank(state: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    """Bank tensors -> per-layer 2-D matrices under the lineage's names (blocks.{i}.attn.c_q.weight ...)."""
    out = {k: v for k, v in state.items() if k not in BANKS}
    for i in range(n):
        for s in BANK_SLOTS:
            out[f"blocks.{i}.{s.name}.weight"] = state[s.bank][s.slot * n + i]
    return out


def rebank(flat: dict[str, Tensor], n: int) -> dict[str, Tensor]:
    out = {k: v for k, v in flat.items() if not (k.startswith("blocks.") and k.endswith(".weight"))}
    for bank in BANKS:
        out[bank] = torch.stack([flat[f"blocks.{i}.{s.name}.weight"] for s in slots_of(bank)
                                 for i in range(n)])
    return out


def hessian_key(weight_name: str) -> str | None:
    """The site whose Hessian quantizes this weight (the lm-head input for the tied embedding), or None."""
    if weight_name == "tok_emb.weight":
        return LM_HEAD_SITE
    for s in BANK_SLOTS:
        if weight_name.endswith(f".{s.name}.weight"):
            return weight_name[:-len(f"{s.name}.weight")] + s.site
    return None


@contextlib.contextmanager
def observing(model: GPT, fn):
    """Inside, every quantized matmul hands its input to fn(site, x)."""
    model.observe = fn
    try:
        yield
    finally:
        model.observe = _no_observe


@torch.no_grad()
def collect_hessians(model: GPT, loader, h: Hyperparameters, ctx: Context, clock: Clock, budget: Budget):
    """X^T X of every quantized matmul's input over training batches, summed over ranks (and over a looped
    layer's passes: its weights act once per pass). A batch is taken only if, at CALIB_BATCH_MARGIN times
    the mean batch so far (before the first: its share of the reserve), it ends before the budget's
    calibration deadline."""
    hess: dict[str, Tensor] = {}

    def observe(site, x):
        x = x.detach().reshape(-1, x.size(-1)).float()
        if site not in hess:
            hess[site] = torch.zeros(x.size(1), x.size(1), device=x.device)
        hess[site].addmm_(x.T, x)

    deadline = budget.calibration_deadline()
    start, batches = clock.synced_ms(), 0
    local = local_batch_tokens(h, ctx)
    ctx.log(f"gptq:calibration start train_time:{start:.0f}ms "
            + (f"deadline:{deadline:.0f}ms" if math.isfinite(deadline) else "deadline:none"))
    with observing(model, observe):
        while batches < h.GPTQ_CALIB_BATCHES:
            now = clock.synced_ms()
            per_batch = (now - start) / batches if batches else budget.reserve_ms / h.GPTQ_CALIB_BATCHES
            if ctx.any(now + CALIB_BATCH_MARGIN * per_batch >= deadline):
                break
            x, y = loader.next_batch(local, h.TRAIN_SEQ_LEN)
            with ctx.autocast():
                model(x, y)
            batches += 1
    for H in hess.values():
        if dist.is_initialized():
            dist.all_reduce(H)
    tokens, end = batches * local * ctx.world, clock.synced_ms()
    ctx.log(f"gptq:calibration end train_time:{end:.0f}ms tokens:{tokens} layers:{len(hess)} "
            f"elapsed:{(end - start) / 1000:.1f}s")
    if budget.over_cap(end):  # the solve reads no data: past the cap it is tolerated, reading data is not
        ctx.log(f"run_invalid: training and calibration read data until {end:.0f}ms, past the "
                f"{budget.cap_ms:.0f}ms cap by {budget.over_cap(end):.0f}ms: not a valid submission")
    if batches == 0 < h.GPTQ_CALIB_BATCHES:
        ctx.log(f"run_invalid: GPTQ without Hessians: calibration took 0/{h.GPTQ_CALIB_BATCHES} batches "
                f"(train_time {start:.0f}ms, deadline {deadline:.0f}ms); falls back to clip-search rounding")
    elif batches < h.GPTQ_CALIB_BATCHES:
        ctx.log(f"calibration_short: batches:{batches}/{h.GPTQ_CALIB_BATCHES} deadline:{deadline:.0f}ms "
                f"(GPTQ_RESERVE_SECONDS too small for GPTQ_CALIB_BATCHES?)")
    return hess


def _gptq_pass(W: Tensor, Hinv: Tensor, s: Tensor, mult: list, lim: list, block: int) -> Tensor:
    """Column-by-column quantization with error feedback through the inverse-Hessian Cholesky factor; column
    c uses step s * mult[c] and codes in [-lim[c], lim[c]] (AWQ-lite's int8 columns). Works on W^T so that
    each column is a contiguous row (several times faster on CPU)."""
    Wt = W.T.contiguous()
    Qt = torch.zeros_like(Wt)
    cols = Wt.size(0)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        Hi, E = Hinv[i1:i2, i1:i2], torch.zeros_like(Wt[i1:i2])
        for j in range(i2 - i1):
            w, c = Wt[i1 + j], i1 + j
            sc = s if mult[c] == 1.0 else s * mult[c]
            q = torch.clamp(torch.round(w / sc), -lim[c], lim[c])
            Qt[c] = q
            E[j] = (w - q * sc) / Hi[j, j]
            Wt[c + 1:i2] -= Hi[j, j + 1:, None] * E[j][None, :]
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ E
    return Qt.T


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # symmetric codes in [-qmax, qmax]


def fp16_scale(x: Tensor) -> Tensor:
    return x.clamp(2 ** -24, 65504).half()  # stays positive and finite in fp16


def row_scales(W: Tensor, qmax: int, sigmas: float = 0.0) -> Tensor:
    """Candidate per-row scales (K, rows), fp16-rounded. SDClip (sigmas > 0, PR #1394): one, clipping each
    row at sigmas * its std (no search; larger sigmas, lower entropy). Else one per clip quantile."""
    if sigmas:
        clips = sigmas * W.std(1, correction=0)[None]
    else:
        a = W.abs()
        clips = torch.stack([a.amax(1) if q == 1.0 else torch.quantile(a, q, dim=1) for q in CLIP_QUANTILES])
    return fp16_scale(clips / qmax).float()


def awq_scores(W: Tensor, H: Tensor) -> Tensor:
    """AWQ-lite's saliency (PR #1908) of each whole 64-column group: activation RMS x mean |w|, summed (the
    RMS over every use: a looped layer's Hessian sums its passes)."""
    n = W.size(1) // AWQ_GROUP
    saliency = H.diagonal().clamp_min(0).sqrt() * W.abs().mean(0)
    return saliency[:n * AWQ_GROUP].view(n, AWQ_GROUP).sum(1)


def awq_pick(sites: dict[str, list[str]], state: dict, hessians: dict, h) -> dict[str, Tensor]:
    """The AWQ_LITE_GROUP_TOP_K most salient groups of the whole model (#1945: one), among the GPTQ'd sites
    under 8 bits; each site's picks (sorted int16 indices; its matrices share them)."""
    ranked = []
    for site, names in sites.items():
        if site in hessians and quant_spec(names[0], h)[0] < 8:
            scores = awq_scores(torch.cat([state[n] for n in names]), hessians[site]).tolist()
            ranked += [(-v, site, g) for g, v in enumerate(scores)]
    picked = {}
    for _, site, g in sorted(ranked)[:h.AWQ_LITE_GROUP_TOP_K]:
        picked.setdefault(site, []).append(g)
    return {site: torch.tensor(sorted(gs), dtype=torch.int16) for site, gs in picked.items()}


def awq_multiplier(groups: Tensor, cols: int, qmax: int) -> Tensor:
    """Per-column step multiplier: qmax/127 in the promoted groups (int8 steps under the row clip), else 1."""
    m = torch.ones(cols)
    for g in groups.tolist():
        m[g * AWQ_GROUP:(g + 1) * AWQ_GROUP] = qmax / 127
    return m


def quantize_rows(W: Tensor, qmax: int, sigmas: float = 0.0) -> tuple[Tensor, Tensor]:
    """Round-to-nearest per row (with the clip candidate of least squared error): what GPTQ reduces to when H
    is the identity. Used for int8 embeddings and for matrices without a Hessian."""
    W = W.float()
    scales = row_scales(W, qmax, sigmas)
    Q = torch.clamp(torch.round(W[None] / scales[:, :, None]), -qmax, qmax)
    return _best_per_row(Q, scales, (W[None] - Q * scales[:, :, None]).square().sum(-1))


def _best_per_row(Q: Tensor, scales: Tensor, err: Tensor) -> tuple[Tensor, Tensor]:
    """From K candidates (K, rows, cols) with errors (K, rows), each row's least-error codes and scale."""
    best, pick = err.argmin(0), torch.arange(Q.size(1), device=Q.device)
    return Q[best, pick].to(torch.int8), scales[best, pick].half()


def gptq_quantize(W: Tensor, H: Tensor | None, qmax: int = 31, block: int = 128, damp: float = 0.01,
                  sigmas: float = 0.0, awq: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Full GPTQ (act-order, Cholesky inverse, 128-column blocks, damping) -> (codes, row scales, AWQ groups:
    `awq`'s, stepped at int8 inside the same solve).
    Every clip candidate is run (stacked as extra rows: rows are independent given H) and each row keeps
    the one with the lowest Hessian-weighted error (w - q s) H (w - q s)^T. H = None: plain rounding."""
    if H is None:
        return *quantize_rows(W, qmax, sigmas), torch.zeros(0, dtype=torch.int16)
    W, H = W.float(), H.float().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W = W.masked_fill(dead[None, :], 0.0)
    groups = awq if awq is not None else torch.zeros(0, dtype=torch.int16)
    perm = torch.argsort(H.diagonal(), descending=True)
    mult = awq_multiplier(groups, cols, qmax).to(W.device)[perm]
    Hp = H[perm][:, perm]
    Hd = Hp + damp * Hp.diagonal().mean() * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    scales = row_scales(W, qmax, sigmas)  # (K, rows)
    K = scales.size(0)
    Wp = W[:, perm]
    Q = _gptq_pass(Wp.repeat(K, 1), Hinv, scales.reshape(-1), mult.tolist(), (qmax / mult).round().tolist(),
                   block).view(K, rows, cols)
    D = Wp[None] - Q * scales[:, :, None] * mult
    q, s = _best_per_row(Q, scales, torch.einsum("krc,cd,krd->kr", D, Hp, D))
    return q[:, torch.argsort(perm)], s, groups


def lqer_factors(E: Tensor, rank: int, group: int) -> dict:
    """LQER (PR #1797/#1855): the rank-r SVD of the quantization error E ~ A B, A = U S at int2 (codes -2..1,
    one scale), B = V^T at int4 (codes -8..7, one scale per `group` values of B flattened): a few KB each."""
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    r = min(rank, S.numel())
    A, B = U[:, :r] * S[:r], Vh[:r]
    sa = fp16_scale(A.abs().amax() / 1.5)
    Bg = F.pad(B.flatten(), (0, -B.numel() % group)).view(-1, group)
    sb = fp16_scale(Bg.abs().amax(1) / 7.5)
    qb = torch.clamp(torch.round(Bg / sb.float()[:, None]), -8, 7).flatten()[:B.numel()].view_as(B)
    qa = torch.clamp(torch.round(A / sa.float()), -2, 1).to(torch.int8)
    return {"lqer_a": qa, "lqer_a_scale": sa.view(1), "lqer_b": qb.to(torch.int8), "lqer_b_scale": sb,
            "lqer_group": group}


@dataclasses.dataclass
class QEntry:
    """One tensor of the artifact: codes q (int8, |q| <= qmax) with fp16 row scales, or at 16 bits fp16
    `data`; AWQ-lite's column groups and LQER's factors if any. h_diag (not stored) marks GPTQ'd matrices,
    among which LQER and pruning choose: H's diagonal, or ones where calibration gave no H. lqer_group: values
    per B scale (in the header, not a stream)."""
    bits: int
    q: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None
    awq: Tensor | None = None
    lqer_a: Tensor | None = None
    lqer_a_scale: Tensor | None = None
    lqer_b: Tensor | None = None
    lqer_b_scale: Tensor | None = None
    h_diag: Tensor | None = None
    lqer_group: int = 0

    @property
    def qmax(self) -> int:
        return qmax_of(self.bits)

    @property
    def is_gptq(self) -> bool:
        return self.h_diag is not None

    def tensors(self) -> dict[str, Tensor]:
        """The stored fields, by name."""
        return {f: getattr(self, f) for f in STORED_FIELDS if getattr(self, f) is not None}


STORED_FIELDS = ("awq", "data", "lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale", "q", "scale")


def lqer_product(e: QEntry) -> Tensor:
    qb = e.lqer_b.float()
    sb = e.lqer_b_scale.float().repeat_interleave(e.lqer_group)[:qb.numel()].view_as(qb)
    return (e.lqer_a.float() * e.lqer_a_scale.float()) @ (qb * sb)


def column_steps(e: QEntry) -> Tensor:
    """An integer entry's per-column step multiplier: AWQ-lite's promoted groups, else ones."""
    return awq_multiplier(e.awq if e.awq is not None else torch.zeros(0), e.q.size(1), e.qmax)


def dequantize_entry(e: QEntry) -> Tensor:
    if e.q is None:
        return e.data.float()
    W = e.q.float() * e.scale.float()[:, None] * column_steps(e).to(e.q.device)
    return W + lqer_product(e) if e.lqer_a is not None else W


def tensor_class(name: str) -> str:
    if name == "tok_emb.weight":
        return "embed"
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "other"


def quant_spec(name: str, h: Hyperparameters) -> tuple[int, float]:
    """(bits, SDClip sigmas) of a matrix quantized with a Hessian, by tensor class."""
    cls = tensor_class(name)
    if cls == "embed":
        return h.EMBED_BITS, h.EMBED_CLIP_SIGMAS
    return h.MATRIX_BITS, h.ATTN_CLIP_SIGMAS if cls == "attn" else h.MLP_CLIP_SIGMAS


def add_lqer(entries: dict[str, QEntry], state: dict, rank: int, top_k: int, group: int) -> list[str]:
    """LQER on the top_k GPTQ'd matrices by quantization error norm (as PR #1855 picks them)."""
    err = {n: state[n] - dequantize_entry(e) for n, e in entries.items() if e.is_gptq}
    top = sorted(err, key=lambda n: (-err[n].norm().item(), n))[:top_k]
    for n in top:
        entries[n] = dataclasses.replace(entries[n], **lqer_factors(err[n], rank, group))
    return top


def gptq_group(names: list[str], state: dict, H: Tensor | None, h: Hyperparameters,
               awq: Tensor | None) -> dict[str, QEntry]:
    """The matrices that read one input (c_q, c_k, c_v) in one GPTQ pass: rows are independent given H."""
    bits, sigmas = quant_spec(names[0], h)
    W = torch.cat([state[n] for n in names])
    q, s, groups = gptq_quantize(W, H, qmax_of(bits), h.GPTQ_BLOCK_SIZE, h.GPTQ_DAMP, sigmas, awq)
    h_diag = H.diagonal() if H is not None else torch.ones(W.size(1), device=W.device)
    sizes = [state[n].size(0) for n in names]
    return {n: QEntry(bits, q=qn.contiguous(), scale=sn.contiguous(), awq=groups if groups.numel() else None,
                      h_diag=h_diag) for n, qn, sn in zip(names, q.split(sizes), s.split(sizes))}


def quantize_state(model: GPT, hessians: dict[str, Tensor], h: Hyperparameters, ctx: Context,
                   log: bool = True) -> dict[str, QEntry]:
    """Routes every tensor: bank matrices and the tied embedding -> GPTQ at MATRIX_BITS / EMBED_BITS
    (+ AWQ-lite, LQER); other large matrices -> int8 rows; the rest -> fp16."""
    t0 = time.perf_counter()
    state = unbank({k: v.detach().float() for k, v in model.state_dict().items()}, h.NUM_LAYERS)
    entries, sites = {}, {}
    for name, W in state.items():
        site = hessian_key(name)
        if site is not None:
            sites.setdefault(site, []).append(name)
        elif W.dim() == 2 and W.numel() > PASSTHROUGH_MAX:
            q, s = quantize_rows(W, 127)
            entries[name] = QEntry(8, q=q, scale=s)
        else:
            entries[name] = QEntry(16, data=W.half())
    progress, awq = Progress(), awq_pick(sites, state, hessians, h)
    awq_log = [f"{site}:{g}" for site, groups in awq.items() for g in groups.tolist()]
    for i, (site, names) in enumerate(sites.items()):
        entries.update(gptq_group(names, state, hessians.get(site), h, awq.get(site)))
        if log and progress.due():
            ctx.log(f"gptq:progress sites:{i + 1}/{len(sites)} {time.perf_counter() - t0:.0f}s")
    lqer = add_lqer(entries, state, h.LQER_RANK, h.LQER_TOP_K, h.LQER_ASYM_GROUP) if h.LQER_RANK else []
    ctx.sync()
    n_gptq = sum(len(names) for site, names in sites.items() if site in hessians)
    n_plain = sum(len(names) for names in sites.values()) - n_gptq
    if log:
        ctx.log(f"gptq:quantized {n_gptq} matrices with Hessians, {n_plain} without (clip-search rounding), "
                f"{len(entries)} tensors, lqer:{lqer} awq:{awq_log} in {time.perf_counter() - t0:.1f}s")
    return entries


def estimate_gptq_ms(model: GPT, h: Hyperparameters, ctx: Context) -> float:
    """Times rank 0 quantizing the current weights with identity Hessians (the same shapes and work as the
    real solve, no data), before the clock starts; calibration then leaves this much time for the solve."""
    if h.MAX_WALLCLOCK_SECONDS <= 0:
        return 0.0
    ms = 0.0
    if ctx.master:
        flat = unbank(model.state_dict(), h.NUM_LAYERS)
        eye = {hessian_key(n): torch.eye(W.size(1), device=W.device) for n, W in flat.items()
               if hessian_key(n)}
        ctx.sync()
        t0 = time.perf_counter()
        with fp32_matmuls():
            quantize_state(model, eye, h, ctx, log=False)
        ms = 1000 * (time.perf_counter() - t0)
    return ctx.max_across(ms)


def dequantize_state(entries: dict[str, QEntry], n_layers: int) -> dict[str, Tensor]:
    return rebank({name: dequantize_entry(e) for name, e in entries.items()}, n_layers)


# Artifact: magic, version, header length and CRC-32, the lzma-compressed JSON header, then one compressed
# stream per group. Each group keeps the codec and byte transform that made it smallest, with the CRC-32 of
# its raw bytes. No pickle: loading never executes code.
ARTIFACT_MAGIC = b"PGOLF"
ARTIFACT_VERSION = 7  # 4: per-group streams, AWQ/LQER; 5: bits per entry; 6: eval settings; 7: LQER groups
CODECS = ("lzma", "zstd", "brotli", "zpaq")  # zpaq: ZPAQ level 5, as #1855's `lrzip -z`, in memory
CODEC_PACKAGES = {"zstd": "zstandard", "brotli": "brotli", "zpaq": "zpaq"}  # pip package = module
# ZPAQ compresses blocks in parallel: one per 4 MiB (not per core), so its bytes depend only on the data.
ZPAQ_BLOCK_BYTES = 4 << 20
DTYPES = {"torch.int8": torch.int8, "torch.int16": torch.int16, "torch.float16": torch.float16}
# 1-byte codes as stored or transposed (columns often compress better); 2-byte values as stored or split
# into a low-byte and a high-byte plane ("byte shuffle": the high bytes of similar values repeat).
TRANSFORMS = {1: ("row", "col"), 2: ("raw", "shuffle")}


Codec = namedtuple("Codec", "compress decompress")
Item = namedtuple("Item", "name field t")  # tensor t is field `field` of entry `name`
Spec = namedtuple("Spec", "name field dtype shape")  # how the header lists a stored tensor


def _codec(name: str) -> Codec:
    """Codec `name`; an optional one that is not installed raises ImportError naming its package."""
    if name == "lzma":
        return Codec(lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)
    try:
        if name == "zstd":
            import zstandard
            return Codec(lambda b: zstandard.ZstdCompressor(level=22).compress(b),
                         lambda b: zstandard.ZstdDecompressor().decompress(b, max_output_size=1 << 31))
        if name == "zpaq":
            import zpaq
            blocks = lambda b: ceil_div(len(b) + 1, ZPAQ_BLOCK_BYTES)  # noqa: E731
            return Codec(lambda b: zpaq.compress(b, level=5, threads=blocks(b), hints=False), zpaq.decompress)
        import brotli
        return Codec(lambda b: brotli.compress(b, quality=11), brotli.decompress)
    except ImportError:
        raise ImportError(f"codec {name} is not installed: pip install {CODEC_PACKAGES[name]} "
                          f"(requirements.txt)") from None


def available_codecs() -> list[str]:
    out = []
    for name in CODECS:
        try:
            _codec(name)
            out.append(name)
        except ImportError:
            pass
    return out


def tensor_group(item: Item) -> str:
    """Integer codes by tensor class (their statistics differ), LQER codes, scales, fp16 weights."""
    if item.field == "q":
        return "q." + tensor_class(item.name)
    return "lqer" if item.t.dtype == torch.int8 else "fp16" if item.field == "data" else "scales"


def group_tensors(entries: dict[str, QEntry]) -> dict[str, list[Item]]:
    groups = {}
    for name in sorted(entries):
        for field, t in sorted(entries[name].tensors().items()):
            item = Item(name, field, t)
            groups.setdefault(tensor_group(item), []).append(item)
    return dict(sorted(groups.items()))


def encode_group(items: list[Item], transform: str) -> bytes:
    ts = [it.t.T if transform == "col" and it.t.dim() == 2 else it.t for it in items]
    raw = b"".join(t.cpu().contiguous().numpy().tobytes() for t in ts)
    return np.frombuffer(raw, np.uint8).reshape(-1, 2).T.tobytes() if transform == "shuffle" else raw


def decode_group(raw: bytes, specs: list[Spec], transform: str) -> list[Tensor]:
    if transform == "shuffle":
        raw = np.frombuffer(raw, np.uint8).reshape(2, -1).T.tobytes()
    out, pos = [], 0
    for spec in specs:
        dt = DTYPES[spec.dtype]
        n = math.prod(spec.shape) * dt.itemsize
        t = torch.frombuffer(bytearray(raw[pos:pos + n]), dtype=dt) if n else torch.empty(0, dtype=dt)
        col = transform == "col" and len(spec.shape) == 2
        out.append(t.reshape(spec.shape[::-1]).T.contiguous() if col else t.reshape(spec.shape))
        pos += n
    return out


def compress_groups(groups: dict[str, list[Item]], plan: dict | None) -> dict[str, dict]:
    """Each group's smallest stream: {group: codec, transform, raw (its encoded bytes), stream}. Without a
    plan, every codec and transform is tried (in threads); with one (a previous report), each group uses the
    codec and transform it names."""
    if plan is None:
        jobs = [(g, c, tr) for g, items in groups.items() for tr in TRANSFORMS[items[0].t.element_size()]
                for c in available_codecs()]
    else:
        jobs = [(g, plan[g]["codec"], plan[g]["transform"]) for g in groups]
    raws = {(g, tr): encode_group(groups[g], tr) for g, _, tr in jobs}
    with ThreadPoolExecutor(min(len(jobs), 16) or 1) as ex:
        streams = list(ex.map(lambda job: _codec(job[1]).compress(raws[job[0], job[2]]), jobs))
    best = {}
    for (g, c, tr), stream in zip(jobs, streams):
        if g not in best or len(stream) < len(best[g]["stream"]):
            best[g] = {"codec": c, "transform": tr, "raw": raws[g, tr], "stream": stream}
    return best


def pack(entries: dict[str, QEntry], config: dict, meta: dict, plan: dict | None = None):
    """(the artifact, its per-group report {group: codec, transform, bytes, values}); see compress_groups."""
    groups = group_tensors(entries)
    best = compress_groups(groups, plan)
    header = {"config": config, "meta": meta, "bits": {n: e.bits for n, e in sorted(entries.items())},
              "lqer_group": {n: e.lqer_group for n, e in sorted(entries.items()) if e.lqer_group},
              "groups": [{"group": g, "codec": b["codec"], "transform": b["transform"],
                          "tensors": [Spec(it.name, it.field, str(it.t.dtype), list(it.t.shape))
                                      for it in groups[g]],
                          "raw_bytes": len(b["raw"]), "crc": zlib.crc32(b["raw"]), "bytes": len(b["stream"])}
                         for g, b in best.items()]}
    hz = lzma.compress(json.dumps(header, separators=(",", ":")).encode())
    blob = (ARTIFACT_MAGIC + struct.pack("<BII", ARTIFACT_VERSION, len(hz), zlib.crc32(hz)) + hz
            + b"".join(b["stream"] for b in best.values()))
    report = {g: {"codec": b["codec"], "transform": b["transform"], "bytes": len(b["stream"]),
                  "values": sum(it.t.numel() for it in groups[g])} for g, b in best.items()}
    return blob, report


def unpack_header(blob: bytes, source: str = "artifact") -> tuple[dict, int]:
    """(the header, where the first group starts); anything corrupt or truncated is refused, naming it."""
    n = len(ARTIFACT_MAGIC)
    if len(blob) < n + 9 or blob[:n] != ARTIFACT_MAGIC:
        raise ValueError(f"{source}: not a model artifact (bad magic or truncated header)")
    version, hlen, hcrc = struct.unpack_from("<BII", blob, n)
    if version != ARTIFACT_VERSION:
        raise ValueError(f"{source}: artifact version {version}, "
                         f"this script reads version {ARTIFACT_VERSION}")
    pos = n + 9 + hlen
    if pos > len(blob) or zlib.crc32(blob[n + 9:pos]) != hcrc:
        raise ValueError(f"{source}: artifact header is truncated or corrupt (checksum mismatch)")
    try:
        header = json.loads(lzma.decompress(blob[n + 9:pos]))
    except (lzma.LZMAError, ValueError) as e:
        raise ValueError(f"{source}: artifact header does not decode ({e}): corrupt") from None
    return header, pos


def unpack(blob: bytes, source: str = "artifact") -> tuple[dict, dict, dict[str, QEntry]]:
    """(config, meta, entries) from an artifact; anything corrupt or truncated is refused naming the part."""
    header, pos = unpack_header(blob, source)
    entries = {name: QEntry(bits, lqer_group=header["lqer_group"].get(name, 0))
               for name, bits in header["bits"].items()}
    groups = header["groups"]
    starts = list(itertools.accumulate([pos] + [g["bytes"] for g in groups]))  # each group's, then the end
    with ThreadPoolExecutor(max(len(groups), 1)) as ex:  # ZPAQ decodes at ~0.24 MB/s a thread
        raws = ex.map(lambda i: read_group(blob, starts[i], groups[i], source), range(len(groups)))
        for g, raw in zip(groups, raws):  # in order: the first bad group is the one named
            specs = [Spec(*row) for row in g["tensors"]]
            for spec, t in zip(specs, decode_group(raw, specs, g["transform"])):
                setattr(entries[spec.name], spec.field, t)
    if starts[-1] != len(blob):
        raise ValueError(f"{source}: {len(blob) - starts[-1]} trailing bytes after the last group (corrupt)")
    return header["config"], header["meta"], entries


def read_group(blob: bytes, pos: int, g: dict, source: str) -> bytes:
    """Group g's raw bytes from its stream at blob[pos:], checked against its length and CRC-32."""
    name = g["group"]
    codec, length = g["codec"], g["bytes"]
    if codec not in CODECS:
        raise ValueError(f"{source}: group {name}: unknown codec {codec!r}")
    if pos + length > len(blob):
        raise ValueError(f"{source}: group {name} is truncated ({len(blob) - pos} of {length} bytes)")
    try:
        raw = _codec(codec).decompress(blob[pos:pos + length])
    except ImportError as e:
        raise ImportError(f"{source}: group {name}: {e}") from None
    except Exception as e:
        raise ValueError(f"{source}: group {name} ({codec}) does not decompress ({e}): corrupt") from None
    if len(raw) != g["raw_bytes"] or zlib.crc32(raw) != g["crc"]:
        raise ValueError(f"{source}: group {name}: checksum mismatch: corrupt artifact")
    return raw


def read_artifact(path: str) -> tuple[dict, dict, dict]:
    with open(path, "rb") as f:
        return unpack(f.read(), path)


def write_atomic(path: str, data: bytes):
    """A crash never leaves a half-written file under the final name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def prune_order(entries: dict[str, QEntry]) -> list[tuple[str, tuple[int, int]]]:
    """All +-1 codes of GPTQ'd matrices, cheapest first: cost = step^2 * H_jj (the Hessian-weighted loss of
    zeroing; the step is the row's scale, times the AWQ multiplier in promoted columns)."""
    names, idx = [], []
    costs = []
    for name in sorted(entries):
        e = entries[name]
        if not e.is_gptq:
            continue
        col = e.h_diag.cpu() * column_steps(e).square()
        nz = (e.q.abs() == 1).nonzero().cpu()
        names += [name] * len(nz)
        idx.append(nz)
        costs.append(e.scale.float().cpu()[nz[:, 0]].square() * col[nz[:, 1]])
    if not idx:
        return []
    order = torch.argsort(torch.cat(costs), stable=True).tolist()
    flat = torch.cat(idx).tolist()
    return [(names[i], flat[i]) for i in order]


def pruned(entries: dict[str, QEntry], order: list, k: int) -> dict[str, QEntry]:
    out = {n: dataclasses.replace(e, q=e.q.clone()) if e.q is not None else e for n, e in entries.items()}
    for name, (r, c) in order[:k]:
        out[name].q[r, c] = 0
    return out


def log_packing(report: dict, blob: bytes, ctx: Context):
    groups = " ".join(f"{g}={r['codec']}/{r['transform']}:{r['bytes']}" for g, r in report.items())
    ctx.log(f"compression: {groups} header:{len(blob) - sum(r['bytes'] for r in report.values())}")


def log_headroom(report: dict, left: int, config: dict, ctx: Context):
    """What the bytes under the cap would buy, at the measured bits per attention/MLP weight."""
    groups = [report[g] for g in ("q.attn", "q.mlp") if g in report]
    bits = 8 * sum(r["bytes"] for r in groups) / max(sum(r["values"] for r in groups), 1)
    weights = int(8 * left / bits) if bits else 0
    units = weights // (2 * config["MODEL_DIM"] * config["NUM_LAYERS"])
    ctx.log(f"size_fit: {left} bytes under the cap: at {bits:.3f} bits per matrix weight that is ~{weights} "
            f"more weights, e.g. {units} more MLP hidden units per layer "
            f"(MLP_MULT +{units / config['MODEL_DIM']:.2f})")


def fit_artifact(entries, config, meta, code_bytes, cap, ctx) -> bytes:
    """Best per-group compression; under the cap, says what the spare bytes would buy. Over it, zeroes the
    cheapest +-1 codes (deterministic, logged, same codecs) until it fits, or stops saying by how much."""
    blob, report = pack(entries, config, meta)
    log_packing(report, blob, ctx)
    if code_bytes + len(blob) <= cap:
        log_headroom(report, cap - code_bytes - len(blob), config, ctx)
        return blob
    over = code_bytes + len(blob) - cap
    order = prune_order(entries)
    size_of = lambda k: len(pack(pruned(entries, order, k), config, meta, report)[0])
    full = size_of(len(order))
    ctx.log(f"size_fit: over by {over} bytes; {len(order)} +-1 candidates; pruning all gives {full} bytes")
    if code_bytes + full > cap:
        raise RuntimeError(f"artifact does not fit: {code_bytes + full - cap} bytes over the {cap}-byte cap "
                           f"even with every +-1 code pruned ({over} over without pruning)")
    saved = max(len(blob) - full, 1)
    k = min(len(order), math.ceil(1.1 * len(order) * over / saved))
    while code_bytes + size_of(k) > cap:
        k = min(len(order), math.ceil(k * 1.5) + 1)
    ctx.log(f"size_fit: pruned {k}/{len(order)} +-1 codes ({100 * k / max(len(order), 1):.2f}%)")
    return pack(pruned(entries, order, k), config, meta, report)[0]


# Code bytes: what a submission ships is this program as one line, as records have since #1394 (shipped by
# #1394-#1514, counted beside readable source by #1530-#2135; README "Bytes"): the source without comments,
# docstrings and blank lines, brotli-11, base85, exec'd. `records/tool.py new` ships it as train_gpt.py.
WRAPPER = ('import brotli,base64;exec(brotli.decompress(base64.b85decode("', '")))\n')


def strip_source(src: str) -> str:
    """The same program without comments, docstrings and blank lines; every other line as it is, and strings
    spanning lines whole. A docstring that is its block's only statement becomes `pass`."""
    drop, keep, sole = set(), set(), {}
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        doc = body[0].value if isinstance(body, list) and body and isinstance(body[0], ast.Expr) else None
        if isinstance(doc, ast.Constant) and isinstance(doc.value, str):
            drop.update(range(doc.lineno, doc.end_lineno + 1))
            if len(body) == 1:  # the block's only statement
                sole[doc.lineno] = doc.col_offset
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            keep.update(range(node.lineno + 1, node.end_lineno + 1))
    lines = src.splitlines(keepends=True)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            r, c = tok.start
            lines[r - 1] = lines[r - 1][:c].rstrip() + "\n"
    out = []
    for i, line in enumerate(lines, 1):
        if i in sole:
            out.append(" " * sole[i] + "pass\n")
        elif i not in drop and (i in keep or line.strip()):
            out.append(line)
    return "".join(out)


def wrap_code(src: str) -> bytes:
    payload = base64.b85encode(_codec("brotli").compress(strip_source(src).encode())).decode()
    return (WRAPPER[0] + payload + WRAPPER[1]).encode()


def code_sizes(path: str = __file__) -> tuple[int, int]:
    """(this file's bytes, the shipped program's bytes); run as the shipped program, both are its own."""
    with open(os.path.abspath(path), "rb") as f:
        src = f.read()
    return len(src), len(src if src.startswith(WRAPPER[0].encode()) else wrap_code(src.decode()))


def pack_artifact(entries: dict | None, h: Hyperparameters, ctx: Context, meta: dict) -> str:
    """Rank 0 fits the quantized entries under the cap and writes the artifact atomically; every rank then
    waits for the file. Reads no data: compression runs after the training clock (frontier.md §3.3)."""
    if ctx.master:
        raw_code, code_bytes = code_sizes()
        blob = fit_artifact(entries, model_config(h), meta, code_bytes, h.SIZE_CAP_BYTES, ctx)
        write_atomic(h.ARTIFACT_PATH, blob)
        label = f"int{h.MATRIX_BITS}+pergroup"
        ctx.log(f"Serialized model {label}: {len(blob)} bytes")
        ctx.log(f"Code size (uncompressed): {raw_code} bytes")
        ctx.log(f"Code size (compressed): {code_bytes} bytes")
        ctx.log(f"Total submission size {label}: {code_bytes + len(blob)} bytes")
    ctx.barrier()
    return h.ARTIFACT_PATH


# ----------------------------------------------------------------------------------------------
# Evaluation: legal score-first TTT. Chunk mode (#549): the stream in chunks, each scored by sliding
# windows, then trained on. Lora mode (#1530 -> #1610/#1626 -> #1855): documents, each with its own adapters.
# ----------------------------------------------------------------------------------------------

TTT_TRAIN_COST_PRIOR = 3  # before any chunk has trained, a TTT epoch is assumed to cost 3 scoring passes
TTT_LOG_EVERY = 10  # chunks between ttt_chunk lines


class TTTState:
    """What trains during chunk TTT and lora TTT's pauses, and how; `rows` per rank in every step (one padded
    shape: one compiled graph). Frozen blocks are left out of the optimizer, and their rows in the shared
    banks get zero gradient (so neither SGD nor AdamW, both without weight decay, moves them)."""

    def __init__(self, model: GPT, optimizer: str, lr: float, momentum: float, clip: float, rows: int,
                 freeze: int = 0):
        n = len(model.blocks)
        frozen = [p for block in model.blocks[:freeze] for p in block.parameters()]
        frozen_ids = {id(p) for p in frozen}
        self.params = [p for p in model.parameters() if id(p) not in frozen_ids]
        # each slot's frozen layers are bank rows [slot * n, slot * n + freeze)
        self.frozen_rows = [(getattr(model, s.bank), s.slot * n) for s in BANK_SLOTS] if freeze else []
        self.f, self.clip = freeze, clip
        self.rows = rows
        per_layer = sum(bank[0].numel() for bank, _ in self.frozen_rows)
        self.n_frozen = sum(p.numel() for p in frozen) + freeze * per_layer
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)

    def reduce_grads(self):
        """Zeroes the frozen bank rows; sums the gradients over ranks in one flat all-reduce every rank joins
        (each rank's loss is already divided by the global target count: the sum is the mean); clips."""
        for bank, start in self.frozen_rows:
            bank.grad[start:start + self.f].zero_()
        flat = flat_grads(self.params)
        if dist.is_initialized():
            dist.all_reduce(flat)
        set_grads(self.params, flat)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)


def piece_rows(val_tokens: Tensor, pieces: np.ndarray, rows: int, L: int) -> tuple[Tensor, Tensor]:
    """`rows` rows of L targets; row r holds pieces[r] = (first target, n <= L targets). The rest is padding
    with input 0 and label -100 (ignored by cross-entropy): no target outside the pieces enters the step."""
    p = torch.zeros((rows, 2), dtype=torch.int64)
    p[:len(pieces)] = torch.from_numpy(pieces.reshape(-1, 2))
    p, t = p.to(val_tokens.device), torch.arange(L, device=val_tokens.device)
    idx, keep = (p[:, :1] + t).clamp(max=val_tokens.numel() - 2), t < p[:, 1:]
    return torch.where(keep, val_tokens[idx], 0), torch.where(keep, val_tokens[idx + 1], -100)


def train_pieces(model_fn, state: TTTState, val_tokens: Tensor, pieces: np.ndarray, batch_seqs: int, L: int,
                 ctx):
    """One pass over `pieces` in global batches of batch_seqs rows, split over ranks by rank_span; each rank's
    step has the same padded shape (state.rows, L), and the loss is the mean over the global batch."""
    for b in range(0, len(pieces), batch_seqs):
        batch = pieces[b:b + batch_seqs]
        first, count = rank_span(len(batch), ctx.rank, ctx.world)
        x, y = piece_rows(val_tokens, batch[first:first + count], state.rows, L)
        state.opt.zero_grad(set_to_none=False)
        with ctx.autocast():
            loss = model_fn(x, y).sum() / int(batch[:, 1].sum())
        loss.backward()
        state.reduce_grads()
        state.opt.step()


def ttt_train_chunk(model_fn, state: TTTState, val_tokens: Tensor, lo: int, hi: int, lr: float, h, ctx):
    """Trains on targets [lo, hi), all scored already: rows of TRAIN_SEQ_LEN targets, TTT_EPOCHS times."""
    starts = np.arange(lo, hi, h.TRAIN_SEQ_LEN)
    pieces = np.stack([starts, np.minimum(hi - starts, h.TRAIN_SEQ_LEN)], axis=1)
    for g in state.opt.param_groups:
        g["lr"] = lr
    for _ in range(h.TTT_EPOCHS):
        train_pieces(model_fn, state, val_tokens, pieces, h.TTT_BATCH_SEQS, h.TRAIN_SEQ_LEN, ctx)


def chunk_ttt_state(model: GPT, h: Hyperparameters, ctx) -> TTTState:
    # rows per rank of each fixed-shape step: a global batch is at most one chunk's sequences
    rows = ceil_div(min(h.TTT_BATCH_SEQS, ceil_div(h.TTT_CHUNK_TOKENS, h.TRAIN_SEQ_LEN)), ctx.world)
    return TTTState(model, h.TTT_OPTIMIZER, h.TTT_LR, h.TTT_MOMENTUM, h.TTT_GRAD_CLIP, rows,
                    h.TTT_FREEZE_BLOCKS)


def cosine(lr: float, c: int, n: int) -> float:
    """Cosine from lr at step 0 to 0 at step n - 1."""
    return lr * 0.5 * (1 + math.cos(math.pi * c / max(n - 1, 1)))


def ttt_fits_budget(h, ctx, c: int, n_chunks: int, t_eval0: float, score_s: list, train_s: list) -> bool:
    """Whether training on chunk c, then scoring the rest, is projected (at the mean times so far) to end
    within EVAL_BUDGET_SECONDS; if not, says so."""
    train_est = np.mean(train_s) if train_s else TTT_TRAIN_COST_PRIOR * h.TTT_EPOCHS * score_s[-1]
    projected = time.perf_counter() - t_eval0 + train_est + np.mean(score_s) * (n_chunks - c - 1)
    if not ctx.any(projected > h.EVAL_BUDGET_SECONDS):
        return True
    ctx.log(f"ttt:budget_stop chunk:{c + 1}/{n_chunks} elapsed:{time.perf_counter() - t_eval0:.1f}s "
            f"projected:{projected:.1f}s budget:{h.EVAL_BUDGET_SECONDS:.0f}s")
    return False


def eval_val_ttt(model: GPT, model_fn, val_tokens: Tensor, h, ctx, val_bytes, t_eval0: float, dump=None):
    """Legal score-first TTT: chunk c's windows are scored under inference_mode with weights trained only
    on chunks < c; then (except the last chunk) the model trains on chunk c. If the eval budget would
    overrun, adaptation stops and the remaining chunks are scored with the current weights."""
    n_targets = val_tokens.numel() - 1
    wins = sliding_windows(n_targets, h.EVAL_SEQ_LEN, h.EVAL_STRIDE)
    C = h.TTT_CHUNK_TOKENS
    n_chunks = ceil_div(n_targets, C)
    chunk_of = np.minimum(wins[:, 1] // C, n_chunks - 1)
    state = chunk_ttt_state(model, h, ctx)
    ctx.log(f"ttt_sliding:start chunks={n_chunks} chunk_tokens={C} total_windows={len(wins)} "
            f"stride={h.EVAL_STRIDE} ttt_lr={h.TTT_LR} ttt_epochs={h.TTT_EPOCHS} "
            f"freeze_blocks={h.TTT_FREEZE_BLOCKS}")
    ctx.log(f"ttt_sliding:params unfrozen={sum(p.numel() for p in model.parameters()) - state.n_frozen} "
            f"frozen={state.n_frozen}")
    meter, adapting = BpbMeter(ctx.device), True
    score_s, train_s = [], []  # seconds per chunk, for the budget projection
    t0, progress = time.perf_counter(), Progress()
    for c in range(n_chunks):
        ts = time.perf_counter()
        model.eval()
        mine = rank_share(wins[chunk_of == c], ctx)
        score_windows(model_fn, val_tokens, mine, h, ctx, val_bytes, meter, dump, step=c)
        ctx.sync()
        score_s.append(time.perf_counter() - ts)
        last = c == n_chunks - 1
        adapting = adapting and not last and ttt_fits_budget(h, ctx, c, n_chunks, t_eval0, score_s, train_s)
        if adapting:
            ts = time.perf_counter()
            model.train()
            ttt_train_chunk(model_fn, state, val_tokens, c * C, min((c + 1) * C, n_targets),
                            cosine(h.TTT_LR, c, n_chunks), h, ctx)
            ctx.sync()
            train_s.append(time.perf_counter() - ts)
        if ctx.any(progress.due(c % TTT_LOG_EVERY == 0 or last)):  # meter.result() is a collective
            _, bpb = meter.result()
            ctx.log(f"  ttt_chunk [{c + 1}/{n_chunks}] bpb={bpb:.6f} time={time.perf_counter() - t0:.1f}s")
    model.eval()
    vl, vb = meter.result()
    ctx.log(f"ttt_sliding:done val_loss={vl:.6f} val_bpb={vb:.6f} elapsed={time.perf_counter() - t0:.1f}s")
    return vl, vb


LORA_ADAM_EPS = 1e-10  # #1855's


def chunk_size(h: Hyperparameters, tokens: int) -> int:
    """A document's chunk: by #2014's TTT_SHORT_SCORE_FIRST_STEPS, that of the first length its tokens (its
    BOS up to the next one: targets + 1) do not exceed, else TTT_CHUNK_SIZE."""
    return next((c for n, c in h.short_chunks if tokens <= n), h.TTT_CHUNK_SIZE)


def lora_row_lengths(h: Hyperparameters) -> list[int]:
    """Lora TTT's padded row lengths, one compiled graph each: each chunk size doubling, then the context."""
    out = set()
    for c in {h.TTT_CHUNK_SIZE} | {c for _, c in h.short_chunks}:
        while c < h.TTT_EVAL_SEQ_LEN:
            out.add(c)
            c *= 2
    return sorted(out | {h.TTT_EVAL_SEQ_LEN})


def row_length(lengths: list[int], n: int) -> int:
    return next(L for L in lengths if L >= n)


def find_docs(val_tokens: Tensor) -> np.ndarray:
    """(first target, targets) per document. A document starts at a BOS (the first one at the stream's start)
    and its targets run up to the next BOS, which its last target predicts: each target is in exactly one."""
    toks = val_tokens.cpu().numpy()
    starts = np.flatnonzero(toks[:-1] == BOS_ID)
    if not starts.size or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return np.stack([starts, np.diff(np.append(starts, toks.size - 1))], axis=1)


def doc_pieces(docs: np.ndarray, L: int) -> np.ndarray:
    """Each document cut into rows (first target, n <= L targets): no row crosses a document boundary."""
    k = ceil_div(docs[:, 1], L)
    off = (np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)) * L
    return np.stack([np.repeat(docs[:, 0], k) + off, np.minimum(np.repeat(docs[:, 1], k) - off, L)], axis=1)


class DocPlan:
    """Lora TTT's order, the same at any world size. Documents go longest first (ties in stream order) in
    batches of up to TTT_BATCH_SIZE that share a chunk size (chunk[q]). Pause p comes after the batch holding
    document PHASED_TTT_PREFIX_DOCS * p / PHASED_TTT_NUM_PHASES of that order, when every earlier batch is
    scored; it trains on all of them. Scoring step first_step[q] + c is chunk c of batch q. cost: work units
    (row tokens through forward and backward) of each batch and pause, to share batches out and to project
    the pass's time."""

    def __init__(self, docs: np.ndarray, h: Hyperparameters, lengths: list[int]):
        R, L = h.TTT_BATCH_SIZE, h.TTT_EVAL_SEQ_LEN
        self.docs = docs[np.argsort(-docs[:, 1], kind="stable")]
        n = len(self.docs)
        sizes = np.array([chunk_size(h, t + 1) for t in self.docs[:, 1]], dtype=np.int64)
        cuts = [0, *(np.flatnonzero(np.diff(sizes)) + 1), n]  # the runs of one chunk size
        self.bounds = np.array([*(s for a, b in zip(cuts, cuts[1:]) for s in range(a, b, R)), n])
        self.chunk, self.n_batches = sizes[self.bounds[:-1]], len(self.bounds) - 1
        phases, prefix = h.PHASED_TTT_NUM_PHASES, min(h.PHASED_TTT_PREFIX_DOCS, n)
        ends = {int(np.searchsorted(self.bounds, prefix * (p + 1) // phases)) for p in range(phases)}
        self.ends = sorted(e for e in ends if 0 < e < self.n_batches)  # no pause with nothing before or after
        top = ceil_div(self.docs[self.bounds[:-1], 1], self.chunk)  # chunks of each batch (longest first)
        self.first_step = np.cumsum(top) - top
        rows = {C: np.cumsum([row_length(lengths, min((c + 1) * C, L)) for c in range(top.max())])
                for C in set(self.chunk.tolist())}
        self.cost = R * np.array([rows[C][t - 1] for C, t in zip(self.chunk, top)], dtype=np.float64)
        self.pause_cost = [len(doc_pieces(self.scored(e), L)) * L * h.GLOBAL_TTT_EPOCHS for e in self.ends]

    def rank_batches(self, lo: int, hi: int, world: int, rank: int) -> list[int]:
        """This rank's share of batches [lo, hi): each batch in turn, longest first, goes to the rank with the
        least work so far (a batch's cost follows its longest document: the first ones are the longest by
        far), so the ranks reach a pause together. A rank scores its batches in queue order."""
        load, mine = np.zeros(world), []
        for q in range(lo, hi):
            r = int(np.argmin(load))
            load[r] += self.cost[q]
            mine += [q] * (r == rank)
        return mine

    def segments(self) -> list[tuple[int, int]]:
        bounds = [0] + self.ends + [self.n_batches]
        return list(zip(bounds[:-1], bounds[1:]))

    def batch(self, q: int) -> np.ndarray:
        return self.docs[self.bounds[q]:self.bounds[q + 1]]

    def scored(self, e: int) -> np.ndarray:
        """The documents of batches [0, e): what the pause after batch e - 1 trains on."""
        return self.docs[:self.bounds[e]]

    def describe(self) -> str:
        n, b = len(self.docs), [len(self.scored(e)) for e in self.ends]
        prefix = b[-1] if b else 0
        return (f"ttt_phased: total_docs:{n} prefix_docs:{prefix} suffix_docs:{n - prefix} "
                f"num_phases:{len(b)} boundaries:{b} batches:{self.n_batches}")


def requires_grad(model: nn.Module, flag: bool):
    for p in model.parameters():
        p.requires_grad_(flag)


class LoraTTT:
    """One rank's per-document LoRA TTT: TTT_BATCH_SIZE documents, one per row, each with its own adapters
    (reset per batch) and Adam state, through the model's own forward."""

    def __init__(self, model: GPT, model_fn, val_tokens: Tensor, h, ctx, val_bytes, dump):
        self.model, self.fn = model, model_fn
        self.val, self.bytes, self.dump = val_tokens, val_bytes, dump
        self.h, self.ctx = h, ctx
        self.lora = Adapters(model, h, h.TTT_BATCH_SIZE).to(ctx.device)
        lr = h.TTT_LORA_LR * h.TTT_LOCAL_LR_MULT
        self.opt = torch.optim.AdamW(self.lora.parameters(), lr=lr, eps=LORA_ADAM_EPS,
                                     betas=(h.TTT_BETA1, h.TTT_BETA2), weight_decay=h.TTT_WEIGHT_DECAY)
        self.meter, self.lengths = BpbMeter(ctx.device), lora_row_lengths(h)
        self.pause_rows = ceil_div(h.GLOBAL_TTT_BATCH_SEQS, ctx.world)

    def warmup(self, pauses: bool):
        """Compiles every graph of the pass on random tokens, never validation tokens (#1530's flagged
        mistake): the adapted forward and backward at each row length, and a pause's SGD step. It takes no
        optimizer step, so nothing changes."""
        h, ctx = self.h, self.ctx
        R = h.TTT_BATCH_SIZE
        gen = torch.Generator(ctx.device).manual_seed(h.SEED)

        def rand(rows: int, T: int) -> Tensor:
            return torch.randint(0, h.VOCAB_SIZE, (rows, T), device=ctx.device, generator=gen)

        requires_grad(self.model, pauses)
        if pauses:
            shape = (self.pause_rows, h.TTT_EVAL_SEQ_LEN)
            with ctx.autocast():
                self.fn(rand(*shape), rand(*shape)).sum().backward()
        requires_grad(self.model, False)
        for T in self.lengths:
            with ctx.autocast():
                self.fn(rand(R, T), rand(R, T), self.lora).sum().backward()
        for p in list(self.model.parameters()) + list(self.lora.parameters()):
            p.grad = None

    def rows(self, docs: np.ndarray, c: int, C: int):
        """Chunk c (of C targets) of each document (a row): the window of up to TTT_EVAL_SEQ_LEN tokens ending
        at the chunk's end, padded to a row length. Masks: the chunk's targets (scored), those of rows with a
        later chunk (trained on). Padding rows and finished documents score nothing."""
        h = self.h
        d = np.zeros((h.TTT_BATCH_SIZE, 2), dtype=np.int64)
        d[:len(docs)] = docs
        end = np.minimum((c + 1) * C, d[:, 1])  # document-relative
        ws = np.maximum(end - h.TTT_EVAL_SEQ_LEN, 0)
        geo = np.stack([d[:, 0] + ws, end - ws, np.minimum(c * C, end) - ws, d[:, 1] > end], axis=1)
        geo = torch.from_numpy(geo.astype(np.int64)).to(self.ctx.device)
        T = row_length(self.lengths, min((c + 1) * C, h.TTT_EVAL_SEQ_LEN))
        t = torch.arange(T, device=self.ctx.device)
        idx, valid = geo[:, :1] + t, t < geo[:, 1:2]
        scored = valid & (t >= geo[:, 2:3])
        idx = idx.clamp(max=self.val.numel() - 2)  # target indices; the clamped ones are padding
        x, y = torch.where(valid, self.val[idx], 0), torch.where(valid, self.val[idx + 1], 0)
        return x, y, idx, scored, scored & (geo[:, 3:] > 0)

    def score_batch(self, docs: np.ndarray, C: int, first_step: int, train: bool, keep_a: bool, seed: int):
        """Scores the documents in chunks of C; after each chunk (but a document's last) one Adam step on its
        targets. Scores come from the forward before the step that trains on them."""
        self.lora.reset(keep_a, seed)
        self.opt.state.clear()
        n_chunks = ceil_div(int(docs[:, 1].max()), C)
        for c in range(n_chunks):
            x, y, idx, scored, trained = self.rows(docs, c, C)
            with self.ctx.autocast():
                nll = self.fn(x, y, self.lora)
            self.meter.add(nll.detach(), self.bytes[idx + 1], scored)
            if self.dump is not None:
                self.dump.add(idx, scored, nll, first_step + c)
            if train and c < n_chunks - 1:  # the longest document has a later chunk
                ((nll * trained).sum() / C).backward()  # per-row means, summed
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)

    def pause(self, docs: np.ndarray):
        """#1610's pause: SGD on the base weights over `docs`, all scored already, in rows of at most
        TTT_EVAL_SEQ_LEN targets of one document each; cosine LR over GLOBAL_TTT_CHUNK_TOKENS chunks."""
        h, L = self.h, self.h.TTT_EVAL_SEQ_LEN
        pieces = doc_pieces(docs, L)
        starts = np.cumsum(pieces[:, 1]) - pieces[:, 1]
        _, chunk_of = np.unique(starts // h.GLOBAL_TTT_CHUNK_TOKENS, return_inverse=True)
        n = chunk_of.max() + 1
        state = TTTState(self.model, "sgd", h.GLOBAL_TTT_LR, h.GLOBAL_TTT_MOMENTUM, h.GLOBAL_TTT_GRAD_CLIP,
                         self.pause_rows)
        requires_grad(self.model, True)
        for k in range(n):
            for g in state.opt.param_groups:
                g["lr"] = cosine(h.GLOBAL_TTT_LR, k, n)
            for _ in range(h.GLOBAL_TTT_EPOCHS):
                train_pieces(self.fn, state, self.val, pieces[chunk_of == k], h.GLOBAL_TTT_BATCH_SEQS, L,
                             self.ctx)
        requires_grad(self.model, False)
        for p in state.params:
            p.grad = None


class LoraBudget:
    """Whether this rank keeps adapting: while its pass (its batches and the pauses), projected from the work
    done so far at the rate measured so far, ends within EVAL_BUDGET_SECONDS of the first scored token. Each
    rank decides before each batch on its own; the ranks agree at each pause (a rank that stopped cancels
    it) and at the end. After a stop, the rest is scored by the model as it stands (adapters at zero)."""

    def __init__(self, total: float, n_batches: int, h, ctx, t0: float):
        self.total, self.done = total, 0.0
        self.h, self.ctx = h, ctx
        self.t0, self.n_batches = t0, n_batches
        self.adapting, self.all_stopped = True, False
        self.stop = (math.inf, 0.0, 0.0)  # (batch, elapsed, projected) of this rank's stop

    def keeps_adapting(self, q: int) -> bool:
        elapsed = time.perf_counter() - self.t0
        projected = elapsed * self.total / self.done if self.done else elapsed
        if self.adapting and projected > self.h.EVAL_BUDGET_SECONDS:
            self.adapting, self.stop = False, (q, elapsed, projected)
        return self.adapting

    def agreed(self) -> bool:
        """Whether every rank still adapts (a collective until one has stopped); once one has, none does, and
        the first stop is logged."""
        if not self.all_stopped and self.ctx.any(not self.adapting):
            q, elapsed = -self.ctx.max_across(-self.stop[0]), self.ctx.max_across(self.stop[1])
            projected = self.ctx.max_across(self.stop[2])
            self.ctx.log(f"ttt:budget_stop batch:{int(q) + 1}/{self.n_batches} elapsed:{elapsed:.1f}s "
                         f"projected:{projected:.1f}s budget:{self.h.EVAL_BUDGET_SECONDS:.0f}s")
            self.adapting, self.all_stopped = False, True
        return not self.all_stopped


def eval_val_ttt_lora(model: GPT, model_fn, val_tokens: Tensor, h, ctx, val_bytes, dump=None):
    """Per-document LoRA TTT with phased global SGD, score-first in DocPlan's order. Returns (val_loss,
    val_bpb, ttt_eval_time): timed as the records time it, from the first scored token, after the warm-up."""
    run = LoraTTT(model, model_fn, val_tokens, h, ctx, val_bytes, dump)
    t0 = time.perf_counter()
    run.warmup(pauses=h.PHASED_TTT_NUM_PHASES > 0 and h.PHASED_TTT_PREFIX_DOCS > 0)
    ctx.sync()
    ctx.log(f"ttt_lora:compile warmup done ({time.perf_counter() - t0:.1f}s)")
    log_compiled_graphs(ctx, "ttt_warmup")
    t0 = time.perf_counter()
    ctx.log("beginning TTT eval timer")
    plan = DocPlan(find_docs(val_tokens), h, run.lengths)
    ctx.log(plan.describe())
    mine = [plan.rank_batches(lo, hi, ctx.world, ctx.rank) for lo, hi in plan.segments()]
    total = sum(plan.cost[q] for batches in mine for q in batches) + sum(plan.pause_cost) / ctx.world
    guard, progress = LoraBudget(total, plan.n_batches, h, ctx, t0), Progress()
    for p, batches in enumerate(mine):
        if p and guard.agreed():
            docs = plan.scored(plan.ends[p - 1])
            ctx.log(f"ttpp: phase:{p}/{len(plan.ends)} gd:{len(docs)} t:{time.perf_counter() - t0:.1f}s")
            run.pause(docs)
            guard.done += plan.pause_cost[p - 1] / ctx.world
            ctx.log(f"ttpr: phase:{p}/{len(plan.ends)} t:{time.perf_counter() - t0:.1f}s")
        for k, q in enumerate(batches):
            keep_a = h.TTT_WARM_START_A and k > 0  # fresh A in each rank's first batch of a phase
            train = guard.keeps_adapting(q)
            run.score_batch(plan.batch(q), int(plan.chunk[q]), int(plan.first_step[q]), train, keep_a,
                            h.SEED + 1 + q)
            guard.done += plan.cost[q]
            if ctx.master and progress.due():  # rank 0's running numbers (the others' would be discarded)
                rl, rb = run.meter.result(reduce=False)
                ctx.log(f"ttp: b{q + 1}/{plan.n_batches} rl:{rl:.4f} rb:{rb:.4f} (this rank's) gd:{p} "
                        f"t:{time.perf_counter() - t0:.1f}s")
    guard.agreed()
    vl, vb = run.meter.result()
    requires_grad(model, True)
    return vl, vb, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Main: named stages
# ----------------------------------------------------------------------------------------------

def log_environment(h: Hyperparameters, ctx: Context):
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        ctx.log(f.read(), console=False)
    ctx.log("=" * 100, console=False)
    ctx.log(f"Running Python {sys.version}", console=False)
    ctx.log(f"Running PyTorch {torch.__version__}", console=False)
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi: not available"
    ctx.log(smi, console=False)
    ctx.log("=" * 100, console=False)
    for name, value in h.items():
        ctx.log(f"hparam:{name}={value}")


def build_model(h: Hyperparameters, ctx: Context) -> GPT:
    torch.manual_seed(h.SEED)
    model = GPT(h).to(ctx.device)
    model.act_dtype = ctx.act_dtype
    return model


def log_model(model: GPT, h: Hyperparameters, ctx: Context):
    ctx.log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    ctx.log(f"rope_base:{h.rope_base:.2f} rope_scaling:{h.ROPE_SCALING} rope_dims:{h.ROPE_DIMS} "
            f"train_seq_len:{h.TRAIN_SEQ_LEN}")
    ctx.log(f"XSA:last_{h.XSA_LAST_N} active_layers:{[b.layer for b in model.blocks if b.use_xsa]}")
    ctx.log(f"preset:{h.PRESET} smear_gate:{h.SMEAR_GATE} sparse_attn_gate:{h.SPARSE_ATTN_GATE_ENABLED} "
            f"skip_gates:{h.SKIP_GATES_ENABLED} parallel_start_layer:{h.PARALLEL_START_LAYER} "
            f"num_loops:{h.NUM_LOOPS} "
            f"looped_order:{model.loop_order} enable_looping_at:{h.ENABLE_LOOPING_AT}")
    ctx.log(f"world_size:{ctx.world} grad_accum_steps:{ctx.grad_accum}")
    ctx.log(f"attention_mode:gqa num_heads:{h.NUM_HEADS} num_kv_heads:{h.NUM_KV_HEADS}")
    ctx.log(f"tie_embeddings:True embed_lr:{h.TIED_EMBED_LR} head_lr:{h.TIED_EMBED_LR} "
            f"matrix_lr:{h.MATRIX_LR} scalar_lr:{h.SCALAR_LR}")
    ctx.log(f"train_batch_tokens:{h.TRAIN_BATCH_TOKENS} train_seq_len:{h.TRAIN_SEQ_LEN} "
            f"iterations:{h.ITERATIONS} "
            f"warmup_steps:{h.WARMUP_STEPS} max_wallclock_seconds:{h.MAX_WALLCLOCK_SECONDS:.3f}")
    ctx.log(f"seed:{h.SEED}")


def stage_train(h: Hyperparameters, ctx: Context, val_tokens: Tensor, val_bytes) -> str:
    """Train; collect Hessians and run GPTQ on the training clock; report the pre-quantization score; write
    the artifact."""
    local_batch_tokens(h, ctx)
    ctx.log(f"train_loader:dataset:{os.path.basename(os.path.normpath(h.DATA_PATH))} "
            f"train_shards:{len(list_shards(f'{h.DATA_PATH}/fineweb_train_*.bin'))}")
    model = build_model(h, ctx)
    log_model(model, h, ctx)
    budget = Budget(h, estimate_gptq_ms(model, h, ctx))
    run = train_model(model, h, ctx, budget, val_tokens, val_bytes)
    with fp32_matmuls():
        hessians = collect_hessians(model, run.loader, h, ctx, run.clock, budget)
        entries = quantize_state(model, hessians, h, ctx) if ctx.master else None
    ctx.barrier()
    run.clock.pause()
    done = run.clock.ms()
    over = budget.over_cap(done)
    ctx.log(f"gptq:done train_time:{done:.0f}ms" + (f" OVER_CAP_BY:{over:.0f}ms" if over else ""))
    t0 = time.perf_counter()
    vl, vb = eval_val(run.model_c, val_tokens, h, ctx, val_bytes)
    ctx.log(f"DIAGNOSTIC post_ema val_loss:{vl:.4f} val_bpb:{vb:.4f} "
            f"eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    meta = {"prequant_val_loss": vl, "prequant_val_bpb": vb, "val_targets": val_tokens.numel() - 1,
            "eval": {k: getattr(h, k) for k in EVAL_KEYS}, "train_time_ms": run.clock.ms(), "seed": h.SEED}
    return pack_artifact(entries, h, ctx, meta)


def adopt_artifact_settings(path: str, h: Hyperparameters, ctx: Context):
    """A re-evaluation scores as the run did: the artifact's model, and its evaluation settings except those
    set in the environment (each difference is logged)."""
    with open(path, "rb") as f:
        header, _ = unpack_header(f.read(), path)
    stored = header["meta"].get("eval", {})  # an artifact packed outside stage_train may have none
    mine = {k for k in stored if k in h.explicit and getattr(h, k) != stored[k]}
    for k in sorted(mine):
        ctx.log(f"eval_setting:{k}={getattr(h, k)} set explicitly; the run used {stored[k]}")
    adopted = {k: v for k, v in stored.items() if k not in mine and getattr(h, k) != v}
    if adopted:
        ctx.log("eval_setting:from_artifact " + " ".join(f"{k}={v}" for k, v in adopted.items()))
    h.update(header["config"] | adopted)


def load_eval_model(path: str, h: Hyperparameters, ctx: Context) -> tuple[GPT, dict]:
    """Every rank reads the artifact from disk, as a fresh process would, into a freshly built model."""
    config, meta, entries = read_artifact(path)
    h.update(config)
    ctx.log(f"eval_model:{path} rope_base:{h.rope_base:.2f}")
    model = build_model(h, ctx)
    state = {k: v.to(ctx.device) for k, v in dequantize_state(entries, h.NUM_LAYERS).items()}
    model.load_state_dict(state, strict=True)
    if h.ASYM_LOGIT_RESCALE:  # not trained with the model: TTT's full-weight SGD trains them (lora: pauses)
        model.logit_caps = nn.Parameter(torch.full((2,), h.LOGIT_SOFTCAP, device=ctx.device))
    model.looping = h.NUM_LOOPS > 0
    model.eval()
    return model, meta


def log_metric(ctx, name: str, vl: float, vb: float, extra: str = ""):
    ctx.log(f"{name} val_loss:{vl:.4f} val_bpb:{vb:.4f}{extra}")
    ctx.log(f"{name}_exact val_loss:{vl:.8f} val_bpb:{vb:.8f}")


def stage_evaluate(path: str, h: Hyperparameters, ctx: Context, val_tokens: Tensor, val_bytes):
    """Roundtrip, sliding window (if enabled) and TTT (if enabled) on the reloaded artifact. final_eval_time
    counts everything from reading the artifact; ttt_eval_time only the TTT pass (lora mode: from its first
    scored token, after the compile warm-up, as the records count it)."""
    t_eval0 = time.perf_counter()
    model, meta = load_eval_model(path, h, ctx)
    model_fn = compile_model(model, ctx)
    dump = TokenDump(val_tokens.numel() - 1, ctx.device) if h.DUMP_TOKEN_NLL else None

    def timed(fn, *args, **kw):
        ctx.sync()
        t = time.perf_counter()
        out = fn(*args, **kw)
        ctx.sync()
        return out, 1000 * (time.perf_counter() - t)

    (vl, vb), ms = timed(eval_val, model_fn, val_tokens, h, ctx, val_bytes)
    log_metric(ctx, "final_int6_roundtrip", vl, vb, f" eval_time:{ms:.0f}ms")
    if "prequant_val_bpb" in meta:
        L, n = meta["eval"]["EVAL_SEQ_LEN"], meta["val_targets"]
        same = (L, n) == (h.EVAL_SEQ_LEN, val_tokens.numel() - 1)
        ctx.log(f"quant_gap val_bpb:{vb - meta['prequant_val_bpb']:+.6f}" if same else
                f"quant_gap:n/a (prequant scored {n} targets at EVAL_SEQ_LEN={L})")
    if h.SLIDING_WINDOW_ENABLED:  # the dump holds the last pass
        last = None if h.TTT_ENABLED else dump
        (vl, vb), ms = timed(eval_val_sliding, model_fn, val_tokens, h, ctx, val_bytes, last)
        log_metric(ctx, "final_int6_sliding_window", vl, vb, f" stride:{h.EVAL_STRIDE} eval_time:{ms:.0f}ms")
    if h.TTT_ENABLED and h.TTT_MODE == "lora":  # timed from its first scored token, after its warm-up
        vl, vb, ttt_s = eval_val_ttt_lora(model, model_fn, val_tokens, h, ctx, val_bytes, dump)
        log_metric(ctx, "quantized_ttt_phased", vl, vb, f" eval_time:{1000 * ttt_s:.0f}ms")
    elif h.TTT_ENABLED:
        (vl, vb), ms = timed(eval_val_ttt, model, model_fn, val_tokens, h, ctx, val_bytes, t_eval0, dump)
        log_metric(ctx, "legal_ttt", vl, vb, f" eval_time:{ms:.0f}ms")
        ttt_s = ms / 1000
    if h.TTT_ENABLED:
        ctx.log(f"ttt_eval_time:{ttt_s:.1f}s budget:{h.EVAL_BUDGET_SECONDS:.0f}s")
    if model.logit_caps is not None:  # where TTT moved them
        ctx.log("asym_logit_caps: pos:{:.6f} neg:{:.6f}".format(*model.logit_caps.tolist()))
    if dump is not None:
        dump.save(h.DUMP_TOKEN_NLL, ctx)
    log_compiled_graphs(ctx, "evaluation")
    ctx.log(f"final_eval_time:{time.perf_counter() - t_eval0:.1f}s budget:{h.EVAL_BUDGET_SECONDS:.0f}s")


def check_outputs(h: Hyperparameters):
    """Fails at start-up, not after training: each file the run writes needs a writable directory, and the
    cap fit's code size needs brotli."""
    if not h.EVAL_ARTIFACT:
        _codec("brotli")
    for name in ("DUMP_TOKEN_NLL",) + (() if h.EVAL_ARTIFACT else ("ARTIFACT_PATH",)):
        path = getattr(h, name)
        folder = os.path.dirname(os.path.abspath(path))
        if path and os.path.isdir(path):
            raise ValueError(f"{name}={path}: cannot be written (a directory)")
        if path and not os.access(folder, os.W_OK):
            raise ValueError(f"{name}={path}: cannot be written ({folder}: missing or read-only)")


def report_crash(e: BaseException, ctx: Context | None):
    """A crash's traceback goes into the run log, and one `error:` line, printed last and once (rank 0), to
    the console: under torchrun, eight tracebacks would bury it. The other ranks log their error line."""
    line = f"error: {type(e).__name__}: {e}"
    rank = int(os.environ.get("RANK", "0"))
    if ctx is not None:
        with contextlib.suppress(OSError), open(ctx.logfile, "a", encoding="utf-8") as f:
            if rank == 0:
                traceback.print_exception(e, file=f)
            print(line if rank == 0 else f"rank {rank}: {line}", file=f)
    if rank == 0:
        print(line + (f" (traceback: {ctx.logfile})" if ctx else ""), file=sys.stderr, flush=True)


def run(h: Hyperparameters, ctx: Context):
    log_environment(h, ctx)
    check_outputs(h)
    ctx.log(f"attention_backend:{set_attention_backend(ctx.device)}")
    if ctx.cuda and ATTN_BACKEND == "sdpa":
        ctx.log(pin_sdpa_kernels(h))
    if h.EVAL_ARTIFACT:
        adopt_artifact_settings(h.EVAL_ARTIFACT, h, ctx)
    sp = load_tokenizer(h.TOKENIZER_PATH, h.VOCAB_SIZE)
    check_manifest(h, ctx)
    ctx.log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={h.TOKENIZER_PATH}")
    val_tokens, val_bytes = load_validation(h, ctx, sp)
    ctx.log(f"val_loader:shards pattern={h.DATA_PATH}/{VAL_SHARDS} tokens:{val_tokens.numel() - 1}")
    path = h.EVAL_ARTIFACT or stage_train(h, ctx, val_tokens, val_bytes)
    stage_evaluate(path, h, ctx, val_tokens, val_bytes)
    if dist.is_initialized():
        dist.barrier()  # no rank tears down while another still talks to it (gloo aborts at exit otherwise)
        dist.destroy_process_group()


def main():
    ctx = None
    try:
        h = Hyperparameters()
        ctx = Context(h)
        run(h, ctx)
    except (Exception, KeyboardInterrupt) as e:
        report_crash(e, ctx)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


if __name__ == "__main__":
    main()
