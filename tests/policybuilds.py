"""Python run in a relay's or a tool's process before it starts, to see its
policy builds: whether it built the whole policy, and how often."""

from __future__ import annotations

# each build said on standard output
BUILDS_SAID = """from relay.policy import load as loading
built = loading._load
def said(*args, **kwargs):
    print("the policy built", flush=True)
    return built(*args, **kwargs)
loading._load = said
"""

# a build ends the process, saying so: for a tool that should build none
BUILT_WHOLE = """from relay.policy import load as loading
def built_whole(*args, **kwargs):
    raise SystemExit("the whole policy built")
loading.load = built_whole
"""


def tool(prelude: str) -> list[str]:
    """``python -c`` arguments running ``relay`` with ``prelude`` first; the
    command line's words follow."""
    return ["-c", f"{prelude}\nimport sys\nfrom relay.cli import main\nsys.exit(main())"]
