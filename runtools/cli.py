"""Command lines generated from config dataclasses: every script's flags are the fields of its config, with the help
text in the field's metadata, so a flag, its default and its help cannot drift apart."""
import argparse
import dataclasses
import typing


def add_dataclass_flags(parser, cls, choices: dict = None, explicit_only: bool = False):
    """One --kebab-case flag per field of the dataclass `cls`. metadata["help"] is required; the other metadata keys
    (choices, metavar, nargs, alias) go to add_argument; `choices[name]` overrides. bool fields are --flag/--no-flag,
    tuple fields take several values (nargs "*" unless the metadata says), Optional[X] is X. explicit_only: every
    default is SUPPRESS, so parsing returns only the flags given on the command line. Returns the parser."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        extra = dict(f.metadata)
        help_ = extra.pop("help")  # KeyError: a new field needs its --help text
        flags = ["--" + f.name.replace("_", "-")] + ([extra.pop("alias")] if "alias" in extra else [])
        if choices and f.name in choices:
            extra["choices"] = list(choices[f.name])
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = argparse.SUPPRESS if explicit_only else f.default
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_, **extra)
        elif tp is tuple or typing.get_origin(tp) is tuple:
            extra.setdefault("nargs", "*")
            parser.add_argument(*flags, type=(typing.get_args(tp) or (str,))[0], default=default, help=help_,
                                **extra)
        else:
            parser.add_argument(*flags, type=tp, default=default, help=help_, **extra)
    return parser


def dataclass_parser(cls, description: str, choices: dict = None, explicit_only: bool = False):
    """An ArgumentParser (defaults shown in --help) with add_dataclass_flags(cls)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_dataclass_flags(parser, cls, choices, explicit_only)


def as_flag(name, value) -> str:
    """The command-line spelling of a field value: --train-backbone, --no-plots, --eval-sets a b, --lr 0.0005."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} " + (" ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value))
