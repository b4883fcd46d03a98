"""What every command line of the project shares: the `--config FILE` / `--set KEY.PATH=VALUE`
options, the run config they name, and the exit statuses.

Exit statuses, the same for every command:
  0  done;
  1  the work failed after it started (`failed`): what finished is kept, and for the long-running
     commands a rerun of the same command resumes;
  2  refused before any heavy work (`refused`: a config, model, data or cluster problem).
Either way the reason is one `error: ...` line (or a few) on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from core.config import config_origin
from core.settings.run import DEFAULT_PRESET, REPO_ROOT, RunConfig, load_run_config

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
# As a user types it from the repository root.
DEFAULT_PRESET_NAME = DEFAULT_PRESET.relative_to(REPO_ROOT).as_posix()

ErrorClasses = tuple[type[BaseException], ...]


class CommandFailed(RuntimeError):
    """The work failed after it started (exit 1): raised by a command whose failure is some other
    library's exception (e.g. Ray Train's), with the message the user should read."""


def add_config_options(parser: argparse.ArgumentParser, *, example: str, section: str | None = None,
                       default: str = DEFAULT_PRESET_NAME) -> None:
    """Add `--config FILE` (`args.config`, None when absent) and the repeatable
    `--set KEY.PATH=VALUE` (`args.overrides`). `section`: the part of the preset the command reads
    (None: all of it); `example`: an override the command's users would write; `default`: what is
    used without `--config`."""
    whose = f" whose {section}: section is used" if section else ""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help=f"YAML preset{whose} (default: {default})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def load_run_config_from(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """The run config that `--config` and `--set` name (validated: `ConfigError` otherwise), and
    where it came from, as the check phase's messages name it."""
    config = load_run_config(args.config, args.overrides)
    return config, config_origin(args.config or DEFAULT_PRESET, args.overrides)


def run_command(command: Callable[[], int | None], *, refused: ErrorClasses = (),
                failed: ErrorClasses = ()) -> int:
    """Run a command's body and return its exit status: its own (None counts as 0), 2 for an error
    of a `refused` class, 1 for one of a `failed` class or `CommandFailed`. Any other exception is
    a bug and keeps its traceback."""
    try:
        status = command()
    except refused as err:
        return _report(err, EXIT_REFUSED)
    except (CommandFailed, *failed) as err:
        return _report(err, EXIT_FAILED)
    return EXIT_OK if status is None else status


def _report(err: BaseException, status: int) -> int:
    print(f"error: {err}", file=sys.stderr)
    return status
