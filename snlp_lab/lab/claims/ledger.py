"""The ledger as files: every claim of `rules.LEDGER` judged on the CSV tables of one report folder, written
as claims.md (a Markdown table with the evidence linked, then where our numbers differ from the paper's
and the tables read with their write times) and claims.csv (one row per claim) into an output folder.

`make figures` (`snlp_lab.lab.figures`) reads and writes the same report folder; `python -m
snlp_lab.claims` reads the committed reports/ and writes a scratch folder unless told otherwise.
"""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pandas as pd

from ...core.checks import check_choice
from ...core.files import DamagedFileError, atomic_write, atomic_write_text, first_line
from ..profiles import PROFILES
from .paper import Setting
from .rules import LEDGER, Claim, decode_table


def read_tables(report_dir) -> dict[str, pd.DataFrame]:
    """Every CSV table of a report folder, by file stem (the ledger's own excepted). Only an empty cell or
    'nan' is a missing value: text such as 'n/a' (speculative's `identical` when sampling) stays text."""
    return {p.stem: _read_csv(p) for p in sorted(Path(report_dir).glob("*.csv")) if p.stem != "claims"}


def _read_csv(p: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(p, keep_default_na=False, na_values=["", "nan", "NaN"])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DamagedFileError(p, f"is not a readable CSV table ({first_line(e)})",
                               "run the notebook that writes it again") from None


def ledger(t: dict, setting: Setting) -> list[Claim]:
    """Every claim of `LEDGER` on the tables `t`."""
    return [fn(t, setting) for fn in LEDGER]


def check_inputs(report_dir, profile: str) -> None:
    """Raise ValueError, before anything is written, if the report folder is missing or the profile unknown."""
    if not Path(report_dir).is_dir():
        raise ValueError(f"report folder {report_dir} does not exist: run `make figures` first")
    check_choice("profile", profile, PROFILES)


def _links(c: Claim, report_dir: Path, fig_dir: Path, out_dir: Path) -> str:
    """The evidence of a claim that exists: its tables (the .md, else the .csv) and figures (.png), linked
    relative to out_dir, where claims.md is."""
    out = []
    for name in c.tables:
        for ext in ("md", "csv"):
            if (report_dir / f"{name}.{ext}").exists():
                out.append(f"[{name}]({os.path.relpath(report_dir / f'{name}.{ext}', out_dir)})")
                break
    for name in c.figures:
        if (fig_dir / f"{name}.png").exists():
            out.append(f"[{name}.png]({os.path.relpath(fig_dir / f'{name}.png', out_dir)})")
    return ", ".join(out) or "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_ledger(report_dir, fig_dir=None, profile: str = "cpu", log=print, out_dir=None) -> Path:
    """Write out_dir/claims.md (and claims.csv) from the tables in report_dir; returns the path.
    fig_dir: where the figures are (default: figures/ beside report_dir); out_dir: where the ledger goes
    (default: report_dir itself, as `make figures` writes it; created if missing), its links relative to
    it. Raises ValueError if the report folder is missing, the profile unknown, or the text would hold a NaN."""
    report_dir = Path(report_dir)
    fig_dir = Path(fig_dir) if fig_dir is not None else report_dir.parent / "figures"
    out_dir = report_dir if out_dir is None else Path(out_dir)
    check_inputs(report_dir, profile)
    setting, own = Setting.of(profile), PROFILES[profile].notebooks
    t = read_tables(report_dir)
    rows = ledger(t, setting)
    stamp = lambda n: datetime.datetime.fromtimestamp((report_dir / f"{n}.csv").stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    here = out_dir.resolve() == report_dir.resolve()
    lines = ["# The paper's claims, tested here", "",
             "Written by `python -m snlp_lab.claims` (run by `make figures` after the notebooks) from the tables in "
             + ("this folder" if here else f"`{report_dir.resolve()}`")
             + f", profile `{profile}`: {setting.text()}. Each verdict comes from the rule beside it "
             f"(`snlp_lab/lab/claims/rules.py`); intervals are 95% Student-t over seeds (Welch's for a difference of two sets "
             f"of models); a speedup's bracket is the lower bound its run's noise supports (one-sided 97% or more "
             f"with 5 timing rounds or more). Paper numbers: docs/design.md §4 (arXiv 2605.17842)."
             + (f" This profile runs {', '.join(f'nb/{n}' for n in own)} only (`Profile.notebooks`): a claim "
                f"whose tables come from another notebook is not testable here." if own else ""), "",
             "| | claim | ours | paper | verdict | evidence |", "|---|---|---|---|---|---|"]
    for c in rows:
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"({c.key})", c.claim, c.ours, c.paper, f"**{c.verdict}**: {c.rule}",
            _links(c, report_dir, fig_dir, out_dir))) + " |")
    lines += ["", "## Where our numbers differ from the paper's, and why they may", ""]
    lines += [f"- ({c.key}) {c.differs}" for c in rows if c.differs] or ["- nothing to compare"]
    dec = decode_table(t)
    used = sorted({n for c in rows for n in c.tables if n in t} | ({dec[0]} if dec else set()))
    lines += ["", "## Tables read", "", "; ".join(f"`{n}.csv` ({stamp(n)})" for n in used) or "none", ""]
    text = "\n".join(lines)
    if re.search(r"(?<![a-z])nan(?![a-z])", text, re.IGNORECASE):
        raise ValueError("the claims ledger would print a NaN; a claim function let one through")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(out_dir / "claims.md", text)
    table = pd.DataFrame([dict(key=c.key, claim=c.claim, ours=c.ours, paper=c.paper, verdict=c.verdict, rule=c.rule,
                               differs=c.differs) for c in rows])
    atomic_write(out_dir / "claims.csv", lambda p: table.to_csv(p, index=False))
    log(f"[claims] wrote {path} (+ .csv): " + ", ".join(f"({c.key}) {c.verdict}" for c in rows))
    return path
