"""Errors a user can fix, and the one way the command-line tools report them.

``run_command(prog, debug, body)`` runs a command's body and turns a known user error (a bad
config, unusable data, a run folder in use, no restorable checkpoint, a diverged run) into one
line ``prog: error: ...`` on stderr and a non-zero exit status: 2 for what the command line or
the config got wrong (argparse's convention), 1 for a run that cannot go on. Any other exception
is a bug and keeps its traceback; ``--debug`` shows the traceback of user errors too.
"""

import sys

from m2rnn_jax.typed_config import ConfigError

USAGE_STATUS = 2  # the command line, the config or the data is wrong
FAILURE_STATUS = 1  # the run cannot go on (its folder, its checkpoints, its numbers)


class UserError(Exception):
    """An error whose message tells the user what to change; no traceback needed."""

    exit_status = USAGE_STATUS


class RunFailure(UserError):
    """The run cannot go on as it is (not a mistake on the command line)."""

    exit_status = FAILURE_STATUS


def add_debug_flag(parser):
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def run_command(prog: str, debug: bool, body, *, user_errors=()) -> int:
    """``body()``'s exit status (``None`` = 0), or the status of a known user error after
    printing it as one line. ``user_errors`` adds exception types of the command's own."""
    try:
        status = body()
    except (ConfigError, UserError, *user_errors) as err:
        if debug:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return getattr(err, "exit_status", USAGE_STATUS)
    return 0 if status is None else status
