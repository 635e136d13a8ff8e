"""Ctrl-C at a command's very start, while Python imports the command line: a
real process and a real SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
#: the first module ``relay.cli`` imports of the relay's own: once Python says it
#: is imported (``-X importtime``), the rest of the command line is being imported
MARK = b" relay.errors"
#: seconds from that line to the signal: the import's last part, the parser's
#: building, then the command itself (``relay passwd`` waiting for its input)
DELAYS = (0.0, 0.001, 0.002, 0.003, 0.005, 0.008, 0.01, 0.02, 0.05)


def interrupted(start: list[str], delay: float) -> tuple[int, str]:
    """The exit status and standard error of ``relay passwd`` sent SIGINT
    ``delay`` seconds after ``relay.cli`` began to import its own modules."""
    command = subprocess.Popen(
        [sys.executable, "-X", "importtime", *start, "passwd"],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert command.stderr is not None
    said = b""
    cutoff = threading.Timer(20, command.kill)  # a command that never gets there
    cutoff.start()
    try:
        while not said.rstrip().endswith(MARK):
            line = command.stderr.readline()
            assert line, said.decode(errors="replace")  # ended before it got there
            said += line
        time.sleep(delay)
        command.send_signal(signal.SIGINT)
        _, rest = command.communicate(timeout=20)
    finally:
        cutoff.cancel()
        if command.poll() is None:
            command.kill()
            command.wait(5)
    return command.returncode, (said + rest).decode(errors="replace")


def script() -> list[str]:
    """What the installed ``relay`` script runs: pyproject.toml's entry point."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        module, _, function = tomllib.load(file)["project"]["scripts"]["relay"].partition(":")
    return ["-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


@pytest.mark.parametrize("delay", DELAYS)
@pytest.mark.parametrize("start", [["-m", "relay"], script()], ids=["python -m relay", "relay"])
def test_ctrl_c_while_the_command_line_is_imported_exits_130_quietly(
    start: list[str], delay: float
) -> None:
    """It printed a KeyboardInterrupt traceback and ended by the signal, where
    a Ctrl-C a moment later ends it with 130 and nothing said."""
    status, errors = interrupted(start, delay)
    assert "Traceback" not in errors, errors
    assert status == 130, errors


def test_an_interrupt_inside_code_run_from_a_string_exits_130(tmp_path: Path) -> None:
    """``python -m relay`` ended by SIGINT itself, silently, at some instants of
    its start: the interrupt came inside a dataclass's methods, which Python
    runs from a string, and marked itself unhandled though it was caught. A
    signal lands there by chance; here the command line raises it there."""
    (tmp_path / "interrupted.py").write_text(
        "import sys\n"
        "import relay.cli\n"
        "from relay import launch\n"
        "def interrupted():\n"
        "    exec('raise KeyboardInterrupt')\n"
        "relay.cli.main = interrupted\n"
        "sys.exit(launch.main())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "interrupted"], capture_output=True, text=True, env=env, timeout=60
    )
    assert (done.returncode, done.stderr) == (130, "")
