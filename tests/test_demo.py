"""The CPU demo and README's commands (issue 32): PRESET=demo on the sample shipped in data/sample, the
shipped shards against the builder's output, and every command of the READMEs as it stands."""
import filecmp
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
import train_gpt as tg

SAMPLE = ROOT / "data" / "sample"
DOCS = ("README.md", "data/README.md", "data/sample/README.md")  # the READMEs whose commands a reader pastes
SEPARATORS = {"&&", "||", ";", "|", "(", ")"}


def bash_blocks(doc: str, section: str = "") -> list[str]:
    """The ```bash blocks of a markdown file (those under one `## section` heading if given)."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    if section:
        text = text.split(f"\n## {section}\n")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """Each simple command of a block as words, leading VAR=value assignments included."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        cur = []
        for word in [*lex, ";"]:
            if word in SEPARATORS:
                out, cur = out + [cur] * bool(cur), []
            elif not (cur == [] and word in ("do", "done", "then", "fi")):
                cur.append(word)
    return [c for c in out if c[0] != "for"]


def split_env(cmd: list[str]) -> tuple[dict, list[str]]:
    """A command's leading VAR=value assignments, and its words."""
    n = next((i for i, w in enumerate(cmd) if not re.match(r"[A-Z_][A-Z0-9_]*=", w)), len(cmd))
    return dict(w.split("=", 1) for w in cmd[:n]), cmd[n:]


# ---------------------------------------------------------------- the demo preset and the shipped sample

def test_demo_preset_is_what_readme_documents():
    """README's presets row for `demo` lists every value the preset sets, and they resolve to it."""
    row = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
               if line.startswith("| `demo` |"))
    documented = dict(re.findall(r"`([A-Z_]+)=([^`]*)`", row))
    assert set(documented) == set(tg.PRESETS["demo"])
    demo = tg.Hyperparameters({"PRESET": "demo", "RUN_ID": "x"})
    written = tg.Hyperparameters(dict(documented, RUN_ID="x"))
    def resolved(h):
        return [kv for kv in h.items() if kv[0] != "PRESET"]
    assert resolved(demo) == resolved(written)
    assert demo.items() != tg.Hyperparameters({"RUN_ID": "x"}).items()
    assert (ROOT / demo.DATA_PATH / "fineweb_val_000000.bin").is_file()
    assert (ROOT / demo.TOKENIZER_PATH).is_file()


def test_shipped_shards_are_what_the_builder_writes(tmp_path):
    """data/sample/README.md's rebuild command, pointed at an empty folder, writes the shipped shards and
    manifest byte for byte; the shipped tokenizer is the challenge's (sha256 from its provenance)."""
    [block] = bash_blocks("data/sample/README.md")
    [cmd] = commands(block)
    out = cmd.index("--output") + 1
    assert cmd[:2] == ["python", "data/build_shards.py"] and cmd[out] == "data/sample"
    cmd[out] = str(tmp_path)
    r = subprocess.run([sys.executable, *cmd[1:], "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "manifest.json"]
    assert all(filecmp.cmp(tmp_path / name, SAMPLE / name, shallow=False) for name in built)
    assert (sorted(p.name for p in SAMPLE.iterdir()) ==
            sorted(built + ["README.md", "fineweb_1024_bpe.model", "train.jsonl", "val.jsonl"]))
    sha = "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a"
    assert sha in (SAMPLE / "README.md").read_text()
    assert f'"sha256": "{sha}"' in (SAMPLE / "manifest.json").read_text()


# ---------------------------------------------------------------- README's commands

def test_quick_start_is_install_and_demo_then_install_and_tests():
    """Two commands: install + the demo, install + the tests; the second is .ci/run's (without pip's -q)."""
    demo, tests = [b.strip() for b in bash_blocks("README.md", "Quick start")]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci.replace("pip install -q ", "pip install ")
    install = tests.split(" && ")[0]
    assert demo == f"{install} && PRESET=demo python train_gpt.py"


def test_readme_demo_command_runs_the_whole_job(tmp_path):
    """README's demo command as it stands, from a checkout-shaped folder, shortened by settings only (4 steps,
    one TTT epoch, a stride of a whole window): every stage runs and ends with the lineage's lines."""
    demo = bash_blocks("README.md", "Quick start")[0].strip().split(" && ", 1)[1]
    for name in ("train_gpt.py", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, ITERATIONS="4", TTT_EPOCHS="1", EVAL_STRIDE="256", RUN_ID="demo",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", "-c", demo], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "logs" / "demo.txt").read_text()
    for line in ("hparam:PRESET=demo", "hparam:ITERATIONS=4", "hparam:DATA_PATH=./data/sample",
                 "step:4/4 val_loss:", "gptq:quantized", "Total submission size int6+pergroup:",
                 "final_int6_roundtrip_exact", "final_int6_sliding_window_exact", "legal_ttt_exact",
                 "final_eval_time:"):
        assert line in log, line
    assert (tmp_path / "final_model.int6.ptz").is_file()


@functools.lru_cache(maxsize=None)
def script_help(*script: str) -> str:
    r = subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (script, r.stderr)
    return r.stdout


def check_command(cmd: list[str], block: str):
    """A script it runs is in the checkout and takes each --flag given (per subcommand); settings given to
    train_gpt.py are its own and valid; a bare assignment is a shell variable the block then uses."""
    env, words = split_env(cmd)
    scripts = [w for w in words if w.endswith(".py")]
    if not words:
        assert all(f"${name}" in block for name in env), cmd
    elif words[0] in ("python", "python3", "torchrun") and scripts:
        assert (ROOT / scripts[0]).is_file(), cmd
        args = words[words.index(scripts[0]) + 1:]
        sub = args[:1] if args and args[0] in ("new", "check", "parse", "compare") else []
        flags = [w.split("=")[0] for w in args if w.startswith("--")]
        assert all(f in script_help(scripts[0], *sub) for f in flags), cmd
        if scripts[0] == "train_gpt.py":
            tg.Hyperparameters({k: v for k, v in env.items() if "$" not in v})  # a bad one raises, naming it


@pytest.mark.parametrize("doc", DOCS)
def test_readme_commands_are_copy_pasteable(doc):
    """Every bash block parses, holds no <placeholder> and no path to our machines' ../shared, and each
    command passes check_command."""
    blocks = bash_blocks(doc)
    assert blocks
    for block in blocks:
        r = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert r.returncode == 0, (block, r.stderr)
        assert "../shared" not in block and "<" not in block, block
        for cmd in commands(block):
            check_command(cmd, block)
