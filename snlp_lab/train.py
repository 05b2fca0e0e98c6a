"""`python -m snlp_lab.train`: train a model, one process or under torchrun (the library:
`snlp_lab.training`). Its options are TrainConfig's fields (`snlp_lab.training.config`), one flag each."""
from __future__ import annotations

import json
import os
import sys

from . import training as _lib
from .core.cli import ArgumentParser, DefaultsHelpFormatter, add_dataclass_options, dataclass_from_args, run_command
from .training import TrainConfig, train


def build_parser() -> ArgumentParser:
    """The command line: one option per TrainConfig field (--n-par-set for n_par_set, ...), as the
    field declares it."""
    p = ArgumentParser(prog="python -m snlp_lab.train", description=_lib.__doc__.split("\n\n")[0],
                       formatter_class=DefaultsHelpFormatter)
    add_dataclass_options(p, TrainConfig)
    return p


def config_from_args(argv=None) -> TrainConfig:
    """The TrainConfig that the command line argv (sys.argv[1:] when None) describes, unresolved.
    Raises ValueError for an unknown flag or a value that does not parse."""
    return dataclass_from_args(TrainConfig, build_parser().parse_args(argv))


def main(argv=None) -> int:
    """The command line; bad options or data are one `error: ...` line on stderr and exit status 2."""
    return run_command(_main, argv)


def _main(argv=None) -> int:
    res = train(config_from_args(argv))
    if int(os.environ.get("RANK", "0")) == 0:
        last = res.evals[-1] if res.evals else {}
        print(json.dumps({"run_dir": str(res.run_dir), "step": res.step, **last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
