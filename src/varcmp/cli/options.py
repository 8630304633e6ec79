"""Command-line options made from a settings dataclass: each field (declared with
`model.config.setting`) is one option, with the field's default, help text and choices, so a
setting is written once; `settings_of` builds the dataclass back from the parsed options."""

from __future__ import annotations

import dataclasses

import click

# the click type of each annotated field type (a tuple is given as a comma-separated list)
_TYPES = {"int": int, "float": float, "str": str, "tuple": str, "bool": bool}


def cli_options(*classes):
    """A decorator adding one click option per field of each dataclass in `classes`, in field order:
    --name-with-dashes (or the field's `flag`), --name/--no-name for a bool."""
    options = [_option(f) for cls in classes for f in dataclasses.fields(cls)]

    def decorate(command):
        for option in reversed(options):  # click lists options in the order of their decorators
            command = option(command)
        return command
    return decorate


def _option(f: dataclasses.Field):
    flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
    kind = getattr(f.type, "__name__", f.type)
    default = ",".join(f.default) if kind == "tuple" else f.default
    if kind == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=default, help=f.metadata.get("help"))
    choices = f.metadata.get("choices")
    return click.option(flag, f.name, default=default, help=f.metadata.get("help"),
                        type=click.Choice(choices) if choices else _TYPES[kind])


def settings_of(cls, values: dict):
    """An instance of dataclass `cls` from parsed option values (those of its fields)."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
