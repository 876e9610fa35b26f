"""The loop every `editrt eval` command shares: score each (prediction, target), keep its row, save its image,
feed the run's FID, and at the end write the rows, the table and the images, all or nothing.

A sample the editor refuses (an EditError, e.g. a move that leaves nothing of the subject in the image) is
a row with `error` instead of `metrics`; the command then exits 1 after writing everything.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from editrt.errors import EditError
from editrt.eval.metrics import ImageMetrics, SetFid, metric_settings
from editrt.eval.report import markdown, means, table, write_json, write_jsonl, write_text
from editrt.models.files import write_dir_atomic


@dataclass
class Scorer:
    """Scores samples into rows; `image_dir` (a temporary folder while the run lasts) gets each prediction."""
    metrics: ImageMetrics
    fid: SetFid
    image_dir: Path | None = None
    rows: list = field(default_factory=list)

    def score(self, row: dict, pred: np.ndarray, target: np.ndarray, region: np.ndarray | None = None,
              image_name: str | None = None, extra: Callable[[np.ndarray, np.ndarray], dict] | None = None) -> dict:
        from editrt.runtime.images import save_png

        values = self.metrics(pred, target, region)
        if extra is not None:
            values.update(extra(pred, target))
        self.fid.add(pred, target)
        if self.image_dir is not None and image_name:
            save_png(pred, self.image_dir / f"{image_name}.png")
        row = {**row, "metrics": values}
        self.rows.append(row)
        return row

    def failed(self, row: dict, error: EditError) -> dict:
        row = {**row, "error": " ".join(str(error).split())}
        self.rows.append(row)
        return row


def prepare_scorer(args) -> Scorer:
    """The metric networks (--lpips-weights, --fid-weights) loaded before any editor: a bad file fails first."""
    from editrt.cli import _device

    return Scorer(ImageMetrics.create(args.lpips_weights, _device(args)), SetFid(args.fid_weights, _device(args)))


def run_eval(args, scorer: Scorer, label: str, body: Callable[[Scorer], None],
             columns: Callable[[list], dict] | None = None, log=print) -> int:
    """Run `body(scorer)` and write args.output (JSONL), args.table_md, args.table_json and args.save_images.

    `columns(rows)` groups the rows into table columns (default: one column, `label`; a custom grouping puts
    every row in its first column, which gets the run's FID). Returns the exit code.
    """
    metrics, fid = scorer.metrics, scorer.fid

    def run(image_dir: Path | None):
        scorer.image_dir = image_dir
        body(scorer)

    if args.save_images:
        write_dir_atomic(args.save_images, run)
    else:
        run(None)

    groups = columns(scorer.rows) if columns else {label: scorer.rows}
    cols = {name: means(rows) for name, rows in groups.items()}
    fid_value = fid.result()
    if fid_value is not None:
        cols[next(iter(cols))]["fid"] = fid_value  # over every evaluated pair: the run's first column
    skipped = dict(metrics.skipped)
    if fid_value is None:
        skipped["fid"] = fid.skipped
    result = {**table(cols, skipped), "metric_settings": metric_settings()}
    for name, why in skipped.items():
        print(f"editrt: {name} skipped: {why}", file=sys.stderr)
    if args.output:
        write_jsonl(args.output, scorer.rows)
    if args.table_json:
        write_json(args.table_json, result)
    text = markdown(result)
    if args.table_md:
        write_text(args.table_md, text)
    log(text)
    failed = [r for r in scorer.rows if "error" in r]
    for row in failed:
        where = " ".join(filter(None, (row.get("sample"), row.get("direction"))))
        print(f"editrt: {where}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0
