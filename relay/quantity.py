"""A count with its noun, in the singular at one: "1 recipients" in a reply or a
log line reads as a slip, and makes the reader doubt the number too."""


def quantity(n: float, noun: str, nouns: str | None = None) -> str:
    """``nouns`` is the plural where it is not the noun with an s ("entries"). A
    float (seconds the policy gives) is said as the policy's numbers are: 1.0
    is 1 second, not 1.0 seconds, and so is 0.9999999, which it prints as 1."""
    said = f"{n:g}" if isinstance(n, float) else f"{n}"
    return f"{said} {noun}" if said == "1" else f"{said} {nouns or noun + 's'}"
