"""The ledger as files: every claim of `rules.LEDGER` judged on the CSV tables of one report folder, written
as claims.md (a Markdown table with the evidence linked, then where our numbers differ from the paper's
and the tables read with their write times) and claims.csv (one row per claim) into an output folder.

Beside the report folder's verdicts, a GPU study column (`gpu_column`): claims (b), (c) and (g)
(`GPU_CLAIMS`) judged by the same claim functions on the tables of the GPU study (`make gpu-study`,
`snlp_lab.lab.gpu_study`; default folder <report folder>/gpu/study), in the setting its study.json records
(`Setting.of_study`). A missing folder is "not run", a smoke run gets no verdict, and with one seed the
column says there is no interval. Claim (g)'s entry adds how much of the paper's v2 speedup its mask
treatment accounts for (`rules.mask_share`), from the study's mask_treatment table and, where it has a mask
column, the GPU check's speed.csv (<report folder>/gpu, `make gpu-check`).

`make figures` (`snlp_lab.lab.figures`) reads and writes the same report folder; `python -m
snlp_lab.claims` reads the committed reports/ and writes a scratch folder unless told otherwise.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ...core.checks import check_choice
from ...core.files import DamagedFileError, atomic_write, atomic_write_text, first_line, read_json
from ..profiles import PROFILES
from .paper import Setting, gap
from .rules import HOLDS, LEDGER, UNTESTABLE, VERDICTS, Claim, claim_b, claim_c, claim_g, decode_table, mask_share

# The claims whose tables the GPU study writes (regularization_runs, frontier_all, decode), judged there
# by the same functions as on the report folder's tables.
GPU_CLAIMS = {"b": claim_b, "c": claim_c, "g": claim_g}
GPU_NOT_RUN = "not run (make gpu-study on a CUDA machine)"
GPU_SMOKE = "smoke run: no verdict"
ONE_SEED = "one seed: no interval"


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


def _table_links(names, folder: Path, out_dir: Path) -> list[str]:
    """The tables of `names` that exist in folder (the .md, else the .csv), linked relative to out_dir."""
    out = []
    for name in names:
        for ext in ("md", "csv"):
            if (folder / f"{name}.{ext}").exists():
                out.append(f"[{name}]({os.path.relpath(folder / f'{name}.{ext}', out_dir)})")
                break
    return out


def _links(c: Claim, report_dir: Path, fig_dir: Path, out_dir: Path) -> str:
    """The evidence of a claim that exists: its tables (the .md, else the .csv) and figures (.png), linked
    relative to out_dir, where claims.md is."""
    out = _table_links(c.tables, report_dir, out_dir)
    for name in c.figures:
        if (fig_dir / f"{name}.png").exists():
            out.append(f"[{name}.png]({os.path.relpath(fig_dir / f'{name}.png', out_dir)})")
    return ", ".join(out) or "—"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------------------ the GPU study
@dataclass(frozen=True)
class GpuEntry:
    """One claim of `GPU_CLAIMS` on the GPU study. verdict: one of `rules.VERDICTS`, else GPU_NOT_RUN or
    GPU_SMOKE (nothing judged); ours: the claim function's measurement after how many seeds it rests on
    (ONE_SEED with one), "—" where there is none; rule and differs as in `rules.Claim` (differs in the
    study's setting); tables: the study's tables behind it (file stems)."""
    verdict: str
    ours: str = "—"
    rule: str = ""
    differs: str = ""
    tables: tuple = ()

    def cell(self) -> str:
        """The entry in claims.md's GPU study column."""
        if self.verdict not in VERDICTS:
            return self.verdict + ("" if self.ours == "—" else f"; {self.ours}")
        if self.verdict == UNTESTABLE:
            return f"**{UNTESTABLE}**: {self.rule}" + ("" if self.ours == "—" else f"; {self.ours}")
        return f"**{self.verdict}**: {self.ours}"


@dataclass(frozen=True)
class GpuColumn:
    """The GPU study column: `entries` by claim key (those of `GPU_CLAIMS`); state: "judged", "smoke",
    "not run" or "incomplete" (why: `reason`); the study's setting and seeds where judged; `tables`: the
    study's tables read, by file stem; check: whether the GPU check's speed.csv (with a mask column) was."""
    entries: dict
    state: str
    reason: str = ""
    setting: Setting | None = None
    seeds: tuple = ()
    tables: dict | None = None
    check: bool = False


def _check_mask(check_dir) -> str:
    """The GPU check's part of (g)'s mask sentence (`mask_share` on its speed.csv: columns model, config, T,
    mask, prefill_speedup), or "" where it has no speed.csv or no mask column (older checks time windows
    on both sides only)."""
    p = None if check_dir is None else Path(check_dir) / "speed.csv"
    if p is None or not p.exists():
        return ""
    d = _read_csv(p)
    if "mask" not in d.columns:
        return ""
    share = mask_share(d, "model", "prefill_speedup")
    return "GPU check (speed.csv): " + (share or "no configuration timed with both masks")


def _seeds(t: dict, study: dict) -> tuple:
    """The seeds the study's tables hold (regularization_runs), else those study.json lists."""
    r = t.get("regularization_runs")
    if r is not None and "seed" in r.columns:
        return tuple(sorted(int(x) for x in r.seed.dropna().unique()))
    return tuple(sorted(int(x) for x in study.get("seeds") or ()))


def gpu_column(study_dir, check_dir=None) -> GpuColumn:
    """Claims (b), (c) and (g) (`GPU_CLAIMS`) judged by their claim functions on the CSV tables of the GPU
    study in study_dir (`make gpu-study`: regularization_runs, frontier_all, decode, mask_treatment and
    study.json, whose scale gives the setting, `Setting.of_study`). Nothing is judged where the folder is
    missing (GPU_NOT_RUN), where study.json says smoke (GPU_SMOKE) or where study.json is missing or
    lacks the scale ("not testable here", with the reason). (g) adds the mask treatment's share of the
    paper's v2 speedup (`mask_share`) from mask_treatment and from check_dir's speed.csv (the GPU check,
    `make gpu-check`) where that has a mask column. Raises DamagedFileError for an unreadable table or
    study.json."""
    study_dir = Path(study_dir)
    check = _check_mask(check_dir)

    def nothing(state: str, verdict: str, reason: str = "") -> GpuColumn:
        entries = {k: GpuEntry(verdict, check if k == "g" and check else "—", reason) for k in GPU_CLAIMS}
        return GpuColumn(entries, state, reason, check=bool(check))

    if not study_dir.is_dir():
        return nothing("not run", GPU_NOT_RUN, f"{study_dir} does not exist")
    record = study_dir / "study.json"
    if not record.exists():
        return nothing("incomplete", UNTESTABLE, f"study.json is missing in {study_dir} (make gpu-study writes it "
                                                 "with the tables: run it again)")
    study = read_json(record, "GPU study record", "run make gpu-study again")
    if study.get("smoke"):
        return nothing("smoke", GPU_SMOKE, "study.json says smoke: true (the toy-size code path)")
    try:
        setting = Setting.of_study(study)
    except ValueError as e:
        return nothing("incomplete", UNTESTABLE, str(e))
    t = read_tables(study_dir)
    seeds = _seeds(t, study)
    # the claim functions write an interval only from two seeds on; with one the column says so up front
    count = ONE_SEED if len(seeds) == 1 else f"{len(seeds)} seeds" if seeds else ""
    entries = {}
    for key, fn in GPU_CLAIMS.items():
        c = fn(t, setting)
        judged = c.verdict != UNTESTABLE
        parts = [p for p in (count, c.ours) if p] if judged else []
        tables = tuple(n for n in c.tables if n in t)
        if key == "g":
            share = mask_share(t.get("mask_treatment"))
            parts.append("mask treatment (mask_treatment.csv): "
                         + (share or "not measured (no configuration timed with both masks)"))
            parts += [check] if check else []
            tables += ("mask_treatment",) if "mask_treatment" in t else ()
        # a claim with no paper number of the study's family still differs through the setting
        differs = (c.differs or ("" if c.verdict == HOLDS else gap(setting))) if judged else ""
        entries[key] = GpuEntry(c.verdict, "; ".join(parts) or "—", c.rule, differs, tables)
    return GpuColumn(entries, "judged", setting=setting, seeds=seeds, tables=t, check=bool(check))


def _gpu_header(col: GpuColumn, where: str) -> str:
    """The sentence of claims.md's introduction on the GPU study column; where: the study folder, as linked."""
    if col.state == "judged":
        seeds = ", ".join(map(str, col.seeds)) or "none"
        return (f" The GPU study column judges ({'), ('.join(GPU_CLAIMS)}) by the same rules on the tables of "
                f"`{where}` (`make gpu-study`, seeds {seeds}): {col.setting.text()}.")
    if col.state == "smoke":
        return f" The GPU study column: `{where}` holds a smoke run (the toy-size code path), which gets no verdict."
    if col.state == "not run":
        return f" The GPU study column: not run (`{where}` does not exist; `make gpu-study` on a CUDA machine writes it)."
    return f" The GPU study column: `{where}` cannot be judged: {col.reason}."


# ------------------------------------------------------------------------------------------ the files
def write_ledger(report_dir, fig_dir=None, profile: str = "cpu", log=print, out_dir=None, gpu_study=None) -> Path:
    """Write out_dir/claims.md (and claims.csv) from the tables in report_dir; returns the path.
    fig_dir: where the figures are (default: figures/ beside report_dir); out_dir: where the ledger goes
    (default: report_dir itself, as `make figures` writes it; created if missing), its links relative to
    it; gpu_study: the GPU study's folder (default: report_dir/gpu/study; the GPU check's speed.csv is read
    from report_dir/gpu), judged into the GPU study column (`gpu_column`). Raises ValueError if the report
    folder is missing, the profile unknown, or the text would hold a NaN."""
    report_dir = Path(report_dir)
    fig_dir = Path(fig_dir) if fig_dir is not None else report_dir.parent / "figures"
    out_dir = report_dir if out_dir is None else Path(out_dir)
    gpu_dir = Path(gpu_study) if gpu_study is not None else report_dir / "gpu" / "study"
    check_dir = report_dir / "gpu"
    check_inputs(report_dir, profile)
    setting, own = Setting.of(profile), PROFILES[profile].notebooks
    t = read_tables(report_dir)
    rows = ledger(t, setting)
    gpu = gpu_column(gpu_dir, check_dir)
    stamp = lambda p: datetime.datetime.fromtimestamp(p.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    here = out_dir.resolve() == report_dir.resolve()
    gpu_where = os.path.relpath(gpu_dir, out_dir)
    lines = ["# The paper's claims, tested here", "",
             "Written by `python -m snlp_lab.claims` (run by `make figures` after the notebooks) from the tables in "
             + ("this folder" if here else f"`{report_dir.resolve()}`")
             + f", profile `{profile}`: {setting.text()}. Each verdict comes from the rule beside it "
             f"(`snlp_lab/lab/claims/rules.py`); intervals are 95% Student-t over seeds (Welch's for a difference of two sets "
             f"of models); a speedup's bracket is the lower bound its run's noise supports (one-sided 97% or more "
             f"with 5 timing rounds or more). Paper numbers: docs/design.md §4 (arXiv 2605.17842)."
             + (f" This profile runs {', '.join(f'nb/{n}' for n in own)} only (`Profile.notebooks`): a claim "
                f"whose tables come from another notebook is not testable here." if own else "")
             + _gpu_header(gpu, gpu_where), "",
             "| | claim | ours | paper | verdict | GPU study | evidence |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        g = gpu.entries.get(c.key)
        evidence = _links(c, report_dir, fig_dir, out_dir)
        more = [] if g is None else _table_links(g.tables, gpu_dir, out_dir)
        more += _table_links(("speed",), check_dir, out_dir) if c.key == "g" and gpu.check else []
        if more:
            evidence = ("" if evidence == "—" else evidence + "; ") + "GPU: " + ", ".join(more)
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"({c.key})", c.claim, c.ours, c.paper, f"**{c.verdict}**: {c.rule}", "—" if g is None else g.cell(),
            evidence)) + " |")
    lines += ["", "## Where our numbers differ from the paper's, and why they may", ""]
    differs = []
    for c in rows:
        g = gpu.entries.get(c.key)
        differs += [f"- ({c.key}) {c.differs}"] if c.differs else []
        differs += [f"- ({c.key}, GPU study) {g.differs}"] if g is not None and g.differs else []
        differs += [f"- ({c.key}, both columns) {c.note}"] if c.note else []
    lines += differs or ["- nothing to compare"]
    dec = decode_table(t)
    used = sorted({n for c in rows for n in c.tables if n in t} | ({dec[0]} if dec else set()))
    read = [f"`{n}.csv` ({stamp(report_dir / f'{n}.csv')})" for n in used]
    if gpu.tables:
        gpu_dec = decode_table(gpu.tables)
        gpu_used = sorted({n for g in gpu.entries.values() for n in g.tables} | ({gpu_dec[0]} if gpu_dec else set()))
        read += [f"`{gpu_where}/{n}.csv` ({stamp(gpu_dir / f'{n}.csv')})" for n in gpu_used]
    if gpu.check:
        read.append(f"`{os.path.relpath(check_dir / 'speed.csv', out_dir)}` ({stamp(check_dir / 'speed.csv')})")
    lines += ["", "## Tables read", "", "; ".join(read) or "none", ""]
    text = "\n".join(lines)
    if re.search(r"(?<![a-z])nan(?![a-z])", text, re.IGNORECASE):
        raise ValueError("the claims ledger would print a NaN; a claim function let one through")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(out_dir / "claims.md", text)
    none = GpuEntry("—")
    table = pd.DataFrame([dict(key=c.key, claim=c.claim, ours=c.ours, paper=c.paper, verdict=c.verdict, rule=c.rule,
                               differs=c.differs, note=c.note, gpu_verdict=g.verdict, gpu_ours=g.ours,
                               gpu_rule=g.rule, gpu_differs=g.differs)
                          for c, g in ((c, gpu.entries.get(c.key, none)) for c in rows)])
    # an empty cell reads back as a missing value (NaN); "—" says there is nothing to say
    gpu_cols = ["note", "gpu_verdict", "gpu_ours", "gpu_rule", "gpu_differs"]
    table[gpu_cols] = table[gpu_cols].replace("", "—")
    atomic_write(out_dir / "claims.csv", lambda p: table.to_csv(p, index=False))
    log(f"[claims] wrote {path} (+ .csv): " + ", ".join(f"({c.key}) {c.verdict}" for c in rows)
        + "; GPU study: " + ", ".join(f"({k}) {g.verdict}" for k, g in gpu.entries.items()))
    return path
