"""Candidate patterns of the PII detector, the validators that turn candidates into verdicts, and context words.

Each `PatternSpec` is one regular expression in the common subset of Hyperscan and Python `re`
(ASCII only, no look-arounds, no back-references), plus the boundary rules around it:

- `not_before` and `not_after` are character-class bodies. The char just before the match and the
  char just after it must not be in them.
- `before_seps` and `after_seps` are separator chars (a class body) that must not join the match
  to a digit: "0.4111..." and "4111...-01" are parts of longer numbers. `after_neighbor` is the
  class that must not follow an `after_seps` char, digits unless set.
- Hyperscan checks all of these by consuming one or two bytes on each side of the match, and
  Python `re` checks them as look-arounds, so both find the same matches.
- `before` and `after` are extra look-around assertions of at most 4 chars, which only Python
  checks, on every candidate on both paths.
- `hyperscan_core`, when set, is a suffix of `core` that Hyperscan matches instead, with no left
  boundary. The detector then extends the start to the left over `extend_left` chars, because
  Hyperscan is slow to track start offsets through a long run of common chars (an email's local
  part) but fast from a rare char ("x@").
- `left_boundary_in_python`, when set, leaves the left boundary out of the Hyperscan pattern and
  has the detector check it, because consuming a boundary that nearly every char satisfies
  (the space before a phone number) makes Hyperscan track a start offset at every char.

A validator receives the matched text and returns zero or more `Verdict`s: an entity type, a
score without context, a score with context, and a rule name. One candidate can have several
verdicts when the same digits fit several national formats; the detector keeps the best one.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import phonenumbers

from extguard.scan import pii_ids


class Verdict(NamedTuple):
    """One reading of a candidate.

    `score` applies without context and `context_score` when a context word of `entity_type`
    precedes the match. `length`, when set, shortens the span to the first `length` chars.
    """

    entity_type: str
    score: float
    context_score: float
    rule: str
    length: int | None = None


Validator = Callable[[str], Sequence[Verdict]]


@dataclass(frozen=True, slots=True)
class PatternSpec:
    """One candidate pattern and its validator. See the module docstring for the fields."""

    name: str
    core: str
    not_before: str
    not_after: str
    validate: Validator
    max_chars: int  # maximum length the validator accepts, for hold-back and quick rejects
    before_seps: str = ""
    after_seps: str = ""
    after_neighbor: str = "0-9"
    before: str = ""
    after: str = ""
    hyperscan_core: str = ""
    extend_left: str = ""
    extend_left_max_chars: int = 0
    left_boundary_in_python: bool = False


NO_VERDICT: tuple[Verdict, ...] = ()
_SEPARATORS = str.maketrans("", "", " -./()+")
ALNUM = "0-9A-Za-z"
# A digit run must not continue a number written with a decimal point or a dash ("0.4111...",
# "ORD-2024-4111...") on either side.
DIGIT_SEPS = r".\-"
# A digit group next to the match ("1 234 567 890 12") makes it part of a longer grouped number.
GROUP_BEFORE = r"(?<![0-9] )"
GROUP_AFTER = r"(?! [0-9])"


def _strip(value: str) -> str:
    return value.translate(_SEPARATORS)


def _separators(value: str) -> set[str]:
    return {char for char in value if not char.isalnum()}


# -- email ----------------------------------------------------------------------------------

# NOTE: local parts are ASCII only, so an internationalized address (RFC 6531) such as
# "josé@example.com" is not found.
_LOCAL = r"A-Za-z0-9_%+\-"
EMAIL_LOCAL_MAX_CHARS = 64
EMAIL_DOMAIN_MAX_CHARS = 253
EMAIL_MAX_LABELS = 8  # labels before the top-level domain
EMAIL_MAX_CHARS = EMAIL_LOCAL_MAX_CHARS + 1 + EMAIL_DOMAIN_MAX_CHARS
# Labels, then a top-level domain of letters or an IDNA ("xn--") label. Lengths are checked in
# `_validate_email`, because Hyperscan cannot track start offsets through long counted repeats.
_EMAIL_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+(?:[A-Za-z][A-Za-z]+|xn--[A-Za-z0-9\-]+)"


def _validate_email(value: str) -> Sequence[Verdict]:
    local, _, domain = value.partition("@")
    if len(local) > EMAIL_LOCAL_MAX_CHARS or ".." in local or len(domain) > EMAIL_DOMAIN_MAX_CHARS:
        return NO_VERDICT
    labels = domain.split(".")
    if len(labels) - 1 > EMAIL_MAX_LABELS or max(map(len, labels)) > 63:
        return NO_VERDICT
    return (Verdict("EMAIL_ADDRESS", 1.0, 1.0, "email_address"),)


# -- payment cards --------------------------------------------------------------------------


def _validate_card(value: str) -> Sequence[Verdict]:
    digits = _strip(value)
    if not 12 <= len(digits) <= 19 or not pii_ids.card_issuer_known(digits) or not pii_ids.luhn_valid(digits):
        return NO_VERDICT
    if len(digits) == 12:
        # Only Maestro issues 12-digit numbers, and so many other 12-digit numbers pass Luhn.
        return (Verdict("CREDIT_CARD", 0.4, 0.95, "credit_card_luhn"),)
    return (Verdict("CREDIT_CARD", 1.0, 1.0, "credit_card_luhn"),)


# -- IBAN -----------------------------------------------------------------------------------


def _validate_iban(value: str) -> Sequence[Verdict]:
    """Accept the longest prefix, cut at a separator, that is a valid IBAN.

    The pattern may take a trailing word or number group ("DE89... 2 days"), so shorter
    prefixes are tried after the whole match.
    """
    if len(_separators(value)) > 1:
        return NO_VERDICT

    length = len(value)
    while length >= 15:
        candidate = value[:length]
        compact = _strip(candidate)
        if len(compact) <= pii_ids.IBAN_MAX_CHARS and pii_ids.iban_valid(compact.upper()):
            score = 1.0 if compact.isupper() or compact.isdigit() else 0.9
            return (Verdict("IBAN_CODE", score, 1.0, "iban_mod97", length),)
        cut = max(candidate.rfind(" "), candidate.rfind("-"))
        if cut < 0:
            break
        length = cut
    return NO_VERDICT


# -- US SSN and ITIN ------------------------------------------------------------------------

# (score, context score) by separator: a dash is the usual way to write these numbers.
_SSN_SCORES = {"-": (0.6, 0.95), " ": (0.5, 0.9), ".": (0.4, 0.9)}
_ITIN_SCORES = {"-": (0.5, 0.9), " ": (0.4, 0.9), ".": (0.3, 0.85)}
_BARE_NINE_SCORES = (0.3, 0.85)


def _validate_ssn(value: str) -> Sequence[Verdict]:
    digits = _strip(value)
    separator = value[3]
    if pii_ids.us_ssn_valid(digits):
        return (Verdict("US_SSN", *_SSN_SCORES[separator], "us_ssn"),)
    if pii_ids.us_itin_valid(digits):
        return (Verdict("US_ITIN", *_ITIN_SCORES[separator], "us_itin"),)
    return NO_VERDICT


# -- digit-only national identifiers --------------------------------------------------------

# (score, context score) of numbers with a checksum that about 1 in 10 random numbers pass. They
# reach the default threshold of 0.5 only after a context word.
_CHECKSUM_DIGITS = (0.4, 0.95)


def _validate_nine_digits(value: str) -> Sequence[Verdict]:
    """Read 9 digits, bare or as 3-3-3 groups, as every national number of that length."""
    digits = _strip(value)
    separators = _separators(value)
    verdicts: list[Verdict] = []
    if pii_ids.ca_sin_valid(digits):
        verdicts.append(Verdict("CA_SIN", *_CHECKSUM_DIGITS, "ca_sin_luhn"))
    if separators <= {" "}:
        if pii_ids.au_tfn_valid(digits):
            verdicts.append(Verdict("AU_TFN", *_CHECKSUM_DIGITS, "au_tfn"))
        if pii_ids.au_acn_valid(digits):
            verdicts.append(Verdict("AU_ACN", *_CHECKSUM_DIGITS, "au_acn"))
    if not separators:
        if pii_ids.aba_routing_valid(digits):
            verdicts.append(Verdict("ABA_ROUTING_NUMBER", 0.3, 0.9, "aba_routing"))
        if pii_ids.us_ssn_valid(digits):
            verdicts.append(Verdict("US_SSN", *_BARE_NINE_SCORES, "us_ssn"))
        elif pii_ids.us_itin_valid(digits):
            verdicts.append(Verdict("US_ITIN", *_BARE_NINE_SCORES, "us_itin"))
    return verdicts


def _validate_ten_digits(value: str) -> Sequence[Verdict]:
    digits = _strip(value)
    verdicts: list[Verdict] = []
    if pii_ids.uk_nhs_valid(digits):
        verdicts.append(Verdict("UK_NHS", *_CHECKSUM_DIGITS, "uk_nhs_mod11"))
    if not _separators(value):
        if pii_ids.us_npi_valid(digits):
            verdicts.append(Verdict("US_NPI", *_CHECKSUM_DIGITS, "us_npi_luhn"))
        if pii_ids.au_medicare_valid(digits):
            verdicts.append(Verdict("AU_MEDICARE", *_CHECKSUM_DIGITS, "au_medicare"))
    return verdicts


def _validate_npi_grouped(value: str) -> Sequence[Verdict]:
    if not pii_ids.us_npi_valid(_strip(value)):
        return NO_VERDICT
    return (Verdict("US_NPI", *_CHECKSUM_DIGITS, "us_npi_luhn"),)


def _validate_medicare_grouped(value: str) -> Sequence[Verdict]:
    if not pii_ids.au_medicare_valid(_strip(value)):
        return NO_VERDICT
    return (Verdict("AU_MEDICARE", *_CHECKSUM_DIGITS, "au_medicare"),)


def _validate_eleven_digits(value: str) -> Sequence[Verdict]:
    digits = _strip(value)
    verdicts: list[Verdict] = []
    if pii_ids.au_abn_valid(digits):
        # Mod 89 passes about 1 in 89 random numbers, and the 2-3-3-3 grouping is distinctive.
        score = 0.7 if " " in value else 0.5
        verdicts.append(Verdict("AU_ABN", score, 1.0, "au_abn_mod89"))
    if len(digits) == len(value):
        if pii_ids.pl_pesel_valid(digits):
            # A birth date and the check digit: by estimate, about 2 in 100 random numbers pass.
            verdicts.append(Verdict("PL_PESEL", 0.5, 1.0, "pl_pesel"))
        if pii_ids.de_tax_id_valid(digits):
            verdicts.append(Verdict("DE_TAX_ID", *_CHECKSUM_DIGITS, "de_tax_id"))
        if pii_ids.au_medicare_valid(digits):
            verdicts.append(Verdict("AU_MEDICARE", *_CHECKSUM_DIGITS, "au_medicare"))
    return verdicts


_TIME_OF_DAY = re.compile(r"(?:[01][0-9]|2[0-3])[0-5][0-9]")


def _validate_twelve_digits(value: str) -> Sequence[Verdict]:
    digits = _strip(value)
    verdicts: list[Verdict] = []
    if len(_separators(value)) <= 1 and pii_ids.in_aadhaar_valid(digits):
        verdicts.append(Verdict("IN_AADHAAR", *_CHECKSUM_DIGITS, "in_aadhaar_verhoeff"))
    if len(digits) == len(value) and pii_ids.se_personnummer_valid(digits):
        # Timestamps such as 202403150010 also start with a century and a valid date, and 1 in
        # 10 of them pass Luhn. Their last four digits are a time of day, which only about 1 in
        # 7 real numbers look like, so only those need a context word.
        score = 0.45 if _TIME_OF_DAY.fullmatch(digits[-4:]) else 0.85
        verdicts.append(Verdict("SE_PERSONNUMMER", score, 1.0, "se_personnummer"))
    return verdicts


def _validate_thirteen_digits(value: str) -> Sequence[Verdict]:
    digits = _strip(value)
    verdicts: list[Verdict] = []
    if pii_ids.th_tnin_valid(digits):
        verdicts.append(Verdict("TH_TNIN", 0.5 if "-" in value else 0.4, 0.95, "th_tnin"))
    if len(digits) == len(value):
        if pii_ids.za_id_valid(digits):
            # A birth date, two status digits and Luhn: by estimate, about 1 in 1000 random numbers pass.
            verdicts.append(Verdict("ZA_ID_NUMBER", 0.85, 1.0, "za_id_luhn"))
        verdicts.extend(_kr_rrn_verdicts(digits, dashed=False))
    return verdicts


def _kr_rrn_verdicts(digits: str, *, dashed: bool) -> Sequence[Verdict]:
    if not pii_ids.kr_rrn_date_valid(digits):
        return NO_VERDICT
    if pii_ids.kr_rrn_checksum_valid(digits):
        return (Verdict("KR_RRN", 0.9 if dashed else 0.7, 1.0, "kr_rrn_checksum"),)
    # Numbers issued since October 2020 have no check digit, so only the date vouches for them.
    return (Verdict("KR_RRN", 0.5 if dashed else 0.3, 0.85, "kr_rrn_date"),)


def _validate_kr_rrn_dashed(value: str) -> Sequence[Verdict]:
    return _kr_rrn_verdicts(_strip(value), dashed=True)


def _validate_se_dashed(value: str) -> Sequence[Verdict]:
    if not pii_ids.se_personnummer_valid(_strip(value)):
        return NO_VERDICT
    return (Verdict("SE_PERSONNUMMER", 0.85, 1.0, "se_personnummer"),)


def _validate_aba_dashed(value: str) -> Sequence[Verdict]:
    if not pii_ids.aba_routing_valid(_strip(value)):
        return NO_VERDICT
    return (Verdict("ABA_ROUTING_NUMBER", 0.4, 0.95, "aba_routing"),)


# -- identifiers with letters ---------------------------------------------------------------


def _validate_nino(value: str) -> Sequence[Verdict]:
    compact = _strip(value).upper()
    if not pii_ids.uk_nino_valid(compact):
        return NO_VERDICT
    return (Verdict("UK_NINO", 0.5, 0.95, "uk_nino"),)


def _validate_es_nif(value: str) -> Sequence[Verdict]:
    if not pii_ids.es_nif_valid(_strip(value).upper()):
        return NO_VERDICT
    return (Verdict("ES_NIF", 0.6, 1.0, "es_nif_letter"),)


def _validate_es_nie(value: str) -> Sequence[Verdict]:
    if not pii_ids.es_nie_valid(_strip(value).upper()):
        return NO_VERDICT
    return (Verdict("ES_NIE", 0.8, 1.0, "es_nie_letter"),)


def _validate_it_fiscal_code(value: str) -> Sequence[Verdict]:
    if not pii_ids.it_fiscal_code_valid(value.upper()):
        return NO_VERDICT
    return (Verdict("IT_FISCAL_CODE", 1.0, 1.0, "it_fiscal_code"),)


def _validate_in_pan(value: str) -> Sequence[Verdict]:
    return (Verdict("IN_PAN", 0.5, 0.95, "in_pan"),)


def _validate_sg_nric(value: str) -> Sequence[Verdict]:
    nric = value.upper()
    if not pii_ids.sg_nric_check_known(nric):
        return (Verdict("SG_NRIC_FIN", 0.4, 0.85, "sg_nric_format"),)
    if not pii_ids.sg_nric_valid(nric):
        return NO_VERDICT
    return (Verdict("SG_NRIC_FIN", 0.8, 1.0, "sg_nric_check_letter"),)


def _validate_fi_identity_code(value: str) -> Sequence[Verdict]:
    if not pii_ids.fi_identity_code_valid(value):
        return NO_VERDICT
    return (Verdict("FI_PERSONAL_IDENTITY_CODE", 0.95, 1.0, "fi_identity_code"),)


def _validate_mbi(value: str) -> Sequence[Verdict]:
    if value.count("-") not in (0, 2):
        return NO_VERDICT
    return (Verdict("US_MBI", 0.5, 0.95, "us_mbi"),)


def _validate_base58(value: str) -> Sequence[Verdict]:
    if not pii_ids.bitcoin_base58_valid(value):
        return NO_VERDICT
    return (Verdict("CRYPTO", 1.0, 1.0, "bitcoin_base58check"),)


def _validate_bech32(value: str) -> Sequence[Verdict]:
    if not pii_ids.bitcoin_bech32_valid(value):
        return NO_VERDICT
    return (Verdict("CRYPTO", 1.0, 1.0, "bitcoin_bech32"),)


def _validate_mac(value: str) -> Sequence[Verdict]:
    if not pii_ids.mac_address_valid(_strip(value.replace(":", ""))):
        return NO_VERDICT
    return (Verdict("MAC_ADDRESS", 0.85, 1.0, "mac_address"),)


# -- IP addresses ---------------------------------------------------------------------------


# Netmasks ("255.255.255.0"), loopback and the unspecified address identify no host or person.
_NETMASK_OCTETS = frozenset({0, 128, 192, 224, 240, 248, 252, 254, 255})


def _validate_ipv4(value: str) -> Sequence[Verdict]:
    octets = [int(octet) for octet in value.split(".")]
    if any(octet > 255 for octet in octets):
        return NO_VERDICT
    is_netmask = octets[0] == 255 and all(octet in _NETMASK_OCTETS for octet in octets)
    if is_netmask or octets[0] == 127 or octets == [0, 0, 0, 0]:
        return (Verdict("IP_ADDRESS", 0.3, 0.6, "ipv4_not_a_host"),)
    return (Verdict("IP_ADDRESS", 0.85, 0.95, "ipv4"),)


def _validate_ipv6(value: str) -> Sequence[Verdict]:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return NO_VERDICT

    groups = [group for group in re.split(r"[:.]", value) if group]
    if "." in value or len(groups) >= 3 or (len(groups) == 2 and len(groups[0]) >= 3):
        return (Verdict("IP_ADDRESS", 0.85, 0.95, "ipv6"),)
    if value == "::1":
        return (Verdict("IP_ADDRESS", 0.6, 0.95, "ipv6"),)
    # Short compressed forms ("a::b", "::2") are also C++ and Rust paths or Python slices.
    return (Verdict("IP_ADDRESS", 0.4, 0.85, "ipv6"),) if groups else NO_VERDICT


# -- phone numbers --------------------------------------------------------------------------

DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "CA", "ES", "IT", "BR")
PHONE_MAX_CHARS = 40
_PHONE_EXTENSION = re.compile(r" ?(?:x|ext\.?|extension) ?[0-9]+$")
_DIGIT_GROUP = re.compile(r"[0-9]+")
# Dates, a year range and an SSN shape, which phone validation must not accept.
_DATE_SHAPES = re.compile(
    r"(?:19|20)[0-9]{2}([\-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12][0-9]|3[01])"
    r"|(?:0?[1-9]|[12][0-9]|3[01])([\-/.])(?:0?[1-9]|[12][0-9]|3[01])\2(?:19|20)?[0-9]{2}"
    r"|(?:19|20)[0-9]{2} ?- ?(?:19|20)[0-9]{2}"
    r"|[0-9]{3}([\- ])[0-9]{2}\3[0-9]{4}"
)
# A date and the hour of a timestamp ("2024-03-16 19", "2024-03-16T19"), which ends a candidate
# at the colon before the minutes.
_TIMESTAMP_START = re.compile(r"(?:19|20)[0-9]{2}([\-/.])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12][0-9]|3[01])[ T][0-9]{1,2}$")
_DOTTED_ONLY = re.compile(r"[0-9]+(?:\.[0-9]+)+")
_TRUNK_PREFIXED = re.compile(r"0[1-9][0-9]{8,9}")
_IP_SHAPE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# Thousands grouping ("1 234 567", "699.956.915"): one separator kind and 3-digit groups after the first.
_THOUSANDS = re.compile(r"[1-9][0-9]{0,2}(?:( |\.)[0-9]{3})(?:\1[0-9]{3})*")


class PhoneValidator:
    """Reads phone-shaped candidates with the `phonenumbers` package.

    Numbers with a + (or 00 or 011 international prefix) are parsed for any country. Numbers in
    national format are tried against `regions` in order, but only when their formatting (area
    code in parentheses, trunk 0, dashes, dots or mixed groups) already looks like a phone number.
    Bare digit runs and thousands-grouped numbers are not parsed: they get a score that needs a
    context word. Results are cached by value, because chat requests resend earlier turns.
    """

    __slots__ = ("regions",)

    def __init__(self, regions: Sequence[str] = DEFAULT_PHONE_REGIONS) -> None:
        self.regions = tuple(region.upper() for region in regions)

    def __call__(self, value: str) -> Sequence[Verdict]:
        return _phone_verdicts(value, self.regions)


@functools.lru_cache(maxsize=4096)
def _phone_verdicts(value: str, regions: tuple[str, ...]) -> Sequence[Verdict]:
    if len(value) > PHONE_MAX_CHARS:
        return NO_VERDICT
    main = _PHONE_EXTENSION.sub("", value)
    has_extension = len(main) < len(value)
    groups = _DIGIT_GROUP.findall(main)
    digits = "".join(groups)
    if len(digits) < 7 or pii_ids.is_repeated_digit(digits):
        return NO_VERDICT
    if _DATE_SHAPES.fullmatch(main) or _IP_SHAPE.fullmatch(main) or _TIMESTAMP_START.match(main):
        return NO_VERDICT
    if _DOTTED_ONLY.fullmatch(main) and any(not 2 <= len(group) <= 4 for group in groups):
        # Version numbers ("124.0.6367.91", "2.4.10.1"): dotted phone numbers have groups of 2 to 4 digits.
        return NO_VERDICT

    if len(digits) > 15 and not has_extension:
        return _trimmed_phone_verdicts(value, regions)

    international = _international_form(main, digits)
    if international is not None:
        return _international_verdicts(international)
    return _national_verdicts(main, groups, regions, has_extension=has_extension)


def _trimmed_phone_verdicts(value: str, regions: tuple[str, ...]) -> Sequence[Verdict]:
    """Return the verdict of the longest group prefix that validates as a phone number, if any.

    The pattern joins neighbouring numbers separated by single spaces or dashes into one run
    ("+44 20 7946 0958 536-22-8726"), so an over-long run may start with a phone number.
    """
    digit_count = 0
    prefix_ends: list[int] = []
    for match in _DIGIT_GROUP.finditer(value):
        digit_count += match.end() - match.start()
        if digit_count > 15:
            break
        prefix_ends.append(match.end())

    for end in reversed(prefix_ends):
        for verdict in _phone_verdicts(value[:end], regions):
            if verdict.rule in ("phone_international", "phone_national"):
                return (verdict._replace(length=end),)
    return NO_VERDICT


def _international_form(main: str, digits: str) -> str | None:
    """Return the number as "+digits" if it is written in international form, else None."""
    if main.startswith("+"):
        # "+44 (0)20 ..." repeats the trunk prefix, which the international form drops.
        return "+" + _strip(main.replace("(0)", "", 1))
    if digits.startswith("00") and len(digits) >= 10:
        return "+" + digits[2:]
    if digits.startswith("011") and len(digits) >= 11:
        return "+" + digits[3:]
    return None


def _international_verdicts(number: str) -> Sequence[Verdict]:
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return NO_VERDICT
    if phonenumbers.is_valid_number(parsed):
        return (Verdict("PHONE_NUMBER", 0.95, 1.0, "phone_international"),)
    if phonenumbers.is_possible_number(parsed):
        return (Verdict("PHONE_NUMBER", 0.6, 0.9, "phone_international_possible"),)
    return NO_VERDICT


def _national_verdicts(main: str, groups: list[str], regions: tuple[str, ...], *, has_extension: bool) -> Sequence[Verdict]:
    if _looks_formatted(main, groups, has_extension=has_extension):
        valid_score = 0.75
    elif len(groups) == 1 and _TRUNK_PREFIXED.fullmatch(main):
        # A bare run with a trunk 0 ("09171234567"): quantities and most IDs do not start with 0.
        valid_score = 0.55
    elif len(groups) == 1 and len(groups[0]) < 8:
        return NO_VERDICT
    else:
        return (Verdict("PHONE_NUMBER", 0.3, 0.85, "phone_pattern"),)

    if any(_valid_in_region(main, region) for region in regions):
        return (Verdict("PHONE_NUMBER", valid_score, 0.95, "phone_national"),)
    return (Verdict("PHONE_NUMBER", 0.3, 0.8, "phone_pattern"),)


def _valid_in_region(number: str, region: str) -> bool:
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(number, region))
    except phonenumbers.NumberParseException:
        return False


def _looks_formatted(main: str, groups: list[str], *, has_extension: bool) -> bool:
    """Return whether the separators follow a phone convention rather than a plain or grouped number."""
    if has_extension or "(" in main:
        return True
    if len(groups) == 1 or _THOUSANDS.fullmatch(main):
        return False
    if any(char in main for char in "-./"):
        return True
    if len(groups) >= 3:
        return True
    # Two space-separated groups: an area code with its trunk 0 then the subscriber number.
    return main.startswith("0") and len(groups[-1]) >= 4


# -- context words --------------------------------------------------------------------------

CONTEXT_WINDOW_CHARS = 40

# Words that, within CONTEXT_WINDOW_CHARS before a match, raise its score to the verdict's
# context score. Phrases are compared word by word, and a word may have a plural s.
CONTEXT_WORDS: dict[str, tuple[str, ...]] = {
    "PHONE_NUMBER": (
        "phone", "telephone", "tel", "mobile", "cell", "cellphone", "call", "fax", "contact",
        "whatsapp", "sms", "dial", "landline", "hotline", "desk", "reach", "telefon",
        "téléphone", "portable", "handy",
    ),
    "CREDIT_CARD": (
        "card", "credit", "debit", "visa", "mastercard", "amex", "american express", "discover", "jcb",
        "diners", "maestro", "unionpay", "cc", "payment", "cvv", "expiry",
    ),
    "US_SSN": ("ssn", "social security", "social sec"),
    "US_ITIN": ("itin", "taxpayer", "tin", "tax id"),
    "IBAN_CODE": ("iban", "bank", "account", "transfer", "wire", "sepa", "bic", "swift"),
    "IP_ADDRESS": (
        "ip", "ipv4", "ipv6", "address", "addr", "host", "server", "client", "gateway", "subnet",
        "connect", "connecting", "connected", "proxy", "remote", "peer",
    ),
    "UK_NINO": ("national insurance", "nino", "ni number", "ni no"),
    "UK_NHS": ("nhs", "national health", "health service", "patient"),
    "ES_NIF": ("nif", "dni", "documento nacional", "identificación"),
    "ES_NIE": ("nie", "extranjero"),
    "IT_FISCAL_CODE": ("codice fiscale", "fiscal code", "cf"),
    "IN_AADHAAR": ("aadhaar", "aadhar", "uidai"),
    "IN_PAN": ("pan", "permanent account number", "income tax"),
    "AU_TFN": ("tfn", "tax file number"),
    "AU_ABN": ("abn", "australian business number"),
    "AU_ACN": ("acn", "australian company number", "company number"),
    "AU_MEDICARE": ("medicare",),
    "SG_NRIC_FIN": ("nric", "fin", "singapore"),
    "KR_RRN": ("rrn", "resident registration", "주민등록번호"),
    "FI_PERSONAL_IDENTITY_CODE": ("hetu", "henkilötunnus", "personal identity code"),
    "SE_PERSONNUMMER": ("personnummer", "samordningsnummer", "personal identity number"),
    "PL_PESEL": ("pesel",),
    "US_NPI": ("npi", "national provider", "provider"),
    "ABA_ROUTING_NUMBER": ("routing", "aba", "rtn", "transit"),
    "CA_SIN": ("sin", "social insurance", "nas", "assurance sociale"),
    "DE_TAX_ID": ("steuer-id", "steuerid", "steueridentifikationsnummer", "idnr", "steuernummer", "tax id"),
    "TH_TNIN": ("thai id", "tnin", "national id"),
    "ZA_ID_NUMBER": ("id number", "identity number", "south african id", "rsa id", "identity"),
    "CRYPTO": ("wallet", "btc", "bitcoin", "crypto"),
    "MAC_ADDRESS": ("mac", "hardware address", "ethernet"),
    "US_MBI": ("mbi", "medicare", "beneficiary"),
}  # fmt: skip

# Words that, within the same window, lower every score by NEGATIVE_CONTEXT_PENALTY: the number
# is more likely a version, an order or a technical identifier.
NEGATIVE_CONTEXT_WORDS = (
    "version", "ver", "v", "release", "build", "order", "invoice", "receipt", "tracking", "ticket",
    "port", "timestamp", "epoch", "uuid", "guid", "isbn", "sku", "hash", "checksum", "sha", "md5",
    "commit", "serial number", "part number", "model", "meeting id", "row", "batch", "elapsed", "trace id",
)  # fmt: skip
NEGATIVE_CONTEXT_PENALTY = 0.45
NEGATIVE = "-"  # the key of negative words in the keyword-to-types map


_CONTEXT_TOKEN = re.compile(r"[^\W_]+")


def context_tokens(text: str) -> list[str]:
    """Return the lower-case words of `text`, the unit in which context phrases are compared."""
    return _CONTEXT_TOKEN.findall(text.lower())


def context_phrases() -> dict[tuple[str, ...], frozenset[str]]:
    """Return each context phrase, as a tuple of words, mapped to the entity types it supports.

    Negative words map to NEGATIVE.
    """
    phrases: dict[tuple[str, ...], set[str]] = {}
    for entity_type, words in CONTEXT_WORDS.items():
        for word in words:
            phrases.setdefault(tuple(context_tokens(word)), set()).add(entity_type)
    for word in NEGATIVE_CONTEXT_WORDS:
        phrases.setdefault(tuple(context_tokens(word)), set()).add(NEGATIVE)
    return {phrase: frozenset(types) for phrase, types in phrases.items()}


# -- the table ------------------------------------------------------------------------------

_HEX = "0-9A-Fa-f"
_MBI_LETTER = f"[{pii_ids.MBI_LETTERS}]"
_MBI_ALNUM = f"[0-9{pii_ids.MBI_LETTERS}]"
_IT_DIGIT = "[0-9LMNP-Vlmnp-v]"


def build_specs(phone: PhoneValidator) -> tuple[PatternSpec, ...]:
    """Return the candidate patterns in priority order: on equal score and length, earlier wins."""
    return (
        PatternSpec(
            "email",
            rf"[{_LOCAL}](?:[{_LOCAL}.]*[{_LOCAL}])?@" + _EMAIL_DOMAIN,
            not_before=_LOCAL + ".",
            not_after=r"A-Za-z0-9\-",
            validate=_validate_email,
            max_chars=EMAIL_MAX_CHARS,
            hyperscan_core=rf"[{_LOCAL}]@" + _EMAIL_DOMAIN,
            extend_left=_LOCAL + ".",
            extend_left_max_chars=EMAIL_LOCAL_MAX_CHARS,
        ),
        PatternSpec(
            "card_plain",
            r"[1-6][0-9]{11,18}",
            "0-9",
            "0-9",
            _validate_card,
            19,
            before_seps=DIGIT_SEPS,
            after_seps=DIGIT_SEPS,
        ),
        # Groups of 3 to 6 after a first group of 4 cover 4-4-4-4, 4-6-5 and 4-4-4-4-3. A
        # neighbouring group of 3+ digits means the number is part of a longer grouped run.
        PatternSpec(
            "card_spaced",
            r"[1-6][0-9]{3}(?: [0-9]{3,6}){2,4}",
            "0-9",
            "0-9",
            _validate_card,
            23,
            before_seps=DIGIT_SEPS,
            after_seps=DIGIT_SEPS,
            before=r"(?<![0-9]{3} )",
            after=r"(?! [0-9]{3})",
        ),
        # Dashed groups as above, or four dotted groups of 4 ("4539.5260.1815.9083").
        PatternSpec(
            "card_dashed",
            r"[1-6][0-9]{3}(?:(?:-[0-9]{3,6}){2,4}|(?:\.[0-9]{4}){3})",
            "0-9",
            "0-9",
            _validate_card,
            23,
            before_seps=DIGIT_SEPS,
            after_seps=DIGIT_SEPS,
        ),
        PatternSpec(
            "iban",
            r"[A-Za-z]{2}[0-9]{2}(?:[ \-]?[A-Za-z0-9]{4}){2,7}(?:[ \-]?[A-Za-z0-9]{1,3})?",
            ALNUM,
            ALNUM,
            _validate_iban,
            42,
        ),
        PatternSpec(
            "ssn",
            r"[0-9]{3}-[0-9]{2}-[0-9]{4}|[0-9]{3}\.[0-9]{2}\.[0-9]{4}",
            ALNUM,
            ALNUM,
            _validate_ssn,
            11,
            before_seps=DIGIT_SEPS,
            after_seps=DIGIT_SEPS,
        ),
        PatternSpec(
            "ssn_spaced",
            r"[0-9]{3} [0-9]{2} [0-9]{4}",
            ALNUM,
            ALNUM,
            _validate_ssn,
            11,
            before_seps=DIGIT_SEPS,
            after_seps=DIGIT_SEPS,
            before=GROUP_BEFORE,
            after=GROUP_AFTER,
        ),
        PatternSpec(
            "phone",
            r"(?:\+ ?)?(?:\([0-9]+\) ?[0-9]+(?:(?:[ .\-/]| ?\([0-9]+\) ?| - )[0-9]+){0,7}"
            r"|[0-9]+(?:(?:[ .\-/]| ?\([0-9]+\) ?| - )[0-9]+){1,7}"
            r"|[0-9]{7,})"
            r"(?: ?(?:x|ext\.?|extension) ?[0-9]+)?",
            "0-9A-Za-z_+",
            "0-9A-Za-z_",
            phone,
            PHONE_MAX_CHARS,
            before_seps=r".\-/",
            after_seps=r".\-/",
            # Not a segment of a URL path or file path ("/api/items/222528 200 79634").
            before=r"(?<![A-Za-z0-9_]/)",
            left_boundary_in_python=True,
        ),
        PatternSpec(
            "ipv4",
            r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}",
            "0-9A-Za-z_.",
            "0-9A-Za-z_",
            _validate_ipv4,
            15,
            after_seps=r"\.",
        ),
        PatternSpec(
            "ipv6",
            rf"(?:[{_HEX}]{{1,4}})?(?::(?:[{_HEX}]{{1,4}})?){{2,7}}(?:(?:\.[0-9]{{1,3}}){{3}})?",
            "0-9A-Za-z_:",
            "0-9A-Za-z_:",
            _validate_ipv6,
            45,
            after_seps=r"\.",
        ),
        PatternSpec(
            "mac",
            rf"[{_HEX}]{{2}}(?::[{_HEX}]{{2}}){{5}}|[{_HEX}]{{2}}(?:-[{_HEX}]{{2}}){{5}}"
            rf"|[{_HEX}]{{4}}\.[{_HEX}]{{4}}\.[{_HEX}]{{4}}",
            r"0-9A-Za-z_:\-",
            r"0-9A-Za-z_:\-",
            _validate_mac,
            17,
            after_seps=r"\.",
            after_neighbor=_HEX,
        ),
        PatternSpec(
            "crypto_base58",
            "[13][1-9A-HJ-NP-Za-km-z]{25,34}",
            ALNUM,
            ALNUM,
            _validate_base58,
            35,
        ),
        PatternSpec(
            "crypto_bech32",
            "[bB][cC]1[02-9ac-hj-np-zAC-HJ-NP-Z]{11,87}",
            ALNUM,
            ALNUM,
            _validate_bech32,
            90,
        ),
        PatternSpec(
            "uk_nino",
            "[A-CEGHJ-PR-TW-Za-ceghj-pr-tw-z][A-CEGHJ-NPR-TW-Za-ceghj-npr-tw-z]"
            " ?(?:[0-9]{2} ?[0-9]{2} ?[0-9]{2}|[0-9]{3} [0-9]{3}) ?[A-Da-d]",
            ALNUM,
            ALNUM,
            _validate_nino,
            13,
        ),
        PatternSpec(
            "it_fiscal_code",
            f"[A-Za-z]{{6}}{_IT_DIGIT}{{2}}[ABCDEHLMPR-Tabcdehlmpr-t]{_IT_DIGIT}{{2}}[A-Za-z]{_IT_DIGIT}{{3}}[A-Za-z]",
            ALNUM,
            ALNUM,
            _validate_it_fiscal_code,
            16,
        ),
        PatternSpec("es_nif", "[0-9]{7,8}-?[A-Za-z]", ALNUM, ALNUM, _validate_es_nif, 10, before_seps=DIGIT_SEPS),
        PatternSpec("es_nie", "[XYZxyz]-?[0-9]{7}-?[A-Za-z]", ALNUM, ALNUM, _validate_es_nie, 11),
        PatternSpec("in_pan", f"[A-Z]{{3}}[{pii_ids.IN_PAN_HOLDER_TYPES}][A-Z][0-9]{{4}}[A-Z]", ALNUM, ALNUM, _validate_in_pan, 10),
        PatternSpec("sg_nric", "[STFGMstfgm][0-9]{7}[A-Za-z]", ALNUM, ALNUM, _validate_sg_nric, 9),
        PatternSpec(
            "fi_identity_code",
            r"[0-9]{6}[\-+A-FU-Y][0-9]{3}[0-9A-FHJ-NPR-Y]",
            ALNUM,
            ALNUM,
            _validate_fi_identity_code,
            11,
            before_seps=DIGIT_SEPS,
        ),
        PatternSpec(
            "us_mbi",
            f"[1-9]{_MBI_LETTER}{_MBI_ALNUM}[0-9]-?{_MBI_LETTER}{_MBI_ALNUM}[0-9]-?{_MBI_LETTER}{{2}}[0-9]{{2}}",
            ALNUM,
            ALNUM + r"\-",
            _validate_mbi,
            13,
        ),
        *_digit_id_specs(),
    )


def _digit_id_specs() -> tuple[PatternSpec, ...]:
    """Return the patterns of digit-only national numbers, grouped by shape.

    Space-grouped shapes get the group guards: a further digit group next to them makes them part
    of a longer grouped number.
    """
    shapes: tuple[tuple[str, str, Validator, int, bool], ...] = (
        ("nine_digits", "[0-9]{3}-[0-9]{3}-[0-9]{3}|[0-9]{9}", _validate_nine_digits, 11, False),
        ("nine_digits_spaced", "[0-9]{3} [0-9]{3} [0-9]{3}", _validate_nine_digits, 11, True),
        ("ten_digits", "[0-9]{3}-[0-9]{3}-[0-9]{4}|[0-9]{10}", _validate_ten_digits, 12, False),
        ("ten_digits_spaced", "[0-9]{3} [0-9]{3} [0-9]{4}", _validate_ten_digits, 12, True),
        ("npi_dashed", "[12][0-9]{3}-[0-9]{3}-[0-9]{3}", _validate_npi_grouped, 12, False),
        ("npi_spaced", "[12][0-9]{3} [0-9]{3} [0-9]{3}", _validate_npi_grouped, 12, True),
        ("medicare_spaced", "[2-6][0-9]{3} [0-9]{5} [0-9](?:[ \\-/]?[0-9])?", _validate_medicare_grouped, 14, True),
        ("eleven_digits", "[0-9]{11}", _validate_eleven_digits, 11, False),
        ("eleven_digits_spaced", "[0-9]{2} [0-9]{3} [0-9]{3} [0-9]{3}", _validate_eleven_digits, 14, True),
        ("twelve_digits", "[0-9]{12}|[2-9][0-9]{3}-[0-9]{4}-[0-9]{4}", _validate_twelve_digits, 14, False),
        ("twelve_digits_spaced", "[2-9][0-9]{3} [0-9]{4} [0-9]{4}", _validate_twelve_digits, 14, True),
        ("thirteen_digits", "[0-9]{13}|[1-8]-[0-9]{4}-[0-9]{5}-[0-9]{2}-[0-9]", _validate_thirteen_digits, 17, False),
        ("kr_rrn_dashed", "[0-9]{6}-[1-4][0-9]{6}", _validate_kr_rrn_dashed, 14, False),
        ("se_personnummer_dashed", "(?:[0-9]{2})?[0-9]{6}[\\-+][0-9]{4}", _validate_se_dashed, 13, False),
        ("aba_dashed", "[0-9]{4}-[0-9]{4}-[0-9]", _validate_aba_dashed, 11, False),
    )
    return tuple(
        PatternSpec(
            name,
            core,
            ALNUM,
            ALNUM,
            validate,
            max_chars,
            before_seps=DIGIT_SEPS,
            after_seps=DIGIT_SEPS,
            before=GROUP_BEFORE if grouped else "",
            after=GROUP_AFTER if grouped else "",
        )
        for name, core, validate, max_chars, grouped in shapes
    )
