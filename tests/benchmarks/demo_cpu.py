#!/usr/bin/env python3
"""README's demo command as it stands (`PRESET=demo python train_gpt.py`), timed on this machine.

Runs it in a scratch folder shaped like a checkout (train_gpt.py and data/ linked), stamps every console line
with the seconds since launch, and prints a Markdown record: the machine, the wall time, the longest silence
between two lines, and the log without its hparam: lines.

  python tests/benchmarks/demo_cpu.py --out tests/benchmarks/results/demo_cpu_<date>.md
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from presets_cpu import emit, machine

ROOT = Path(__file__).resolve().parents[2]


def readme_demo_command() -> str:
    quick = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Quick start\n")[1]
    install_and_demo = re.search(r"```bash\n(.*?)\n```", quick, re.S)[1]
    return install_and_demo.split(" && ", 1)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the Markdown here")
    args = ap.parse_args()
    cmd = readme_demo_command()
    with tempfile.TemporaryDirectory() as work:
        for name in ("train_gpt.py", "data"):
            os.symlink(ROOT / name, Path(work) / name)
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # `python` is this one
        env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=path)
        start, stamped = time.time(), []
        proc = subprocess.Popen(["bash", "-c", cmd], cwd=work, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            stamped.append((time.time() - start, line.rstrip("\n")))
        wall = time.time() - start
    assert proc.wait() == 0, "\n".join(line for _, line in stamped[-20:])
    times = [0.0] + [t for t, _ in stamped]
    import torch
    lines = [f"# README's demo on CPU ({machine()})", "",
             f"`{cmd}` (README, Quick start), from a scratch folder shaped like the checkout; Python "
             f"{platform.python_version()}, torch {torch.__version__}.", "",
             f"- wall time: {wall:.0f} s ({wall / 60:.1f} min); longest silence between two lines: "
             f"{max(b - a for a, b in zip(times, times[1:])):.0f} s", "",
             "The console, seconds since launch (without the `hparam:` lines):", "", "```text"]
    lines += [f"{t:6.1f} {line}" for t, line in stamped if not line.startswith("hparam:")] + ["```"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
