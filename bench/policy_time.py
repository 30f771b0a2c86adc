"""Benchmark: `policy compile` and `policy verify` of bench/scale.py's policy (issue 19).

The policy is the one bench/scale.py sets up (its `plant_policy` and `appliance`: the
synthetic plant of bench/pipeline.py, 10 signals an asset with the semantic model, written
as JSON, and its co-signed envelope). Each command is a `python -m broker` process, timed
from outside by bench/scale.py's `timed_cli`, as `policy_seconds` does there; the CPU time
the process used (user + system, from getrusage of children) is printed too, the figure to
compare on a loaded machine. With `--before TREE` (a `git archive` of an older commit) the
runs alternate between this tree and TREE, whose CLI runs from its own folder with the
same interpreter. Target at 100,000 signals: compile + verify <= 5 s (quiet machine).

Run from the repository root: `.venv/bin/python bench/policy_time.py --signals 100000`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import scale
from support import rusage_cpu_s

COMMANDS = ("compile", "verify")


def timed(tree: Path, setup: scale.Setup, workdir: Path, command: str) -> tuple[float, float]:
    """Wall and CPU seconds of one `policy COMMAND` run of the CLI in `tree`."""
    scale.REPO = tree  # timed_cli runs `python -m broker` from this folder
    before = rusage_cpu_s(resource.RUSAGE_CHILDREN)
    if command == "compile":
        out = workdir / "compiled.dsse.json"
        wall = scale.timed_cli("policy", "compile", str(setup.policy_yaml), "--out", str(out))
    else:
        wall = scale.timed_cli(
            "policy", "verify", str(setup.envelope), "--trust", str(setup.trust_root)
        )
    return wall, rusage_cpu_s(resource.RUSAGE_CHILDREN) - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signals", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command per tree")
    parser.add_argument("--before", type=Path, help="an older tree to alternate with")
    args = parser.parse_args()
    trees = {"this tree": scale.REPO}
    if args.before is not None:
        trees["before"] = args.before.resolve()
    with tempfile.TemporaryDirectory(prefix="policy-time-") as folder:
        workdir = Path(folder)
        setup = scale.appliance(workdir, scale.plant_policy(args.signals))
        size_mb = setup.envelope.stat().st_size / 1e6
        print(f"{args.signals:,} signals: policy.json {setup.policy_yaml.stat().st_size / 1e6:.0f}"
              f" MB, envelope {size_mb:.0f} MB")  # fmt: skip
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.repeat):
            for name, tree in trees.items():  # alternated: the load changes between runs
                for command in COMMANDS:
                    runs.setdefault((name, command), []).append(
                        timed(tree, setup, workdir, command)
                    )
    for name in trees:
        cells = []
        for command in COMMANDS:
            walls, cpus = zip(*runs[name, command], strict=True)
            cells.append(f"{command} {statistics.median(walls):.2f} s wall "
                         f"{statistics.median(cpus):.2f} s CPU")  # fmt: skip
        total = sum(statistics.median(c for _, c in runs[name, command]) for command in COMMANDS)
        print(f"{name:>9}: {'; '.join(cells)}; CPU together {total:.2f} s "
              f"(medians of {args.repeat})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
