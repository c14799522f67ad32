"""Regex detectors for PII, secrets and prompt injection.

These are the inline detectors that run on every request and response. Patterns are compiled
once at import. The detector classes keep no per-instance state, so one instance can be shared
by all concurrent streams. All offsets are `str` indices into the scanned text.

Every pattern is bounded: from a given start it inspects at most a fixed number of characters,
and a look-behind stops it from restarting inside a run it already rejected. A scan is therefore
linear in the text length, and `pending_chars` can bound how far back a new character may
change a result.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence

from extguard.scan.findings import Detector, Finding
from extguard.scan.pii import PiiDetector


def _finding_start(finding: Finding) -> int:
    return finding.start


def _trailing_run_length(text: str, chars: frozenset[str], limit: int) -> int:
    """Return the length of the run of `chars` that ends `text`, counting at most `limit` chars."""
    stop = max(0, len(text) - limit)
    index = len(text)
    while index > stop and text[index - 1] in chars:
        index -= 1
    return len(text) - index


# -- secrets --------------------------------------------------------------------------------

_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_AWS_KEY_CHARS = 20
_AWS_KEY_PREFIX = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]{0,16}|A(?:KI?|SI?)?")
_AWS_RUN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

# Legacy keys are `sk-` + 48 alphanumerics and project keys `sk-proj-` + about 160 chars, so
# 256 chars after `sk-` leaves room for longer formats while keeping the pattern bounded.
_OPENAI_KEY_BODY_MAX_CHARS = 256
_OPENAI_API_KEY = re.compile(
    rf"(?<![A-Za-z0-9_\-])sk-[A-Za-z0-9_\-]{{20,{_OPENAI_KEY_BODY_MAX_CHARS}}}(?![A-Za-z0-9_\-])"
)
_OPENAI_KEY_MAX_CHARS = 3 + _OPENAI_KEY_BODY_MAX_CHARS
_OPENAI_KEY_PREFIX = re.compile(rf"sk-[A-Za-z0-9_\-]{{0,{_OPENAI_KEY_BODY_MAX_CHARS}}}|sk?")
_OPENAI_RUN_CHARS = _AWS_RUN_CHARS | {"-"}


class SecretDetector:
    """AWS access key ids and OpenAI API keys, score 1.0."""

    __slots__ = ()

    name = "secrets"
    entity_types = frozenset({"AWS_ACCESS_KEY_ID", "OPENAI_API_KEY"})

    def scan(self, text: str) -> list[Finding]:
        """Return every key in `text`, sorted by start offset."""
        findings = [
            Finding("secrets", "AWS_ACCESS_KEY_ID", match.start(), match.end(), 1.0, "aws_access_key_id")
            for match in _AWS_ACCESS_KEY_ID.finditer(text)
        ]
        if "sk-" in text:
            findings.extend(
                Finding("secrets", "OPENAI_API_KEY", match.start(), match.end(), 1.0, "openai_api_key")
                for match in _OPENAI_API_KEY.finditer(text)
            )

        if len(findings) > 1:
            findings.sort(key=_finding_start)
        return findings

    def pending_chars(self, text: str) -> int:
        """Return the length of the trailing run if it is the start of a key, else 0.

        Both key kinds must start at the start of a run of key characters, so only a run that
        is still a prefix of a key can become one.
        """
        pending = 0

        aws_run = _trailing_run_length(text, _AWS_RUN_CHARS, _AWS_KEY_CHARS + 1)
        if aws_run and _AWS_KEY_PREFIX.fullmatch(text, len(text) - aws_run):
            pending = aws_run

        openai_run = _trailing_run_length(text, _OPENAI_RUN_CHARS, _OPENAI_KEY_MAX_CHARS + 1)
        if openai_run and _OPENAI_KEY_PREFIX.fullmatch(text, len(text) - openai_run):
            pending = max(pending, openai_run)

        return pending


# -- prompt injection -----------------------------------------------------------------------

# The instruction-override phrase as slots of alternative words; `True` marks an optional slot.
# The scan pattern and the prefix check of `pending_chars` are both built from this table.
_OVERRIDE_PHRASE: tuple[tuple[frozenset[str], bool], ...] = (
    (frozenset({"ignore", "disregard", "forget"}), False),
    (frozenset({"all"}), True),
    (frozenset({"of"}), True),
    (frozenset({"the", "your"}), True),
    (frozenset({"previous", "prior", "above", "earlier", "preceding"}), False),
    (frozenset({"instructions", "rules", "directions", "prompts"}), False),
)
_OVERRIDE_MAX_WORDS = len(_OVERRIDE_PHRASE)
_OVERRIDE_MAX_CHARS = sum(max(map(len, words)) for words, _ in _OVERRIDE_PHRASE) + _OVERRIDE_MAX_WORDS - 1


def _words_pattern(words: frozenset[str]) -> str:
    return "(?:" + "|".join(sorted(words)) + ")"


def _override_pattern() -> re.Pattern[str]:
    parts = [r"\b", _words_pattern(_OVERRIDE_PHRASE[0][0])]
    for words, optional in _OVERRIDE_PHRASE[1:]:
        parts.append(f"(?: {_words_pattern(words)})?" if optional else f" {_words_pattern(words)}")
    parts.append(r"\b")
    return re.compile("".join(parts))


_OVERRIDE = _override_pattern()
_OVERRIDE_TRIGGER = re.compile(_words_pattern(_OVERRIDE_PHRASE[0][0]))
_WORD = re.compile(r"\w+")
_WHITESPACE_TO_COLLAPSE = re.compile(r"\s{2,}|[^\S ]")
# Tail of the text that `pending_chars` normalizes. Whitespace collapses, so a phrase prefix can
# be longer in the original than normalized. This allows 3 extra chars per normalized char.
# NOTE: a phrase prefix padded with more whitespace is not held back, so a stream can miss it.
_PENDING_TAIL_CHARS = 4 * _OVERRIDE_MAX_CHARS


class _NormalizedText:
    """Case-folded text with whitespace runs collapsed to one space, and the map back.

    The map is piecewise linear: normalized index `n` in piece `k` maps to
    `original_starts[k] + n - normalized_starts[k]`.
    """

    __slots__ = ("text", "_normalized_starts", "_original_starts")

    def __init__(self, text: str, normalized_starts: list[int], original_starts: list[int]) -> None:
        self.text = text
        self._normalized_starts = normalized_starts
        self._original_starts = original_starts

    def original_index(self, index: int) -> int:
        """Return the original index of the char at normalized `index`."""
        piece = bisect_right(self._normalized_starts, index) - 1
        return self._original_starts[piece] + index - self._normalized_starts[piece]

    def original_end(self, end: int) -> int:
        """Return the original exclusive end for the normalized exclusive `end` (> 0)."""
        return self.original_index(end - 1) + 1


def _normalize(text: str, folded: str) -> _NormalizedText:
    """Collapse whitespace runs of `folded`, which is `text.casefold()`, to single spaces."""
    if len(folded) != len(text):
        # Some char folded to several chars ("ß" to "ss"), so folded offsets are not original ones.
        return _normalize_per_char(text)

    parts: list[str] = []
    normalized_starts = [0]
    original_starts = [0]
    position = 0
    normalized_position = 0
    for match in _WHITESPACE_TO_COLLAPSE.finditer(folded):
        parts.append(folded[position : match.start()])
        parts.append(" ")
        normalized_position += match.start() - position + 1
        position = match.end()
        normalized_starts.append(normalized_position)
        original_starts.append(position)

    if not parts:
        return _NormalizedText(folded, normalized_starts, original_starts)
    parts.append(folded[position:])
    return _NormalizedText("".join(parts), normalized_starts, original_starts)


def _normalize_per_char(text: str) -> _NormalizedText:
    chars: list[str] = []
    normalized_starts: list[int] = []
    original_starts: list[int] = []
    shift: int | None = None
    previous_was_space = False

    for index, char in enumerate(text):
        if char.isspace():
            if previous_was_space:
                continue
            previous_was_space = True
            folded = " "
        else:
            previous_was_space = False
            folded = char.casefold()

        for folded_char in folded:
            # A new linear piece starts wherever the normalized-minus-original shift changes.
            if len(chars) - index != shift:
                shift = len(chars) - index
                normalized_starts.append(len(chars))
                original_starts.append(index)
            chars.append(folded_char)

    return _NormalizedText("".join(chars), normalized_starts or [0], original_starts or [0])


def _is_override_prefix(words: Sequence[str], partial: str | None) -> bool:
    """Return whether `words` then `partial` can still grow into the override phrase.

    `words` are complete words. `partial` is a last word that more text may extend, or None
    when the text ends in a space after `words`.
    """
    slot = 0
    for word in words:
        while slot < _OVERRIDE_MAX_WORDS and word not in _OVERRIDE_PHRASE[slot][0]:
            if not _OVERRIDE_PHRASE[slot][1]:
                return False
            slot += 1
        if slot == _OVERRIDE_MAX_WORDS:
            return False
        slot += 1

    if partial is None:
        return slot < _OVERRIDE_MAX_WORDS

    for candidates, optional in _OVERRIDE_PHRASE[slot:]:
        if any(candidate.startswith(partial) for candidate in candidates):
            return True
        if not optional:
            break
    return False


class InjectionDetector:
    """Instruction-override phrases such as "ignore all previous instructions", score 0.9.

    The phrase is matched on case-folded text with whitespace runs collapsed, and the offsets
    are mapped back to the original text. Only the object words instructions, rules,
    directions and prompts count, so "ignore the typos" and "ignore previous commits" do not
    match.
    """

    __slots__ = ()

    name = "injection"
    entity_types = frozenset({"PROMPT_INJECTION"})

    def scan(self, text: str) -> list[Finding]:
        """Return every override phrase in `text`, sorted by start offset."""
        folded = text.casefold()
        if not _OVERRIDE_TRIGGER.search(folded):
            return []

        normalized = _normalize(text, folded)
        return [
            Finding(
                "injection",
                "PROMPT_INJECTION",
                normalized.original_index(match.start()),
                normalized.original_end(match.end()),
                0.9,
                "instruction_override",
            )
            for match in _OVERRIDE.finditer(normalized.text)
        ]

    def pending_chars(self, text: str) -> int:
        """Return the length of the trailing text that is a prefix of an override phrase, else 0.

        A complete phrase at the very end counts as a prefix, because a following letter would
        end its last word elsewhere ("instructionsets").
        """
        tail_start = max(0, len(text) - _PENDING_TAIL_CHARS)
        tail = text[tail_start:]
        normalized = _normalize(tail, tail.casefold())
        words = [match.span() for match in _WORD.finditer(normalized.text)][-(_OVERRIDE_MAX_WORDS + 1) :]
        if not words:
            return 0

        chain = _trailing_word_chain(normalized.text, words)
        if not chain:
            return 0
        ends_in_word = chain[-1][1] == len(normalized.text)

        strings = [normalized.text[start:end] for start, end in chain]
        for first in range(max(0, len(chain) - _OVERRIDE_MAX_WORDS), len(chain)):
            if ends_in_word:
                complete, partial = strings[first:-1], strings[-1]
            else:
                complete, partial = strings[first:], None
            if _is_override_prefix(complete, partial):
                return len(text) - tail_start - normalized.original_index(chain[first][0])
        return 0


def _trailing_word_chain(text: str, words: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the trailing words of `text` that are separated by single spaces.

    The chain is empty unless `text` ends in its last word or in one space after it.
    """
    last_end = words[-1][1]
    if last_end != len(text) and text[last_end:] != " ":
        return []

    first = len(words) - 1
    while first > 0 and words[first][0] == words[first - 1][1] + 1 and text[words[first - 1][1]] == " ":
        first -= 1
    return words[first:]


def default_detectors() -> dict[str, Detector]:
    """Return one instance of each inline detector, keyed by detector name.

    Building them compiles their pattern databases, which takes a few hundred milliseconds:
    build once per process and share them.
    """
    detectors: tuple[Detector, ...] = (PiiDetector(), SecretDetector(), InjectionDetector())
    return {detector.name: detector for detector in detectors}
