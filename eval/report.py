"""Eval outputs: the per-sample JSONL rows, the means, and the table laid out like SEELE's Table 1
(one column per run, one row per metric, the better direction in the row name). Every file is written
atomically: a failed or interrupted run leaves none of its outputs behind.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from editrt.models.files import write_atomic

# metric -> (label, lower is better)
METRICS = {
    "lpips": ("LPIPS", True), "psnr": ("PSNR", False), "ssim": ("SSIM", False), "mse": ("MSE", True),
    "fmse": ("fMSE", True), "fid": ("FID", True),
}


def _json_value(value):
    """inf (identical images' PSNR) as the string 'inf', nan as 'nan': JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(_json_value(row), allow_nan=False) + "\n" for row in rows)
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, data) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(_json_value(data), indent=2) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a RUNS.jsonl an eval command wrote ('inf' back to inf); a bad line is one error naming it."""
    from editrt.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected a RUNS.jsonl written by `editrt eval ... -o`", field="runs")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("metrics", {}), dict):
            raise InputError(f"{path}: line {number} is not an eval row (a JSON object with `metrics`)", field="runs")
        if "metrics" in row:
            row["metrics"] = {k: float(v) if v in ("inf", "nan") else v for k, v in row["metrics"].items()}
        rows.append(row)
    return rows


def means(rows: list[dict]) -> dict:
    """The mean of each metric over the rows that have it ('inf' PSNRs make the mean inf), and `n`."""
    scored = [r["metrics"] for r in rows if "metrics" in r]
    out = {"n": len(scored)}
    for name in METRICS:
        values = [m[name] for m in scored if name in m]
        if values:
            out[name] = sum(values) / len(values)
    return out


def table(columns: dict[str, dict], skipped: dict[str, str] | None = None) -> dict:
    """{'columns': [...], 'rows': [{'metric', 'lower_is_better', 'values': {column: value}}], 'n', 'skipped'}."""
    names = [m for m in METRICS if any(m in c for c in columns.values())]
    return {
        "columns": list(columns),
        "rows": [{"metric": METRICS[m][0], "lower_is_better": METRICS[m][1],
                  "values": {col: c.get(m) for col, c in columns.items()}} for m in names],
        "n": {col: c.get("n", 0) for col, c in columns.items()},
        "skipped": dict(skipped or {}),
    }


def markdown(data: dict) -> str:
    """The table in Markdown: | Model | col ... |, then LPIPS(↓) ..., then n; a skipped metric as a note."""
    cols = data["columns"]
    lines = ["| Model | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for row in data["rows"]:
        arrow = "↓" if row["lower_is_better"] else "↑"
        cells = ["" if row["values"][c] is None else _fmt(row["values"][c]) for c in cols]
        lines.append(f"| {row['metric']}({arrow}) | " + " | ".join(cells) + " |")
    lines.append("| n | " + " | ".join(str(data["n"][c]) for c in cols) + " |")
    for name, why in data["skipped"].items():
        lines.append(f"\n{METRICS.get(name, (name,))[0]} skipped: {why}")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
