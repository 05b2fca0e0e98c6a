"""Reading files the lab did not just write, and writing files so that a failure leaves nothing behind.

Reading. Every artifact the lab reads back (a run's checkpoint.json, weights and optimizer states,
tokenizer files, nanochat's .pt and meta JSON, a Hugging Face folder, the data cache) is opened by one
of the readers here or by the loader of its kind on top of them. A file that is missing, truncated,
not UTF-8, not valid JSON, or that holds the wrong structure raises `DamagedFileError`, a ValueError
whose one-line message names the file, says what is wrong with it and what to do. Commands print it
as `error: ...` (`core.cli.run_command`).

Writing. Every file the lab writes goes through `atomic_write`: it is written under a temporary name
beside its target and moved into place in one step (`os.replace`), so a reader sees the old file or the
new one, never half of one. A write that fails removes its temporary file, and a full disk raises
`DiskFullError` (an OSError) naming the disk and the folder, so that a retry after freeing space
starts from a clean folder. Temporary files of processes that were killed (kill -9 runs no cleanup)
are removed by the next write of the same file.
"""
from __future__ import annotations

import binascii
import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import types
import typing
from pathlib import Path

FULL_BELOW = 1 << 20  # bytes: a failed write with less free space than this ran out of it


class DamagedFileError(ValueError):
    """A file that cannot be used as what it should be: missing, truncated, malformed or of the wrong
    structure. `path` is the file; the message is "<path>: <what is wrong>; <what to do>"."""

    def __init__(self, path: str | os.PathLike, problem: str, remedy: str = ""):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}" + (f"; {remedy}" if remedy else ""))


class DiskFullError(OSError):
    """A write ran out of disk space (errno ENOSPC). The message names the disk (its mount point and
    free space) and the folder written to; the temporary file is already removed."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        folder = path.parent
        mount = _mount_point(folder)
        usage = shutil.disk_usage(mount)
        super().__init__(errno.ENOSPC, f"no space left on the disk mounted at {mount} ({_size(usage.free)} free "
                                       f"of {_size(usage.total)}) while writing {path.name} into {folder}; "
                                       f"free space there or write to a bigger disk, then run again "
                                       f"(what was saved before is intact)")
        self.filename = str(path)

    def __str__(self):
        return self.strerror


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


# ------------------------------------------------------------------------------------------ reading
def first_line(e: BaseException) -> str:
    """An exception's message as one line (the first non-empty one; libraries' messages span lines)."""
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    return lines[0].rstrip(".") if lines else type(e).__name__


def read_bytes(path: str | os.PathLike, what: str, remedy: str = "") -> bytes:
    """The bytes of file `path` (a `what`, for the message). DamagedFileError when it is missing, a
    folder or unreadable."""
    p = Path(path)
    if p.is_dir():
        raise DamagedFileError(p, f"is a folder, but a {what} file is needed here", remedy)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise DamagedFileError(p, f"the {what} is missing", remedy) from None
    except OSError as e:
        raise DamagedFileError(p, f"cannot read the {what}: {e.strerror or first_line(e)}", remedy) from None


def read_json(path: str | os.PathLike, what: str, remedy: str = "", kind: type = dict):
    """The JSON value in file `path`, which must be a `kind` (dict, list). DamagedFileError naming the
    file when it is missing, not UTF-8 text, not valid JSON (a truncated file) or not a `kind`."""
    blob = read_bytes(path, what, remedy)
    try:
        value = json.loads(blob.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedFileError(path, f"is not a {what}: not UTF-8 text (a binary file?)", remedy) from None
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"is not a valid {what}: bad JSON at line {e.lineno} column {e.colno} "
                                     f"({e.msg}; a truncated file?)", remedy) from None
    if not isinstance(value, kind):
        raise DamagedFileError(path, f"is not a valid {what}: it holds a JSON {_json_type(value)}, "
                                     f"not a JSON {_json_type(kind())}", remedy)
    return value


def read_jsonl(path: str | os.PathLike, what: str, remedy: str = "") -> list[dict]:
    """The records of a JSON-lines log (one JSON object per line; [] when the file does not exist).
    A last line cut short is left out: appending it was interrupted (a killed process), and the lines
    before it are whole. A damaged line anywhere else is a DamagedFileError naming the file and line."""
    p = Path(path)
    if not p.exists():
        return []
    lines = read_bytes(p, what, remedy).decode("utf-8", errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the interrupted append
                break
            raise DamagedFileError(p, f"line {i + 1} of this {what} is not JSON", remedy) from None
        if not isinstance(rec, dict):
            raise DamagedFileError(p, f"line {i + 1} of this {what} is not a JSON object", remedy)
        out.append(rec)
    return out


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def read_safetensors(path: str | os.PathLike, device: str = "cpu", what: str = "weights file",
                     remedy: str = "") -> dict:
    """{name: tensor} of a safetensors file on `device`. DamagedFileError when it is missing or is not
    a complete safetensors file (truncated, overwritten)."""
    from safetensors.torch import load_file
    p = Path(path)
    if not p.is_file():  # missing, or a folder: said in read_bytes' words
        read_bytes(p, what, remedy)
    try:
        return load_file(str(p), device=device)
    except Exception as e:  # safetensors raises SafetensorError (or OSError) with its own wording
        raise DamagedFileError(p, f"is not a complete safetensors {what} ({first_line(e)}; a truncated "
                                  f"or overwritten file?)", remedy) from None


def check_safetensors(path: str | os.PathLike, what: str = "weights file", remedy: str = "") -> None:
    """Read only the header of a safetensors file, which covers its whole length: a truncated or
    overwritten file is a DamagedFileError naming it, before a library reads it in its own words."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:
        raise DamagedFileError(path, f"is not a complete safetensors {what} ({first_line(e)}; a truncated "
                                     f"or overwritten file?)", remedy) from None


def read_torch(path: str | os.PathLike, what: str, remedy: str = "", kind: type = dict,
               map_location="cpu"):
    """The object in a torch.save file (read with weights_only=True: tensors, containers and numbers,
    no code), which must be a `kind`. DamagedFileError when it is missing, truncated or not a `kind`."""
    import torch
    p = Path(path)
    if not p.is_file():
        read_bytes(p, what, remedy)
    try:
        value = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated zip: "PytorchStreamReader failed ..."; pickle errors; EOFError
        raise DamagedFileError(p, f"is not a complete torch {what} ({first_line(e)}; a truncated or "
                                  f"overwritten file?)", remedy) from None
    if not isinstance(value, kind):
        raise DamagedFileError(p, f"is not a valid {what}: it holds a {type(value).__name__}, "
                                  f"not a {kind.__name__}", remedy)
    return value


def field(path: str | os.PathLike, record: dict, key: str, kind, what: str, remedy: str = ""):
    """record[key] of a record read from file `path`, which must be of type `kind` (a type or a tuple;
    bool is no int). DamagedFileError naming the file and the key when it is missing or of another type."""
    if key not in record:
        raise DamagedFileError(path, f"is not a valid {what}: it has no {key!r}", remedy)
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not _is_a(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise DamagedFileError(path, f"is not a valid {what}: {key!r} is {value!r}, not a {names}", remedy)
    return value


def _is_a(value, kinds: tuple) -> bool:
    if isinstance(value, bool) and bool not in kinds:  # JSON true is no number here
        return False
    if isinstance(value, int) and float in kinds:  # JSON 1 is a float 1.0
        return True
    return isinstance(value, kinds)


def dataclass_from_record(cls, path: str | os.PathLike, record, what: str, remedy: str = ""):
    """cls(**record) for a dataclass cls whose fields a file recorded (a model config in a checkpoint):
    the record must be a dict with no unknown keys, every field of a plain type (int, float, bool, str,
    or one of them | None) must have that type, and cls's own checks (__post_init__, a `validate`
    method) must pass. DamagedFileError naming the file, the field and the value otherwise."""
    if not isinstance(record, dict):
        raise DamagedFileError(path, f"is not a valid {what}: it holds {_json_type(record)} where an object "
                                     f"of {cls.__name__} fields belongs", remedy)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise DamagedFileError(path, f"has {cls.__name__} field(s) {unknown} that this code does not know; load "
                                     f"it with the version of snlp_lab that wrote it", remedy)
    hints = typing.get_type_hints(cls)
    for name, value in record.items():
        tp = hints[name]
        kinds = tuple(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if all(k in (int, float, bool, str, type(None)) for k in kinds):
            field(path, record, name, kinds, what, remedy)
    try:
        obj = cls(**record)
        return obj.validate() if hasattr(obj, "validate") else obj
    except (TypeError, ValueError) as e:
        raise DamagedFileError(path, f"is not a valid {what}: {first_line(e)}", remedy) from None


# ------------------------------------------------------------------------------------------ writing
_TMP = re.compile(r"\.(.+)\.(\d+)\.tmp")


def temporary_name(path: str | os.PathLike) -> Path:
    """Where `atomic_write` writes `path` first: .<name>.<pid>.tmp beside it (hidden, and tied to this
    process so that two writers never share one)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale(path: str | os.PathLike) -> None:
    """Remove the temporary files of `path` that killed processes left (their pid is not running)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        m = _TMP.fullmatch(p.name)
        if m and m[1] == path.name and int(m[2]) != os.getpid() and not _alive(int(m[2])):
            _remove(p)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def disk_full(error: BaseException, folder: str | os.PathLike) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or another writer's error (torch's
    "unexpected pos", safetensors' I/O error) on a disk with less than FULL_BELOW bytes free."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return False
    try:
        return shutil.disk_usage(_mount_point(Path(folder))).free < FULL_BELOW
    except OSError:
        return False


@contextlib.contextmanager
def contents_of(path: str | os.PathLike, what: str, remedy: str = ""):
    """`with contents_of(path, what):` around code that hands a file's parsed contents to a library
    (an optimizer's load_state_dict, torch.set_rng_state): the errors such code raises on contents of
    the wrong structure (KeyError, TypeError, IndexError, RuntimeError, a bad base64 string) become one
    DamagedFileError naming the file. A ValueError of our own passes through: it is already a message."""
    try:
        yield
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, binascii.Error) as e:
        raise DamagedFileError(path, f"its {what} does not fit ({type(e).__name__}: {first_line(e)})",
                               remedy) from None


@contextlib.contextmanager
def removed_on_failure(tmp: str | os.PathLike, target: str | os.PathLike | None = None):
    """`with removed_on_failure(tmp):` removes file (or folder) tmp when the block raises, and turns a
    full disk into `DiskFullError` naming target (default tmp)."""
    tmp = Path(tmp)
    try:
        yield tmp
    except BaseException as e:
        full = disk_full(e, tmp.parent)
        _remove(tmp)
        if full and not isinstance(e, DiskFullError):
            raise DiskFullError(target or tmp) from e
        raise


def atomic_write(path: str | os.PathLike, write) -> Path:
    """write(tmp) writes the new file (or a new folder) at tmp; it is then moved onto `path` in one
    step, replacing what was there. On failure tmp is removed and `path` is untouched; a full disk is
    a `DiskFullError`. Returns path."""
    path = Path(path)
    remove_stale(path)
    tmp = temporary_name(path)
    with removed_on_failure(tmp, path):
        write(tmp)
        if path.is_dir() and not path.is_symlink():  # a folder saved again (a transformers model)
            shutil.rmtree(path)
        os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
