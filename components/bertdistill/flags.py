"""A step's command-line flags, derived from its params dataclass.

Each setting of a step is stated once, as a field of the step's params dataclass: its type
and default are the field's, its help text sits beside it (`flag(...)`). The command line,
the tests that build params directly and the DAG's form (orchestration/plan.py reads the
defaults with `default`) all read that one field, so adding a setting touches one module.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Any


def flag(default: Any = MISSING, *, help: str, minimum: int | None = None,
         choices: tuple[str, ...] | None = None, name: str | None = None, metavar: str | None = None) -> Any:
    """A params field with its command-line help. No default: a required flag. `name` replaces the
    flag's derived name (`--no-lower-case` for a boolean whose default is True)."""
    metadata = {"help": help, "minimum": minimum, "choices": choices, "name": name, "metavar": metavar}
    return field(default=default, metadata=metadata)


def default(params_cls: type, name: str) -> Any:
    """The default a params field declares: for callers that must agree with a step (the form)."""
    value = params_cls.__dataclass_fields__[name].default
    if value is MISSING:
        raise KeyError(f"{params_cls.__name__}.{name} has no default")
    return value


def add_flags(parser: argparse.ArgumentParser, params_cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `params_cls` (but those in `skip`): `--batch-size` for `batch_size`."""
    hints = typing.get_type_hints(params_cls)
    for f in fields(params_cls):
        if f.name in skip:
            continue
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{params_cls.__name__}.{f.name} has no help text: declare it with flag(help=...)")
        kind = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if kind is bool:
            kwargs["action"] = "store_false" if f.default else "store_true"
            name = meta["name"] or ("--no-" if f.default else "--") + f.name.replace("_", "-")
        else:
            name = meta["name"] or "--" + f.name.replace("_", "-")
            if f.default is MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
                if f.default is not None:  # None's meaning is in the help text ("default: the teacher's")
                    kwargs["help"] += " (default: %(default)s)"
            if kind is list:
                kwargs["nargs"] = "+"
            else:
                kwargs["type"] = _at_least(meta["minimum"]) if meta["minimum"] is not None else kind
            for key in ("choices", "metavar"):
                if meta[key] is not None:
                    kwargs[key] = meta[key]
        parser.add_argument(name, **kwargs)


def _base_type(hint: Any) -> type:
    """int for `int`, `int | None`; list for `list[str]`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if len(args) != 1:
            raise TypeError(f"a flag has one type, not {hint}")
        hint = args[0]
    return typing.get_origin(hint) or hint


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse
