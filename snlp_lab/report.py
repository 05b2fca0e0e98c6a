"""Writing what the notebooks produce: figures (PNG + PDF), tables (CSV + Markdown) and one-line
readings that `make figures` gathers into reports/README.md."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

READINGS = "readings.jsonl"


def save_figure(fig, name: str, fig_dir) -> list[Path]:
    """Save `fig` as fig_dir/name.png and .pdf; returns the paths."""
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    paths = [fig_dir / f"{name}.png", fig_dir / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def save_table(df: pd.DataFrame, name: str, report_dir, title: str, meta: dict, floatfmt: str = ".4g") -> Path:
    """Save df as report_dir/name.csv and name.md; the Markdown states where the numbers come from.

    A table with a NaN anywhere is refused: a missing number must be explained, not printed as 'nan'.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    num = df.select_dtypes("number")
    if num.isna().any().any():
        bad = num.columns[num.isna().any()].tolist()
        raise ValueError(f"table {name!r} has NaN in columns {bad}; fill or drop them with a reason")
    df.to_csv(report_dir / f"{name}.csv", index=False)
    lines = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in meta.items()] + ["", df.to_markdown(index=False, floatfmt=floatfmt), ""]
    path = report_dir / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def add_reading(report_dir, notebook: str, item: str, reading: str) -> None:
    """Record a one-line reading of a figure or table (item = file stem); README.md lists them."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    entries = read_readings(report_dir)
    entries = [e for e in entries if (e["notebook"], e["item"]) != (notebook, item)]
    entries.append({"notebook": notebook, "item": item, "reading": reading})
    (report_dir / READINGS).write_text("".join(json.dumps(e) + "\n" for e in entries))


def read_readings(report_dir) -> list[dict]:
    p = Path(report_dir) / READINGS
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def write_index(report_dir, fig_dir, header: str = "") -> Path:
    """reports/README.md: every figure and table with its one-line reading, grouped by notebook."""
    report_dir, fig_dir = Path(report_dir), Path(fig_dir)
    entries = read_readings(report_dir)
    lines = ["# Results", "", header, ""] if header else ["# Results", ""]
    for nb in dict.fromkeys(e["notebook"] for e in entries):
        lines += [f"## {nb}", ""]
        for e in (e for e in entries if e["notebook"] == nb):
            links = []
            if (fig_dir / f"{e['item']}.png").exists():
                links.append(f"[figure](../{fig_dir.name}/{e['item']}.png)")
            if (report_dir / f"{e['item']}.md").exists():
                links.append(f"[table]({e['item']}.md)")
            lines.append(f"- `{e['item']}` ({', '.join(links) or 'no file'}): {e['reading']}")
        lines.append("")
    path = report_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def fmt_change(new: float, old: float) -> str:
    """'+3.1%' style relative change; refuses to print NaN."""
    if not (math.isfinite(new) and math.isfinite(old)) or old == 0:
        raise ValueError(f"cannot form a relative change from {new} and {old}")
    return f"{100 * (new / old - 1):+.1f}%"


def output_dir(path) -> Path:
    """A notebook's output folder: a relative path is taken relative to the notebooks' folder nb/,
    wherever the kernel runs (so "../figures" is the repository's figures/ from any working directory)."""
    return (Path(__file__).resolve().parent.parent / "nb" / path).resolve()
