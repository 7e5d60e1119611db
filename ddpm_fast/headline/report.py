"""The headline run's results: rows, what was skipped or failed, the printed table, the JSON."""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Section key -> heading, in the order the table prints them.
SECTIONS = {
    "sample": "1. sample(): images end to end, same weights",
    "train": "2. training step",
    "unet": "3. U-Net alone",
    "kernels": "4. kernels",
}


@dataclass
class Row:
    """One measured implementation of one case. ``seconds`` is the median time of one unit (a
    sampling run, a training step, a kernel call); ``rate`` its throughput in ``unit``;
    ``peak_pct`` its % of the FLOP peak or of the measured copy bandwidth (``peak_of``). Rows of
    one (section, case) are compared with the row marked ``baseline``: speedup = its seconds /
    this row's."""

    section: str
    case: str
    impl: str
    dtype: str
    seconds: float
    rate: float | None = None
    unit: str = ""
    peak_pct: float | None = None
    peak_of: str = ""
    baseline: bool = False
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    speedup: float | None = None
    speedup_vs: dict[str, float] = field(default_factory=dict)


class Report:
    """Collects rows, skips and errors as the run goes (one progress line each, on stderr)."""

    def __init__(self, progress: bool = True) -> None:
        self.start = time.perf_counter()
        self.rows: list[Row] = []
        self.skipped: list[dict[str, str]] = []
        self.errors: list[dict[str, str]] = []
        self.targets: list[dict[str, Any]] = []
        self.progress = progress

    def log(self, message: str) -> None:
        if self.progress:
            print(f"headline [{time.perf_counter() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> Row:
        if not (math.isfinite(row.seconds) and row.seconds > 0):
            raise ValueError(f"{row.section} / {row.case} / {row.impl}: bad time {row.seconds!r}")
        self.rows.append(row)
        rate = f", {_num(row.rate)} {row.unit}" if row.rate is not None else ""
        self.log(f"{row.section}: {row.case}: {row.impl} ({row.dtype}) {fmt_time(row.seconds)}{rate}")
        return row

    def skip(self, section: str, what: str, reason: str) -> None:
        self.skipped.append({"section": section, "what": what, "reason": reason})
        self.log(f"{section}: skipped {what}: {reason}")

    def error(self, section: str, what: str, err: BaseException) -> None:
        text = f"{type(err).__name__}: {err}"
        self.errors.append({"section": section, "what": what, "error": text, "traceback": traceback.format_exc()})
        self.log(f"{section}: FAILED {what}: {text}")
        if self.progress:
            traceback.print_exc(file=sys.stderr)

    def compare(self) -> None:
        """Fill each row's speedup (vs its case's baseline row) and speedup_vs (vs every other
        row of its case)."""
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in self.rows:
            groups.setdefault((row.section, row.case), []).append(row)
        for rows in groups.values():
            base = next((r for r in rows if r.baseline), None)
            for row in rows:
                row.speedup = base.seconds / row.seconds if base is not None else None
                row.speedup_vs = {f"{o.impl} ({o.dtype})": o.seconds / row.seconds for o in rows if o is not row}

    def ordered(self) -> list[Row]:
        """Rows by section (SECTIONS' order), then by case (first measured first), then as measured."""
        order = list(SECTIONS)
        cases: dict[tuple[str, str], int] = {}
        for row in self.rows:
            cases.setdefault((row.section, row.case), len(cases))
        return sorted(
            self.rows,
            key=lambda r: (order.index(r.section) if r.section in order else len(order), cases[(r.section, r.case)]),
        )

    def table(self) -> str:
        """The printed table: one line per row under its section's heading, then footnotes."""
        self.compare()
        header = ("case", "implementation", "dtype", "time", "rate", "vs base", "of peak")
        lines: list[list[str]] = []
        notes: list[str] = []
        section = None
        for row in self.ordered():
            if row.section != section:
                section = row.section
                lines.append([f"[{SECTIONS.get(section, section)}]"])
            impl = row.impl
            if row.note:
                if row.note not in notes:
                    notes.append(row.note)
                impl += f" [{notes.index(row.note) + 1}]"
            speed = "base" if row.baseline else (f"{row.speedup:.2f}x" if row.speedup is not None else "-")
            peak = f"{row.peak_pct:.1f}% {row.peak_of}" if row.peak_pct is not None else "-"
            rate = f"{_num(row.rate)} {row.unit}" if row.rate is not None else "-"
            lines.append([row.case, impl, row.dtype, fmt_time(row.seconds), rate, speed, peak])
        widths = [max([len(h)] + [len(line[i]) for line in lines if len(line) > 1]) for i, h in enumerate(header)]
        right = {3, 4, 5, 6}

        def fmt(cells: list[str] | tuple[str, ...]) -> str:
            parts = [
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(parts).rstrip()

        out = [fmt(header), fmt(["-" * w for w in widths])]
        out += [line[0] if len(line) == 1 else fmt(line) for line in lines]
        out += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
        return "\n".join(out)

    def summary(self) -> str:
        """Skipped rows, failures and targets, after the table."""
        out = []
        for s in self.skipped:
            out.append(f"skipped ({s['section']}) {s['what']}: {s['reason']}")
        for e in self.errors:
            out.append(f"FAILED ({e['section']}) {e['what']}: {e['error']}")
        for t in self.targets:
            bound = "<=" if t["at_most"] else ">="
            verdict = "met" if t["met"] else "NOT met"
            measured, unit = _num(t["measured"]), t["unit"]
            out.append(f"target: {t['what']}: {measured}{unit} (issue 21: {bound} {t['target']:g}{unit}): {verdict}")
        return "\n".join(out)

    def rows_json(self) -> list[dict[str, Any]]:
        self.compare()
        return [asdict(row) for row in self.ordered()]


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"
