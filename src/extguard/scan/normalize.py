"""A matching copy of a text that undoes common obfuscation, with a map back to original offsets.

`normalize(text)` returns a `NormalizedText` whose `text` is, in this order:

1. Unicode NFKC applied to every char that NFKC changes: fullwidth forms, ligatures, mathematical
   alphanumerics (U+1D400-U+1D7FF), enclosed and squared letters, superscripts.
2. Invisible chars removed: format controls (category Cf: zero-width space and joiners, bidi
   embeddings, overrides and isolates, soft hyphen, BOM) and combining marks (Mn, Me), so
   "e" + U+0301 matches "e". Unicode tag chars U+E0020-U+E007E are not removed but replaced by
   the ASCII char they shadow, because they are used to hide instructions ("ASCII smuggling").
3. Case-folded (`str.casefold`, so "ß" becomes "ss").
4. Confusable letters folded to ASCII by a small built-in table: Cyrillic and Greek look-alikes,
   Latin small capitals, Latin letters with diacritics ("é" to "e", "ł" to "l"), and
   typographic quotes (to ' and ").
5. Non-ASCII whitespace replaced by " ". Whitespace runs are kept: `CollapsedText` collapses
   them, with its own map.

Leetspeak is not undone in the text, because that would cost a regex pass over every text.
Patterns are made tolerant of it instead: `leet_tolerant` turns the letter "o" of a pattern
into `[o0]`, and likewise 1 for i and l, 3 for e, 4 and @ for a, 5 and $ for s, 7 for t.

Steps 4 and 5 map one char to one char, and so do 1 to 3 for most chars. `NormalizedText` keeps
a piecewise linear map from normalized to original offsets, so a match in the copy can be
reported in the original text. The copy is for matching only and is never shown to anyone.

Cost: an ASCII text is only lower-cased, with one-to-one offsets. In other texts, chars that
steps 1 to 3 change are handled one at a time from a table built at import (about 5,000 code
points, 30 ms).
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right

# Tag chars U+E0020-U+E007E shadow ASCII 0x20-0x7E. U+E0001 and U+E007F are tag controls.
_TAG_FIRST = 0xE0020
_TAG_LAST = 0xE007E

# Code point ranges scanned at import for chars that need per-char handling. Chars outside
# these ranges are treated as needing nothing beyond case folding and the confusables table.
_SCANNED_RANGES = ((0x80, 0xD800), (0xE000, 0x10000), (0x1D400, 0x1D800), (0x1F100, 0x1F200), (0xE0000, 0xE0080))

_LOOKALIKES = {
    # Cyrillic letters that look like Latin ones, after case folding.
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i",
    "ї": "i", "ј": "j", "к": "k", "ӏ": "l", "м": "m", "о": "o", "р": "p", "ԛ": "q", "г": "r",
    "ѕ": "s", "т": "t", "у": "y", "ԝ": "w", "х": "x", "ү": "y", "ɡ": "g",
    # Greek letters that look like Latin ones, after case folding.
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ζ": "z", "μ": "u",
    # Latin small capitals and other letter look-alikes.
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ꜰ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i",
    "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s",
    "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z", "ı": "i", "ł": "l", "ø": "o",
    "đ": "d", "ħ": "h", "ŧ": "t", "ƀ": "b", "ɨ": "i", "ʋ": "v",
    # Typographic quotes, so patterns can use ASCII quotes.
    "‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "«": '"', "»": '"',
}  # fmt: skip

# Leet chars that stand for a letter, by letter.
_LEET_CLASSES = {"a": "[a4@]", "e": "[e3]", "i": "[i1!|]", "l": "[l1|]", "o": "[o0]", "s": "[s5$]", "t": "[t7]"}


def _diacritic_table() -> dict[str, str]:
    """Map lowercase Latin letters with diacritics (U+00C0-U+024F) to their ASCII base letter."""
    table = {}
    for code_point in range(0xC0, 0x250):
        char = chr(code_point)
        if char != char.casefold():
            continue
        base = unicodedata.normalize("NFD", char)[0]
        if base != char and base.isascii() and base.isalpha():
            table[char] = base.lower()
    return table


_CONFUSABLES = str.maketrans({**_diacritic_table(), **_LOOKALIKES})


def _fold_one(char: str) -> str:
    """Return the matching-copy form of one char that needs per-char handling."""
    code_point = ord(char)
    if _TAG_FIRST <= code_point <= _TAG_LAST:
        return chr(code_point - 0xE0000).lower()

    category = unicodedata.category(char)
    if category in ("Cf", "Mn", "Me"):
        return ""

    composed = unicodedata.normalize("NFKC", char)
    kept = "".join(part for part in composed if unicodedata.category(part) not in ("Mn", "Me"))
    folded = kept.casefold().translate(_CONFUSABLES)
    return " " if folded.isspace() else folded


def _build_special_table() -> dict[str, str]:
    """Return the per-char replacement of every scanned char that NFKC, removal or casefold change."""
    table = {}
    for first, last in _SCANNED_RANGES:
        for code_point in range(first, last):
            char = chr(code_point)
            if char.isspace():
                table[char] = " "
                continue
            changes = (
                unicodedata.category(char) in ("Cf", "Mn", "Me")
                or unicodedata.normalize("NFKC", char) != char
                or len(char.casefold()) != 1
                or _TAG_FIRST <= code_point <= _TAG_LAST
            )
            if changes:
                table[char] = _fold_one(char)
    return table


def _char_class(chars: list[str]) -> str:
    """Return a regex char class body of `chars` as ranges of consecutive code points."""
    code_points = sorted(map(ord, chars))
    parts = []
    start = previous = code_points[0]
    for code_point in code_points[1:] + [-1]:
        if code_point == previous + 1:
            previous = code_point
            continue
        parts.append(f"\\U{start:08x}" if start == previous else f"\\U{start:08x}-\\U{previous:08x}")
        start = previous = code_point
    return "".join(parts)


_SPECIAL_CHARS = _build_special_table()
_TAG_CHARS = re.compile(r"[\U000e0020-\U000e007e]")
# Runs of chars that need per-char handling.
_SPECIAL = re.compile(f"[{_char_class(list(_SPECIAL_CHARS))}]+")


class NormalizedText:
    """The matching copy `text` of an original text, and the map back to original offsets.

    The map is piecewise linear: normalized index `n` in piece `k` maps to
    `original_starts[k] + n - normalized_starts[k]`. A char that expanded ("ß" to "ss") gets one
    piece per output char, so every output char maps to the char it came from. An ASCII text
    has one piece: offsets are the same in both.
    `tag_chars` is the number of Unicode tag chars that were decoded into the copy.
    """

    __slots__ = ("text", "tag_chars", "_normalized_starts", "_original_starts")

    def __init__(self, text: str, normalized_starts: list[int], original_starts: list[int], tag_chars: int) -> None:
        self.text = text
        self.tag_chars = tag_chars
        self._normalized_starts = normalized_starts
        self._original_starts = original_starts

    def original_index(self, index: int) -> int:
        """Return the original index of the char at normalized `index` (0 <= index < len(text))."""
        piece = bisect_right(self._normalized_starts, index) - 1
        return self._original_starts[piece] + index - self._normalized_starts[piece]

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """Return the original (start, end) of the normalized span `start:end`, end exclusive.

        The span must not be empty. Its original end is one past the original char of its last
        normalized char, so chars removed right after the span (zero-width chars) stay outside.
        """
        return self.original_index(start), self.original_index(end - 1) + 1


class _Builder:
    """The normalized parts and the piece map that `normalize` accumulates while it walks the text."""

    __slots__ = ("parts", "normalized_starts", "original_starts", "length")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.normalized_starts: list[int] = []
        self.original_starts: list[int] = []
        self.length = 0

    def add(self, part: str, original_start: int) -> None:
        """Append `part`, whose chars map one to one onto the original from `original_start`."""
        if self.normalized_starts and self.length - original_start == self.normalized_starts[-1] - self.original_starts[-1]:
            # Same shift as the previous piece: extend it.
            self.parts.append(part)
            self.length += len(part)
            return
        self.normalized_starts.append(self.length)
        self.original_starts.append(original_start)
        self.parts.append(part)
        self.length += len(part)

    def add_expansion(self, part: str, original_index: int) -> None:
        """Append `part`, every char of which maps to the one original char at `original_index`."""
        for char in part:
            self.add(char, original_index)


def normalize(text: str) -> NormalizedText:
    """Return the matching copy of `text` described in the module docstring."""
    if text.isascii():
        return NormalizedText(text.lower(), [0], [0], 0)

    builder = _Builder()
    position = 0
    for match in _SPECIAL.finditer(text):
        if match.start() > position:
            builder.add(_fold_plain(text[position : match.start()]), position)
        _add_special(builder, match.group(), match.start())
        position = match.end()
    if position < len(text):
        builder.add(_fold_plain(text[position:]), position)

    if not builder.parts:
        return NormalizedText("", [0], [0], 0)
    normalized = "".join(builder.parts)
    return NormalizedText(normalized, builder.normalized_starts, builder.original_starts, len(_TAG_CHARS.findall(text)))


def _fold_plain(part: str) -> str:
    """Fold a run free of chars in the special table, which casefold maps one to one."""
    if part.isascii():
        return part.lower()
    folded = part.casefold()
    if len(folded) != len(part):
        # A char outside the scanned ranges changed length: keep the map exact, skip the fold.
        folded = part.lower() if len(part.lower()) == len(part) else part
    return folded.translate(_CONFUSABLES)


def _add_special(builder: _Builder, run: str, original_start: int) -> None:
    for offset, char in enumerate(run):
        replacement = _SPECIAL_CHARS.get(char, char)
        if len(replacement) == 1:
            builder.add(replacement, original_start + offset)
        elif replacement:
            builder.add_expansion(replacement, original_start + offset)


def fold_pattern(pattern: str) -> str:
    """Return regex source `pattern` with every non-ASCII char folded as `normalize` folds text.

    Write patterns for the matching copy in natural spelling ("précédentes", "игнорируй") and
    pass them through this, so they meet the folded text. ASCII chars, and so regex syntax, are
    kept as they are: write ASCII letters in lower case.
    """
    return "".join(char if char.isascii() else _fold_pattern_char(char) for char in pattern)


def leet_tolerant(pattern: str) -> str:
    """Return regex source `pattern` with each literal a, e, i, l, o, s and t also matching its leet chars.

    Escapes, char classes, group openers and repeat counts are copied unchanged, so "\\s",
    "[a-z]", "(?:" and "{0,3}" keep their meaning.
    """
    parts = []
    index = 0
    while index < len(pattern):
        end = _syntax_end(pattern, index)
        if end > index:
            parts.append(pattern[index:end])
            index = end
        else:
            parts.append(_LEET_CLASSES.get(pattern[index], pattern[index]))
            index += 1
    return "".join(parts)


def _syntax_end(pattern: str, index: int) -> int:
    """Return the end of the regex syntax token at `pattern[index]`, or `index` for a literal char."""
    char = pattern[index]
    if char == "\\":
        return index + 2
    if char == "{":
        return pattern.index("}", index) + 1
    if pattern.startswith(("(?<!", "(?<="), index):
        return index + 4
    if pattern.startswith("(?", index):
        return index + 3
    if char != "[":
        return index

    end = index + 1
    if pattern[end] == "^":
        end += 1
    if pattern[end] == "]":
        end += 1
    while pattern[end] != "]":
        end += 2 if pattern[end] == "\\" else 1
    return end + 1


def _fold_pattern_char(char: str) -> str:
    replacement = _SPECIAL_CHARS.get(char)
    if replacement is not None:
        return replacement
    return _fold_plain(char)


_WHITESPACE_RUN = re.compile(r"\s{2,}|[^\S ]")
# ASCII whitespace other than space and line feed. Non-ASCII whitespace is " " after `normalize`.
_OTHER_WHITESPACE_CHARS = "\t\r\x0b\x0c\x1c\x1d\x1e\x1f"
_OTHER_WHITESPACE = str.maketrans(dict.fromkeys(_OTHER_WHITESPACE_CHARS, " "))


def _collapse(text: str) -> str:
    """Collapse each whitespace run of `text`: to "\\n" when it contains one, else to " ".

    Uses `str` methods only, which are several times faster than a regex pass. Each loop halves
    the longest run left, so it runs about log2(longest run) times.
    """
    if any(char in text for char in _OTHER_WHITESPACE_CHARS):
        text = text.translate(_OTHER_WHITESPACE)
    while "  " in text:
        text = text.replace("  ", " ")
    if "\n" in text:
        text = text.replace(" \n", "\n").replace("\n ", "\n")
        while "\n\n" in text:
            text = text.replace("\n\n", "\n")
    return text


class CollapsedText:
    """`text` with every whitespace run collapsed to one char, and the map back to the input.

    A run that contains a line break becomes "\\n", any other run becomes " ". Patterns can then
    match a gap between words with one `\\s`. The map is built on the first call to
    `input_index`, so texts without matches never pay for it.
    """

    __slots__ = ("text", "_input", "_collapsed_starts", "_input_starts")

    def __init__(self, text: str) -> None:
        self._input = text
        self.text = _collapse(text)
        self._collapsed_starts: list[int] | None = None
        self._input_starts: list[int] = []

    def input_index(self, index: int) -> int:
        """Return the index in the input text of the char at collapsed `index`."""
        if self._collapsed_starts is None:
            self._build_map()
        piece = bisect_right(self._collapsed_starts, index) - 1  # type: ignore[arg-type]
        return self._input_starts[piece] + index - self._collapsed_starts[piece]  # type: ignore[index]

    def input_span(self, start: int, end: int) -> tuple[int, int]:
        """Return the input (start, end) of the non-empty collapsed span `start:end`."""
        return self.input_index(start), self.input_index(end - 1) + 1

    def _build_map(self) -> None:
        collapsed_starts = [0]
        input_starts = [0]
        if len(self.text) == len(self._input):
            # Collapsing only removes chars, so nothing changed: the map is the identity.
            self._collapsed_starts, self._input_starts = collapsed_starts, input_starts
            return
        removed = 0
        for match in _WHITESPACE_RUN.finditer(self._input):
            # The run becomes one char at collapsed index match.start() - removed.
            removed += match.end() - match.start() - 1
            collapsed_starts.append(match.end() - removed)
            input_starts.append(match.end())
        self._collapsed_starts = collapsed_starts
        self._input_starts = input_starts
