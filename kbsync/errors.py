"""One error type whose message is shown to the user as a single line."""


class KbsyncError(Exception):
    """A user-facing failure: the CLI prints its message on one line and exits non-zero."""

    exit_code = 1


class NotFound(KbsyncError):
    """Something named by the user (model, relation, entity, edit) does not exist."""

    exit_code = 2


class BadInput(KbsyncError):
    """The user's input cannot be used as given (empty target, malformed phrase, ...)."""

    exit_code = 2


class Busy(KbsyncError):
    """Another operation holds what this one needs (an edit in flight); retry when it is done."""

    exit_code = 3
