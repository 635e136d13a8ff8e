"""A count with its noun, in the singular at one: "1 recipients" in a reply or a
log line reads as a slip, and makes the reader doubt the number too."""


def quantity(n: int, noun: str, nouns: str | None = None) -> str:
    """``nouns`` is the plural where it is not the noun with an s ("entries")."""
    return f"{n} {noun}" if n == 1 else f"{n} {nouns or noun + 's'}"
