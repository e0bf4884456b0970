"""The README's CLI examples do what they say.

Which lines run: every line of a ```bash block that follows a `<!-- runnable: ... -->` comment in
README.md, from an empty directory, with `kvtier` replaced by `python -m kvtier.cli`
(the CPU, the default model). Lines without `kvtier` (creating prompts.txt) run first; the kvtier
lines then run two at a time, each pinned to a core of its own (taskset) so that they do not fight
over both.
Each kvtier line must exit 0 and pass the check below whose key it contains; every check must
find its line, so that the runnable set cannot quietly shrink.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
APOLOGY = re.compile(r"sorry|apologi|I can't|I cannot|as an AI", re.IGNORECASE)


def runnable_lines(text: str) -> list[str]:
    """The lines of every bash block marked runnable, comment-only lines left out."""
    lines, blocks = [], re.findall(r"<!-- runnable:.*?-->\s*```bash\n(.*?)```", text, re.DOTALL)
    for block in blocks:
        lines += [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


def _check_france(out: str) -> None:
    assert "Paris" in out


def _check_json(out: str) -> None:
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2  # the two prompts of prompts.txt
    assert all(r["text"].strip() and r["finish_reason"] in ("stop", "length") for r in records)
    assert all(len(r["logprobs"]) == len(r["token_ids"]) for r in records)


def _check_raw_completion(out: str) -> None:
    completion = out.split("\n", 1)[1].rsplit("\n[", 1)[0]  # between the prompt line and the [stats] line
    assert completion.strip() and not APOLOGY.search(completion), completion


def _check_piped_chat(out: str) -> None:
    lines = [line for line in out.splitlines() if line.startswith(("you> ", "assistant> "))]
    assert [line.split("> ")[0] for line in lines] == ["you", "assistant"] * 2, out
    assert lines[0] == "you> Hi! Who are you?" and "assistant>" not in lines[0]


def _check_help(out: str) -> None:
    assert out.startswith("usage: kvtier generate") and "(default: 128)" in out


CHECKS = {"What is the capital of France?": _check_france, "--json": _check_json,
          "--no-chat-template": _check_raw_completion, "| kvtier chat": _check_piped_chat,
          "generate --help": _check_help}


def _shell(line: str, core: int | None) -> str:
    """The line with `python -m kvtier.cli` for `kvtier`, pinned to `core` (its default --cpu-threads is then 1)."""
    pin = f"taskset -c {core} " if core is not None else ""
    python = shlex.quote(sys.executable)
    return re.sub(r"(^|\|\s*)kvtier\b", lambda m: f"{m.group(1)}{pin}{python} -m kvtier.cli", line)


def _run_pinned(commands: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Each command on a core of its own, two at a time where two cores and taskset are there."""
    cores: queue.Queue[int | None] = queue.Queue()
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    for core in (mine[:2] if shutil.which("taskset") and len(mine) >= 2 else [None]):
        cores.put(core)
    env = {**os.environ, "PYTHONPATH": str(README.parent), "CUDA_VISIBLE_DEVICES": ""}  # the CPU, as the README says
    if cores.qsize() > 1:
        env["OMP_NUM_THREADS"] = "1"  # one thread on its one core, whatever the caller's setting

    def run(line: str) -> subprocess.CompletedProcess:
        core = cores.get()
        try:
            return subprocess.run(_shell(line, core), shell=True, cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=300, stdin=subprocess.DEVNULL)
        finally:
            cores.put(core)
    with ThreadPoolExecutor(cores.qsize()) as pool:
        return list(pool.map(run, commands))


def test_readme_cli_examples(tmp_path):
    lines = runnable_lines(README.read_text())
    commands = [line for line in lines if re.search(r"(^|\|\s*)kvtier\b", line)]
    unchecked = [key for key in CHECKS if not any(key in c for c in commands)]
    assert not unchecked, f"no runnable README example for {unchecked}"
    for line in lines:
        if line not in commands:  # set-up, such as writing prompts.txt
            subprocess.run(line, shell=True, cwd=tmp_path, check=True)
    for line, result in zip(commands, _run_pinned(commands, tmp_path)):
        assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
        for key, check in CHECKS.items():
            if key in line:
                check(result.stdout)
