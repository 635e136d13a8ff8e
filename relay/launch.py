"""The ``relay`` command's entry point, apart from ``relay.cli``: Ctrl-C while
Python still imports the command line (its first 0.15 s or so) printed a
KeyboardInterrupt traceback, where one a moment later ends the command
quietly with 130. It imports nothing itself, so next to nothing of a start
is left before the handler below."""


def main() -> int:
    code = _run()
    if code == 130:
        # An interrupt inside code that Python ran from a string (``exec`` of
        # the methods a dataclass or namedtuple makes) marks it unhandled,
        # caught or not; ``python -m relay`` then ended by SIGINT at its
        # exit, not with 130. Running a string again clears the mark.
        exec("")
    return code


def _run() -> int:
    try:
        from relay.cli import main as run

        return run()
    except KeyboardInterrupt:  # 128 + SIGINT, as the commands end on it later
        return 130
    except RuntimeError as exc:
        # one in a class body's ``__set_name__`` (a dataclass's fields) comes wrapped
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return 130
        raise
