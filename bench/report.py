"""What the benchmark parts share: repeat statistics, tables written as Markdown and JSON, the machine."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def spread(values: list[float]) -> dict[str, float]:
    """{"median", "min", "max", "n"} of repeated measurements (the headline figure and its range)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cell(v: Any, digits: int = 3) -> str:
    """A Markdown cell: floats with `digits` significant digits, None as '-', '|' escaped."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v).replace("|", "\\|")


@dataclass
class Table:
    """A titled table: columns (key, header) and rows (dicts keyed by column key; extra keys go to JSON only)."""

    title: str
    columns: list[tuple[str, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(h for _, h in self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in self.columns) + " |" for r in self.rows]
        lines += [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return "\n".join(lines)

    def as_json(self) -> dict:
        return {"title": self.title, "columns": [k for k, _ in self.columns], "rows": self.rows, "notes": self.notes}


def machine() -> dict[str, Any]:
    """The machine a run comes from: CPU model, cores, load, torch and its threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "system": f"{platform.system()} {platform.release()}", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def loaded(info: dict[str, Any]) -> bool:
    """True when the 1-minute load average at the start exceeded half the cores (timings then scatter)."""
    return info["load_average_1m"] > 0.5 * (info["cores"] or 1)


def write_part(out: Path, name: str, tables: list[Table], meta: dict[str, Any], goals: list[dict] | None = None) -> str:
    """Write <out>/<name>.md and <out>/<name>.json (atomically); return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    m = meta["machine"]
    memory = f", {m['memory_gb']} GB memory ({m['memory_available_gb']} GB available)" if "memory_gb" in m else ""
    head = [f"## {name}", "", f"`{meta['command']}` on {m['cpu']} ({m['cores']} cores{memory}, torch {m['torch']}, "
            f"{m['torch_threads']} thread(s)), {m['date']}; load average {m['load_average_1m']} at the start"
            + (" (loaded machine: absolute times are inflated, ratios measured side by side less so)." if loaded(m)
               else "."), ""]
    if goals:
        head += ["| goal | target | measured | met |", "|---|---|---|---|"]
        head += [f"| {g['goal']} | {g['target']} | {g['measured']} | {cell(g['met'])} |" for g in goals] + [""]
    text = "\n".join(head + [t.markdown() + "\n" for t in tables])
    payload = {**meta, "goals": goals or [], "tables": [t.as_json() for t in tables]}
    for suffix, content in (("md", text), ("json", json.dumps(payload, indent=2, default=str))):
        tmp = out / f".{name}.{suffix}.tmp"
        tmp.write_text(content)
        os.replace(tmp, out / f"{name}.{suffix}")
    return text
