"""Writing a benchmark's results: the JSON file beside the printed table."""
from __future__ import annotations

import json
import os


def write_json(path: str, payload) -> None:
    """Write ``payload`` to ``path`` (its folder made when missing) through a temporary file renamed into place,
    so that an interrupted run leaves the previous results whole; prints where it went."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")
