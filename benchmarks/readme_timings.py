"""Wall time of every line of the README's "Command line" block, run in order as a new user
would (from the repository root, writing under runs/), plus ``make demo``'s job.

    .venv/bin/python benchmarks/readme_timings.py [--skip PATTERN ...]

Optional parts in brackets (``[--integer]``) are dropped; ``qrobust`` is the venv's. Writes
benchmarks/results/readme_timings.json and prints the markdown table of docs/timings.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from qrobust.hardware import cpu_info
from qrobust.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(readme: Path) -> list[str]:
    """The command lines of the README block that follows '## Command line'."""
    text = readme.read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        line = re.sub(r"\s*\[[^\]]*\]", "", line)
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def run(command: str) -> dict:
    argv = shlex.split(command)
    if argv[0] == "qrobust":
        argv[0] = str(Path(sys.executable).with_name("qrobust"))
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    tail = (done.stdout.strip().splitlines() or [""])[-1]
    return {"command": command, "seconds": round(seconds, 1), "rc": done.returncode,
            "last_line": tail[:300], "stderr_tail": done.stderr.strip()[-300:]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", action="append", default=[], help="skip lines containing this")
    ap.add_argument("--out", default="benchmarks/results/readme_timings.json")
    args = ap.parse_args(argv)
    commands = [*readme_commands(ROOT / "README.md"), "qrobust demo --out runs/demo"]
    rows = []
    for command in commands:
        if any(s in command for s in args.skip):
            rows.append({"command": command, "skipped": True})
            continue
        rows.append(run(command))
        print(f"{rows[-1]['seconds']:8.1f} s  rc={rows[-1]['rc']}  {command}", flush=True)
    out = {"benchmark": "readme_timings", "cpu": cpu_info().to_dict(), **provenance(),
           "rows": rows}
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("\n| command | wall time |\n|---|---|")
    for r in rows:
        shown = "skipped" if r.get("skipped") else f"{r['seconds']:.0f} s"
        print(f"| `{r['command']}` | {shown} |")
    return out


if __name__ == "__main__":
    main()
