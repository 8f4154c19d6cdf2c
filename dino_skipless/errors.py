"""The base of the errors a user can fix: the stage reports its message (which says what was
expected and where) in one or two lines, without a traceback (``dino_skipless.cli.cli_main``)."""

from __future__ import annotations


class UserError(RuntimeError):
    """A bad argument, an output folder that cannot be used, a result that cannot be made; the
    message is complete (what was wrong, what to do) and is shown as it is."""
