"""The inline PII detector: one compiled multi-pattern scan, then validators on the candidates.

How a scan works:

1. All candidate patterns (`pii_patterns.build_specs`) are compiled once, at construction, into
   one Hyperscan block-mode database with `HS_FLAG_SOM_LEFTMOST`. The text is encoded as UTF-8
   once per scan and framed by a newline on each side, so every pattern can consume exactly one
   boundary byte on each side. Byte offsets are mapped back to `str` offsets (no mapping when the
   text is ASCII). If Hyperscan is missing or refuses to compile on this CPU, the same patterns
   run through Python `re` with look-arounds instead, and one warning is logged.
2. Per pattern, candidates are chosen as `re.finditer` would: leftmost first, longest from each
   start, none overlapping. The 4-char look-arounds of the pattern are checked in Python.
3. Each candidate's validator (checksums, issuer ranges, dates, `phonenumbers`) returns verdicts.
4. Context words in the CONTEXT_WINDOW_CHARS (40) chars before the match adjust the score.
5. Allow-listed values are dropped, then overlapping findings are resolved: the higher score
   wins, then the longer span, then the earlier pattern.

Scores:

- 0.9 to 1.0: a checksum that random strings rarely pass, or a distinctive format with its
  check. Examples are cards (Luhn plus issuer range and length), IBANs (country format and
  mod 97), emails, international phone numbers that `phonenumbers` validates, Bitcoin addresses,
  and Italian and Finnish personal codes.
- 0.75 to 0.85: a distinctive format without a strong check, such as IPv4 and IPv6 addresses,
  MAC addresses, national phone numbers formatted as phone numbers and valid in a configured region.
- 0.5 to 0.6: a format that is mostly but not only this type (US SSN with dashes, UK NINO, Indian
  PAN, US MBI, Spanish NIF). These pass the default threshold of 0.5.
- 0.5 to 0.9 for digit-only numbers whose check also needs a valid birth date or prefix (PESEL,
  ABN, Korean RRN, Swedish personnummer, South African ID), higher where fewer random numbers pass.
- 0.3 to 0.45: digit runs that only a context word makes PII, such as bare 9-digit SSNs, digit-only
  national numbers whose checksum 1 in 10 random numbers pass (NHS, TFN, SIN, Aadhaar, NPI),
  ABA routing numbers and bare or thousands-grouped phone numbers.
- A context word for the type raises the score to the verdict's context score, about 0.85 for
  pattern-only matches and 0.95 for checksum-validated ones. A negative context word ("version",
  "order", "invoice", "build", "port", "timestamp", "uuid", "isbn", ...) subtracts 0.45, so an IPv4
  address after "version" drops to 0.4 and a card number after "order" to 0.55.

Stream hold-back (`pending_chars`): the longest of three trailing runs, each trimmed to where a
match can start and capped at the longest match of its family plus its look-ahead:

- letters, digits and `_%+-.@:` (emails, IPv6, MAC, crypto and letter IDs): 319 chars if the run
  holds an "@", else 90;
- digits and `.-()/+` and spaces, plus a phone extension being typed: 48;
- letters, digits, spaces and dashes from a token that starts like an IBAN or a NINO ("DE89 37"): 44.

For ordinary prose this is the last partial word, or 0 after a space or punctuation.
"""

from __future__ import annotations

import logging
import re
import threading
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from extguard.scan import pii_patterns
from extguard.scan.findings import Finding
from extguard.scan.secrets import DATABASE_URL_SCHEMES, OTHER_URL_SCHEMES
from extguard.scan.pii_patterns import (
    CONTEXT_WINDOW_CHARS,
    DEFAULT_PHONE_REGIONS,
    EMAIL_MAX_CHARS,
    NEGATIVE,
    NEGATIVE_CONTEXT_PENALTY,
    PatternSpec,
    PhoneValidator,
)

try:
    import hyperscan
except ImportError:  # pragma: no cover - exercised by forcing the fallback in tests
    hyperscan = None

_LOG = logging.getLogger(__name__)

ENTITY_TYPES = frozenset({"EMAIL_ADDRESS", *pii_patterns.CONTEXT_WORDS})


class _Candidate(NamedTuple):
    score: float
    length: int
    order: int
    start: int
    end: int
    entity_type: str
    rule: str


def _candidate_rank(candidate: _Candidate) -> tuple[float, int, int, int]:
    return (-candidate.score, -candidate.length, candidate.order, candidate.start)


# -- matchers -------------------------------------------------------------------------------


def _regex_source(spec: PatternSpec) -> str:
    """Return the Python `re` form of `spec`: the core with every boundary rule as a look-around."""
    parts = [f"(?<![{spec.not_before}])"]
    if spec.before_seps:
        parts.append(f"(?<![0-9][{spec.before_seps}])")
    parts += [spec.before, f"(?:{spec.core})", f"(?![{spec.not_after}])"]
    if spec.after_seps:
        parts.append(f"(?![{spec.after_seps}][{spec.after_neighbor}])")
    parts.append(spec.after)
    return "".join(parts)


def _hyperscan_source(spec: PatternSpec) -> str:
    """Return the Hyperscan form of `spec`, which consumes its boundary chars.

    Each side consumes one char outside the forbidden class, or a separator and the char beyond
    it. The core never starts or ends with a separator, so the separator branch is recognizable.
    """
    right = f"[^{spec.not_after}{spec.after_seps}]"
    if spec.after_seps:
        right = f"(?:{right}|[{spec.after_seps}][^{spec.after_neighbor}])"
    if spec.hyperscan_core:
        return f"(?:{spec.hyperscan_core}){right}"
    if spec.left_boundary_in_python:
        return f"(?:{spec.core}){right}"

    left = f"[^{spec.not_before}{spec.before_seps}]"
    if spec.before_seps:
        left = f"(?:{left}|[^0-9][{spec.before_seps}])"
    return f"{left}(?:{spec.core}){right}"


def _separator_bytes(class_body: str) -> frozenset[int]:
    return frozenset(class_body.replace("\\", "").encode())


class _RegexMatcher:
    """Finds candidates with Python `re`, one `finditer` per pattern."""

    __slots__ = ("_patterns",)

    def __init__(self, specs: Sequence[PatternSpec]) -> None:
        self._patterns = tuple(re.compile(_regex_source(spec), re.ASCII) for spec in specs)

    def find(self, text: str) -> list[tuple[int, int, int]]:
        """Return (pattern index, start, end) of every candidate, grouped by pattern."""
        return [
            (index, match.start(), match.end())
            for index, pattern in enumerate(self._patterns)
            for match in pattern.finditer(text)
        ]


def _collect_match(spec_index: int, start: int, end: int, flags: int, matches: list[tuple[int, int, int]]) -> None:
    matches.append((spec_index, start, end))


# The maximum look-ahead of any pattern, in chars beyond the match.
_LOOKAHEAD_CHARS = 5


class _HyperscanMatcher:
    """Finds candidates with one Hyperscan database, with the same results as `_RegexMatcher`.

    Hyperscan reports, per pattern and end offset, the leftmost start. Every `finditer` match is
    therefore inside a reported span, and `_select` recovers the matches from the spans, running
    Python `re` only on the few spans that overlap a match already chosen. Scratch space is per
    thread, so one instance can scan on several threads at once.

    NOTE: `_select` takes the longest span from a start where `re` takes its greedy match. They
    differ for the phone pattern's 8-group limit in runs of glued numbers ("...0487 98 11
    922024-01-15"), so the two paths can disagree on such input.
    """

    __slots__ = ("_database", "_regexes", "_guards", "_separators", "_extensions", "_left_checks", "_local")

    def __init__(self, specs: Sequence[PatternSpec]) -> None:
        """Raise hyperscan.error when the database does not compile or this CPU is not supported."""
        self._database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._database.compile(
            expressions=[_hyperscan_source(spec).encode() for spec in specs],
            ids=list(range(len(specs))),
            elements=len(specs),
            flags=[hyperscan.HS_FLAG_SOM_LEFTMOST] * len(specs),
        )
        self._regexes = tuple(re.compile(_regex_source(spec), re.ASCII) for spec in specs)
        self._guards = tuple(
            (re.compile(spec.before) if spec.before else None, re.compile(spec.after) if spec.after else None)
            for spec in specs
        )
        self._separators = tuple(
            (_separator_bytes(spec.before_seps), _separator_bytes(spec.after_seps)) for spec in specs
        )
        self._extensions = tuple(
            (_class_bytes(spec.extend_left), _class_bytes(spec.core[1 : spec.core.index("]")]), spec.extend_left_max_chars)
            if spec.hyperscan_core
            else None
            for spec in specs
        )
        self._left_checks = tuple(
            (_class_bytes(spec.not_before), re.compile(spec.core.encode())) if spec.left_boundary_in_python else None
            for spec in specs
        )
        self._local = threading.local()

    def _scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._database)
        return scratch

    def find(self, text: str) -> list[tuple[int, int, int]]:
        """Return (pattern index, start, end) of every candidate, grouped by pattern."""
        # The newlines frame the text, so a boundary can be consumed at its very start and end.
        data = ("\n" + text + "\n").encode()
        matches: list[tuple[int, int, int]] = []
        self._database.scan(data, match_event_handler=_collect_match, context=matches, scratch=self._scratch())
        if not matches:
            return []

        spans = self._value_spans(data, matches)
        if not text.isascii():
            spans = _to_char_offsets(data, spans)
        selected: list[tuple[int, int, int]] = []
        for spec_index in sorted(spans):
            # Sorting (start, -end) pairs puts them leftmost first, then longest first.
            spans[spec_index].sort()
            self._select(text, spec_index, spans[spec_index], selected)
        return selected

    def _value_spans(self, data: bytes, matches: list[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
        """Strip the consumed boundary bytes and return (start, -end) text byte spans per pattern.

        Data offset `i` is text byte offset `i - 1`. A separator right inside the consumed range
        means the two-byte boundary branch matched. The same span can occur twice.
        """
        spans: dict[int, list[tuple[int, int]]] = {}
        for spec_index, start, end in matches:
            before_seps, after_seps = self._separators[spec_index]
            value_end = end - 3 if data[end - 2] in after_seps else end - 2
            extension = self._extensions[spec_index]
            left_check = self._left_checks[spec_index]
            if left_check is not None:
                value_start = _bounded_start(data, start, value_end + 1, before_seps, *left_check)
                if value_start is None:
                    continue
            elif extension is None:
                value_start = start + 1 if data[start + 1] in before_seps else start
            else:
                value_start = _extend_left(data, start, *extension)
                if value_start is None:
                    continue
            spans.setdefault(spec_index, []).append((value_start, -value_end))
        return spans

    def _select(self, text: str, spec_index: int, spans: list[tuple[int, int]], selected: list[tuple[int, int, int]]) -> None:
        """Append what `finditer` returns: leftmost match, then longest from that start.

        `spans` are sorted (start, -end) pairs. A span that starts inside the previous match but
        ends after it may hide a match that starts at or after the previous end. Python `re`
        searches for it, up to the span's end.
        """
        before, after = self._guards[spec_index]
        position = 0
        index = 0
        while index < len(spans):
            start, end = spans[index][0], -spans[index][1]
            if start < position:
                furthest = end
                while index < len(spans) and spans[index][0] < position:
                    furthest = max(furthest, -spans[index][1])
                    index += 1
                if furthest > position:
                    match = self._regexes[spec_index].search(text, position, min(len(text), furthest + _LOOKAHEAD_CHARS))
                    if match is not None and match.end() <= furthest:
                        selected.append((spec_index, match.start(), match.end()))
                        position = match.end()
                continue

            index += 1
            if before is not None and before.match(text, start) is None:
                continue
            if after is not None and after.match(text, end) is None:
                continue
            selected.append((spec_index, start, end))
            position = end


def _class_bytes(class_body: str) -> frozenset[int]:
    """Return the bytes of an ASCII class body made of ranges ("A-Z"), escaped chars ("\\-") and plain chars."""
    tokens: list[tuple[str, bool]] = []  # (char, escaped)
    index = 0
    while index < len(class_body):
        escaped = class_body[index] == "\\"
        index += escaped
        tokens.append((class_body[index], escaped))
        index += 1

    members: set[int] = set()
    position = 0
    while position < len(tokens):
        char = tokens[position][0]
        if position + 2 < len(tokens) and tokens[position + 1] == ("-", False):
            members.update(range(ord(char), ord(tokens[position + 2][0]) + 1))
            position += 3
        else:
            members.add(ord(char))
            position += 1
    return frozenset(members)


def _extend_left(data: bytes, start: int, run_bytes: frozenset[int], first_bytes: frozenset[int], max_chars: int) -> int | None:
    """Return the text byte offset where the run of `run_bytes` that ends at data offset `start` begins.

    Return None when no match can start there: the run is longer than `max_chars`, or its first
    byte is not in `first_bytes`. The frame byte at data offset 0 is never in the run.
    """
    limit = max(0, start - max_chars)
    index = start
    while index > limit and data[index - 1] in run_bytes:
        index -= 1
    if data[index - 1] in run_bytes or data[index] not in first_bytes:
        return None
    return index - 1


def _bounded_start(
    data: bytes, start: int, end: int, separators: frozenset[int], not_before: frozenset[int], core: re.Pattern[bytes]
) -> int | None:
    """Return the text byte offset of the leftmost core match that ends at data offset `end` and
    has a valid left boundary, or None when there is none.

    Hyperscan reports `start`, the leftmost start of a core match ending at `end`, without
    checking the char before it. A later start can still be valid ("ab1 415 555 0199" contains
    "415 555 0199"), so later starts after a boundary char are tried with Python `re`.
    """
    if _left_boundary_ok(data, start, separators, not_before):
        return start - 1
    for position in range(start + 1, end):
        if _left_boundary_ok(data, position, separators, not_before) and core.fullmatch(data, position, end):
            return position - 1
    return None


def _left_boundary_ok(data: bytes, position: int, separators: frozenset[int], not_before: frozenset[int]) -> bool:
    """Return whether a match may start at data offset `position`: the byte before it is not in
    `not_before`, and if it is a separator, the byte before that is not a digit."""
    previous = data[position - 1]
    if previous in separators:
        return not 48 <= data[position - 2] <= 57
    return previous not in not_before


def _to_char_offsets(data: bytes, spans: dict[int, list[tuple[int, int]]]) -> dict[int, list[tuple[int, int]]]:
    """Map (start, -end) text byte offsets to `str` offsets. `data` is the framed UTF-8 text.

    Every offset is at an ASCII char of a match, so each slice between offsets decodes cleanly.
    """
    offsets = sorted({abs(offset) for pairs in spans.values() for pair in pairs for offset in pair})
    chars: dict[int, int] = {}
    byte_position = char_position = 0
    for offset in offsets:
        char_position += len(data[1 + byte_position : 1 + offset].decode())
        byte_position = offset
        chars[offset] = char_position
    return {index: [(chars[start], -chars[-end]) for start, end in pairs] for index, pairs in spans.items()}


_fallback_logged = threading.Event()


def _log_fallback_once(reason: str) -> None:
    if not _fallback_logged.is_set():
        _fallback_logged.set()
        _LOG.warning("Hyperscan is unavailable (%s); the PII detector uses Python re, which is slower", reason)


def _build_matcher(specs: Sequence[PatternSpec], use_hyperscan: bool | None) -> _HyperscanMatcher | _RegexMatcher:
    if use_hyperscan is False:
        return _RegexMatcher(specs)
    if hyperscan is None:
        if use_hyperscan:
            raise RuntimeError("use_hyperscan=True, but the hyperscan package is not installed")
        _log_fallback_once("the hyperscan package is not installed")
        return _RegexMatcher(specs)
    try:
        return _HyperscanMatcher(specs)
    except hyperscan.error as error:
        if use_hyperscan:
            raise
        _log_fallback_once(f"compiling the pattern database failed: {error}")
        return _RegexMatcher(specs)


# -- pending chars --------------------------------------------------------------------------

_WORD_RUN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_%+-.@:")
# The maximum word-family match without an "@" (a bech32 address). An email local part also fits.
_WORD_RUN_MAX_CHARS = 90
_EMAIL_RUN_MAX_CHARS = EMAIL_MAX_CHARS + 1
_DIGIT_RUN_CHARS = frozenset("0123456789 .-()/+")
_DIGIT_MATCH_STARTS = frozenset("0123456789+(")
# A phone number (at most PHONE_MAX_CHARS) or a spaced card (23) plus the 4-char look-ahead.
_DIGIT_RUN_MAX_CHARS = 48
# An extension after a digit, possibly still being typed ("555-2671 ext", "555-2671 x12").
_EXTENSION_SUFFIX = re.compile(r"(?<=[0-9]) ?(?:x|e|ex|ext\.?|exte|exten|extens|extensi|extensio|extension)? ?[0-9]*$")
_SPACED_RUN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 -")
# A spaced IBAN (34 chars and 8 separators) and a trailing separator and char.
_SPACED_RUN_MAX_CHARS = 44
# The start of an IBAN ("DE89 3704") or a NINO ("AB 12 34"), or a prefix of one.
_SPACED_PREFIX = re.compile(r"[A-Za-z]{1,2}|[A-Za-z]{2} ?(?:[0-9][A-Za-z0-9 \-]*)?")


def _trailing_run_start(text: str, end: int, chars: frozenset[str], limit: int) -> int:
    """Return where the run of `chars` that ends at `end` starts, looking back at most `limit` chars."""
    stop = max(0, end - limit)
    index = end
    while index > stop and text[index - 1] in chars:
        index -= 1
    return index


def _pending_word(text: str) -> int:
    start = _trailing_run_start(text, len(text), _WORD_RUN_CHARS, _EMAIL_RUN_MAX_CHARS)
    run = len(text) - start
    if "@" not in text[start:]:
        run = min(run, _WORD_RUN_MAX_CHARS)
    return run


def _pending_digits(text: str) -> int:
    end = len(text)
    suffix = _EXTENSION_SUFFIX.search(text, max(0, end - 16))
    if suffix is not None and suffix.start() < end:
        end = suffix.start()

    start = _trailing_run_start(text, end, _DIGIT_RUN_CHARS, _DIGIT_RUN_MAX_CHARS - (len(text) - end))
    while start < end and text[start] not in _DIGIT_MATCH_STARTS:
        start += 1
    if start == end:
        return 0
    return len(text) - start


def _pending_spaced(text: str) -> int:
    run_start = _trailing_run_start(text, len(text), _SPACED_RUN_CHARS, _SPACED_RUN_MAX_CHARS)
    for start in range(run_start, len(text)):
        at_token_start = start == 0 or not text[start - 1].isalnum()
        if at_token_start and text[start].isalpha() and _SPACED_PREFIX.fullmatch(text, start):
            return len(text) - start
    return 0


# -- the detector ---------------------------------------------------------------------------


# The end of a URL's user name before its password ("postgres://user:", "https://user:"), for
# the schemes whose passwords the secrets detector reports. URLs of other schemes keep the e-mail
# finding, which at least masks their password. Looked for at most this many chars back, which
# stays inside the stream scanner's rescan context.
_URL_USER_MAX_CHARS = 48
_URL_USERINFO_END = re.compile(rf"(?:{DATABASE_URL_SCHEMES}|{OTHER_URL_SCHEMES})://[^\s/?#@:]*:\Z", re.IGNORECASE)

_NO_CONTEXT: frozenset[str] = frozenset()


def _is_url_userinfo(text: str, start: int, end: int) -> bool:
    """Return whether the e-mail-shaped `text[start:end]` is the user part and host of a URL or Git remote.

    That is "password@host" after "postgres://user:" (the secrets detector reports the password),
    "user@host" right after "://" ("ssh://git@gitlab.com/..."), or an scp-style remote whose host
    is followed by ":" and a path ("git@github.com:acme/repo.git").
    """
    if _URL_USERINFO_END.search(text, max(0, start - _URL_USER_MAX_CHARS), start):
        return True
    if text.endswith("://", 0, start):
        return True
    return end < len(text) - 1 and text[end] == ":" and not text[end + 1].isspace()


class PiiDetector:
    """Finds PII of ENTITY_TYPES (Presidio's names) with one multi-pattern scan and validators.

    `allow_values` are never flagged: exact matches, compared case-insensitively for email
    addresses. `allow_patterns` are regular expressions, and a value that one of them fully
    matches is never flagged. `phone_regions` are the ISO 3166 regions tried for phone numbers
    written without a country code. `use_hyperscan` forces Hyperscan (True; errors raise) or
    Python `re` (False); None uses Hyperscan when it works and logs once when it does not.

    Instances are immutable and safe to share between threads and streams.
    """

    __slots__ = (
        "_specs",
        "_matcher",
        "_allow_values",
        "_allow_emails",
        "_allow_patterns",
        "_context_phrases",
        "_phrase_lengths",
        "_first_words",
    )

    name = "pii"
    entity_types = ENTITY_TYPES

    def __init__(
        self,
        allow_values: Iterable[str] = (),
        allow_patterns: Iterable[str] = (),
        *,
        phone_regions: Sequence[str] = DEFAULT_PHONE_REGIONS,
        use_hyperscan: bool | None = None,
    ) -> None:
        """Raise re.error for an invalid allow pattern and ValueError for an empty region list."""
        if not phone_regions:
            raise ValueError("phone_regions is empty; give at least one ISO 3166 region such as 'US'")

        self._specs = pii_patterns.build_specs(PhoneValidator(phone_regions))
        self._matcher = _build_matcher(self._specs, use_hyperscan)

        values = tuple(allow_values)
        self._allow_values = frozenset(values)
        self._allow_emails = frozenset(value.casefold() for value in values)
        self._allow_patterns = tuple(re.compile(pattern) for pattern in allow_patterns)

        self._context_phrases = pii_patterns.context_phrases()
        lengths: dict[str, set[int]] = {}
        for phrase in self._context_phrases:
            lengths.setdefault(phrase[0], set()).add(len(phrase))
        self._phrase_lengths = {word: tuple(sorted(counts)) for word, counts in lengths.items()}
        # Every word that can start a phrase, also with a plural s, for a quick test of a window.
        self._first_words = frozenset(lengths) | frozenset(word + "s" for word in lengths)

    @property
    def uses_hyperscan(self) -> bool:
        """Whether scans run on Hyperscan rather than the Python `re` fallback."""
        return isinstance(self._matcher, _HyperscanMatcher)

    def scan(self, text: str) -> list[Finding]:
        """Return every PII finding in `text`, sorted by start offset, with no two overlapping."""
        if not text:
            return []
        spans = self._matcher.find(text)
        if not spans:
            return []

        candidates: list[_Candidate] = []
        # Candidates of several patterns often share a start, and so their context.
        contexts: dict[int, frozenset[str]] = {}
        for spec_index, start, end in spans:
            self._add_candidates(text, spec_index, start, end, candidates, contexts)
        return self._resolve(candidates)

    def pending_chars(self, text: str) -> int:
        """Return the longest trailing run that a match could still start in or extend.

        See the module docstring for the three runs and their caps.
        """
        if not text:
            return 0
        return max(_pending_word(text), _pending_digits(text), _pending_spaced(text))

    def _add_candidates(
        self,
        text: str,
        spec_index: int,
        start: int,
        end: int,
        candidates: list[_Candidate],
        contexts: dict[int, frozenset[str]],
    ) -> None:
        spec = self._specs[spec_index]
        if end - start > spec.max_chars:
            return
        verdicts = spec.validate(text[start:end])
        if not verdicts:
            return
        if spec.name == "email" and _is_url_userinfo(text, start, end):
            return

        context_types = contexts.get(start)
        if context_types is None:
            context_types = contexts[start] = self._context_types(text, start)
        for verdict_index, verdict in enumerate(verdicts):
            verdict_end = end if verdict.length is None else start + verdict.length
            if self._is_allowed(text[start:verdict_end], verdict.entity_type):
                continue
            score = verdict.context_score if verdict.entity_type in context_types else verdict.score
            if NEGATIVE in context_types:
                score -= NEGATIVE_CONTEXT_PENALTY
            score = round(min(1.0, score), 2)
            if score <= 0:
                continue
            order = spec_index * 8 + verdict_index
            candidates.append(
                _Candidate(score, verdict_end - start, order, start, verdict_end, verdict.entity_type, verdict.rule)
            )

    def _context_types(self, text: str, start: int) -> frozenset[str]:
        """Return the entity types (and NEGATIVE) whose context phrases occur just before `start`.

        The last word of a phrase may carry a plural s.
        """
        words = pii_patterns.context_tokens(text[max(0, start - CONTEXT_WINDOW_CHARS) : start])
        starts = self._first_words.intersection(words)
        if not starts:
            return _NO_CONTEXT
        found: set[str] = set()
        for index, word in enumerate(words):
            if word not in starts:
                continue
            lengths = self._phrase_lengths.get(word)
            if lengths is None and word.endswith("s"):
                lengths = self._phrase_lengths.get(word[:-1])
            if lengths is None:
                continue
            for length in lengths:
                phrase = tuple(words[index : index + length])
                types = self._context_phrases.get(phrase)
                if types is None and phrase[-1].endswith("s"):
                    types = self._context_phrases.get((*phrase[:-1], phrase[-1][:-1]))
                if types is not None:
                    found.update(types)
        return frozenset(found)

    def _is_allowed(self, value: str, entity_type: str) -> bool:
        if not self._allow_emails and not self._allow_patterns:
            return False
        if value in self._allow_values:
            return True
        if entity_type == "EMAIL_ADDRESS" and value.casefold() in self._allow_emails:
            return True
        return any(pattern.fullmatch(value) for pattern in self._allow_patterns)

    @staticmethod
    def _resolve(candidates: list[_Candidate]) -> list[Finding]:
        """Keep the best candidates that do not overlap a better one, sorted by start."""
        candidates.sort(key=_candidate_rank)
        kept_starts: list[int] = []
        kept: list[_Candidate] = []
        for candidate in candidates:
            index = bisect_right(kept_starts, candidate.start)
            if index > 0 and kept[index - 1].end > candidate.start:
                continue
            if index < len(kept) and kept[index].start < candidate.end:
                continue
            kept_starts.insert(index, candidate.start)
            kept.insert(index, candidate)
        return [
            Finding("pii", candidate.entity_type, candidate.start, candidate.end, candidate.score, candidate.rule)
            for candidate in kept
        ]
