"""Per-module mutation scores from mutmut's result files (``mutants/**/*.py.meta``).

Run after ``mutmut run``:  ``python .ci/mutation_scores.py [--equivalent FILE]``.
Prints a markdown table for the modules in ``[tool.mutmut] only_mutate``: mutants, killed,
survived, no tests, timeouts, equivalent, not run, and the score = (killed + timeout) /
(killed + timeout + survived + no tests), the mutants listed as equivalent in FILE left out
(one mutant name per line, ``#`` comments allowed; docs/mutation_equivalent.txt). Statuses are
mutmut's own (``mutmut.stats.status_by_exit_code``).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import tomllib


def load_equivalent(path: str | None) -> set[str]:
    if not path or not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()}


def in_scope() -> list[str]:
    with open("pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["mutmut"]["only_mutate"]


def scores(root: str = "mutants", equivalent: set[str] | None = None) -> list[dict]:
    from mutmut.stats import status_by_exit_code

    equivalent = equivalent or set()
    patterns = in_scope()
    rows = []
    for meta in sorted(glob.glob(os.path.join(root, "**", "*.py.meta"), recursive=True)):
        module = os.path.relpath(meta, root)[: -len(".meta")]
        if not any(fnmatch.fnmatch(module, p) for p in patterns):
            continue
        with open(meta, encoding="utf-8") as f:
            codes = json.load(f).get("exit_code_by_key", {})
        if not codes:
            continue
        row = {"module": module, "mutants": len(codes), "killed": 0, "survived": 0, "no_tests": 0, "timeout": 0,
               "not_run": 0, "equivalent": 0}
        for name, code in codes.items():
            status = status_by_exit_code[code]
            if name in equivalent:
                row["equivalent"] += 1
            elif status == "not checked":
                row["not_run"] += 1
            elif status == "survived":
                row["survived"] += 1
            elif status == "no tests":
                row["no_tests"] += 1
            elif status == "timeout":
                row["timeout"] += 1
            else:  # killed, segfault, suspicious: the tests noticed
                row["killed"] += 1
        detected = row["killed"] + row["timeout"]
        judged = detected + row["survived"] + row["no_tests"]
        row["score"] = detected / judged if judged else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="mutants")
    parser.add_argument("--equivalent", default="docs/mutation_equivalent.txt")
    args = parser.parse_args()
    rows = scores(args.root, load_equivalent(args.equivalent))
    print("| module | mutants | killed | survived | no tests | timeout | equivalent | not run | score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        score = f"{100 * r['score']:.1f}%" if r["score"] is not None else "–"
        print(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['no_tests']} | {r['timeout']} "
              f"| {r['equivalent']} | {r['not_run']} | {score} |")


if __name__ == "__main__":
    main()
