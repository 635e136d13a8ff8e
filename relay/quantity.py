"""A count with its noun, in the singular at one: "1 recipients" in a reply or a
log line reads as a slip, and makes the reader doubt the number too."""


def quantity(n: float, noun: str, nouns: str | None = None) -> str:
    """``nouns`` is the plural where it is not the noun with an s ("entries"). A
    float (seconds the policy gives) is said in full, to the last digit that
    makes it another number: 1.0 is 1 second, 59.9999999 is not 60 (a warning
    said a lifetime of 60 seconds was less than a first_retry of 60)."""
    said = number(n)
    return f"{said} {noun}" if said == "1" else f"{said} {nouns or noun + 's'}"


def number(n: float) -> str:
    """``n`` as the policy may give it: 60 for 60.0, the digits of 59.9999999."""
    return repr(n).removesuffix(".0") if isinstance(n, float) else f"{n}"
