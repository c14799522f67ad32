"""Tests of the Hyperscan PII detector: entity tables, scores, offsets, allow-lists, the re fallback and streams."""

from __future__ import annotations

import itertools
import logging
import re
import threading

import pytest

from extguard.scan import pii
from extguard.scan.engine import Action, ScanRule, guard_text
from extguard.scan.findings import Detector, Finding
from extguard.scan.pii import PiiDetector
from extguard.scan.redact import Masker
from extguard.scan.stream import StreamGuard

HYPERSCAN = PiiDetector(use_hyperscan=True)
REGEX = PiiDetector(use_hyperscan=False)
BOTH_PATHS = pytest.mark.parametrize("detector", [HYPERSCAN, REGEX], ids=["hyperscan", "re"])
THRESHOLD = 0.5  # the policy's default score_threshold

# Published test card numbers; all pass the Luhn check.
VISA = "4111111111111111"
VISA_13 = "4222222222222"
VISA_19 = "4111111111111111110"
MASTERCARD = "5555555555554444"
MASTERCARD_2_SERIES = "2223003122003222"
AMEX = "378282246310005"
DISCOVER = "6011111111111117"
JCB = "3530111333300000"

BITCOIN_P2PKH = "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"
BITCOIN_BECH32 = "bc1qskpa0r28h70cx0qd63tc2yguggqqdd22enexnu"


def values(detector: Detector, text: str, entity_type: str, threshold: float = THRESHOLD) -> list[str]:
    return [text[f.start : f.end] for f in detector.scan(text) if f.entity_type == entity_type and f.score >= threshold]


def only_finding(detector: Detector, text: str) -> Finding:
    (finding,) = detector.scan(text)
    return finding


POSITIVES = [
    # email
    ("alice@example.com", "EMAIL_ADDRESS", ["alice@example.com"]),
    ("Mail alice.smith+news@mail.example.co.uk today", "EMAIL_ADDRESS", ["alice.smith+news@mail.example.co.uk"]),
    ("(alice@example.com)", "EMAIL_ADDRESS", ["alice@example.com"]),
    ("<alice@example.com>, bob@test.org.", "EMAIL_ADDRESS", ["alice@example.com", "bob@test.org"]),
    ('{"to": "alice@example.com"}', "EMAIL_ADDRESS", ["alice@example.com"]),
    ("'alice@example.com'", "EMAIL_ADDRESS", ["alice@example.com"]),
    ("https://host/?to=alice@example.com&x=1", "EMAIL_ADDRESS", ["alice@example.com"]),
    ("alice@example.com's inbox", "EMAIL_ADDRESS", ["alice@example.com"]),
    ("first_last-2@sub-domain.example.io", "EMAIL_ADDRESS", ["first_last-2@sub-domain.example.io"]),
    ("ALICE@EXAMPLE.COM", "EMAIL_ADDRESS", ["ALICE@EXAMPLE.COM"]),
    ("a@b.cc", "EMAIL_ADDRESS", ["a@b.cc"]),
    ("idn ivan@xn--80akhbyknj4f.xn--p1ai", "EMAIL_ADDRESS", ["ivan@xn--80akhbyknj4f.xn--p1ai"]),
    ("x@a.b@c.example.org", "EMAIL_ADDRESS", ["a.b@c.example.org"]),
    # payment cards
    (VISA, "CREDIT_CARD", [VISA]),
    ("card 4111 1111 1111 1111 exp 12/27", "CREDIT_CARD", ["4111 1111 1111 1111"]),
    ("card 4111-1111-1111-1111.", "CREDIT_CARD", ["4111-1111-1111-1111"]),
    (VISA_13, "CREDIT_CARD", [VISA_13]),
    ("4111 1111 1111 1111 110", "CREDIT_CARD", ["4111 1111 1111 1111 110"]),
    (VISA_19, "CREDIT_CARD", [VISA_19]),
    (MASTERCARD, "CREDIT_CARD", [MASTERCARD]),
    ("5555 5555 5555 4444", "CREDIT_CARD", ["5555 5555 5555 4444"]),
    (MASTERCARD_2_SERIES, "CREDIT_CARD", [MASTERCARD_2_SERIES]),
    (AMEX, "CREDIT_CARD", [AMEX]),
    ("amex 3782 822463 10005", "CREDIT_CARD", ["3782 822463 10005"]),
    ("3782-822463-10005", "CREDIT_CARD", ["3782-822463-10005"]),
    ("Discover:6011111111111117,", "CREDIT_CARD", [DISCOVER]),
    (f"jcb={JCB}", "CREDIT_CARD", [JCB]),
    (f'{{"card": "{VISA}"}}', "CREDIT_CARD", [VISA]),
    (f"{VISA},{MASTERCARD}", "CREDIT_CARD", [VISA, MASTERCARD]),
    ("2024-01-15 4111 1111 1111 1111", "CREDIT_CARD", ["4111 1111 1111 1111"]),
    ("4111 1111 1111 1111 12 months", "CREDIT_CARD", ["4111 1111 1111 1111"]),
    ("my debit card is 675912345674", "CREDIT_CARD", ["675912345674"]),
    # phone numbers
    ("call +44 20 7946 0958 today", "PHONE_NUMBER", ["+44 20 7946 0958"]),
    ("Berlin office: +49 30 901820.", "PHONE_NUMBER", ["+49 30 901820"]),
    ("Paris +33 1 42 68 53 00", "PHONE_NUMBER", ["+33 1 42 68 53 00"]),
    ("reach me at (212) 555-0187", "PHONE_NUMBER", ["(212) 555-0187"]),
    ("212-555-0187", "PHONE_NUMBER", ["212-555-0187"]),
    ("212.555.0187", "PHONE_NUMBER", ["212.555.0187"]),
    ("+1 (212) 555-0187 ext. 12", "PHONE_NUMBER", ["+1 (212) 555-0187 ext. 12"]),
    ("desk 212-555-0187x345", "PHONE_NUMBER", ["212-555-0187x345"]),
    ("+44 (0)20 7946 0958", "PHONE_NUMBER", ["+44 (0)20 7946 0958"]),
    ("from abroad dial 0044 20 7946 0958", "PHONE_NUMBER", ["0044 20 7946 0958"]),
    ("01 42 68 53 00", "PHONE_NUMBER", ["01 42 68 53 00"]),
    ("Tel: 030 901820", "PHONE_NUMBER", ["030 901820"]),
    ("phone: 2125550187", "PHONE_NUMBER", ["2125550187"]),
    ("mobile 699 956 915", "PHONE_NUMBER", ["699 956 915"]),
    # US SSN and ITIN
    ("SSN 536-22-8726", "US_SSN", ["536-22-8726"]),
    ("536-22-8726", "US_SSN", ["536-22-8726"]),
    ("536 22 8726", "US_SSN", ["536 22 8726"]),
    ("social security number: 536228726", "US_SSN", ["536228726"]),
    ("ssn 219.09.9999", "US_SSN", ["219.09.9999"]),
    ("912-70-1234", "US_ITIN", ["912-70-1234"]),
    ("ITIN 912701234", "US_ITIN", ["912701234"]),
    # IBAN
    ("IBAN GB82 WEST 1234 5698 7654 32.", "IBAN_CODE", ["GB82 WEST 1234 5698 7654 32"]),
    ("NL91ABNA0417164300", "IBAN_CODE", ["NL91ABNA0417164300"]),
    ("FR14 2004 1010 0505 0001 3M02 606", "IBAN_CODE", ["FR14 2004 1010 0505 0001 3M02 606"]),
    ("my iban is fr1420041010050500013m02606", "IBAN_CODE", ["fr1420041010050500013m02606"]),
    ("CH93-0076-2011-6238-5295-7", "IBAN_CODE", ["CH93-0076-2011-6238-5295-7"]),
    ("pay DE89370400440532013000 2 days", "IBAN_CODE", ["DE89370400440532013000"]),
    ("BE68539007547034 ALL CAPS", "IBAN_CODE", ["BE68539007547034"]),
    # IP addresses
    ("host 10.0.0.1", "IP_ADDRESS", ["10.0.0.1"]),
    ("192.168.1.254:8080", "IP_ADDRESS", ["192.168.1.254"]),
    ("from 203.0.113.7.", "IP_ADDRESS", ["203.0.113.7"]),
    ("ip=198.51.100.23@eth0", "IP_ADDRESS", ["198.51.100.23"]),
    ("2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS", ["2001:db8:85a3::8a2e:370:7334"]),
    ("fe80::1ff:fe23:4567:890a", "IP_ADDRESS", ["fe80::1ff:fe23:4567:890a"]),
    ("mapped ::ffff:192.0.2.128", "IP_ADDRESS", ["::ffff:192.0.2.128"]),
    ("curl [2001:db8::1]:443", "IP_ADDRESS", ["2001:db8::1"]),
    ("connect to ::1", "IP_ADDRESS", ["::1"]),
    ("x::ffff:192.0.2.1", "IP_ADDRESS", ["192.0.2.1"]),
    # MAC and crypto
    ("3c:22:fb:9a:10:5e", "MAC_ADDRESS", ["3c:22:fb:9a:10:5e"]),
    ("3C-22-FB-9A-10-5E.", "MAC_ADDRESS", ["3C-22-FB-9A-10-5E"]),
    ("3c22.fb9a.105e", "MAC_ADDRESS", ["3c22.fb9a.105e"]),
    (f"send to {BITCOIN_P2PKH}", "CRYPTO", [BITCOIN_P2PKH]),
    (f"wallet {BITCOIN_BECH32}", "CRYPTO", [BITCOIN_BECH32]),
    (BITCOIN_BECH32.upper(), "CRYPTO", [BITCOIN_BECH32.upper()]),
    # national identifiers
    ("AB 12 34 56 C", "UK_NINO", ["AB 12 34 56 C"]),
    ("national insurance AB123456C", "UK_NINO", ["AB123456C"]),
    ("NHS number 666 193 4514", "UK_NHS", ["666 193 4514"]),
    ("DNI 93390824Z", "ES_NIF", ["93390824Z"]),
    ("93390824-z", "ES_NIF", ["93390824-z"]),
    ("NIE X3108355C", "ES_NIE", ["X3108355C"]),
    ("Z-1476584-N", "ES_NIE", ["Z-1476584-N"]),
    ("codice fiscale IIQDFC17C15B260M", "IT_FISCAL_CODE", ["IIQDFC17C15B260M"]),
    ("aadhaar 6460 0974 8358", "IN_AADHAAR", ["6460 0974 8358"]),
    ("ABCPE1234F", "IN_PAN", ["ABCPE1234F"]),
    ("TFN 977 781 880", "AU_TFN", ["977 781 880"]),
    ("91 771 988 403", "AU_ABN", ["91 771 988 403"]),
    ("ABN 91771988403", "AU_ABN", ["91771988403"]),
    ("ACN 495 318 191", "AU_ACN", ["495 318 191"]),
    ("Medicare 4395 36561 5", "AU_MEDICARE", ["4395 36561 5"]),
    ("F3647488L", "SG_NRIC_FIN", ["F3647488L"]),
    ("680512-2782528", "KR_RRN", ["680512-2782528"]),
    ("231293-190M", "FI_PERSONAL_IDENTITY_CODE", ["231293-190M"]),
    ("660723-6749", "SE_PERSONNUMMER", ["660723-6749"]),
    ("19660723-6749", "SE_PERSONNUMMER", ["19660723-6749"]),
    ("card 4539.5260.1815.9083", "CREDIT_CARD", ["4539.5260.1815.9083"]),
    ("PESEL 85061209654", "PL_PESEL", ["85061209654"]),
    ("personnummer 196607236749", "SE_PERSONNUMMER", ["196607236749"]),
    ("NPI 1842265104", "US_NPI", ["1842265104"]),
    ("routing number 046730774", "ABA_ROUTING_NUMBER", ["046730774"]),
    ("SIN 223 677 535", "CA_SIN", ["223 677 535"]),
    ("Steuer-ID 64926583670", "DE_TAX_ID", ["64926583670"]),
    ("Thai ID 1109671724881", "TH_TNIN", ["1109671724881"]),
    ("1-1096-71724-88-1", "TH_TNIN", ["1-1096-71724-88-1"]),
    ("8902287824089", "ZA_ID_NUMBER", ["8902287824089"]),
    ("2HK7-QT9-WX55", "US_MBI", ["2HK7-QT9-WX55"]),
]


@BOTH_PATHS
@pytest.mark.parametrize(("text", "entity_type", "expected"), POSITIVES)
def test_entity_found(detector: PiiDetector, text: str, entity_type: str, expected: list[str]) -> None:
    assert values(detector, text, entity_type) == expected


NEGATIVES = [
    # email
    ("name@localhost", "EMAIL_ADDRESS"),
    ("a@b.c", "EMAIL_ADDRESS"),
    ("user@", "EMAIL_ADDRESS"),
    ("@example.com", "EMAIL_ADDRESS"),
    ("alice@example.com2", "EMAIL_ADDRESS"),
    ("alice@example.c0m", "EMAIL_ADDRESS"),
    ("alice..smith@example.com", "EMAIL_ADDRESS"),
    (".alice@example.com", "EMAIL_ADDRESS"),
    ("alice.@example.com", "EMAIL_ADDRESS"),
    ("alice@-example.com", "EMAIL_ADDRESS"),
    ("package@1.2.3", "EMAIL_ADDRESS"),
    ("version 1.2.3 released 2024-01-15T10:30:00Z", "EMAIL_ADDRESS"),
    ("x" * 65 + "@example.com", "EMAIL_ADDRESS"),
    ("a@" + "b." * 9 + "com", "EMAIL_ADDRESS"),
    ("@mention and a@ and @@", "EMAIL_ADDRESS"),
    ("my email is info@presidio.", "EMAIL_ADDRESS"),
    # payment cards: Luhn failures, unknown issuers, wrong lengths and parts of longer numbers
    ("4111111111111112", "CREDIT_CARD"),
    ("4111 1111 1111 1112", "CREDIT_CARD"),
    ("1111111111111117", "CREDIT_CARD"),
    ("7111111111111111", "CREDIT_CARD"),
    ("41111111111111111111", "CREDIT_CARD"),
    ("4111111111111111111", "CREDIT_CARD"),
    ("1234 4111 1111 1111 1111", "CREDIT_CARD"),
    ("4111 1111 1111 1111 1111", "CREDIT_CARD"),
    ("4111 1111 1111 1111 123", "CREDIT_CARD"),
    ("4111  1111  1111  1111", "CREDIT_CARD"),
    ("4111 1111-1111 1111", "CREDIT_CARD"),
    ("0.4111111111111111", "CREDIT_CARD"),
    ("4111111111111111.5", "CREDIT_CARD"),
    ("ORD-2024-4111111111111111", "CREDIT_CARD"),
    ("4111111111111111-01", "CREDIT_CARD"),
    ("123e4567-e89b-12d3-a456-426614174000", "CREDIT_CARD"),
    ("42345678-4234-5678-9234-567812345678", "CREDIT_CARD"),
    ("ORD-2024-000123", "CREDIT_CARD"),
    ("1700000000000 ms since epoch", "CREDIT_CARD"),
    ("version 4.11.1111 and v2.10.4", "CREDIT_CARD"),
    ("+1 (555) 123-4567", "CREDIT_CARD"),
    ("675912345674", "CREDIT_CARD"),
    # phone numbers: dates, times, versions, IPs, long runs, amounts
    ("2024-01-15", "PHONE_NUMBER"),
    ("15/01/2024 and 01.02.2023", "PHONE_NUMBER"),
    ("1999-2024", "PHONE_NUMBER"),
    ("at 10:30:45", "PHONE_NUMBER"),
    ("version 10.2.13.4567", "PHONE_NUMBER"),
    ("10.20.30.40", "PHONE_NUMBER"),
    ("12345678901234567890", "PHONE_NUMBER"),
    ("1234567", "PHONE_NUMBER"),
    ("2125550187", "PHONE_NUMBER"),
    ("population 1 234 567", "PHONE_NUMBER"),
    ("invoice 212-555-0187", "PHONE_NUMBER"),
    ("ISBN 978-3-16-148410-0", "PHONE_NUMBER"),
    ("uuid 123e4567-e89b-12d3-a456-426614174000", "PHONE_NUMBER"),
    ("timestamp 1700000000", "PHONE_NUMBER"),
    ("536-22-8726", "PHONE_NUMBER"),
    ("4111 1111 1111 1111", "PHONE_NUMBER"),
    ("+1 2", "PHONE_NUMBER"),
    # US SSN: invalid area, group or serial, placeholders, bare without context, longer runs
    ("000-12-3456", "US_SSN"),
    ("666-12-3456", "US_SSN"),
    ("912-12-3456", "US_SSN"),
    ("536-00-8726", "US_SSN"),
    ("536-22-0000", "US_SSN"),
    ("123-45-6789", "US_SSN"),
    ("987-65-4321", "US_SSN"),
    ("078-05-1120", "US_SSN"),
    ("111-11-1111", "US_SSN"),
    ("536228726", "US_SSN"),
    ("536-22-87261", "US_SSN"),
    ("1536-22-8726", "US_SSN"),
    ("536-22-8726-4", "US_SSN"),
    ("536 22 8726 44", "US_SSN"),
    ("536-22 8726", "US_SSN"),
    ("order 536-22-8726", "US_SSN"),
    ("912-12-3456", "US_ITIN"),
    # IBAN: bad checksums, unknown countries, bad lengths and formats
    ("GB82 WEST 1234 5698 7654 33", "IBAN_CODE"),
    ("DE89 3704 0044 0532 0130 01", "IBAN_CODE"),
    ("XX82WEST12345698765432", "IBAN_CODE"),
    ("GB82 WEST 1234 5698 7654", "IBAN_CODE"),
    ("NL91 ABNA 0417 1643 0A", "IBAN_CODE"),
    ("GB82 WEST-1234 5698 7654 32", "IBAN_CODE"),
    ("XGB82WEST12345698765432", "IBAN_CODE"),
    # IP addresses
    ("256.1.1.1", "IP_ADDRESS"),
    ("my ip: 192.168.0", "IP_ADDRESS"),
    ("1.2.3.4.5", "IP_ADDRESS"),
    ("Version 1.2.3.4", "IP_ADDRESS"),
    ("v1.2.3.4", "IP_ADDRESS"),
    ("build 10.0.19041.1", "IP_ADDRESS"),
    ("std::cout", "IP_ADDRESS"),
    ("MyClass::toString", "IP_ADDRESS"),
    ("Time 12:34:56", "IP_ADDRESS"),
    ("2001::db8::1", "IP_ADDRESS"),
    ("a::b", "IP_ADDRESS"),
    ("x[::2]", "IP_ADDRESS"),
    ("::", "IP_ADDRESS"),
    ("00:11:22:33:44:55", "IP_ADDRESS"),
    # MAC and crypto
    ("00:00:00:00:00:00", "MAC_ADDRESS"),
    ("ff:ff:ff:ff:ff:ff", "MAC_ADDRESS"),
    ("00:11:22:33:44", "MAC_ADDRESS"),
    ("00:11-22:33:44:55", "MAC_ADDRESS"),
    ("00:11:22:33:44:55:66", "MAC_ADDRESS"),
    ("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN3", "CRYPTO"),
    (BITCOIN_BECH32[:-1] + "q", "CRYPTO"),
    ("bc1Qskpa0r28h70cx0qd63tc2yguggqqdd22enexnu", "CRYPTO"),
    ("8f953371d3e85eddb89b05ed6b9e680791055315c73e1025ab5dba7bb2aee189", "CRYPTO"),
    # national identifiers: bad checks, invalid prefixes and dates
    ("BG 12 34 56 C", "UK_NINO"),
    ("DA123456C", "UK_NINO"),
    ("AB123456E", "UK_NINO"),
    ("AB12345C", "UK_NINO"),
    ("NHS number 666 193 4515", "UK_NHS"),
    ("6661934514", "UK_NHS"),
    ("93390824A", "ES_NIF"),
    ("X3108355D", "ES_NIE"),
    ("IIQDFC17C15B260N", "IT_FISCAL_CODE"),
    ("aadhaar 6460 0974 8359", "IN_AADHAAR"),
    ("ABCXE1234F", "IN_PAN"),
    ("TFN 977 781 881", "AU_TFN"),
    ("91 771 988 404", "AU_ABN"),
    ("Medicare 4395 36562 5", "AU_MEDICARE"),
    ("F3647488M", "SG_NRIC_FIN"),
    ("681312-2782528", "KR_RRN"),
    ("231293-190N", "FI_PERSONAL_IDENTITY_CODE"),
    ("660723-6748", "SE_PERSONNUMMER"),
    ("85061209655", "PL_PESEL"),
    # Addresses that identify no host, and meeting ids.
    ("netmask 255.255.255.0", "IP_ADDRESS"),
    ("curl http://127.0.0.1:8080/health", "IP_ADDRESS"),
    ("Meeting ID: 812 3456 7890", "PHONE_NUMBER"),
    # Log lines, timestamps and version strings.
    ("started_at 202403150010", "SE_PERSONNUMMER"),
    ("Reference 204805620871", "SE_PERSONNUMMER"),
    ("2024-03-16 19:59:35,641 INFO worker started", "PHONE_NUMBER"),
    ("2024-03-16T19:59:35Z request done", "PHONE_NUMBER"),
    ("Mozilla/5.0 Chrome/124.0.6367.91 Safari/537.36", "PHONE_NUMBER"),
    ("Edge 123.0.2420.97 and 2.4.10.1", "PHONE_NUMBER"),
    ("10.28.46.22 - - GET /api/v1/items/222528 200 79634", "PHONE_NUMBER"),
    ("NPI 1842265105", "US_NPI"),
    ("046730774", "ABA_ROUTING_NUMBER"),
    ("SIN 046 454 286", "CA_SIN"),
    ("Steuer-ID 64926583671", "DE_TAX_ID"),
    ("Thai ID 1109671724882", "TH_TNIN"),
    ("8902287824088", "ZA_ID_NUMBER"),
    ("1SG4-TE5-MK73", "US_MBI"),
    ("2HK7-QT9WX55", "US_MBI"),
]


@BOTH_PATHS
@pytest.mark.parametrize(("text", "entity_type"), NEGATIVES)
def test_entity_not_found(detector: PiiDetector, text: str, entity_type: str) -> None:
    assert values(detector, text, entity_type) == []


@BOTH_PATHS
@pytest.mark.parametrize(
    ("text", "entity_type", "score"),
    [
        ("ssn 536228726", "US_SSN", 0.85),
        ("Social Security Numbers: 536228726", "US_SSN", 0.85),
        ("536-22-8726", "US_SSN", 0.6),
        ("10.1.2.3", "IP_ADDRESS", 0.85),
        ("version 10.1.2.3", "IP_ADDRESS", 0.4),
        ("release v 10.1.2.3", "IP_ADDRESS", 0.4),
        (VISA, "CREDIT_CARD", 1.0),
        ("order 4111111111111111", "CREDIT_CARD", 0.55),
        ("2125550187", "PHONE_NUMBER", 0.3),
        ("cell: 2125550187", "PHONE_NUMBER", 0.85),
        ("+44 20 7946 0958", "PHONE_NUMBER", 0.95),
        ("(212) 555-0187", "PHONE_NUMBER", 0.75),
        ("977 781 880", "AU_TFN", 0.4),
        # A Swedish number whose last four digits read as a time of day needs a context word.
        ("196607231005", "SE_PERSONNUMMER", 0.45),
        ("personnummer 196607231005", "SE_PERSONNUMMER", 1.0),
        ("196607236749", "SE_PERSONNUMMER", 0.85),
        ("85061209654", "PL_PESEL", 0.5),
        ("91771988403", "AU_ABN", 0.5),
        ("tax file number 977 781 880", "AU_TFN", 0.95),
    ],
)
def test_context_sets_score(detector: PiiDetector, text: str, entity_type: str, score: float) -> None:
    scores = [f.score for f in detector.scan(text) if f.entity_type == entity_type]
    assert scores == [score]


def test_context_window_is_40_chars() -> None:
    near = "ssn" + " " * 37 + "536228726"
    far = "ssn" + " " * 38 + "536228726"
    assert values(HYPERSCAN, near, "US_SSN") == ["536228726"]
    assert values(HYPERSCAN, far, "US_SSN") == []


@BOTH_PATHS
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Grüße 👋 alice@example.com", [("EMAIL_ADDRESS", "alice@example.com")]),
        ("卡号 4111 1111 1111 1111，邮箱 bob@test.org", [("CREDIT_CARD", "4111 1111 1111 1111"), ("EMAIL_ADDRESS", "bob@test.org")]),
        ("ćč 10.0.0.1 ü 2001:db8::1 é", [("IP_ADDRESS", "10.0.0.1"), ("IP_ADDRESS", "2001:db8::1")]),
        ("Ärger: +44 20 7946 0958 — café", [("PHONE_NUMBER", "+44 20 7946 0958")]),
        ("josé@example.com", []),
    ],
)
def test_offsets_after_non_ascii(detector: PiiDetector, text: str, expected: list[tuple[str, str]]) -> None:
    found = [(f.entity_type, text[f.start : f.end]) for f in detector.scan(text) if f.score >= THRESHOLD]
    assert found == expected


@BOTH_PATHS
@pytest.mark.parametrize(
    ("detector_kwargs", "text", "expected"),
    [
        ({"allow_values": ["Support@Example.com"]}, "mail support@example.com or bob@test.org", ["bob@test.org"]),
        ({"allow_values": ["4111 1111 1111 1111"]}, "4111 1111 1111 1111 and 4111111111111111", ["4111111111111111"]),
        ({"allow_values": ["10.0.0.1"]}, "10.0.0.1 and 10.0.0.2", ["10.0.0.2"]),
        ({"allow_patterns": [r".*@example\.com"]}, "a@example.com b@example.org", ["b@example.org"]),
        ({"allow_patterns": ["example"]}, "a@example.com", ["a@example.com"]),
        ({"allow_patterns": [r"10\.0\.\d+\.\d+"]}, "10.0.3.4 and 192.168.0.1", ["192.168.0.1"]),
    ],
)
def test_allow_list(detector: PiiDetector, detector_kwargs: dict[str, list[str]], text: str, expected: list[str]) -> None:
    allowing = PiiDetector(**detector_kwargs, use_hyperscan=detector.uses_hyperscan)
    found = [text[f.start : f.end] for f in allowing.scan(text) if f.score >= THRESHOLD]
    assert found == expected


def test_allow_value_is_case_sensitive_except_emails() -> None:
    allowing = PiiDetector(allow_values=["ab123456c"])
    assert values(allowing, "AB123456C", "UK_NINO") == ["AB123456C"]


def test_invalid_allow_pattern_raises() -> None:
    with pytest.raises(re.error, match="missing \\)"):
        PiiDetector(allow_patterns=["(unclosed"])


def test_empty_phone_regions_raises() -> None:
    with pytest.raises(ValueError, match="phone_regions"):
        PiiDetector(phone_regions=[])


def test_phone_regions_configurable() -> None:
    # "0487 98 11 92" is a Belgian mobile number written in national format.
    text = "0487 98 11 92"
    assert values(PiiDetector(phone_regions=["BE"]), text, "PHONE_NUMBER") == [text]
    assert values(PiiDetector(phone_regions=["US"]), text, "PHONE_NUMBER") == []


@BOTH_PATHS
def test_finding_fields(detector: PiiDetector) -> None:
    email = only_finding(detector, "alice@example.com")
    card = only_finding(detector, VISA)
    assert email.detector == "pii"
    assert (email.entity_type, email.score, email.rule) == ("EMAIL_ADDRESS", 1.0, "email_address")
    assert (email.start, email.end) == (0, len("alice@example.com"))
    assert (card.entity_type, card.score, card.rule) == ("CREDIT_CARD", 1.0, "credit_card_luhn")


@BOTH_PATHS
def test_findings_sorted_and_disjoint(detector: PiiDetector) -> None:
    text = (
        f"{VISA} alice@example.com {MASTERCARD} bob@test.org 10.0.0.1 +44 20 7946 0958 "
        "536-22-8726 GB82 WEST 1234 5698 7654 32 2001:db8::1 3c:22:fb:9a:10:5e"
    )
    findings = detector.scan(text)
    assert [f.start for f in findings] == sorted(f.start for f in findings)
    assert all(a.end <= b.start for a, b in itertools.pairwise(findings))
    assert len(findings) == 10
    assert {f.entity_type for f in findings} <= detector.entity_types


def test_entity_types_use_presidio_names() -> None:
    expected = {
        "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS", "UK_NINO", "UK_NHS",
        "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "IN_AADHAAR", "IN_PAN", "AU_TFN", "AU_ABN", "AU_ACN", "AU_MEDICARE",
        "SG_NRIC_FIN", "KR_RRN", "FI_PERSONAL_IDENTITY_CODE", "SE_PERSONNUMMER", "PL_PESEL", "US_ITIN", "US_NPI",
        "ABA_ROUTING_NUMBER", "CA_SIN", "DE_TAX_ID", "TH_TNIN", "ZA_ID_NUMBER", "CRYPTO", "MAC_ADDRESS", "US_MBI",
    }  # fmt: skip
    assert HYPERSCAN.entity_types == expected
    assert HYPERSCAN.name == "pii"


# -- Hyperscan and the re fallback ---------------------------------------------------------


def test_hyperscan_used_by_default() -> None:
    assert PiiDetector().uses_hyperscan
    assert not REGEX.uses_hyperscan


def test_fallback_when_hyperscan_missing(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(pii, "hyperscan", None)
    monkeypatch.setattr(pii, "_fallback_logged", threading.Event())
    with caplog.at_level(logging.WARNING, logger="extguard.scan.pii"):
        first = PiiDetector()
        second = PiiDetector()
    assert not first.uses_hyperscan
    assert not second.uses_hyperscan
    assert [record.getMessage() for record in caplog.records] == [
        "Hyperscan is unavailable (the hyperscan package is not installed); "
        "the PII detector uses Python re, which is slower"
    ]
    assert values(first, "mail alice@example.com", "EMAIL_ADDRESS") == ["alice@example.com"]


def test_forced_hyperscan_without_package_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pii, "hyperscan", None)
    with pytest.raises(RuntimeError, match="hyperscan package is not installed"):
        PiiDetector(use_hyperscan=True)


def test_fallback_when_database_fails(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def reject_database(self: object, specs: object) -> None:
        raise pii.hyperscan.error("unsupported CPU")

    monkeypatch.setattr(pii._HyperscanMatcher, "__init__", reject_database)
    monkeypatch.setattr(pii, "_fallback_logged", threading.Event())
    with caplog.at_level(logging.WARNING, logger="extguard.scan.pii"):
        detector = PiiDetector()
    assert not detector.uses_hyperscan
    assert "unsupported CPU" in caplog.text


@pytest.mark.parametrize(
    "text",
    [
        "x@a.b@c.example.org and a@b.co.uk.",
        "5.+1 415 555 2671 and 4111 4111 4111 4111 4111 4111",
        "1234 4111 1111 1111 1111, 0487 98 11 92 12 13",
        "ab12 -192.168.0.1+6789+078-05-1120ab126789xx.y@ex-ample.com)",
        "v1.2.3.4.5 1.2.3.4:5 ::ffff:1.2.3.4 a:b::c:d",
        # Phone numbers glued to letters or signs on the left, where Hyperscan's leftmost start is
        # not a valid start and a later one is.
        "ab1 415 555 0199, x+1 415 555 0199, 7a(212) 555-0187, _+44 20 7946 0958, 1.-415 555 0199",
    ],
)
def test_paths_agree(text: str) -> None:
    assert HYPERSCAN.scan(text) == REGEX.scan(text)


# -- streams and pending_chars -------------------------------------------------------------

MASKER = Masker(b"test-hash-key")
STREAM_TEXTS = [
    "Hi, mail alice.smith@example.com or call +1 (212) 555-0187 ext. 12; card 4111 1111 1111 1111.",
    "IBAN GB82 WEST 1234 5698 7654 32, ssn 536-22-8726, host 10.0.0.1 and 2001:db8::1.",
    "version 10.1.2.3, order 4111111111111111, NINO AB 12 34 56 C, tfn 977 781 880, 3c:22:fb:9a:10:5e",
    "Grüße — bob@test.org, wallet bc1qskpa0r28h70cx0qd63tc2yguggqqdd22enexnu, phone 2125550187 x",
    "near misses 4111 1111 1111 1111 123, 2024-01-15, 1.2.3.4.5, alice@example.com2 and 0.4111111111111111",
]


def stream_through(pieces: list[str], rules: list[ScanRule]) -> tuple[str, list[tuple[str, int, int]]]:
    guard = StreamGuard(rules, MASKER, None, restore_pseudonyms=False)
    released: list[str] = []
    hits: list[tuple[str, int, int]] = []
    for chunk in [*(guard.feed(piece) for piece in pieces), guard.flush()]:
        released.append(chunk.text)
        hits.extend((hit.finding.entity_type, hit.finding.start, hit.finding.end) for hit in chunk.hits)
    return "".join(released), hits


@BOTH_PATHS
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_equals_whole_text(detector: PiiDetector, text: str) -> None:
    rules = [ScanRule("pii", detector, Action.MASK, score_threshold=THRESHOLD)]
    whole = guard_text(text, rules, MASKER, None)
    expected_hits = [(hit.finding.entity_type, hit.finding.start, hit.finding.end) for hit in whole.hits]

    for cut in range(1, len(text)):
        released, hits = stream_through([text[:cut], text[cut:]], rules)
        assert released == whole.text, cut
        assert hits == expected_hits, cut
    released, hits = stream_through(list(text), rules)
    assert released == whole.text
    assert hits == expected_hits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("hello world ", 0),
        ("hello world.", len("world.")),
        ("hello wor", len("wor")),
        ("write to alice@exa", len("alice@exa")),
        ("call +1 415 55", len("+1 415 55")),
        ("call (212) ", len("(212) ")),
        ("call 212-555-0187 ex", len("212-555-0187 ex")),
        ("call 212-555-0187 x12", len("212-555-0187 x12")),
        ("ip 10.0.0.", len("10.0.0.")),
        ("card 4111 1111 ", len("4111 1111 ")),
        ("IBAN DE89 3704 00", len("DE89 3704 00")),
        ("NINO AB 12 34", len("AB 12 34")),
        ("in 2024", len("in 2024")),
        ("x" * 1000, 90),
        ("a@" + "b" * 1000, 90),
        ("a@" + "b" * 200, 202),
        ("1 " * 50, 48),
        ("hello (", 1),
        ("hello +", 1),
    ],
)
def test_pending_chars(text: str, expected: int) -> None:
    assert HYPERSCAN.pending_chars(text) == expected


def test_pending_chars_bounded() -> None:
    text = " ".join(STREAM_TEXTS) + " " + "a" * 400 + "@" + "b" * 400
    for end in range(len(text) + 1):
        assert 0 <= HYPERSCAN.pending_chars(text[:end]) <= 319


# -- pathological inputs -------------------------------------------------------------------


@BOTH_PATHS
@pytest.mark.parametrize(
    "text",
    ["0123456789" * 100_000, "a@" * 500_000, "1." * 500_000],
    ids=["digits", "a-at", "one-dot"],
)
def test_megabyte_input_scans(detector: PiiDetector, text: str) -> None:
    assert detector.scan(text) == []
    assert detector.pending_chars(text) >= 0


@pytest.mark.parametrize(
    "text",
    [
        "4" * 1_000_000,
        "a" * 1_000_000,
        "a." * 500_000,
        "a@b." * 250_000,
        "4111 " * 200_000,
        " " * 1_000_000,
        "ab12" * 250_000,
        "1:" * 500_000,
        "12-" * 333_333,
        "(1)" * 333_333,
    ],
    ids=["fours", "letters", "a-dot", "a-at-b-dot", "card-groups", "spaces", "ab12", "colons", "dashes", "parens"],
)
def test_megabyte_input_scans_hyperscan(text: str) -> None:
    assert [f for f in HYPERSCAN.scan(text) if f.score >= THRESHOLD] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgres://admin:S3cr3tPassw0rd@db.internal:5432/app", []),
        ("mongodb+srv://app:Pa55w0rdXyz@cluster0.example.net/db", []),
        ("https://user:hunter2abc@example.com/path", []),
        ("ftp://user:secret@files.example.net/x", []),
        # Schemes the secrets detector does not know keep the e-mail finding, which still masks
        # the password.
        ("foo://user:hunter2abc@example.com/path", ["hunter2abc@example.com"]),
        ("mailto:bob@example.com", ["bob@example.com"]),
        ("Email:bob@example.com", ["bob@example.com"]),
        # User names in URLs and Git remotes.
        ("see http://bob@example.com", []),
        ("git clone git@github.com:acme/repo.git", []),
        ("ssh://git@gitlab.com/acme/repo.git", []),
        ("https://ghp_x1y2z3@github.com/acme/repo", []),
        ("write to bob@example.com: it works", ["bob@example.com"]),
    ],
)
def test_url_password_is_not_an_email(text: str, expected: list[str]) -> None:
    findings = PiiDetector().scan(text)

    assert [text[f.start : f.end] for f in findings if f.entity_type == "EMAIL_ADDRESS"] == expected
