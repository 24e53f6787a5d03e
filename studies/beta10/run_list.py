"""Run screening variants from a list file, ``--jobs`` at a time.

One variant per line: ``name|{GOTRegularizer kwargs as JSON, empty for TRADES}|extra screen.py flags``.
Arguments after the known ones are passed to every ``screen.py`` call.
"""

import argparse
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("list")
    p.add_argument("--out", required=True)
    p.add_argument("--jobs", type=int, default=2)
    a, extra = p.parse_known_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for line in Path(a.list).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kw, flags = (line.split("|") + ["", ""])[:3]
        cmd = [
            sys.executable,
            "-m",
            "studies.beta10.screen",
            "--name",
            name.strip(),
            "--out",
            str(out),
            *extra,
            *shlex.split(flags),
        ]
        if kw.strip():
            cmd += ["--got", kw.strip()]
        jobs.append((name.strip(), cmd))

    def run(job):
        name, cmd = job
        with open(out / f"{name}.log", "w") as log:
            return name, subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)

    with ThreadPoolExecutor(a.jobs) as ex:
        for name, rc in ex.map(run, jobs):
            print(name, rc, flush=True)


if __name__ == "__main__":
    main()
