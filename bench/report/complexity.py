"""Big-O strings to the exponent of n: ``"O(n^2 d)"`` -> 2, the theory column beside each fitted exponent."""

from __future__ import annotations

import re

_SUPERSCRIPTS = str.maketrans({"²": "^2", "³": "^3", "·": " ", "×": " ", "*": " ", "⋅": " "})
_TOKEN = re.compile(r"([A-Za-z_]\w*)\s*(?:\^\s*\{?\(?\s*([0-9]*\.?[0-9]+(?:\s*/\s*[0-9]+)?)\s*\)?\}?)?")


def complexity_exponent(text: str | None) -> float | None:
    """The exponent of ``n`` in a big-O string, ignoring logarithms and other symbols; None if unparseable.

    ``"O(n^2 d)"`` -> 2, ``"O(n w d)"`` -> 1, ``"O(n k d)"`` -> 1, ``"O(n d^2)"`` -> 1, ``"O(n log n)"`` -> 1,
    ``"O(n^2 + n d)"`` -> 2 (the largest term), ``"O(n sqrt(n))"`` -> 1.5, ``"O(1)"`` -> 0.
    """
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"\s*O\s*\((.*)\)\s*", text)
    if not match:
        return None
    inner = match.group(1).translate(_SUPERSCRIPTS)
    inner = re.sub(r"\blog\s*_?\d*\s*\(?\s*n\s*\)?", " ", inner)  # log n, log(n), log2 n: no power of n
    inner = re.sub(r"\bsqrt\s*\(\s*n\s*\)", "n^0.5", inner)
    exponents = []
    for term in inner.split("+"):
        exponent = 0.0
        for name, power in _TOKEN.findall(term):
            if name == "n":
                exponent += _parse_power(power)
        exponents.append(exponent)
    return max(exponents)


def _parse_power(text: str) -> float:
    if not text:
        return 1.0
    if "/" in text:
        numerator, denominator = text.split("/")
        return float(numerator) / float(denominator)
    return float(text)
