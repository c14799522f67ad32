"""The inline detectors that run on every request and streamed response.

Each compiles its patterns once at construction and keeps no per-call state, so one instance
serves all concurrent streams: `PiiDetector` (extguard.scan.pii), `SecretDetector`
(extguard.scan.secrets) and `InjectionDetector` (extguard.scan.injection).
"""

from __future__ import annotations

from extguard.scan.findings import Detector
from extguard.scan.injection import InjectionDetector
from extguard.scan.pii import PiiDetector
from extguard.scan.secrets import SecretDetector


def default_detectors() -> dict[str, Detector]:
    """Return one instance of each inline detector, keyed by detector name.

    Building them compiles their pattern databases, which takes a second or two: build once
    per process and share them.
    """
    detectors: tuple[Detector, ...] = (PiiDetector(), SecretDetector(), InjectionDetector())
    return {detector.name: detector for detector in detectors}
