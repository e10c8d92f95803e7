"""How `offplan --help` names things: flags take no value, so no type follows them; arguments
read as MODEL / PLAN in the usage line (required bare, optional in brackets), as most command
line tools write them.

`Typer(cls=OffplanGroup)` gives a command group, and every command typer builds into it,
this behaviour; nothing else about parsing changes.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup


def _tidy(params: list) -> list:
    """Flags show no '<bool>'; arguments are named in capitals."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if isinstance(param, TyperArgument) and param.metavar is None:
            param.metavar = param.name.upper()
    return params


def _usage(command, ctx, tail: list[str]) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if isinstance(param, TyperArgument):
            name = param.metavar + ("..." if param.nargs != 1 else "")
            pieces.append(name if param.required else f"[{name}]")
        else:
            pieces.extend(param.get_usage_pieces(ctx))
    return pieces + tail


class OffplanCommand(TyperCommand):
    def get_params(self, ctx) -> list:
        return _tidy(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return _usage(self, ctx, [])


class OffplanGroup(TyperGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in self.commands.values():
            if type(command) is TyperCommand:
                command.__class__ = OffplanCommand  # adds the two methods above, no state

    def get_params(self, ctx) -> list:
        return _tidy(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        return _usage(self, ctx, [self.subcommand_metavar])


def offplan_version() -> str:
    """The installed package's version ('unknown' when run from a source tree not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("offplan")
    except PackageNotFoundError:
        return "unknown"
