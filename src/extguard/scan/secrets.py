"""Inline secrets detector: vendor tokens, private keys, connection strings and secret assignments.

Kinds, by entity type. "Span" is what a finding covers, so what a MASK rule replaces.

| entity type                     | what is matched                                                | span          | score      |
| ------------------------------- | -------------------------------------------------------------- | ------------- | ---------- |
| AWS_ACCESS_KEY_ID               | AKIA, ASIA, ABIA or ACCA + 16 of [A-Z0-9]                      | key id        | 1.0        |
| AWS_SECRET_ACCESS_KEY           | 40 of [A-Za-z0-9/+] assigned to a name with "aws" and "key" or | value         | 0.9        |
|                                 | "secret", or to secret_access_key (`=`, `:`, `=>` or a space)  |               |            |
| GCP_SERVICE_ACCOUNT_KEY         | JSON with "type": "service_account" then, in the same object,  | "type" key to | 1.0        |
|                                 | "private_key" holding a whole private key block                | key's quote   |            |
| GOOGLE_API_KEY                  | AIza + 35 of [A-Za-z0-9_-]                                     | key           | 1.0        |
| AZURE_STORAGE_CONNECTION_STRING | DefaultEndpointsProtocol=...;AccountKey=<base64>               | through key   | 1.0 or 0.9 |
| AZURE_SAS_TOKEN                 | `?sig=` or `&sig=` whose value decodes to 32 bytes             | sig value     | 0.9        |
| GITHUB_TOKEN                    | ghp_, gho_, ghu_, ghs_, ghr_ + 36 chars whose last 6 are the   | token         | 1.0        |
|                                 | CRC32 checksum; github_pat_ + 22 + _ + 59 chars                |               |            |
| GITLAB_TOKEN                    | glpat-, gldt-, glrt-, glcbt-, glptt-, glft-, glimt-, glagent-, | token         | 1.0 or 0.9 |
|                                 | gloas-, glsoat-, glffct-, glrtr- tokens, GR1348941 tokens      |               |            |
| SLACK_TOKEN                     | xoxb-, xoxp-, xoxa-, xoxr-, xoxs-, xoxe-, xoxe.xoxp-, xapp-    | token         | 1.0 or 0.9 |
| SLACK_WEBHOOK_URL               | hooks.slack.com/services/..., /workflows/..., /triggers/...    | URL           | 1.0 or 0.9 |
| OPENAI_API_KEY                  | sk- + 20 to 256 of [A-Za-z0-9_-], not sk-ant-                  | key           | 1.0 or 0.9 |
| ANTHROPIC_API_KEY               | sk-ant- + 32 to 200 of [A-Za-z0-9_-]                           | key           | 1.0 or 0.9 |
| STRIPE_API_KEY                  | sk_live_ or rk_live_ + 20 to 247 of [A-Za-z0-9]                | key           | 0.9        |
| HUGGINGFACE_TOKEN               | hf_ + 30 to 40 of [A-Za-z0-9]                                  | token         | 0.9        |
| BEARER_TOKEN                    | "Bearer " + 20 to 512 token chars that pass the entropy checks | token         | 0.6 to 0.8 |
|                                 | of generic values, unless another kind reports the token       |               |            |
| BASIC_AUTH                      | "Basic " + base64 of user:password in printable UTF-8          | base64 value  | 0.9        |
| PRIVATE_KEY                     | -----BEGIN ... PRIVATE KEY----- through its END line (PKCS#8,  | whole block   | 1.0 or 0.9 |
|                                 | RSA, EC, DSA, OpenSSH, encrypted, PGP ... PRIVATE KEY BLOCK)   |               |            |
| JWT                             | three base64url segments, the header JSON with "alg"           | token         | 0.9        |
| DATABASE_URL_PASSWORD           | postgres(ql), mysql, mariadb, mongodb(+srv), redis(s), amqp(s) | password only | 0.9        |
|                                 | URLs of the form scheme://user:password@host, also after any   |               |            |
|                                 | char (jdbc:postgresql://), with an optional +driver            |               |            |
| URL_PASSWORD                    | the same form with http(s), ftp(s), sftp, ssh, git, svn,       | password only | 0.9        |
|                                 | smtp(s), imap(s), pop3(s), ldap(s), mqtt(s), nats, kafka,      |               |            |
|                                 | ws(s) or socks schemes                                         |               |            |
| GENERIC_SECRET                  | password, passwd, pwd, passphrase, secret, token, api_key,     | value         | 0.6 to 0.8 |
|                                 | apikey, access_key, secret_key, private_key, auth_key (also    |               |            |
|                                 | at the end of a longer name) then `=`, `:`, `:=` or `=>` and a |               |            |
|                                 | quoted or bare value that passes the entropy checks            |               |            |

Scores: 1.0 when a checksum verifies or the code checks a fixed length or internal structure
(the strict shapes of each kind: OpenAI keys with the T3BlbkFJ marker or the 48-char legacy
body, Anthropic keys of 108 chars ending in AA, glpat- with a 20-char body, private key blocks
with their END line, Azure account keys of 64 bytes, Slack's documented token and webhook
shapes). 0.9 when the structure is there but nothing fixed can be checked: a vendor prefix with
a variable length, a JWT, a password in a URL, a SAS signature, an AWS secret key recognized
from its name, a private key block cut off before its END line. Generic assignments score
from 0.6 to 0.8, linear in the Shannon entropy of the value between 3.0 and 4.2 bits per char.

URL passwords that repeat the user name (`guest:guest`, `postgres:postgres`) are default
credentials and are not reported. Rejected as filler: token bodies with fewer distinct chars than a fifth of their length (at
least 4) or a run of 6 equal chars; token bodies that are lowercase words joined by - or _;
GitHub tokens whose checksum does not match. Generic values are rejected when shorter than 8
chars, below the entropy threshold, without letters or with one char class only, when they
look like placeholders (`<your-key>`, `${VAR}`, `$VAR`, `changeme`, `xxxx`, `********`, or
containing "password"), code (`os.environ[...]`, `self.token`, `getpass()`), paths, URLs, or
base64 of text with spaces.

Overlaps: a finding is dropped when another one contains it and depends on no text more than
48 chars before it. A GENERIC_SECRET value is not reported when another kind's finding starts
at or before it, overlaps it and depends on no text more than 48 chars before it. Findings
further apart both stay (a service account key and its private key block), because a stream
window may not show the outer one's start.

Matching: one Hyperscan database of short trigger patterns (vendor prefixes, names before an
assignment, BEGIN lines) is compiled per detector. `scan` encodes the text as UTF-8 once, runs
the database in block mode with HS_FLAG_SOM_LEFTMOST, maps each trigger's byte offset to a char
offset, and runs that kind's Python validator at the trigger. Without the hyperscan package the
same triggers run as Python `re` patterns (caseless ones lowercased, on an ASCII-lowercased
copy), and one warning is logged per process.

Every validator inspects a bounded span from its trigger (at most `PRIVATE_KEY_MAX_CHARS`
plus the GCP header for the longest kind), so a scan is linear in the text length.

Streaming: `pending_chars` holds back only what could still become, or change, a match: the
trailing token run when it is a prefix of some kind (prefix-aware, so "sk-ab" is held but
"task-" is not), a value that follows an assignment, a database URL from "://" until its host
starts, and an open private key block or service account key until its END line, at most
`PRIVATE_KEY_MAX_CHARS`. Names and other context before a value are not held, because they lie
at most 48 chars before it, inside the `stream.CONTEXT_CHARS` that a rescan shows minus the 8
chars it does not trust. A database URL's scheme can lie further back, so the URL is held from
its scheme once "://" arrives.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import string
import threading
import zlib
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from urllib.parse import unquote

from extguard.scan.findings import Finding

hyperscan: ModuleType | None
try:
    import hyperscan
except ImportError:  # the regex fallback below takes over
    hyperscan = None

_log = logging.getLogger(__name__)

_DETECTOR = "secrets"
GENERIC_SECRET = "GENERIC_SECRET"

# Maximum length in chars of a private key block found whole, from BEGIN through END. A
# 4096-bit RSA key in PEM is about 3.3 KB, a PGP secret key with a 4096-bit subkey about 7 KB
# (estimates), and JSON escaping adds one char per line. A longer block is reported as cut
# off, and the stream holds an open block back for at most this many chars.
PRIVATE_KEY_MAX_CHARS = 16_384

# Shannon entropy, in bits per char, at which a generic value scores 0.6 and 0.8.
_ENTROPY_LOW_BITS = 3.0
_ENTROPY_HIGH_BITS = 4.2
# A value of n chars has at most log2(n) bits per char, so values shorter than 12 chars need
# this fraction of log2(n) instead of the low threshold.
_ENTROPY_SHORT_FRACTION = 0.85
_GENERIC_MIN_CHARS = 8
_GENERIC_MAX_CHARS = 256
# Maximum distance in chars from a finding's start back to text that decides it: the name and
# operator before a value, or the start of a finding that hides it. The stream scanner rescans
# CONTEXT_CHARS (64) before held text and distrusts the first 8, so 56 chars back are rescanned.
_CONTEXT_MAX_CHARS = 48


# -- char classes ---------------------------------------------------------------------------

_PRINTABLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))  # without the space


def _ascii_chars(excluded: str) -> str:
    return "".join(char for char in _PRINTABLE_ASCII if char not in excluded)


def _char_class(chars: str) -> str:
    return "[" + "".join(re.escape(char) for char in chars) + "]"


# Chars that end a token run: quotes, brackets, backslash and comma. Whitespace and non-ASCII
# chars end it too, because the run chars are printable ASCII only.
_RUN_EXCLUDED = "\"'`<>(){}[]\\,"
_RUN_CHARS = _ascii_chars(_RUN_EXCLUDED)
# A generic or AWS secret value: printable ASCII without quotes, brackets, backslash, `,` and `;`.
_VALUE_CHARS = _ascii_chars(_RUN_EXCLUDED + ";")
_VALUE = _char_class(_VALUE_CHARS)
_URL_USER = _char_class(_ascii_chars(_RUN_EXCLUDED + "@/?#:"))
_URL_PASSWORD = _char_class(_ascii_chars(_RUN_EXCLUDED + "@/?#"))
_AZURE_SETTING_VALUE = _char_class(_ascii_chars(_RUN_EXCLUDED + ";"))
# Lowercases ASCII letters only, so offsets stay the same (str.lower can change the length).
_ASCII_LOWERCASE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


# -- shared checks --------------------------------------------------------------------------

_REPEATED_CHAR = re.compile(r"(.)\1\1\1\1\1")  # measured twice as fast as (.)\1{5} on CPython 3.11
_LOWERCASE_SLUG = re.compile(r"[a-z]+(?:[_\-][a-z]+)+")
_HEX_ONLY = re.compile(r"[0-9a-f]+|[0-9A-F]+")
_BASE64_VALUE = re.compile(r"[A-Za-z0-9+/]+={0,2}")


def _looks_like_filler(body: str) -> bool:
    """Return whether a token body is filler rather than random chars.

    Filler has fewer distinct chars than a fifth of its length (at least 4), a run of 6 equal
    chars, or is lowercase words joined by `-` or `_`.
    """
    if len(set(body)) < max(4, len(body) // 5):
        return True
    if _REPEATED_CHAR.search(body):
        return True
    return _LOWERCASE_SLUG.fullmatch(body) is not None


def _shannon_entropy(counts: Counter[str], length: int) -> float:
    """Return the Shannon entropy of the char distribution `counts` of `length` chars, in bits per char."""
    return -sum(count / length * math.log2(count / length) for count in counts.values())


def _decodes_to_text(value: str) -> bool:
    """Return whether `value` is base64 of printable ASCII text with a space, such as a sentence."""
    if not _BASE64_VALUE.fullmatch(value):
        return False
    stripped = value.rstrip("=")
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        decoded = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return False
    return b" " in decoded and all(0x20 <= byte < 0x7F for byte in decoded)


def _base64_length(value: str) -> int | None:
    """Return the decoded length of standard base64 `value`, or None when it is not valid base64."""
    try:
        return len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        return None


def _prefix_pattern(atoms: Sequence[tuple[str, str]]) -> str:
    """Return a regex that matches every prefix of the concatenation of `atoms`.

    The empty prefix and the whole concatenation match too. An atom is ("lit", text) for
    literal text, ("one", pattern) for a pattern that matches exactly one char, or
    ("rep", pattern) for a pattern whose matches have all their prefixes matched by it as well,
    such as `[a-z]{0,16}` or `\\\\?`.
    """
    pattern = ""
    for kind, value in reversed(atoms):
        if kind == "rep":
            pattern = value + pattern
            continue
        units = [re.escape(char) for char in value] if kind == "lit" else [value]
        for unit in reversed(units):
            pattern = f"(?:{unit}{pattern})?"
    return pattern


def _finding(entity_type: str, start: int, end: int, score: float, rule: str) -> Finding:
    return Finding(_DETECTOR, entity_type, start, end, score, rule)


# -- AWS ------------------------------------------------------------------------------------

_AWS_KEY_ID_PREFIXES = ("AKIA", "ASIA", "ABIA", "ACCA")
_AWS_KEY_ID = re.compile(r"(?<![A-Za-z0-9_])(?:AKIA|ASIA|ABIA|ACCA)([A-Z0-9]{16})(?![A-Za-z0-9_])")

_AWS_SECRET_NAME = r"(?:aws[A-Za-z0-9_\-.]{0,24}(?:key|secret)|secret[_\-.]?access[_\-.]?key)"
_AWS_SECRET = re.compile(
    rf"(?i:{_AWS_SECRET_NAME})\\?[\"']?[ \t]{{0,4}}(?:=>|:=|=(?![=~])|:(?![:/=])|[ \t])[ \t]{{0,4}}\\?[\"'`]?"
    r"([A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)


def _find_aws_key_id(text: str, start: int) -> Finding | None:
    match = _AWS_KEY_ID.match(text, start)
    if match is None or _looks_like_filler(match.group(1)):
        return None
    return _finding("AWS_ACCESS_KEY_ID", start, match.end(), 1.0, "aws_access_key_id")


def _find_aws_secret(text: str, start: int) -> Finding | None:
    match = _AWS_SECRET.match(text, start)
    if match is None:
        return None

    value = match.group(1)
    # A 40-char hex value is a SHA-1 digest: random base64 of this length is never all hex.
    if _looks_like_filler(value) or _HEX_ONLY.fullmatch(value) or _decodes_to_text(value):
        return None
    return _finding("AWS_SECRET_ACCESS_KEY", match.start(1), match.end(1), 0.9, "aws_secret_access_key")


# -- generic assignments --------------------------------------------------------------------

_GENERIC_NAME = (
    r"(?:passw(?:or)?d|pwd|passphrase|secret|token|api[_\-.]?key|access[_\-.]?key"
    r"|secret[_\-.]?key|private[_\-.]?key|auth[_\-.]?key)"
)
# Groups: 1 an optional backslash before the opening quote, 2 the quote, 3 the quoted value,
# 4 a bare value. A bare value ends at the first char that is not a value char.
_GENERIC = re.compile(
    rf"(?i:{_GENERIC_NAME})\\?[\"']?[ \t]{{0,4}}(?:=>|:=|=(?![=~])|:(?![:/=]))[ \t]{{0,4}}"
    rf"(?:(\\?)([\"'`])({_VALUE}{{1,{_GENERIC_MAX_CHARS}}}+)\1\2"
    rf"|({_VALUE}{{1,{_GENERIC_MAX_CHARS}}}+)(?!{_VALUE}))"
)
# Matched against the lowercased value.
_PLACEHOLDER_WORDS = re.compile(
    r"change[_\-]?me|changeit|password|your|example|placeholder|redacted|dummy|sample|insert|replace|fixme|todo|xxx|undefined"
)
# Dotted names without digits: self.password, os.environ, process.env.API_TOKEN.
_CODE_REFERENCE = re.compile(r"[A-Za-z_$]+(?:\.[A-Za-z_$]+)+")
_PATH_START = ("/", "./", "../", "~/", "$", "%")
_IDENTIFIER_SYMBOLS = frozenset("_-.")
_LOWERCASE = frozenset(string.ascii_lowercase)
_UPPERCASE = frozenset(string.ascii_uppercase)
_DIGITS = frozenset(string.digits)
_ALPHANUMERIC = _LOWERCASE | _UPPERCASE | _DIGITS


def _assignment_value(text: str, start: int) -> tuple[int, int, bool] | None:
    """Return the start, end and bareness of the value assigned to the name at `start`."""
    match = _GENERIC.match(text, start)
    if match is None:
        return None

    bare = match.group(4) is not None
    value_start, value_end = match.span(4 if bare else 3)
    # A bare value followed by a call or subscript is code: password=getpass(), token=env["T"].
    if bare and text.startswith(("(", "["), value_end):
        return None
    return value_start, value_end, bare


def _score_assignment(text: str, value_start: int, value_end: int, bare: bool) -> Finding | None:
    score = _assignment_score(text[value_start:value_end], bare)
    if score is None:
        return None
    return _finding(GENERIC_SECRET, value_start, value_end, score, "secret_assignment")


def _find_assignment(text: str, start: int) -> Finding | None:
    value = _assignment_value(text, start)
    return None if value is None else _score_assignment(text, *value)


def _assignment_score(value: str, bare: bool) -> float | None:
    """Return the score of an assigned value, or None when it does not look like a secret."""
    if len(value) < _GENERIC_MIN_CHARS or not _has_secret_char_mix(value, bare):
        return None
    counts = Counter(value)
    if _looks_like_placeholder(value, counts) or _decodes_to_text(value):
        return None

    entropy = _shannon_entropy(counts, len(value))
    required = min(_ENTROPY_LOW_BITS, _ENTROPY_SHORT_FRACTION * math.log2(len(value)))
    if entropy < required:
        return None
    fraction = (entropy - _ENTROPY_LOW_BITS) / (_ENTROPY_HIGH_BITS - _ENTROPY_LOW_BITS)
    return round(0.6 + 0.2 * min(1.0, max(0.0, fraction)), 2)


def _looks_like_placeholder(value: str, counts: Counter[str]) -> bool:
    """Return whether an assigned value is a placeholder, a reference, words, a path or a URL.

    `counts` are the char counts of `value`.
    """
    if value.startswith(_PATH_START) or "://" in value:
        return True
    if counts.most_common(1)[0][1] * 2 >= len(value):
        return True
    lowered = value.lower()
    if _PLACEHOLDER_WORDS.search(lowered) or _LOWERCASE_SLUG.fullmatch(lowered):
        return True
    return _CODE_REFERENCE.fullmatch(value) is not None


def _has_secret_char_mix(value: str, bare: bool) -> bool:
    """Return whether `value` has letters and two char classes, and a bare value is no identifier.

    The classes are lowercase, uppercase, digits and other chars. A bare value without digits,
    whose other chars are only `_`, `-` and `.`, is taken for an identifier (DB_PASSWORD).
    """
    chars = set(value)
    has_lower = not chars.isdisjoint(_LOWERCASE)
    has_upper = not chars.isdisjoint(_UPPERCASE)
    has_digit = not chars.isdisjoint(_DIGITS)
    symbols = chars - _ALPHANUMERIC

    if not (has_lower or has_upper):
        return False
    if has_lower + has_upper + has_digit + bool(symbols) < 2:
        return False
    return not (bare and not has_digit and symbols <= _IDENTIFIER_SYMBOLS)


def _assignment_findings(text: str, starts: list[int], others: list[tuple[int, Finding]]) -> list[tuple[int, Finding]]:
    """Return the GENERIC_SECRET findings of the names at `starts`, each with its name's start.

    `others` are the findings of the other kinds, sorted by start, each with the start of the
    text it depends on. A value is not scored when one of them starts at or before the value,
    overlaps it, and depends on text at most `_CONTEXT_MAX_CHARS` before it: the other kind
    names the secret better. A finding that starts later may still change as a stream grows,
    so it must not hide a value that the stream releases first.
    """
    other_starts = [finding.start for _, finding in others]
    findings: list[tuple[int, Finding]] = []
    for start in starts:
        value = _assignment_value(text, start)
        if value is None:
            continue
        value_start, value_end, bare = value

        context_start = value_start - _CONTEXT_MAX_CHARS
        first = bisect_left(other_starts, context_start)
        last = bisect_right(other_starts, value_start)
        if any(anchor >= context_start and finding.end > value_start for anchor, finding in others[first:last]):
            continue
        finding = _score_assignment(text, value_start, value_end, bare)
        if finding is not None:
            findings.append((start, finding))
    return findings


# -- GitHub, GitLab, Slack ------------------------------------------------------------------

_GITHUB_CLASSIC = re.compile(r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36}(?![A-Za-z0-9_])")
_GITHUB_FINE_GRAINED = re.compile(r"(?<![A-Za-z0-9_])github_pat_([A-Za-z0-9]{22})_([A-Za-z0-9]{59})(?![A-Za-z0-9_])")
_BASE62_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_GITHUB_CHECKSUM_CHARS = 6


def _base62(number: int, width: int) -> str:
    """Return `number` in base 62 (digits, then A-Z, then a-z), left-padded with "0" to `width`."""
    digits: list[str] = []
    while number:
        number, remainder = divmod(number, 62)
        digits.append(_BASE62_DIGITS[remainder])
    return "".join(reversed(digits)).rjust(width, "0")


def _github_checksum_valid(token: str) -> bool:
    """Check the CRC32 of a classic GitHub token's 30 random chars against its last 6 chars."""
    random_part = token[4:-_GITHUB_CHECKSUM_CHARS]
    return _base62(zlib.crc32(random_part.encode("ascii")), _GITHUB_CHECKSUM_CHARS) == token[-_GITHUB_CHECKSUM_CHARS:]


def _find_github_token(text: str, start: int) -> Finding | None:
    if text.startswith("github_pat_", start):
        match = _GITHUB_FINE_GRAINED.match(text, start)
        if match is None or _looks_like_filler(match.group(1) + match.group(2)):
            return None
        return _finding("GITHUB_TOKEN", start, match.end(), 1.0, "github_fine_grained_token")

    match = _GITHUB_CLASSIC.match(text, start)
    if match is None or not _github_checksum_valid(match.group()):
        return None
    return _finding("GITHUB_TOKEN", start, match.end(), 1.0, "github_token_checksum")


# NOTE: the prefix list and the dot-separated suffix of newer routable tokens are written from
# memory of GitLab's token documentation, not checked against real tokens.
_GITLAB_PREFIXES = (
    "glpat",
    "gldt",
    "glrtr",
    "glrt",
    "glcbt",
    "glptt",
    "glft",
    "glimt",
    "glagent",
    "gloas",
    "glsoat",
    "glffct",
)
_GITLAB_RUNNER_REGISTRATION = "GR1348941"
# Groups: 1 prefix, 2 body, 3 dot-separated suffix parts, 4 runner registration token body.
_GITLAB = re.compile(
    rf"(?<![A-Za-z0-9_\-.])(?:({'|'.join(_GITLAB_PREFIXES)})-([A-Za-z0-9_\-]{{20,64}}+)((?:\.[A-Za-z0-9_\-]{{1,32}}){{0,3}})"
    rf"|{_GITLAB_RUNNER_REGISTRATION}([A-Za-z0-9_\-]{{20}}))"
    r"(?![A-Za-z0-9_\-]|\.[A-Za-z0-9_\-])"
)
_GITLAB_CLASSIC_BODY_CHARS = 20


def _find_gitlab_token(text: str, start: int) -> Finding | None:
    match = _GITLAB.match(text, start)
    if match is None:
        return None

    if match.group(4) is not None:
        body, score = match.group(4), 1.0
    else:
        body = match.group(2)
        classic = match.group(1) == "glpat" and len(body) == _GITLAB_CLASSIC_BODY_CHARS and not match.group(3)
        score = 1.0 if classic else 0.9
    if _looks_like_filler(body):
        return None
    return _finding("GITLAB_TOKEN", start, match.end(), score, "gitlab_token")


_SLACK_TOKEN = re.compile(
    r"(?<![A-Za-z0-9_\-.])(?:xox[abprse]|xoxe\.xox[abprse]|xapp)-([A-Za-z0-9\-]{10,250}+)(?![A-Za-z0-9\-])"
)
# NOTE: the id lengths of these shapes are estimates from public examples; other shapes score 0.9.
_SLACK_TOKEN_SHAPES = re.compile(
    r"xoxb-[0-9]{8,14}-[0-9]{8,14}-[A-Za-z0-9]{20,40}"
    r"|xoxp-[0-9]{8,14}-[0-9]{8,14}-[0-9]{8,14}-[a-f0-9]{28,40}"
    r"|xapp-[0-9]-[A-Z0-9]{8,14}-[0-9]{8,16}-[a-f0-9]{40,80}"
)
_DIGIT = re.compile(r"[0-9]")


def _find_slack_token(text: str, start: int) -> Finding | None:
    match = _SLACK_TOKEN.match(text, start)
    if match is None:
        return None

    if _SLACK_TOKEN_SHAPES.fullmatch(match.group()):
        return _finding("SLACK_TOKEN", start, match.end(), 1.0, "slack_token")
    # Every Slack token carries numeric team or user ids.
    body = match.group(1)
    if not _DIGIT.search(body) or _looks_like_filler(body):
        return None
    return _finding("SLACK_TOKEN", start, match.end(), 0.9, "slack_token")


# Group 1 is set for the loose shape (workflows, triggers, or an unusual services path).
_SLACK_WEBHOOK_PATH_MAX_CHARS = 200
_SLACK_WEBHOOK = re.compile(
    r"(?<![A-Za-z0-9_\-.])(?i:hooks\.slack\.com)/"
    r"(?:services/T[A-Z0-9]{8,12}/B[A-Z0-9]{8,12}/[A-Za-z0-9]{24}(?![A-Za-z0-9_/\-])"
    rf"|(services|workflows|triggers)/[A-Za-z0-9_/\-]{{20,{_SLACK_WEBHOOK_PATH_MAX_CHARS}}}+(?![A-Za-z0-9_/\-]))"
)
# The scheme counts only where a URL can start, as in the pending_chars check.
_SCHEME_BEFORE = re.compile(r"(?<![A-Za-z0-9_\-.])(?i:https?://)\Z")
_SCHEME_MAX_CHARS = len("https://")


def _find_slack_webhook(text: str, start: int) -> Finding | None:
    match = _SLACK_WEBHOOK.match(text, start)
    if match is None:
        return None

    path = text[match.end(1) if match.group(1) is not None else start : match.end()]
    secret = path.rsplit("/", 1)[-1]
    if _looks_like_filler(secret):
        return None
    score = 1.0
    if match.group(1) is not None:
        if not _DIGIT.search(path):
            return None
        score = 0.9

    scheme = _SCHEME_BEFORE.search(text, max(0, start - _SCHEME_MAX_CHARS), start)
    finding_start = start if scheme is None else scheme.start()
    return _finding("SLACK_WEBHOOK_URL", finding_start, match.end(), score, "slack_webhook_url")


# -- OpenAI, Anthropic, Stripe, Google --------------------------------------------------------

# Legacy keys are sk- + 48 alphanumerics and project keys sk-proj- + about 160 chars, so 256
# chars after sk- leave room for longer formats while keeping the pattern bounded.
_OPENAI_KEY_BODY_MAX_CHARS = 256
_OPENAI = re.compile(
    rf"(?<![A-Za-z0-9_\-])sk-(?!ant-)([A-Za-z0-9_\-]{{20,{_OPENAI_KEY_BODY_MAX_CHARS}}}+)(?![A-Za-z0-9_\-])"
)
_OPENAI_LEGACY_BODY = re.compile(r"[A-Za-z0-9]{48}")
_OPENAI_MARKER = "T3BlbkFJ"  # base64 of "OpenAI", inside legacy and project keys

_ANTHROPIC = re.compile(r"(?<![A-Za-z0-9_\-])sk-ant-([A-Za-z0-9_\-]{32,200}+)(?![A-Za-z0-9_\-])")
_ANTHROPIC_SHAPE = re.compile(r"(?:api|admin)[0-9]{2}-[A-Za-z0-9_\-]{93}AA")

_STRIPE = re.compile(r"(?<![A-Za-z0-9_])[sr]k_live_([A-Za-z0-9]{20,247}+)(?![A-Za-z0-9_])")
_GOOGLE_API_KEY = re.compile(r"(?<![A-Za-z0-9_\-])AIza([A-Za-z0-9_\-]{35})(?![A-Za-z0-9_\-])")
_HUGGINGFACE = re.compile(r"(?<![A-Za-z0-9_])hf_([A-Za-z0-9]{30,40})(?![A-Za-z0-9_])")
# HTTP authorization schemes (RFC 6750 token68 chars for Bearer). Group 1 is the credential.
_BEARER = re.compile(r"(?<![A-Za-z0-9_])(?i:bearer)[ \t]+([A-Za-z0-9\-._~+/]{20,512}+=*)(?![A-Za-z0-9\-._~+/=])")
_BASIC = re.compile(r"(?<![A-Za-z0-9_])(?i:basic)[ \t]+([A-Za-z0-9+/]{8,400}+={0,2})(?![A-Za-z0-9+/=])")
# Tokens that start like a vendor kind are that kind's findings, not bearer tokens.
_VENDOR_TOKEN_STARTS = ("eyJ", "sk-", "sk_live_", "rk_live_", "gh", "gl", "xox", "xapp-", "hf_", "AKIA", "ASIA", "AIza")


def _find_openai_key(text: str, start: int) -> Finding | None:
    match = _OPENAI.match(text, start)
    if match is None:
        return None

    body = match.group(1)
    if _looks_like_filler(body):
        return None
    score = 1.0 if _OPENAI_MARKER in body or _OPENAI_LEGACY_BODY.fullmatch(body) else 0.9
    return _finding("OPENAI_API_KEY", start, match.end(), score, "openai_api_key")


def _find_anthropic_key(text: str, start: int) -> Finding | None:
    match = _ANTHROPIC.match(text, start)
    if match is None or _looks_like_filler(match.group(1)):
        return None
    score = 1.0 if _ANTHROPIC_SHAPE.fullmatch(match.group(1)) else 0.9
    return _finding("ANTHROPIC_API_KEY", start, match.end(), score, "anthropic_api_key")


def _find_stripe_key(text: str, start: int) -> Finding | None:
    match = _STRIPE.match(text, start)
    if match is None or _looks_like_filler(match.group(1)):
        return None
    return _finding("STRIPE_API_KEY", start, match.end(), 0.9, "stripe_api_key")


def _find_bearer_token(text: str, start: int) -> Finding | None:
    match = _BEARER.match(text, start)
    if match is None or match.group(1).startswith(_VENDOR_TOKEN_STARTS):
        return None
    score = _assignment_score(match.group(1), bare=True)
    if score is None:
        return None
    return _finding("BEARER_TOKEN", match.start(1), match.end(1), score, "bearer_token")


def _find_basic_auth(text: str, start: int) -> Finding | None:
    match = _BASIC.match(text, start)
    if match is None:
        return None
    try:
        decoded = base64.b64decode(match.group(1), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user or not password or not decoded.isprintable():
        return None
    return _finding("BASIC_AUTH", match.start(1), match.end(1), 0.9, "basic_auth")


def _find_huggingface_token(text: str, start: int) -> Finding | None:
    match = _HUGGINGFACE.match(text, start)
    if match is None or _looks_like_filler(match.group(1)):
        return None
    return _finding("HUGGINGFACE_TOKEN", start, match.end(), 0.9, "huggingface_token")


def _find_google_api_key(text: str, start: int) -> Finding | None:
    match = _GOOGLE_API_KEY.match(text, start)
    if match is None or _looks_like_filler(match.group(1)):
        return None
    return _finding("GOOGLE_API_KEY", start, match.end(), 1.0, "google_api_key")


# -- private keys and GCP service account keys ----------------------------------------------

# Group 1 is the label before PRIVATE KEY ("RSA ", "OPENSSH ", "PGP "), group 2 " BLOCK" for PGP.
_PEM_HEADER = re.compile(r"(?<![A-Za-z0-9\-])-----BEGIN ((?:[A-Z0-9]{1,16} ){0,2})PRIVATE KEY( BLOCK)?-----")
_PEM_HEADER_START = "-----BEGIN"
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{32}")
# The lines of a block cut off before its END line: base64 lines and armor headers
# ("Version: ..."), each after a newline or an escaped newline as in JSON strings.
_PEM_CUT_OFF_BODY = re.compile(
    r"(?:(?:\r?\n|\\(?:r\\)?n)+(?:[A-Za-z0-9+/=]{1,128}|[A-Za-z][A-Za-z\-]{0,30}: [^\r\n\\]{0,100})"
    r"(?=\r|\n|\\[rn]|-|\Z))*"
)


@dataclass(frozen=True, slots=True)
class _Block:
    """A private key block: `end` is exclusive, `whole` is false when the END line is missing."""

    end: int
    whole: bool


class _Open:
    """Marker for a match that more text could still complete or change."""


_OPEN = _Open()


def _private_key_block(text: str, start: int, *, final: bool = False) -> _Block | _Open | None:
    """Return the private key block whose BEGIN line starts at `start`, or None.

    A block needs 32 base64 chars in a row. Without its END line within
    `PRIVATE_KEY_MAX_CHARS` of `start`, the block is cut off after its last base64 line. While
    that END line could still arrive, return `_OPEN` instead, unless `final` is true because no
    more text will come.
    """
    header = _PEM_HEADER.match(text, start)
    if header is None:
        return None

    limit = start + PRIVATE_KEY_MAX_CHARS
    footer = f"-----END {header.group(1)}PRIVATE KEY{header.group(2) or ''}-----"
    footer_start = text.find(footer, header.end(), limit)
    if footer_start >= 0:
        if not _BASE64_RUN.search(text, header.end(), footer_start):
            return None
        return _Block(footer_start + len(footer), whole=True)

    if len(text) < limit and not final:
        return _OPEN
    return _cut_off_block(text, header.end(), limit)


def _cut_off_block(text: str, body_start: int, limit: int) -> _Block | None:
    body = _PEM_CUT_OFF_BODY.match(text, body_start, limit)
    if body is None or not _BASE64_RUN.search(text, body_start, body.end()):
        return None
    return _Block(body.end(), whole=False)


def _find_private_key(text: str, start: int) -> Finding | None:
    block = _private_key_block(text, start, final=True)
    if not isinstance(block, _Block):
        return None

    if block.whole:
        return _finding("PRIVATE_KEY", start, block.end, 1.0, "private_key_block")
    return _finding("PRIVATE_KEY", start, block.end, 0.9, "private_key_block_cut_off")


_JSON_SPACE = r"[ \t\r\n]{0,4}"
_GCP_MARKER = "service_account"
# The "type" key starts an object member: it follows "{", "," or whitespace, or starts the text.
_GCP_TYPE_KEY_BEFORE = re.compile(rf"(?<![^{{,\s])\\?\"type\\?\"{_JSON_SPACE}:{_JSON_SPACE}\\?\"\Z")
_GCP_TYPE_KEY_MAX_CHARS = 24
_GCP_GAP_MAX_CHARS = 512  # chars allowed between the type value and "private_key"
_GCP_TO_PRIVATE_KEY = re.compile(
    rf"{_GCP_MARKER}\\?\"[^{{}}]{{0,{_GCP_GAP_MAX_CHARS}}}?\\?\"private_key\\?\"{_JSON_SPACE}:{_JSON_SPACE}\\?\""
)
_GCP_KEY_CLOSE = re.compile(r"(?:\\(?:r\\)?n|\r?\n)?\\?\"")
# Maximum length of the text from a marker on while _GCP_TO_PRIVATE_KEY can still match: the
# marker, its closing quote, the gap and the "private_key" member up to its value's quote.
_GCP_UNDECIDED_MAX_CHARS = len(_GCP_MARKER) + 2 + _GCP_GAP_MAX_CHARS + 40
_GCP_CLOSE_MAX_CHARS = 5
_GCP_MAX_CHARS = _GCP_TYPE_KEY_MAX_CHARS + _GCP_UNDECIDED_MAX_CHARS + PRIVATE_KEY_MAX_CHARS + _GCP_CLOSE_MAX_CHARS


def _gcp_key_start(text: str, marker: int) -> int | None:
    """Return the start of the `"type"` key whose value is the service_account marker at `marker`."""
    type_key = _GCP_TYPE_KEY_BEFORE.search(text, max(0, marker - _GCP_TYPE_KEY_MAX_CHARS), marker)
    return None if type_key is None else type_key.start()


def _gcp_key_end(text: str, marker: int) -> int | _Open | None:
    """Return the end of the service account key whose type marker starts at `marker`.

    The end is after the closing quote of its "private_key" value. Return `_OPEN` when more
    text could still complete the match.
    """
    to_key = _GCP_TO_PRIVATE_KEY.match(text, marker)
    if to_key is None:
        undecided = len(text) - marker <= _GCP_UNDECIDED_MAX_CHARS
        if undecided and "{" not in text[marker:] and "}" not in text[marker:]:
            return _OPEN
        return None

    block = _private_key_block(text, to_key.end())
    if block is None and _PEM_HEADER_PREFIX.fullmatch(text, to_key.end()):
        return _OPEN
    if not isinstance(block, _Block):
        return block
    if not block.whole:
        return None

    close = _GCP_KEY_CLOSE.match(text, block.end)
    if close is not None:
        return close.end()
    rest = text[block.end :]
    return _OPEN if len(rest) < _GCP_CLOSE_MAX_CHARS and set(rest) <= set("\\rn\r\n") else None


def _find_gcp_service_account(text: str, marker: int) -> Finding | None:
    start = _gcp_key_start(text, marker)
    if start is None:
        return None
    end = _gcp_key_end(text, marker)
    if not isinstance(end, int):
        return None
    return _finding("GCP_SERVICE_ACCOUNT_KEY", start, end, 1.0, "gcp_service_account_key")


# -- Azure, JWT, database URLs --------------------------------------------------------------

_AZURE_CONNECTION_START = "DefaultEndpointsProtocol="
_AZURE_CONNECTION_STRING = re.compile(
    rf"(?<![A-Za-z0-9_])(?i:{_AZURE_CONNECTION_START}https?)(?:;[A-Za-z]{{1,32}}={_AZURE_SETTING_VALUE}{{0,256}}+){{0,8}}?"
    r";(?i:AccountKey)=([A-Za-z0-9+/]{20,128}+={0,2})(?![A-Za-z0-9+/=])"
)
_AZURE_CONNECTION_MAX_CHARS = (
    len(_AZURE_CONNECTION_START) + len("https") + 8 * (1 + 32 + 1 + 256) + len(";AccountKey=") + 130
)
_AZURE_ACCOUNT_KEY_BYTES = 64
_AZURE_SAS_SIGNATURE = re.compile(r"[?&]sig=([A-Za-z0-9%+/]{20,200}+={0,2})(?![A-Za-z0-9%+/=])")
_AZURE_SAS_SIGNATURE_BYTES = 32  # HMAC-SHA256


def _find_azure_connection_string(text: str, start: int) -> Finding | None:
    match = _AZURE_CONNECTION_STRING.match(text, start)
    if match is None or _looks_like_filler(match.group(1).rstrip("=")):
        return None
    score = 1.0 if _base64_length(match.group(1)) == _AZURE_ACCOUNT_KEY_BYTES else 0.9
    return _finding("AZURE_STORAGE_CONNECTION_STRING", start, match.end(), score, "azure_storage_connection_string")


def _find_azure_sas_signature(text: str, start: int) -> Finding | None:
    match = _AZURE_SAS_SIGNATURE.match(text, start)
    if match is None or _base64_length(unquote(match.group(1))) != _AZURE_SAS_SIGNATURE_BYTES:
        return None
    return _finding("AZURE_SAS_TOKEN", match.start(1), match.end(1), 0.9, "azure_sas_signature")


_JWT_HEADER_MAX_CHARS = 512
_JWT_PAYLOAD_MAX_CHARS = 4096
_JWT_SIGNATURE_MAX_CHARS = 512
_JWT = re.compile(
    rf"(?<![A-Za-z0-9_\-.])(eyJ[A-Za-z0-9_\-]{{5,{_JWT_HEADER_MAX_CHARS - 3}}}+)"
    rf"\.[A-Za-z0-9_\-]{{2,{_JWT_PAYLOAD_MAX_CHARS}}}+\.[A-Za-z0-9_\-]{{16,{_JWT_SIGNATURE_MAX_CHARS}}}+"
    r"(?![A-Za-z0-9_\-]|\.[A-Za-z0-9_\-])"
)


def _jwt_header_has_alg(segment: str) -> bool:
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def _find_jwt(text: str, start: int) -> Finding | None:
    match = _JWT.match(text, start)
    if match is None or not _jwt_header_has_alg(match.group(1)):
        return None
    return _finding("JWT", start, match.end(), 0.9, "jwt")


# URL schemes whose user:password@ part the detector reports, without "://". The PII detector
# uses them too, to not report "password@host" as an e-mail address.
DATABASE_URL_SCHEMES = r"(?:postgres(?:ql)?|mysql|mariadb|mongodb|rediss?|amqps?)(?:\+[a-z0-9]{1,16})?"
OTHER_URL_SCHEMES = r"(?:https?|s?ftps?|ssh|git|svn|smtps?|imaps?|pop3s?|ldaps?|mqtts?|nats|kafka|wss?|socks[45]h?)"
_DATABASE_SCHEME = DATABASE_URL_SCHEMES + "://"
_OTHER_SCHEME = OTHER_URL_SCHEMES + "://"
_URL_USER_MAX_CHARS = 64
_URL_PASSWORD_MAX_CHARS = 128
# No lookbehind: it would look further back than a stream window shows before the password.
_DATABASE_URL = re.compile(
    rf"(?i:{_DATABASE_SCHEME}){_URL_USER}{{0,{_URL_USER_MAX_CHARS}}}+"
    rf":({_URL_PASSWORD}{{1,{_URL_PASSWORD_MAX_CHARS}}}+)@[A-Za-z0-9\[]"
)
_PASSWORD_PLACEHOLDER = re.compile(r"pass(?:word|wd)?|pwd|secret|changeme|\*+|x+|\.+|\$\w*|%\w*", re.IGNORECASE)


_OTHER_URL = re.compile(
    rf"(?i:{_OTHER_SCHEME}){_URL_USER}{{0,{_URL_USER_MAX_CHARS}}}+"
    rf":({_URL_PASSWORD}{{1,{_URL_PASSWORD_MAX_CHARS}}}+)@[A-Za-z0-9\[]"
)


def _is_default_credential(url: str, password: str) -> bool:
    """Return whether the password repeats the user name, as default credentials do (guest:guest)."""
    user = url.partition("://")[2].rpartition(":" + password + "@")[0]
    return user.lower() == password.lower()


def _find_database_url(text: str, start: int) -> Finding | None:
    match = _DATABASE_URL.match(text, start)
    if match is None or _PASSWORD_PLACEHOLDER.fullmatch(match.group(1)):
        return None
    if _is_default_credential(match.group(0), match.group(1)):
        return None
    return _finding("DATABASE_URL_PASSWORD", match.start(1), match.end(1), 0.9, "database_url_password")


def _find_url_password(text: str, start: int) -> Finding | None:
    match = _OTHER_URL.match(text, start)
    if match is None or _PASSWORD_PLACEHOLDER.fullmatch(match.group(1)):
        return None
    if _is_default_credential(match.group(0), match.group(1)):
        return None
    return _finding("URL_PASSWORD", match.start(1), match.end(1), 0.9, "url_password")


# -- the kind table -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """One trigger pattern and the validator that runs at each of its matches.

    `trigger` uses only syntax that Hyperscan and Python `re` read alike, and only ASCII, so
    its byte offsets in UTF-8 fall on char boundaries. A caseless trigger must mean the same
    when lowercased (no escapes such as \\S), because the `re` fallback runs it lowercased on
    lowercased text. `find` takes the text and the char offset of a trigger match and returns
    a finding or None.
    """

    trigger: str
    caseless: bool
    find: Callable[[str, int], Finding | None]


_KINDS: tuple[_Kind, ...] = (
    _Kind("AKIA|ASIA|ABIA|ACCA", False, _find_aws_key_id),
    _Kind(_AWS_SECRET_NAME + r"\\?[\"']?[ \t]{0,4}(?:=|:|[ \t])", True, _find_aws_secret),
    _Kind(r"gh[pousr]_|github_pat_", False, _find_github_token),
    _Kind(rf"(?:{'|'.join(_GITLAB_PREFIXES)})-|{_GITLAB_RUNNER_REGISTRATION}", False, _find_gitlab_token),
    _Kind(r"xox[abprse]-|xoxe\.xox[abprse]-|xapp-", False, _find_slack_token),
    _Kind(r"hooks\.slack\.com/", True, _find_slack_webhook),
    _Kind(r"sk-", False, _find_openai_key),
    _Kind(r"sk-ant-", False, _find_anthropic_key),
    _Kind(r"[sr]k_live_", False, _find_stripe_key),
    _Kind(r"hf_", False, _find_huggingface_token),
    _Kind(r"bearer[ \t]", True, _find_bearer_token),
    _Kind(r"basic[ \t]", True, _find_basic_auth),
    _Kind(r"AIza", False, _find_google_api_key),
    _Kind(_GCP_MARKER, False, _find_gcp_service_account),
    _Kind(_AZURE_CONNECTION_START, True, _find_azure_connection_string),
    _Kind(r"[?&]sig=", False, _find_azure_sas_signature),
    _Kind(r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,2}PRIVATE KEY", False, _find_private_key),
    _Kind(r"eyJ", False, _find_jwt),
    _Kind(_DATABASE_SCHEME, True, _find_database_url),
    _Kind(_OTHER_SCHEME, True, _find_url_password),
    _Kind(_GENERIC_NAME + r"\\?[\"']?[ \t]{0,4}[=:]", True, _find_assignment),
)
_ASSIGNMENT_KIND = next(index for index, kind in enumerate(_KINDS) if kind.find is _find_assignment)

ENTITY_TYPES = frozenset(
    {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "GCP_SERVICE_ACCOUNT_KEY",
        "GOOGLE_API_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_SAS_TOKEN",
        "GITHUB_TOKEN",
        "GITLAB_TOKEN",
        "SLACK_TOKEN",
        "SLACK_WEBHOOK_URL",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "STRIPE_API_KEY",
        "HUGGINGFACE_TOKEN",
        "BEARER_TOKEN",
        "BASIC_AUTH",
        "PRIVATE_KEY",
        "JWT",
        "DATABASE_URL_PASSWORD",
        "URL_PASSWORD",
        GENERIC_SECRET,
    }
)


# -- pending_chars --------------------------------------------------------------------------


def _literal_alternatives(literals: Iterable[str], *rest: tuple[str, str]) -> str:
    return "|".join(_prefix_pattern([("lit", literal), *rest]) for literal in literals)


# Every alternative matches the prefixes of one kind's matches, from a start that its lookbehind
# allows. All their chars are token run chars, so a match lies inside the trailing run. JWTs and
# Azure connection strings, which are longer, have their own checks.
_SHORT_TOKEN_TAIL_ALTERNATIVES = (
    rf"(?<![A-Za-z0-9_])(?:{_literal_alternatives(_AWS_KEY_ID_PREFIXES, ('rep', '[A-Z0-9]{0,16}'))})",
    r"(?<![A-Za-z0-9_])(?:"
    + _prefix_pattern([("lit", "gh"), ("one", "[pousr]"), ("lit", "_"), ("rep", "[A-Za-z0-9]{0,36}")])
    + "|"
    + _prefix_pattern([("lit", "github_pat_"), ("rep", "[A-Za-z0-9_]{0,82}")])
    + ")",
    r"(?<![A-Za-z0-9_\-.])(?:"
    + _literal_alternatives((prefix + "-" for prefix in _GITLAB_PREFIXES), ("rep", r"[A-Za-z0-9_\-.]{0,164}"))
    + "|"
    + _prefix_pattern([("lit", _GITLAB_RUNNER_REGISTRATION), ("rep", r"[A-Za-z0-9_\-]{0,20}")])
    + ")",
    r"(?<![A-Za-z0-9_\-.])(?:"
    + _prefix_pattern([("lit", "xox"), ("one", "[a-z]"), ("one", r"[.\-]"), ("rep", r"[A-Za-z0-9.\-]{0,260}")])
    + "|"
    + _prefix_pattern([("lit", "xapp-"), ("rep", r"[A-Za-z0-9\-]{0,250}")])
    + ")",
    r"(?<![A-Za-z0-9_\-])"
    + _prefix_pattern([("lit", "sk-"), ("rep", rf"[A-Za-z0-9_\-]{{0,{_OPENAI_KEY_BODY_MAX_CHARS}}}")]),
    rf"(?<![A-Za-z0-9_])(?:{_literal_alternatives(('sk_live_', 'rk_live_'), ('rep', '[A-Za-z0-9]{0,247}'))})",
    r"(?<![A-Za-z0-9_])" + _prefix_pattern([("lit", "hf_"), ("rep", "[A-Za-z0-9]{0,40}")]),
    r"(?<![A-Za-z0-9_\-])" + _prefix_pattern([("lit", "AIza"), ("rep", r"[A-Za-z0-9_\-]{0,35}")]),
    r"(?<![A-Za-z0-9_\-.])(?i:"
    + _literal_alternatives(
        ("https://hooks.slack.com/", "http://hooks.slack.com/", "hooks.slack.com/"),
        ("rep", rf"[A-Za-z0-9_/\-]{{0,{len('workflows/') + _SLACK_WEBHOOK_PATH_MAX_CHARS}}}"),
    )
    + ")",
    r"(?<![A-Za-z0-9_])(?i:" + _prefix_pattern([("lit", _AZURE_CONNECTION_START)]) + ")",
)
_SHORT_TOKEN_TAIL = re.compile(
    "(?:" + "|".join(f"(?:{alternative})" for alternative in _SHORT_TOKEN_TAIL_ALTERNATIVES) + r")\Z"
)
# The longest match of the alternatives above: xoxe.xoxp- style Slack prefixes and 260 chars.
_SHORT_TOKEN_MAX_CHARS = 5 + 260
# First chars of the alternatives above after a non-word char: case-sensitive (AKIA, AIza,
# GR1348941, gh, gl, sk, rk, hf, xox, xapp) and caseless (hooks, http, DefaultEndpointsProtocol).
# Every alternative's lookbehind rejects at least the word chars, so no match starts elsewhere.
_SHORT_TOKEN_START = re.compile(r"(?<![A-Za-z0-9_])[AGgrsxHhDd]")
# A URL of those schemes is held from its scheme, once "://" is there, until the host starts. A
# partial scheme is not held: when "://" arrives, the scheme ends right before it and is at most
# _DATABASE_SCHEME_MAX_CHARS long, so it is inside any stream window.
_DATABASE_SCHEME_BEFORE = re.compile(rf"(?i:{DATABASE_URL_SCHEMES}|{OTHER_URL_SCHEMES})\Z")
_DATABASE_USERINFO_TAIL = re.compile(
    rf"://{_URL_USER}{{0,{_URL_USER_MAX_CHARS}}}(?::{_URL_PASSWORD}{{0,{_URL_PASSWORD_MAX_CHARS}}}@?)?\Z"
)
_DATABASE_SCHEME_MAX_CHARS = len("postgresql+") + 16
_SAS_SIGNATURE_TAIL = re.compile(r"[A-Za-z0-9%+/]{1,200}={0,2}\Z")
_SAS_SIGNATURE_KEY = "sig="
# The scheme lies before the run of credential chars, inside the rescan context, so only the
# credential is held. The search starts at the run, and the lookbehind checks the scheme before it.
_AUTHORIZATION_TAIL = re.compile(
    r"(?:(?<=[Bb][Ee][Aa][Rr][Ee][Rr][ \t])|(?<=[Bb][Aa][Ss][Ii][Cc][ \t]))([A-Za-z0-9\-._~+/]{1,512}=*)\Z"
)
_AUTHORIZATION_TAIL_MAX_CHARS = 520

_JWT_CHARS = string.ascii_letters + string.digits + "_-."
_JWT_TAIL = re.compile(
    r"(?<![A-Za-z0-9_\-.])"
    + _prefix_pattern(
        [
            ("lit", "eyJ"),
            ("rep", rf"[A-Za-z0-9_\-]{{0,{_JWT_HEADER_MAX_CHARS - 3}}}"),
            ("lit", "."),
            ("rep", rf"[A-Za-z0-9_\-]{{0,{_JWT_PAYLOAD_MAX_CHARS}}}"),
            ("lit", "."),
            ("rep", rf"[A-Za-z0-9_\-]{{0,{_JWT_SIGNATURE_MAX_CHARS}}}"),
            ("lit", "."),
        ]
    )
    + r"\Z"
)
_JWT_MAX_CHARS = _JWT_HEADER_MAX_CHARS + _JWT_PAYLOAD_MAX_CHARS + _JWT_SIGNATURE_MAX_CHARS + 3
_AZURE_CONNECTION_START_PATTERN = re.compile(_AZURE_CONNECTION_START, re.IGNORECASE)

# A value, or the start of one, after a name and an assignment operator, in ASCII-lowercased
# text (faster than IGNORECASE). Group 1 is the value.
_ASSIGNMENT_TAIL = re.compile(
    (
        rf"(?:{_GENERIC_NAME}\\?[\"']?[ \t]{{0,4}}(?:=>|:=|=|:)"
        rf"|{_AWS_SECRET_NAME}\\?[\"']?[ \t]{{0,4}}(?:=>|:=|=|:|[ \t]))"
        rf"[ \t]{{0,4}}\\?[\"'`]?({_VALUE}{{0,{_GENERIC_MAX_CHARS}}})\\?"
    ).lower()
    + r"\Z"
)

# Prefixes of a BEGIN line, from "-" to the label and up to 4 of its closing dashes.
_PEM_HEADER_PREFIX_PATTERN = _prefix_pattern([("lit", "-----BEGIN "), ("rep", "[A-Z0-9 ]{0,48}"), ("rep", "-{0,4}")])
_PEM_HEADER_PREFIX = re.compile(_PEM_HEADER_PREFIX_PATTERN)
_PEM_HEADER_TAIL = re.compile(r"(?<![A-Za-z0-9\-])" + _PEM_HEADER_PREFIX_PATTERN + r"\Z")
_PEM_HEADER_PREFIX_MAX_CHARS = len("-----BEGIN ") + 48 + 4
_GCP_MARKER_TAIL = re.compile(
    r"(?<![^{,\s])"
    + _prefix_pattern(
        [
            ("rep", r"\\?"),
            ("lit", '"type'),
            ("rep", r"\\?"),
            ("lit", '"'),
            ("rep", _JSON_SPACE),
            ("lit", ":"),
            ("rep", _JSON_SPACE),
            ("rep", r"\\?"),
            ("lit", '"' + _GCP_MARKER),
        ]
    )
    + r"\Z"
)
_GCP_MARKER_TAIL_MAX_CHARS = 40
# An END line, then at most the escaped newline before a JSON string's closing quote.
_PEM_FOOTER_TAIL = re.compile(r"PRIVATE KEY-----[\\rn\r\n]{0,4}\Z")


def _token_hold(text: str) -> int:
    """Return the chars from the start of a token prefix that ends the text, or 0."""
    tail = text[-_JWT_MAX_CHARS:]
    run = len(tail) - len(tail.rstrip(_RUN_CHARS))
    if run == 0:
        return 0
    run_start = len(text) - run
    hold = 0

    first = _SHORT_TOKEN_START.search(text, max(run_start, len(text) - _SHORT_TOKEN_MAX_CHARS))
    match = None if first is None else _SHORT_TOKEN_TAIL.search(text, first.start())
    if match is not None:
        hold = len(text) - match.start()

    # A Bearer or Basic credential is held from its start while it can still grow.
    credential = _AUTHORIZATION_TAIL.search(text, max(run_start, len(text) - _AUTHORIZATION_TAIL_MAX_CHARS))
    if credential is not None:
        hold = max(hold, len(text) - credential.start(1))

    # Only the last sig= can have a value that reaches the end, because "&" ends a value.
    key = text.rfind(_SAS_SIGNATURE_KEY, run_start)
    if key > 0 and text[key - 1] in "?&":
        value = _SAS_SIGNATURE_TAIL.match(text, key + len(_SAS_SIGNATURE_KEY))
        if value is not None:
            hold = max(hold, len(text) - value.start())

    # A JWT can only start where the run of its chars starts, because of its lookbehind. A run
    # that fills the tail of a longer text started too far back to be a JWT.
    jwt_run = len(tail) - len(tail.rstrip(_JWT_CHARS))
    whole_run_seen = jwt_run < len(tail) or len(tail) == len(text)
    if hold < jwt_run and whole_run_seen and _JWT_TAIL.match(text, len(text) - jwt_run):
        hold = jwt_run

    separator = text.rfind("://", run_start)
    if separator > 0 and _DATABASE_USERINFO_TAIL.match(text, separator):
        scheme = _DATABASE_SCHEME_BEFORE.search(text, max(run_start, separator - _DATABASE_SCHEME_MAX_CHARS), separator)
        if scheme is not None:
            hold = max(hold, len(text) - scheme.start())

    if run > hold and run >= len(_AZURE_CONNECTION_START):
        azure = _AZURE_CONNECTION_START_PATTERN.search(text, max(run_start, len(text) - _AZURE_CONNECTION_MAX_CHARS))
        if azure is not None:
            hold = max(hold, len(text) - azure.start())
    return hold


def _assignment_hold(text: str) -> int:
    """Return the chars of an assigned value, or the start of one, that ends the text."""
    end = len(text) - 1 if text.endswith("\\") else len(text)
    tail = text[max(0, end - _GENERIC_MAX_CHARS - 1) : end]
    run = len(tail) - len(tail.rstrip(_VALUE_CHARS))
    if run == 0:
        return 0

    region = text[max(0, end - run - _CONTEXT_MAX_CHARS) :].translate(_ASCII_LOWERCASE)
    match = _ASSIGNMENT_TAIL.search(region)
    return 0 if match is None else len(region) - match.start(1)


def _first_open_block(text: str) -> int | None:
    """Return the start of the first private key block whose END line could still arrive."""
    position = text.find(_PEM_HEADER_START, max(0, len(text) - PRIVATE_KEY_MAX_CHARS))
    while position >= 0:
        block = _private_key_block(text, position)
        if block is _OPEN:
            return position
        # The scan judges every BEGIN line, even one inside an earlier block.
        position = text.find(_PEM_HEADER_START, position + 1)
    return None


def _private_key_hold(text: str, open_block: int | None) -> int:
    """Return the chars from the first open private key block, or from a BEGIN line in progress."""
    if open_block is not None:
        return len(text) - open_block
    header = _PEM_HEADER_TAIL.search(text, max(0, len(text) - _PEM_HEADER_PREFIX_MAX_CHARS))
    return 0 if header is None else len(text) - header.start()


def _gcp_hold(text: str, open_block: int | None) -> int:
    """Return the chars from the "type" key of the first service account key still open.

    A key is open while its "private_key" member is undecided, its private key block is open
    (so at or after `open_block`), or the text ends just after the block's END line.
    """
    first = len(text) - _GCP_UNDECIDED_MAX_CHARS - _PEM_HEADER_PREFIX_MAX_CHARS
    if open_block is not None:
        first = min(first, open_block - _GCP_UNDECIDED_MAX_CHARS)
    if _PEM_FOOTER_TAIL.search(text, max(0, len(text) - _GCP_CLOSE_MAX_CHARS - 32)):
        first = len(text) - _GCP_MAX_CHARS

    marker = text.find(_GCP_MARKER, max(0, first))
    while marker >= 0:
        start = _gcp_key_start(text, marker)
        if start is not None and _gcp_key_end(text, marker) is _OPEN:
            return len(text) - start
        marker = text.find(_GCP_MARKER, marker + 1)

    partial = _GCP_MARKER_TAIL.search(text, max(0, len(text) - _GCP_MARKER_TAIL_MAX_CHARS))
    return 0 if partial is None else len(text) - partial.start()


# -- the detector ---------------------------------------------------------------------------


def _collect_match(kind: int, start: int, end: int, flags: int, found: list[tuple[int, int]]) -> None:
    """Hyperscan match handler: record the trigger's kind and leftmost start byte."""
    found.append((start, kind))


def _to_char_offsets(data: bytes, found: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return `found`, sorted by byte offset, with each UTF-8 byte offset turned into a char offset.

    The offsets are trigger starts, which are ASCII bytes and so char boundaries.
    """
    converted: list[tuple[int, int]] = []
    chars = 0
    previous = 0
    for byte_offset, kind in found:
        if byte_offset != previous:
            chars += len(data[previous:byte_offset].decode("utf-8", "surrogatepass"))
            previous = byte_offset
        converted.append((chars, kind))
    return converted


_fallback_logged = threading.Event()


def _log_fallback_once(reason: str) -> None:
    if not _fallback_logged.is_set():
        _fallback_logged.set()
        _log.warning("Hyperscan is unavailable (%s), so the secrets detector uses Python re, which is slower", reason)


def _anchored_order(item: tuple[int, Finding]) -> tuple[int, int]:
    return item[1].start, -item[1].end


def _drop_contained(found: list[tuple[int, Finding]]) -> list[Finding]:
    """Return the findings of `found` sorted by start, without the contained ones.

    Each finding comes with the start of the text it depends on (its name or trigger). A
    finding is dropped when another one contains it and that text starts at most
    `_CONTEXT_MAX_CHARS` before it. A private key block inside a service account key, which
    starts further back, stays.
    """
    found.sort(key=_anchored_order)
    kept: list[tuple[int, Finding]] = []
    for anchor, finding in found:
        context_start = finding.start - _CONTEXT_MAX_CHARS
        contained = False
        for earlier_anchor, earlier in reversed(kept):
            if earlier.start < context_start:
                break
            if earlier_anchor >= context_start and earlier.end >= finding.end:
                contained = True
                break
        if not contained:
            kept.append((anchor, finding))
    return [finding for _, finding in kept]


class SecretDetector:
    """Credentials and keys of the kinds in this module's table, with scores from 0.6 to 1.0.

    `allow_values` are exact strings and `allow_patterns` regexes (full match) that are never
    reported. Both are compared with the finding's span, for example the password alone for a
    DATABASE_URL_PASSWORD finding. `use_hyperscan` forces Hyperscan (True, errors raise) or
    Python `re` (False). None uses Hyperscan when it loads and compiles, and logs once when not.

    Instances are immutable and safe to share between threads and streams: each thread gets
    its own Hyperscan scratch space.
    """

    __slots__ = ("_allow_values", "_allow_patterns", "_database", "_scratch_prototype", "_thread_state", "_triggers")

    name = "secrets"
    entity_types = ENTITY_TYPES

    def __init__(
        self,
        allow_values: Iterable[str] = (),
        allow_patterns: Iterable[str] = (),
        *,
        use_hyperscan: bool | None = None,
    ) -> None:
        """Compile the trigger patterns.

        Raises ValueError when an allow pattern is not a valid regex, RuntimeError when
        `use_hyperscan` is True without the hyperscan package, and hyperscan.error when it is
        True and the database does not compile.
        """
        self._allow_values = frozenset(allow_values)
        self._allow_patterns = tuple(_compile_allow_pattern(pattern) for pattern in allow_patterns)
        self._thread_state = threading.local()
        self._database, self._scratch_prototype = _hyperscan_database(use_hyperscan)

        # Caseless triggers run on an ASCII-lowercased copy, several times faster than IGNORECASE.
        self._triggers: tuple[re.Pattern[str], ...] = ()
        if self._database is None:
            self._triggers = tuple(
                re.compile(kind.trigger.lower() if kind.caseless else kind.trigger) for kind in _KINDS
            )

    @property
    def uses_hyperscan(self) -> bool:
        """Whether scans run on Hyperscan rather than the Python `re` fallback."""
        return self._database is not None

    def scan(self, text: str) -> list[Finding]:
        """Return every secret in `text`, sorted by start offset."""
        if not text:
            return []
        candidates = self._hyperscan_candidates(text) if self._database is not None else self._regex_candidates(text)
        if not candidates:
            return []

        findings = self._validate(text, candidates)
        if self._allow_values or self._allow_patterns:
            findings = [finding for finding in findings if not self._allowed(text[finding.start : finding.end])]
        return findings

    def pending_chars(self, text: str) -> int:
        """Return how many trailing chars of `text` could still become part of a secret.

        The hold-back is the longest trailing part that can still change. Such parts are a
        token run that is a prefix of some kind, a value after an assignment, a database URL
        from "://" until its host, and a BEGIN line or service account marker in progress. An
        open private key block or service account key is held whole, at most
        `PRIVATE_KEY_MAX_CHARS` plus the JSON before the key.
        Ordinary prose gives 0, or the length of a last word that starts a prefix ("s" of "sk-").
        """
        if not text:
            return 0
        open_block = _first_open_block(text)
        return max(
            _token_hold(text),
            _assignment_hold(text),
            _private_key_hold(text, open_block),
            _gcp_hold(text, open_block),
        )

    def _hyperscan_candidates(self, text: str) -> list[tuple[int, int]]:
        data = text.encode("utf-8", "surrogatepass")
        found: list[tuple[int, int]] = []
        self._database.scan(data, match_event_handler=_collect_match, context=found, scratch=self._scratch())  # type: ignore[union-attr]
        if not found:
            return found

        # A trigger of variable length reports each of its ends, with the same start.
        found = sorted(set(found))
        return found if len(data) == len(text) else _to_char_offsets(data, found)

    def _regex_candidates(self, text: str) -> list[tuple[int, int]]:
        lowered = text.translate(_ASCII_LOWERCASE)
        found: list[tuple[int, int]] = []
        for kind, trigger in enumerate(self._triggers):
            searched = lowered if _KINDS[kind].caseless else text
            found.extend((match.start(), kind) for match in trigger.finditer(searched))
        found.sort()
        return found

    def _scratch(self) -> object:
        scratch = getattr(self._thread_state, "scratch", None)
        if scratch is None:
            scratch = self._scratch_prototype.clone()  # type: ignore[union-attr]
            self._thread_state.scratch = scratch
        return scratch

    @staticmethod
    def _validate(text: str, candidates: list[tuple[int, int]]) -> list[Finding]:
        """Return the findings at `candidates`, sorted by start, without the hidden ones.

        Each finding is paired with the start of the text it depends on, the trigger or the
        finding's own start, whichever comes first. Assignments go last, so their values are
        scored only where no other kind matched.
        """
        found: list[tuple[int, Finding]] = []
        assignment_starts: list[int] = []
        for start, kind in candidates:
            if kind == _ASSIGNMENT_KIND:
                assignment_starts.append(start)
                continue
            finding = _KINDS[kind].find(text, start)
            if finding is not None:
                found.append((min(start, finding.start), finding))

        if assignment_starts:
            found.sort(key=_anchored_order)
            found.extend(_assignment_findings(text, assignment_starts, found))
        if len(found) == 1:
            return [found[0][1]]
        return _drop_contained(found)

    def _allowed(self, value: str) -> bool:
        if value in self._allow_values:
            return True
        return any(pattern.fullmatch(value) for pattern in self._allow_patterns)


def _compile_allow_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"invalid allow pattern {pattern!r} for the secrets detector: {error}; fix or remove it"
        ) from error


def _hyperscan_database(use_hyperscan: bool | None) -> tuple[object, object] | tuple[None, None]:
    """Return a block-mode database of the triggers and a scratch space to clone per thread.

    Return (None, None) when the `re` fallback is to be used: `use_hyperscan` is False, or it
    is None and Hyperscan is missing or fails to compile.
    """
    if use_hyperscan is False:
        return None, None
    if hyperscan is None:
        if use_hyperscan:
            raise RuntimeError(
                "use_hyperscan=True, but the hyperscan package is not installed: install it or pass None"
            )
        _log_fallback_once("the hyperscan package is not installed")
        return None, None

    try:
        database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        database.compile(
            expressions=[kind.trigger.encode("ascii") for kind in _KINDS],
            ids=list(range(len(_KINDS))),
            flags=[
                hyperscan.HS_FLAG_SOM_LEFTMOST | (hyperscan.HS_FLAG_CASELESS if kind.caseless else 0) for kind in _KINDS
            ],
        )
        return database, hyperscan.Scratch(database)
    except hyperscan.error as error:
        if use_hyperscan:
            raise
        _log_fallback_once(f"compiling the trigger database failed: {error}")
        return None, None
