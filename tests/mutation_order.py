"""A pytest plugin for mutation runs only (``pyproject.toml``'s ``[tool.mutmut]`` loads it with
``-p tests.mutation_order``); inside a mutant's run (``MUTANT_UNDER_TEST`` names a mutant) it
makes that run cheaper, and ordinary runs of the suite are left alone:

- the forked child's inherited heap (torch, transformers, the collected tests: millions of
  objects) is frozen out of the garbage collector (``gc.freeze()``), so pytest's end-of-session
  ``gc.collect()`` scans only what the mutant's tests made instead of walking, and
  copy-on-write copying, the whole inherited heap (51% of the children's samples in a py-spy
  profile of an ``ep_core`` run);
- the tests mutmut picked run fastest first, by the durations mutmut recorded in
  ``mutants/mutmut-stats.json``, so a mutant that a quick test kills costs that test, not the
  slow ones that happen to be listed before it (mutmut passes its tests in set order)."""

from __future__ import annotations

import gc
import json
import os


def _in_a_mutant_run() -> bool:
    return "__mutmut_" in os.environ.get("MUTANT_UNDER_TEST", "")


def pytest_configure(config) -> None:
    if _in_a_mutant_run():
        gc.freeze()


def pytest_collection_modifyitems(session, config, items) -> None:
    if not _in_a_mutant_run():
        return  # the stats and clean runs keep pytest's order
    try:
        with open("mutmut-stats.json", encoding="utf-8") as f:  # mutmut runs the tests inside mutants/
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
