"""Tuning recipes (DESIGN.md §4): named sets of config overrides. Explicit arguments always win over a recipe."""
from __future__ import annotations

import copy

RECIPES: dict[str, dict] = {
    "default": {"iters": 200, "nsamples": 128},
    "best": {"iters": 1000, "nsamples": 512},
    "light": {"iters": 50, "lr": 5e-3},
    "rtn": {"iters": 0},  # with calibration data: optimised RTN; pass disable_opt_rtn=True for plain RTN
}


def recipe_overrides(name: str | None) -> dict:
    """The config overrides of recipe ``name`` (None = "default")."""
    key = (name or "default").lower().replace("auto-round-", "").replace("auto_round_", "")
    if key not in RECIPES:
        raise ValueError(f"recipe={name!r} is unknown; expected one of {sorted(RECIPES)}")
    return copy.deepcopy(RECIPES[key])


def apply_recipe(name: str | None, explicit: dict) -> dict:
    """Recipe overrides updated with the explicit (non-None) settings."""
    settings = recipe_overrides(name)
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings
