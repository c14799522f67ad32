"""Detection and masking of PII, secrets and prompt injection in LLM traffic text."""

from extguard.scan.detectors import default_detectors
from extguard.scan.secrets import SecretDetector
from extguard.scan.injection import InjectionDetector
from extguard.scan.pii import PiiDetector
from extguard.scan.engine import Action, Hit, ScanRule, TextGuardResult, guard_text
from extguard.scan.findings import Detector, Finding
from extguard.scan.redact import Masker, MaskStyle, PseudonymVault
from extguard.scan.stream import StreamChunk, StreamGuard

__all__ = [
    "Action",
    "Detector",
    "Finding",
    "Hit",
    "InjectionDetector",
    "MaskStyle",
    "Masker",
    "PiiDetector",
    "PseudonymVault",
    "ScanRule",
    "SecretDetector",
    "StreamChunk",
    "StreamGuard",
    "TextGuardResult",
    "default_detectors",
    "guard_text",
]
