"""The claims ledger: each claim of the paper (arXiv 2605.17842; claims (a)-(h), docs/design.md §4) tested on
the tables that the notebooks wrote, with a verdict from a stated rule.

    python -m snlp_lab.claims                     # reports/'s tables -> a new scratch folder (never reports/)
    python -m snlp_lab.claims --report-dir DIR --out DIR --fig-dir DIR --profile smoke --gpu-study DIR

`make figures` writes it into its report folder after the notebooks (`snlp_lab.lab.figures`). Nothing here
is a result: every number comes from a CSV table in the report folder (`read_tables`: file stem ->
DataFrame), the paper's numbers from docs/design.md §4, and our setting from the profile (`Setting.of`).
The parts, each importing only the ones before it (and no training code: the ledger reads tables):

- `paper`: the paper's numbers (`PAPER_V1`, `PAPER_V2_EQUAL`, `PAPER_TABLE_B`, ...), the prior method one
  IDN iteration from h0 reduces to (`LAYER_PARALLELISM`, arXiv 2502.02790) and the settings compared
  (`Setting`, `PAPER_SETTING`, `gap`; the GPU study's from its study.json, `Setting.of_study`);
- `stats`: means and differences over seeds with their 95% intervals (`mean_ci`, `diff_ci`,
  `relative_change`), the sign test, and how far a training curve was from flat;
- `rules`: the verdicts, the thresholds of their rules, and one function per claim (`claim_a` ... `claim_h`,
  registered in `LEDGER`), each returning a `Claim`, or "not testable here" with the reason (`need`); the
  share of the paper's v2 speedup its mask treatment accounts for (`mask_share`);
- `ledger`: the claims judged on a report folder's tables, with claims (b), (c) and (g) judged again on the
  GPU study's tables (`gpu_column`, `GPU_CLAIMS`), written as claims.md and claims.csv (`write_ledger`).
"""
from .paper import (LAYER_PARALLELISM, PAPER_SETTING, PAPER_TABLE_B, PAPER_V1, PAPER_V1_REG_RANGE, PAPER_V2_EQUAL,
                    PAPER_V2_REG_WITHIN, PAPER_V2_T, Setting, gap, paper_v1)
from .stats import (LEVEL, Estimate, before_warmdown_change, diff_ci, last_quarter_change, mean_ci, pct,
                    relative_change, sign_test)
from .rules import (EXACT_ERR, FASTER, FLAT_PCT, HOLDS, LEDGER, NO, P_VALUE, PARALLEL_BRANCHES, STALL_ERR, UNTESTABLE,
                    VERDICTS, WEAK, Claim, Untestable, claim_a, claim_b, claim_c, claim_d, claim_e, claim_f, claim_g,
                    claim_h, mask_share, need, v2_shaped)
from .ledger import (GPU_CLAIMS, GPU_NOT_RUN, GPU_SMOKE, ONE_SEED, GpuColumn, GpuEntry, check_inputs, gpu_column, ledger,
                     read_tables, write_ledger)

__all__ = ["LAYER_PARALLELISM", "PAPER_SETTING", "PAPER_TABLE_B", "PAPER_V1", "PAPER_V1_REG_RANGE", "PAPER_V2_EQUAL",
           "PAPER_V2_REG_WITHIN", "PAPER_V2_T", "Setting", "gap", "paper_v1", "LEVEL", "Estimate", "before_warmdown_change", "diff_ci",
           "last_quarter_change", "mean_ci", "pct", "relative_change", "sign_test", "EXACT_ERR", "FASTER", "FLAT_PCT",
           "HOLDS", "LEDGER", "NO", "P_VALUE", "PARALLEL_BRANCHES", "STALL_ERR", "UNTESTABLE", "VERDICTS", "WEAK",
           "Claim", "Untestable", "claim_a", "claim_b", "claim_c", "claim_d", "claim_e", "claim_f", "claim_g",
           "claim_h", "mask_share", "need", "v2_shaped", "GPU_CLAIMS", "GPU_NOT_RUN", "GPU_SMOKE", "ONE_SEED",
           "GpuColumn", "GpuEntry", "check_inputs", "gpu_column", "ledger", "read_tables", "write_ledger"]
