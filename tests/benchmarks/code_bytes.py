#!/usr/bin/env python3
"""How train_gpt.py's code is counted, against the alternatives; optionally, how long artifacts take to read.

Rows: the file; its wrapper unstripped; the wrapper train_gpt.py counts (stripped: `strip_source`); the same
wrapper of python-minifier's output with #1855's flags (when `pyminify` is installed). With --artifacts, the
seconds `read_artifact` takes for each (ZPAQ groups decode at ~0.24 MB/s a thread).

  python tests/benchmarks/code_bytes.py [--artifacts A.ptz ...] --out tests/benchmarks/results/code_bytes_<date>.md
"""
from __future__ import annotations

import argparse
import base64
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

MINIFY_1855 = ["--no-rename-locals", "--no-hoist-literals", "--remove-literal-statements", "--remove-asserts",
               "--prefer-single-line"]


def wrapped(text: str) -> int:
    """Bytes of the one-line wrapper around `text` as it is (no stripping)."""
    return len(tg.WRAPPER[0]) + len(base64.b85encode(tg._codec("brotli").compress(text.encode()))) + len(tg.WRAPPER[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", nargs="*", default=[])
    ap.add_argument("--out")
    args = ap.parse_args()
    src = (ROOT / "train_gpt.py").read_text()
    rows = [("train_gpt.py as written", len(src.encode())), ("its wrapper, unstripped", wrapped(src)),
            ("its wrapper, stripped (counted)", len(tg.wrap_code(src)))]
    if shutil.which("pyminify"):
        mini = subprocess.run(["pyminify", *MINIFY_1855, str(ROOT / "train_gpt.py")], capture_output=True,
                              text=True, check=True).stdout
        rows.append(("wrapper of python-minifier's output (#1855's flags)", wrapped(mini)))
    cmd = "python tests/benchmarks/code_bytes.py" + (f" --artifacts {' '.join(args.artifacts)}" if args.artifacts else "")
    out = [f"# Code bytes ({platform.node()}, {os.cpu_count()} cores, {datetime.date.today()})", "",
           f"Command: `{cmd}`", "",
           "Artifacts, when given: size_fit_cpu.py's full-size ones (near-init weights).", "", "| code | bytes |", "|---|---|", *[f"| {k} | {v:,} |" for k, v in rows]]
    if args.artifacts:
        out += ["", "| artifact | bytes | read_artifact seconds | codecs |", "|---|---|---|---|"]
        for a in args.artifacts:
            t0 = time.perf_counter()
            tg.read_artifact(a)
            took = time.perf_counter() - t0
            codecs = sorted({g["codec"] for g in tg.unpack_header(Path(a).read_bytes(), a)[0]["groups"]})
            out.append(f"| {a} | {os.path.getsize(a):,} | {took:.1f} | {', '.join(codecs)} |")
    text = "\n".join(out) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
