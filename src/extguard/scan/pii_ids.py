"""Checksum and format validators for payment cards, IBANs, national identifiers and crypto addresses.

Every function takes the value with its separators already removed (unless its docstring states otherwise)
and returns whether the value is well formed. None of them raises on malformed input of the
expected alphabet. They are pure and keep no state, so they are safe to call from any thread.

The rules come from the issuing schemes: ISO/IEC 7812 (Luhn and issuer ranges), ISO 13616 (IBAN),
the Social Security Administration (SSN and ITIN ranges), HMRC (NINO prefixes), NHS Digital
(mod 11), and each country's published check-digit algorithm, named at each function.
"""

from __future__ import annotations

import datetime
import hashlib
import re

_DIGIT_VALUES = {str(digit): digit for digit in range(10)}


def luhn_valid(digits: str) -> bool:
    """Return whether the ASCII digit string passes the Luhn (mod 10) check."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if position % 2:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0


def weighted_sum(digits: str, weights: tuple[int, ...]) -> int:
    """Return the sum of each digit times its weight, pairing them from the left."""
    return sum((ord(char) - 48) * weight for char, weight in zip(digits, weights, strict=False))


def is_repeated_digit(digits: str) -> bool:
    """Return whether every char of `digits` is the same, the usual placeholder value."""
    return len(set(digits)) <= 1


def valid_date(year: int, month: int, day: int) -> bool:
    """Return whether the Gregorian date exists."""
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


# -- payment cards --------------------------------------------------------------------------

# (first digits, lengths) per issuer, from the ISO/IEC 7812 issuer ranges in public use:
# Visa, Mastercard (51-55 and 2221-2720), American Express, Discover (6011, 644-649, 65),
# JCB (3528-3589, and 2131 and 1800 with 15 digits), Diners Club (300-305, 3095, 36, 38, 39),
# Maestro (50, 56-69), UnionPay (62), Mir (2200-2204) and RuPay (60, 65, 81, 82, 508).
_CARD_RANGES: tuple[tuple[int, int, frozenset[int]], ...] = (
    # (low prefix, high prefix, lengths); prefixes are compared on the same number of digits.
    (4, 4, frozenset({13, 16, 19})),
    (51, 55, frozenset({16})),
    (2221, 2720, frozenset({16})),
    (34, 34, frozenset({15})),
    (37, 37, frozenset({15})),
    (6011, 6011, frozenset({16, 17, 18, 19})),
    (644, 649, frozenset({16, 17, 18, 19})),
    (65, 65, frozenset({16, 17, 18, 19})),
    (3528, 3589, frozenset({16, 17, 18, 19})),
    (2131, 2131, frozenset({15})),
    (1800, 1800, frozenset({15})),
    (300, 305, frozenset({14, 15, 16, 17, 18, 19})),
    (3095, 3095, frozenset({14, 15, 16, 17, 18, 19})),
    (36, 36, frozenset({14, 15, 16, 17, 18, 19})),
    (38, 39, frozenset({16, 17, 18, 19})),
    (50, 50, frozenset(range(12, 20))),
    (56, 69, frozenset(range(12, 20))),
    (2200, 2204, frozenset({16, 17, 18, 19})),
    (81, 82, frozenset({16})),
)


def card_issuer_known(digits: str) -> bool:
    """Return whether the card number's prefix and length belong to a known issuer range."""
    length = len(digits)
    for low, high, lengths in _CARD_RANGES:
        if length not in lengths:
            continue
        prefix = int(digits[: len(str(low))])
        if low <= prefix <= high:
            return True
    return False


# -- IBAN -----------------------------------------------------------------------------------

# BBAN structure per country from the SWIFT IBAN registry: a count then n (digits), a (upper-case
# letters) or c (letters or digits). The IBAN length is 4 plus the sum of the counts.
_IBAN_BBAN_FORMATS = {
    "AD": "4n4n12c", "AE": "3n16n", "AL": "8n16c", "AT": "5n11n", "AZ": "4a20c", "BA": "3n3n8n2n",
    "BE": "3n7n2n", "BG": "4a4n2n8c", "BH": "4a14c", "BI": "5n5n11n2n", "BR": "8n5n10n1a1c",
    "BY": "4c4n16c", "CH": "5n12c", "CR": "4n14n", "CY": "3n5n16c", "CZ": "4n6n10n", "DE": "8n10n",
    "DJ": "5n5n11n2n", "DK": "4n9n1n", "DO": "4c20n", "EE": "2n2n11n1n", "EG": "4n4n17n",
    "ES": "4n4n1n1n10n", "FI": "3n11n", "FK": "2a12n", "FO": "4n9n1n", "FR": "5n5n11c2n",
    "GB": "4a6n8n", "GE": "2a16n", "GI": "4a15c", "GL": "4n9n1n", "GR": "3n4n16c", "GT": "4c20c",
    "HR": "7n10n", "HU": "3n4n1n15n1n", "IE": "4a6n8n", "IL": "3n3n13n", "IQ": "4a3n12n",
    "IS": "4n2n6n10n", "IT": "1a5n5n12c", "JO": "4a4n18c", "KW": "4a22c", "KZ": "3n13c",
    "LB": "4n20c", "LC": "4a24c", "LI": "5n12c", "LT": "5n11n", "LU": "3n13c", "LV": "4a13c",
    "LY": "3n3n15n", "MC": "5n5n11c2n", "MD": "2c18c", "ME": "3n13n2n", "MK": "3n10c2n",
    "MN": "4n12n", "MR": "5n5n11n2n", "MT": "4a5n18c", "MU": "4a2n2n12n3n3a", "NI": "4a20n",
    "NL": "4a10n", "NO": "4n6n1n", "OM": "3n16c", "PK": "4a16c", "PL": "8n16n", "PS": "4a21c",
    "PT": "4n4n11n2n", "QA": "4a21c", "RO": "4a16c", "RS": "3n13n2n", "RU": "9n5n15c",
    "SA": "2n18c", "SC": "4a2n2n16n3a", "SD": "2n12n", "SE": "3n16n1n", "SI": "5n8n2n",
    "SK": "4n6n10n", "SM": "1a5n5n12c", "SO": "4n3n12n", "ST": "8n11n2n", "SV": "4a20n",
    "TL": "3n14n2n", "TN": "2n3n13n2n", "TR": "5n1n16c", "UA": "6n19c", "VA": "3n15n",
    "VG": "4a16n", "XK": "4n10n2n", "YE": "4a4n18c",
}  # fmt: skip
_BBAN_CLASSES = {"n": "[0-9]", "a": "[A-Z]", "c": "[A-Z0-9]"}


def _bban_pattern(spec: str) -> re.Pattern[str]:
    parts = [f"{_BBAN_CLASSES[kind]}{{{count}}}" for count, kind in re.findall(r"(\d+)([nac])", spec)]
    return re.compile("".join(parts))


_IBAN_BBAN_PATTERNS = {country: _bban_pattern(spec) for country, spec in _IBAN_BBAN_FORMATS.items()}
IBAN_MAX_CHARS = 34


def iban_valid(iban: str) -> bool:
    """Return whether the upper-case IBAN without separators has its country's format and mod 97 == 1."""
    pattern = _IBAN_BBAN_PATTERNS.get(iban[:2])
    if pattern is None or not iban[2:4].isdigit() or not pattern.fullmatch(iban, 4):
        return False

    # ISO 7064 MOD 97-10: move the first four chars to the end and read letters as 10..35.
    rearranged = iban[4:] + iban[:4]
    number = "".join(char if char.isdigit() else str(ord(char) - 55) for char in rearranged)
    return int(number) % 97 == 1


# -- United States --------------------------------------------------------------------------

# Numbers the SSA has declared invalid or that were printed in advertising.
_SSN_PLACEHOLDERS = frozenset({"123456789", "078051120", *(f"98765432{digit}" for digit in range(10))})


def us_ssn_valid(digits: str) -> bool:
    """Return whether the 9 digits can be an SSN: area not 000, 666 or 9xx, group not 00, serial not 0000."""
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    return digits not in _SSN_PLACEHOLDERS and not is_repeated_digit(digits)


def us_itin_valid(digits: str) -> bool:
    """Return whether the 9 digits can be an ITIN: 9xx area and group 50-65, 70-88, 90-92 or 94-99."""
    if digits[0] != "9":
        return False
    group = int(digits[3:5])
    return 50 <= group <= 65 or 70 <= group <= 88 or 90 <= group <= 92 or 94 <= group <= 99


def us_npi_valid(digits: str) -> bool:
    """Return whether the 10-digit NPI passes Luhn with the 80840 health-industry prefix."""
    return digits[0] in "12" and not is_repeated_digit(digits[1:-1]) and luhn_valid("80840" + digits)


def aba_routing_valid(digits: str) -> bool:
    """Return whether the 9-digit routing number has a Federal Reserve prefix and the 3-7-1 checksum."""
    if digits[0] not in "0123678" or is_repeated_digit(digits):
        return False
    return weighted_sum(digits, (3, 7, 1, 3, 7, 1, 3, 7, 1)) % 10 == 0


# Medicare Beneficiary Identifier letters: A-Z without S, L, O, I, B and Z.
MBI_LETTERS = "ACDEFGHJKMNPQRTUVWXY"


# -- United Kingdom -------------------------------------------------------------------------

_NINO_INVALID_PREFIXES = frozenset({"BG", "GB", "NK", "KN", "NT", "TN", "ZZ"})


def uk_nino_valid(nino: str) -> bool:
    """Return whether the upper-case NINO without spaces has an issuable prefix.

    The pattern already restricts each prefix letter. HMRC never issues the prefixes listed here.
    """
    return nino[:2] not in _NINO_INVALID_PREFIXES


def uk_nhs_valid(digits: str) -> bool:
    """Return whether the 10-digit NHS number passes the mod 11 check (weights 10 down to 1)."""
    return weighted_sum(digits, (10, 9, 8, 7, 6, 5, 4, 3, 2, 1)) % 11 == 0 and not is_repeated_digit(digits)


# -- Spain, Italy ---------------------------------------------------------------------------

_ES_CHECK_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def es_nif_valid(nif: str) -> bool:
    """Return whether the DNI/NIF (7 or 8 digits, then a letter) has the right mod 23 letter."""
    return _ES_CHECK_LETTERS[int(nif[:-1]) % 23] == nif[-1]


def es_nie_valid(nie: str) -> bool:
    """Return whether the NIE (X, Y or Z, 7 digits, letter) has the right mod 23 letter."""
    number = "XYZ".index(nie[0]) * 10_000_000 + int(nie[1:-1])
    return _ES_CHECK_LETTERS[number % 23] == nie[-1]


# Italian codice fiscale: values of chars in odd (1st, 3rd, ...) positions. Digits take the values
# of the letter at the same index (0 as A, 1 as B, ...).
_IT_ODD_VALUES = (1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23)


def _it_char_index(char: str) -> int:
    return ord(char) - 48 if char.isdigit() else ord(char) - 65


def it_fiscal_code_valid(code: str) -> bool:
    """Return whether the 16-char upper-case codice fiscale has the right check letter."""
    total = 0
    for position, char in enumerate(code[:15]):
        index = _it_char_index(char)
        total += _IT_ODD_VALUES[index] if position % 2 == 0 else index
    return chr(65 + total % 26) == code[15]


# -- India ----------------------------------------------------------------------------------

# Verhoeff's dihedral-group tables.
_VERHOEFF_MULTIPLY = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_PERMUTE = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_valid(digits: str) -> bool:
    """Return whether the digit string passes the Verhoeff check."""
    check = 0
    for position, char in enumerate(reversed(digits)):
        check = _VERHOEFF_MULTIPLY[check][_VERHOEFF_PERMUTE[position % 8][ord(char) - 48]]
    return check == 0


def in_aadhaar_valid(digits: str) -> bool:
    """Return whether the 12 digits can be an Aadhaar number: first digit 2-9, Verhoeff, no palindrome."""
    return digits[0] not in "01" and digits != digits[::-1] and verhoeff_valid(digits)


# PAN: the 4th char is the holder type (company, person, HUF, firm, AOP, trust, BOI, local
# authority, artificial juridical person, government).
IN_PAN_HOLDER_TYPES = "ABCFGHJLPT"


# -- Australia ------------------------------------------------------------------------------


def au_tfn_valid(digits: str) -> bool:
    """Return whether the 9-digit tax file number passes the ATO weighted mod 11 check."""
    return weighted_sum(digits, (1, 4, 3, 7, 5, 8, 6, 9, 10)) % 11 == 0 and not is_repeated_digit(digits)


def au_abn_valid(digits: str) -> bool:
    """Return whether the 11-digit ABN passes the ATO mod 89 check (first digit minus 1)."""
    if digits[0] == "0":
        return False
    adjusted = str(int(digits[0]) - 1) + digits[1:]
    return weighted_sum(adjusted, (10, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19)) % 89 == 0


def au_acn_valid(digits: str) -> bool:
    """Return whether the 9-digit ACN's last digit is its ASIC mod 10 complement check digit."""
    complement = (10 - weighted_sum(digits, (8, 7, 6, 5, 4, 3, 2, 1)) % 10) % 10
    return complement == ord(digits[8]) - 48 and not is_repeated_digit(digits)


def au_medicare_valid(digits: str) -> bool:
    """Return whether the 10 or 11-digit Medicare number has a 2-6 start and its 9th-digit check."""
    if digits[0] not in "23456":
        return False
    return weighted_sum(digits, (1, 3, 7, 9, 1, 3, 7, 9)) % 10 == ord(digits[8]) - 48


# -- Singapore, Korea -----------------------------------------------------------------------

_SG_WEIGHTS = (2, 7, 6, 5, 4, 3, 2)
_SG_CHECK_LETTERS = {"S": "JZIHGFEDCBA", "T": "JZIHGFEDCBA", "F": "XWUTRQPNMLK", "G": "XWUTRQPNMLK"}
_SG_OFFSETS = {"S": 0, "T": 4, "F": 0, "G": 4}


def sg_nric_check_known(nric: str) -> bool:
    """Return whether the check letter algorithm of the upper-case NRIC/FIN's prefix is known.

    It is for S, T, F and G. NOTE: the M series (FINs from 2022) uses a table this module does
    not have, so M numbers are matched by format only.
    """
    return nric[0] in _SG_CHECK_LETTERS


def sg_nric_valid(nric: str) -> bool:
    """Return whether an S, T, F or G NRIC/FIN has the right check letter."""
    total = weighted_sum(nric[1:8], _SG_WEIGHTS) + _SG_OFFSETS[nric[0]]
    return _SG_CHECK_LETTERS[nric[0]][total % 11] == nric[8]


# Korean RRN gender digit to birth century.
_KR_CENTURIES = {"1": 1900, "2": 1900, "3": 2000, "4": 2000}


def kr_rrn_date_valid(digits: str) -> bool:
    """Return whether the 13-digit RRN starts with a real birth date for its gender digit."""
    century = _KR_CENTURIES.get(digits[6])
    if century is None:
        return False
    return valid_date(century + int(digits[:2]), int(digits[2:4]), int(digits[4:6]))


def kr_rrn_checksum_valid(digits: str) -> bool:
    """Return whether the 13-digit RRN passes the check digit used before October 2020.

    Numbers issued since then have random trailing digits, so a failed check is no proof.
    """
    total = weighted_sum(digits, (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5))
    return (11 - total % 11) % 10 == ord(digits[12]) - 48


# -- Nordics, Poland ------------------------------------------------------------------------

_FI_CENTURIES = {"+": 1800, "-": 1900, "A": 2000}
_FI_CENTURIES.update(dict.fromkeys("UVWXY", 1900))
_FI_CENTURIES.update(dict.fromkeys("BCDEF", 2000))
_FI_CHECK_CHARS = "0123456789ABCDEFHJKLMNPRSTUVWXY"


def fi_identity_code_valid(code: str) -> bool:
    """Return whether the 11-char upper-case henkilötunnus has a real date and the mod 31 check char."""
    century = _FI_CENTURIES.get(code[6])
    if century is None or not valid_date(century + int(code[4:6]), int(code[2:4]), int(code[:2])):
        return False
    return _FI_CHECK_CHARS[int(code[:6] + code[7:10]) % 31] == code[10]


def se_personnummer_valid(digits: str) -> bool:
    """Return whether the 10 or 12-digit personnummer has a valid month and day and passes Luhn.

    Days 61-91 are samordningsnummer (coordination numbers) and count as valid.
    """
    if len(digits) == 12:
        if digits[:2] not in ("18", "19", "20") or int(digits[:4]) > datetime.date.today().year:
            # A birth year in the future is a timestamp or a reference, not a personnummer.
            return False
        digits = digits[2:]
    month, day = int(digits[2:4]), int(digits[4:6])
    if day > 60:
        day -= 60
    return 1 <= month <= 12 and 1 <= day <= 31 and luhn_valid(digits)


# PESEL month offset to century: 1900s +0, 2000s +20, 2100s +40, 2200s +60, 1800s +80.
_PESEL_CENTURIES = {0: 1900, 20: 2000, 40: 2100, 60: 2200, 80: 1800}


def pl_pesel_valid(digits: str) -> bool:
    """Return whether the 11-digit PESEL has a real birth date and the 1-3-7-9 check digit."""
    encoded_month = int(digits[2:4])
    offset = (encoded_month - 1) // 20 * 20 if encoded_month else -1
    century = _PESEL_CENTURIES.get(offset)
    if century is None or not valid_date(century + int(digits[:2]), encoded_month - offset, int(digits[4:6])):
        return False
    check = (10 - weighted_sum(digits, (1, 3, 7, 9, 1, 3, 7, 9, 1, 3)) % 10) % 10
    return check == ord(digits[10]) - 48


# -- Canada, Germany, Thailand, South Africa ------------------------------------------------


def ca_sin_valid(digits: str) -> bool:
    """Return whether the 9-digit SIN has an assigned first digit (not 0 or 8) and passes Luhn."""
    return digits[0] not in "08" and not is_repeated_digit(digits) and luhn_valid(digits)


def de_tax_id_valid(digits: str) -> bool:
    """Return whether the 11-digit Steuer-IdNr passes the ISO 7064 MOD 11,10 check.

    The first digit is not 0 and no digit occurs more than 3 times in the first 10.
    """
    if digits[0] == "0" or max(digits[:10].count(digit) for digit in set(digits[:10])) > 3:
        return False
    product = 10
    for char in digits[:10]:
        total = (ord(char) - 48 + product) % 10 or 10
        product = total * 2 % 11
    return (11 - product) % 10 == ord(digits[10]) - 48


# Thai province codes in the 2nd and 3rd digits: 10-19, 20-27, 30-49, 50-58, 60-67, 70-77, 80-86, 90-96.
_TH_PROVINCE = re.compile(r"[134][0-9]|2[0-7]|5[0-8]|[67][0-7]|[89][0-6]")


def th_tnin_valid(digits: str) -> bool:
    """Return whether the 13-digit Thai national ID has a 1-8 type digit, a province and its check digit."""
    if digits[0] not in "12345678" or not _TH_PROVINCE.fullmatch(digits, 1, 3):
        return False
    total = weighted_sum(digits, tuple(range(13, 1, -1)))
    return (11 - total % 11) % 10 == ord(digits[12]) - 48


def za_id_valid(digits: str) -> bool:
    """Return whether the 13-digit South African ID has a real birth date, status digits and Luhn.

    The 11th digit (citizenship) is 0, 1 or 2 and the 12th is 8 or 9. The century is not encoded,
    so the date is checked in both the 1900s and the 2000s.
    """
    if digits[10] not in "012" or digits[11] not in "89":
        return False
    year, month, day = int(digits[:2]), int(digits[2:4]), int(digits[4:6])
    if not (valid_date(1900 + year, month, day) or valid_date(2000 + year, month, day)):
        return False
    return luhn_valid(digits)


# -- crypto and network ---------------------------------------------------------------------

_BASE58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_BASE58_VALUES = {char: index for index, char in enumerate(_BASE58_ALPHABET)}


def bitcoin_base58_valid(address: str) -> bool:
    """Return whether the P2PKH or P2SH address decodes to 25 bytes with a valid double-SHA-256 checksum."""
    number = 0
    for char in address:
        value = _BASE58_VALUES.get(char)
        if value is None:
            return False
        number = number * 58 + value

    leading_zeros = len(address) - len(address.lstrip("1"))
    body_length = (number.bit_length() + 7) // 8
    if leading_zeros + body_length != 25:
        return False
    raw = bytes(leading_zeros) + number.to_bytes(body_length, "big")
    return hashlib.sha256(hashlib.sha256(raw[:-4]).digest()).digest()[:4] == raw[-4:]


_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_VALUES = {char: index for index, char in enumerate(_BECH32_CHARSET)}
_BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_BECH32_CONSTANTS = (1, 0x2BC830A3)  # BIP 173 (bech32) and BIP 350 (bech32m)


def _bech32_polymod(values: list[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for bit, generator in enumerate(_BECH32_GENERATOR):
            if (top >> bit) & 1:
                checksum ^= generator
    return checksum


def bitcoin_bech32_valid(address: str) -> bool:
    """Return whether the single-case bc1 address passes the bech32 or bech32m checksum (BIP 173, BIP 350)."""
    if address != address.lower() and address != address.upper():
        return False
    address = address.lower()
    if not address.startswith("bc1") or not 14 <= len(address) <= 90:
        return False

    data = [_BECH32_VALUES.get(char, -1) for char in address[3:]]
    if -1 in data:
        return False
    expanded_hrp = [ord(char) >> 5 for char in "bc"] + [0] + [ord(char) & 31 for char in "bc"]
    return _bech32_polymod(expanded_hrp + data) in _BECH32_CONSTANTS


def mac_address_valid(hex_digits: str) -> bool:
    """Return whether the 12 hex digits are a MAC address other than all zeros or the broadcast address."""
    upper = hex_digits.upper()
    return upper not in ("000000000000", "FFFFFFFFFFFF")
