"""A pytest plugin for mutation runs only (``pyproject.toml``'s ``[tool.mutmut]`` loads it with
``-p tests.mutation_order``): the tests mutmut picked for a mutant run fastest first, by the
durations mutmut recorded in ``mutants/mutmut-stats.json``, so a mutant that a quick test kills
costs that test, not the slow ones that happen to be listed before it (mutmut passes its tests
in set order). Ordinary runs of the suite never load it."""

from __future__ import annotations

import json
import os


def pytest_collection_modifyitems(session, config, items) -> None:
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return  # the stats and clean runs keep pytest's order
    try:
        with open("mutmut-stats.json", encoding="utf-8") as f:  # mutmut runs the tests inside mutants/
            durations = json.load(f)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
