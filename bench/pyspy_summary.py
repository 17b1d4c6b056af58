"""Summarise a py-spy profile of `bench/run` by process: where each gateway, receiver and worker spends its samples.

    pip install py-spy
    py-spy record -s --nonblocking -r 50 -f raw -o prof.txt -- python -u bench/run.py --only ingest,e2e --repeat 1
    python bench/pyspy_summary.py prof.txt

Each process is named by its role (the bench itself, a gateway by its work folder, `fork` for forkserver
children: receivers and workers); for each, the functions with the most samples of their own ("self") and the
ones most samples pass through ("incl", at least 8 % of the process's samples). py-spy counts a thread that is
inside a system call such as fsync as busy, so the sample counts are thread-seconds × rate, not CPU time.
"""

from __future__ import annotations

import collections
import re
import sys

PLUMBING = re.compile(
    r"bootstrap|Thread\.|runpy|forkserver|spawn|<module>|main\(\d+|_run_once|run_forever|runners"
)


def role(stack: list[str]) -> str:
    names = []
    for p in [f for f in stack if f.startswith("process ")][1:]:
        cmd = p.split(":", 1)[1]
        if "gateway run" in cmd:
            m = re.search(r"/([^/]+)/gateway\.toml", cmd)
            names.append("gateway " + (m.group(1) if m else "?"))
        elif "forkserver" in cmd:
            names.append("fork")
        else:
            names.append(cmd[:40])
    return " / ".join(names) or "bench"


def main(path: str) -> None:
    total: collections.Counter[str] = collections.Counter()
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    through: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with open(path, encoding="utf-8") as f:
        for line in f:
            stack_s, n_s = line.rstrip().rsplit(" ", 1)
            stack, n = stack_s.split(";"), int(n_s)
            key = role(stack)
            frames = [s for s in stack if not s.startswith("process ")]
            total[key] += n
            if frames:
                own[key][frames[-1]] += n
                for name in {re.sub(r":\d+\)$", ")", s) for s in frames}:
                    through[key][name] += n
    for key, n in total.most_common():
        print(f"== {key}: {n} samples")
        for name, c in own[key].most_common(8):
            print(f"   self {c:5d} {name[:120]}")
        for name, c in through[key].most_common(40):
            if c < n * 0.08:
                break
            if not PLUMBING.search(name):
                print(f"   incl {c:5d} {name[:120]}")


if __name__ == "__main__":
    main(sys.argv[1])
