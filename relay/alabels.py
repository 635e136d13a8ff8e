"""Domain names in their A-label (``xn--``) form, as IDNA2008 with UTS #46's
non-transitional mapping writes them: the form browsers, ERPs and registries
(DENIC's ``.de`` among them) resolve. Python's own ``idna`` codec is IDNA2003,
which maps ß to ss and the final sigma ς to the plain one, and drops the
joiners ZWNJ and ZWJ: ``kunde@faß.example`` became ``kunde@fass.example``,
another, existing domain, which a suppression then listed for every tenant."""

from __future__ import annotations

import re
import unicodedata

import idna

#: The dots UTS #46 (and IDNA2003) also read as label separators.
_DOTS = re.compile("[.\u3002\uff0e\uff61]")


def a_labels(domain: str) -> str:
    """``domain`` with its non-ASCII labels as A-labels; ASCII labels as written,
    as the old codec kept them. Raises ``idna.IDNAError`` (a UnicodeError) for a
    name IDNA2008 has no A-label form for, such as one with a symbol (☃) or a
    joiner where its script takes none."""
    labels = _DOTS.split(domain)
    rooted = len(labels) > 1 and labels[-1] == ""  # ``example.com.``, fully qualified
    converted = [_a_label(label) for label in (labels[:-1] if rooted else labels)]
    for label in converted:
        if not 0 < len(label) <= 63:
            raise idna.IDNAError("Empty Label" if not label else "Label too long")
    return ".".join(converted) + ("." if rooted else "")


def _a_label(label: str) -> str:
    if label.isascii():
        return label
    mapped = idna.uts46_remap(label, std3_rules=False, transitional=False)
    return idna.alabel(mapped).decode("ascii")


def idna2003_form(domain: str) -> str | None:
    """IDNA2003's form of a name IDNA2008 refuses (a symbol: ``☃`` is
    ``xn--n3h``), which a policy written with older tools holds and by which
    the relay identified such a sender before; None when IDNA2003 maps a label
    to plain ASCII (a joiner dropped: ``a\u200cb`` would be ``ab``, another
    name)."""
    try:
        converted = domain.encode("idna").decode("ascii")
        pairs = list(zip(_DOTS.split(domain), converted.split("."), strict=True))
        if all(label.isascii() or _kept(label, ascii_) for label, ascii_ in pairs):
            return converted
    except (UnicodeError, ValueError):
        pass
    return None


def _kept(label: str, converted: str) -> bool:
    """Whether IDNA2003 wrote ``label`` as it reads, case and compatibility forms
    aside: a joiner inside a label it dropped (``bü\u200dcher``), and the name
    became another's (``bücher``)."""
    if not converted.startswith("xn--"):
        return False
    return converted.encode("ascii").decode("idna") == unicodedata.normalize("NFKC", label.lower())
