"""Command-line plumbing shared by every `python -m snlp_lab.X` command: bad input is one `error: ...`
line on stderr and exit status 2, never a traceback; and options declared once, on a dataclass's fields.

A dataclass whose fields are a command's options declares each flag on its field,

    steps: int = dataclasses.field(default=600, metadata=option("optimizer steps"))

and `add_dataclass_options(parser, Cls)` adds `--steps` (type int, default 600) to the parser;
`dataclass_from_args(Cls, parser.parse_args(argv))` gives the instance back. A field that is not a flag
says so with `metadata=API_ONLY`; a field with neither is an error, so that no option is forgotten.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

CLI = "cli"  # the key of a field's metadata that holds its command-line declaration
API_ONLY = {CLI: None}  # metadata of a field with no command-line flag (set from Python only)
# what `option` passes on to ArgumentParser.add_argument
OPTION_KEYS = ("help", "type", "choices", "metavar", "action")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad input is a ValueError, which every command prints as one `error: ...` line
    (exit status 2), with no usage block. --help still prints the help and exits 0."""

    def error(self, message):
        raise ValueError(message)


def run_command(main, argv=None) -> int:
    """main(argv), with every failure that is not a bug printed as one `error: ...` line on stderr and
    exit status 2, a message and not a traceback:

    - ValueError: bad options, values or data, and damaged files (`core.files.DamagedFileError`);
    - FloatingPointError: a result or a training run that became inf or NaN (`NonFiniteError`);
    - OSError: the machine's side, a full disk (`core.files.DiskFullError`), a file that cannot be
      written, a run folder another process holds (filelock's Timeout).

    Ctrl-C stops with "interrupted" and status 130, as a shell reports it."""
    try:
        return main(argv)
    except (ValueError, FloatingPointError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's message may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except None: the help of such an option says what it defaults to."""

    def _get_help_string(self, action):
        return action.help or "" if action.default is None else super()._get_help_string(action)


# ------------------------------------------------------------------------------------------ dataclass options
def option(help: str, **argparse_kw) -> dict:
    """The metadata of a dataclass field that is a command-line option: `field(default=...,
    metadata=option("what it sets", choices=...))`. argparse_kw: add_argument's `type` (a parser of the
    flag's text, for a type the annotation does not give), `choices`, `metavar` or `action`.
    Raises TypeError for any other keyword."""
    bad = sorted(set(argparse_kw) - set(OPTION_KEYS))
    if bad:
        raise TypeError(f"option() takes {', '.join(OPTION_KEYS)}, not {', '.join(bad)}")
    return {CLI: {"help": help, **argparse_kw}}


def comma_ints(text: str) -> tuple[int, ...]:
    """"8,16,24" -> (8, 16, 24), the flag's parser of a tuple of integers; empty items are skipped."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,16,24, got {text!r}") from None


class _AppendTuple(argparse.Action):
    """A repeatable flag whose values collect into a tuple (the field's type), starting from its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(getattr(namespace, self.dest) or ()) + (values,))


def flag(name: str) -> str:
    """The flag of a field: "n_par_set" -> "--n-par-set"."""
    return "--" + name.replace("_", "-")


def _optional_base(tp):
    """X for `X | None` (or Optional[X]); tp itself otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} has no default: a command-line option needs one")


def option_kwargs(cls, f: dataclasses.Field) -> dict | None:
    """add_argument's keywords for field f of dataclass cls; None for an API_ONLY field. What the field's
    metadata does not give comes from its annotation and default:

    - bool with default False: a switch (`store_true`); other bool: `--name` / `--no-name`
    - int, float (or `int | None`, ...): parsed as that type; str: the text as given
    - tuple[T, ...] without a `type`: a repeatable flag, each value (parsed as T) appended to the tuple

    Raises TypeError where the field has no declaration or the annotation gives no parser (declare `type`).
    """
    if CLI not in f.metadata:
        raise TypeError(f"{cls.__name__}.{f.name} declares no command-line option: give it "
                        f"metadata=option(help, ...) or metadata=API_ONLY")
    decl = f.metadata[CLI]
    if decl is None:
        return None
    kw = {"dest": f.name, "default": _default(f), **decl}
    tp = _optional_base(typing.get_type_hints(cls)[f.name])
    if "action" in kw or "type" in kw:
        return kw
    if tp is bool:
        kw["action"] = "store_true" if kw["default"] is False else argparse.BooleanOptionalAction
    elif tp in (int, float):
        kw["type"] = tp
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        kw["action"] = _AppendTuple
        item = typing.get_args(tp)[0]
        if item is not str:
            kw["type"] = item
    elif tp is not str:
        raise TypeError(f"{cls.__name__}.{f.name}: no parser for {tp}; declare option(..., type=...)")
    return kw


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of dataclass cls (`flag(name)`, in field order), as `option_kwargs` declares
    it, defaulting to the field's default; API_ONLY fields get none. Raises TypeError as `option_kwargs`."""
    for f in dataclasses.fields(cls):
        kw = option_kwargs(cls, f)
        if kw is not None:
            parser.add_argument(flag(f.name), **kw)


def dataclass_from_args(cls, args: argparse.Namespace):
    """The instance of cls that parsed options (from a parser built by `add_dataclass_options`) describe;
    API_ONLY fields keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get(CLI) is not None}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
