"""What the two benchmark drivers (run.py and net/runner.py) share: Markdown tables, the
--loops/--workloads list parsing and where a run's JSON goes."""

from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Any, Dict, List, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def table(header: List[str], rows: List[List[str]], align: List[str]) -> str:
    seps = {"l": "---", "r": "---:"}
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(seps[a] for a in align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def parse_list(value: Optional[str], known: List[str], what: str) -> List[str]:
    if not value:
        return list(known)
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (known: {', '.join(known)})")
    return names


def save_results(doc: Dict[str, Any], path: Optional[str], tag: str) -> str:
    """Write `doc` as JSON to `path`, or (no path) to results/<timestamp>-<tag>.json; return
    the path written."""
    if not path:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(RESULTS_DIR, f"{stamp}-{tag}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path
