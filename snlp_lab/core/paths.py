"""Where snlp_lab keeps files it can rebuild (trained tokenizers, tokenized data, ...).

One rule, in order:

1. ``$SNLP_CACHE`` if the variable is set (point it at a big disk or a shared scratch folder);
2. ``<repo root>/.cache`` when the package runs from a source checkout (the folder above the
   package holds ``pyproject.toml``); ``.cache/`` is git-ignored there;
3. ``~/.cache/snlp_lab`` for an installed package.

Everything under the cache folder can be deleted at any time; it is rebuilt on the next call.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path | None:
    """The source checkout this package lives in, or None when it is installed elsewhere."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def cache_dir() -> Path:
    """The cache folder (see the module docstring for the rule). Created if missing. Raises ValueError
    when it is a file or cannot be created or written."""
    env = os.environ.get("SNLP_CACHE")
    if env:
        path = Path(env).expanduser()
    elif (root := repo_root()) is not None:
        path = root / ".cache"
    else:
        path = Path.home() / ".cache" / "snlp_lab"
    where = f"SNLP_CACHE={env}" if env else f"the cache folder {path}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where} is a file, not a folder; point SNLP_CACHE at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create {where}: {e.strerror}; point SNLP_CACHE at a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{where} is not writable; point SNLP_CACHE at a writable folder")
    return path
