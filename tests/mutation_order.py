"""A pytest plugin for mutation runs only (``pyproject.toml``'s ``[tool.mutmut]`` loads it with
``-p tests.mutation_order``); inside a mutant's run (``MUTANT_UNDER_TEST`` names a mutant) it
makes that run cheaper, and ordinary runs of the suite are left alone:

- the forked child's inherited heap (torch, transformers, the collected tests: millions of
  objects) is frozen out of the garbage collector (``gc.freeze()``), so pytest's end-of-session
  ``gc.collect()`` scans only what the mutant's tests made instead of walking, and
  copy-on-write copying, the whole inherited heap (51% of the children's samples in a py-spy
  profile of an ``ep_core`` run);
- torch runs on one thread: two children share the 2 cores, and two OpenMP threads each
  oversubscribe them; their spin-waiting then counts as CPU time, and mutmut's limit is CPU
  time, so a surviving mutant could be taken for a timeout;
- each run appends one line to ``mutants/mutmut-timings.jsonl`` (the mutant, its wall and CPU
  seconds, the tests it ran, pytest's exit status): where a whole run's time went;
- the tests mutmut picked run in the order most likely to kill the mutant soon: first those
  that killed other mutants of the same function (each kill is appended to
  ``mutants/mutmut-killers.jsonl``), then the rest fastest first, by the durations mutmut
  recorded in ``mutants/mutmut-stats.json``; so a mutant costs the test that kills it, not the
  slow ones that happen to be listed before it (mutmut passes its tests in set order)."""

from __future__ import annotations

import gc
import json
import os
import time

_started: dict[str, float] = {}  # set in a mutant's run only


def _in_a_mutant_run() -> bool:
    return "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", "")


def _mutated_function() -> str:
    """``ep_core.hooks.x_apply_pruning`` for the mutant ``ep_core.hooks.x_apply_pruning__mutmut_7``."""
    return os.environ["MUTANT_UNDER_TEST"].rsplit("__mutmut_", 1)[0]


def _killers(function: str) -> dict[str, int]:
    """How many mutants of ``function`` each test killed so far (``mutmut-killers.jsonl``)."""
    counts: dict[str, int] = {}
    try:
        with open("mutmut-killers.jsonl", encoding="utf-8") as f:
            for line in f:
                try:
                    kill = json.loads(line)
                except ValueError:
                    continue  # a line the other worker was writing
                if kill.get("function") == function:
                    counts[kill["test"]] = counts.get(kill["test"], 0) + 1
    except OSError:
        pass
    return counts


def pytest_configure(config) -> None:
    if _in_a_mutant_run():
        import torch

        gc.freeze()
        torch.set_num_threads(1)
        _started.update(wall=time.perf_counter(), cpu=time.process_time(), tests=0)


def pytest_runtest_logreport(report) -> None:
    if not _started:
        return
    if report.when == "call":
        _started["tests"] += 1
    if report.failed:  # this test killed the mutant (-x: the run stops here)
        with open("mutmut-killers.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"function": _mutated_function(), "test": report.nodeid}) + "\n")


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _started:
        return
    line = {
        "mutant": os.environ["MUTANT_UNDER_TEST"],
        "wall_s": round(time.perf_counter() - _started["wall"], 3),
        "cpu_s": round(time.process_time() - _started["cpu"], 3),
        "tests_run": _started["tests"],
        "exit": int(exitstatus),
    }
    with open("mutmut-timings.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def pytest_collection_modifyitems(session, config, items) -> None:
    if not _in_a_mutant_run():
        return  # the stats and clean runs keep pytest's order
    try:
        with open("mutmut-stats.json", encoding="utf-8") as f:  # mutmut runs the tests inside mutants/
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    killers = _killers(_mutated_function())
    items.sort(key=lambda item: (-killers.get(item.nodeid, 0), durations.get(item.nodeid, float("inf"))))
