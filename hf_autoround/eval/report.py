"""The evaluation table printed by the CLI and saved next to checkpoints (eval.json, eval.md), in the style of
the reference model cards: one row per task metric, one column per model, an average over the task accuracies."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class EvalTable:
    columns: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # row -> column -> value

    def add(self, column: str, values: dict[str, float]) -> None:
        if column not in self.columns:
            self.columns.append(column)
        for row, value in values.items():
            self.rows.setdefault(row, {})[column] = value

    def averages(self) -> dict[str, float]:
        """Mean of the accuracy rows per column (perplexities are not averaged)."""
        out = {}
        for col in self.columns:
            accs = [r[col] for name, r in self.rows.items() if col in r and "perplexity" not in name]
            if accs:
                out[col] = sum(accs) / len(accs)
        return out

    def markdown(self) -> str:
        lines = ["| metric | " + " | ".join(self.columns) + " |", "| --- |" + " ---: |" * len(self.columns)]
        for name, row in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in self.columns) + " |")
        avg = self.averages()
        if avg:
            lines.append("| **average (tasks)** | " + " | ".join(_fmt(avg.get(c)) for c in self.columns) + " |")
        return "\n".join(lines)

    def save(self, directory: str, figures=()) -> None:
        with open(os.path.join(directory, "eval.json"), "w") as f:
            json.dump({"columns": self.columns, "rows": self.rows, "average": self.averages()}, f, indent=2)
        with open(os.path.join(directory, "eval.md"), "w") as f:
            f.write(self.markdown() + "\n")
            for figure in figures:
                f.write(f"\n![{figure}]({figure})\n")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.3f}"
