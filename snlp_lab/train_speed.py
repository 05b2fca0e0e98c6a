"""`python -m snlp_lab.train_speed`: training-step speed, eager against compiled, side by side in one run
(the library: `snlp_lab.lab.train_speed`)."""
from __future__ import annotations

import json
import sys

from .core.cli import ArgumentParser, run_command
from .lab import train_speed as _lib
from .lab.train_speed import training_step_speed


def main(argv=None) -> int:
    """The command line: prints one line per row and the rows as JSON; bad options are one error line."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    p = ArgumentParser(prog="python -m snlp_lab.train_speed", description=_lib.__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu", help="experiment profile whose model and batch are timed")
    p.add_argument("--variant", default="x0ve", help="the profile's model family (plain, x0ve, mhc)")
    p.add_argument("--regs", default="none,idn", help="regularisers, comma-separated (none: the baseline)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (one step of each mode per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first calls")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the profiles train with 1 each)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled loss")
    a = p.parse_args(argv)
    rows = training_step_speed(a.profile, a.variant, tuple(a.regs.split(",")), a.repeats, a.warmup, a.threads,
                               a.backend)
    for r in rows:
        print(f"{r['model']} reg={r['reg']:<5} {r['mode']:<8} {r['step_s'] * 1e3:8.1f} ms/step "
              f"(loss+backward {r['loss_backward_s'] * 1e3:.1f}, optimizer {r['optimizer_s'] * 1e3:.1f}) "
              f"{r['steps_per_s']:6.2f} steps/s  x{r['speedup']:.2f} [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]"
              + (f"  compile {r['compile_s']:.0f} s, grad rel err {r['grad_rel_err']:.1e} "
                 f"(max per tensor {r['grad_max_rel_err']:.1e})" if r["mode"] == "compiled" else
                 f"  {r['aten_ops']} aten ops/step"))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
