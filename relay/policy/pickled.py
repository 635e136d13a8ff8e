"""A built policy, as bytes the supervisor hands its workers at a reload.

Each worker used to build the policy again from the text the supervisor had
checked. A policy of thousands of tenants takes seconds to build, most of it
in libyaml, which holds the interpreter lock throughout: every worker's SMTP
sessions stood still meanwhile, and the three builds shared two cores. The
supervisor's build, pickled, is read back in a tenth of the time. Only the
relay's own processes write the state directory the bytes pass through, so
the pickle trusts no one it did not already trust.
"""

from __future__ import annotations

import io
import pickle
from types import MappingProxyType
from typing import Any

from relay.gcpause import collection_paused
from relay.policy.model import Policy


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        """The policy's read-only mappings, which pickle does not know."""
        if type(obj) is MappingProxyType:
            return _read_only, (dict(obj),)
        return NotImplemented


def _read_only(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


def dumps(policy: Policy) -> bytes:
    """ValueError for a policy holding what pickle cannot take."""
    out = io.BytesIO()
    try:
        _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(policy)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot hand over the built policy: {exc}") from exc
    return out.getvalue()


def loads(data: bytes) -> Policy:
    """The policy ``dumps`` made; ValueError for anything else."""
    try:
        with collection_paused():  # hundreds of thousands of objects, no garbage
            policy = pickle.loads(data)
    except Exception as exc:  # unpickling raises whatever the bytes lead it to
        raise ValueError(f"not a built policy: {exc!r}") from exc
    if not isinstance(policy, Policy):
        raise ValueError(f"not a built policy: {type(policy).__name__}")
    return policy
