"""`vespo-megatron` command line.

Each sub-command lives in the module that owns its concept and exposes ``add_parser(subparsers)``, which registers
an argparse parser whose ``func(args) -> int`` does the work. Those modules import only argparse at import time, so
``--help`` stays fast; heavy imports happen inside ``func``.

Every parser of the tree shows each flag's default in ``--help`` and takes ``--log-level`` and ``--debug``. A user
error (a bad or missing flag, a path that does not exist, an unreachable server, a checkpoint that is not one) is
printed as ONE line ``vespo-megatron <cmd>: error: <flag>: <what>`` with exit status 2, before any rank, engine or
model starts; any other failure prints one line with exit status 1, and the traceback only under ``--debug``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

from vespo_megatron import logs

# Megatron-Core and torch.distributed warn about optional GPU packages and deprecations on every import, also in
# the spawned ranks; the CLI hides them unless PYTHONWARNINGS asks otherwise.
QUIET = "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning"

# sub-command -> module that defines add_parser(); the order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "demo": "vespo_megatron.train.demo_cli",
    "train": "vespo_megatron.train.train_cli",
    "convert": "vespo_megatron.convert.cli",
    "mismatch": "vespo_megatron.mismatch.cli",
    "serve": "vespo_megatron.rollout.server_cli",
}


class UserInputError(ValueError):
    """argparse's own complaint about the command line, as (flag, what)."""

    def __init__(self, prog: str, flag: str, what: str) -> None:
        self.prog, self.flag, self.what = prog, flag, what
        super().__init__(f"{flag}: {what}")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are ``UserInputError`` (flag, what) instead of usage text and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise UserInputError(self.prog, *_flag_and_what(message))


def _flag_and_what(message: str) -> tuple[str, str]:
    """argparse's message -> (flag, what)."""
    required = re.match(r"the following arguments are required: ([^,\s]+)", message)
    if required:
        return required.group(1), "required"
    argument = re.match(r"argument ([^:]+): (.*)", message, re.S)
    if argument:
        return argument.group(1).split("/")[0], argument.group(2)
    unknown = re.match(r"unrecognized arguments: (\S+)", message)
    if unknown:
        return unknown.group(1), "unrecognized argument"
    return "arguments", message


def _walk(parser: argparse.ArgumentParser):
    """``parser`` and every sub-parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _walk(child)


def _is_leaf(parser: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def finish(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Defaults shown in every --help; ``--log-level`` and ``--debug`` on every leaf command."""
    for node in _walk(parser):
        node.formatter_class = argparse.ArgumentDefaultsHelpFormatter
        if _is_leaf(node) and not any(a.dest == "debug" for a in node._actions):
            node.add_argument("--log-level", choices=logs.LEVELS, default="info", help="logging level")
            node.add_argument("--debug", action="store_true", help="show the traceback of a failure")
            node.set_defaults(prog=node.prog)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vespo-megatron",
        description="VESPO off-policy RL for Megatron-Core MoE models: training, routing replay, conversion.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return finish(parser)


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def run_command(args: argparse.Namespace, prog: str) -> int:
    """``args.func(args)`` with the error policy of the module docstring."""
    from vespo_megatron.convert.errors import ConversionError
    from vespo_megatron.errors import UsageError

    try:
        return int(args.func(args) or 0)
    except (UsageError, ConversionError) as err:
        if getattr(args, "debug", False):
            raise
        _fail(prog, str(err))
        return 2
    except KeyboardInterrupt:
        _fail(prog, "interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - the command line's last word; --debug re-raises
        if getattr(args, "debug", False):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        _fail(prog, f"{type(err).__name__}: {first} (run with --debug for the traceback)")
        return 1


def main(argv: list[str] | None = None) -> int:
    if "PYTHONWARNINGS" not in os.environ:
        os.environ["PYTHONWARNINGS"] = QUIET  # inherited by spawned ranks
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UserInputError as err:
        _fail(err.prog, str(err))
        return 2
    if extra:
        _fail(getattr(args, "prog", parser.prog), f"{extra[0]}: unrecognized argument")
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    logs.configure(args.log_level)
    return run_command(args, args.prog)


if __name__ == "__main__":
    sys.exit(main())
