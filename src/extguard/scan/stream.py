"""Incremental guarding of one streamed text channel, such as choice 0's content.

Contract: when no hit blocks, the concatenated `text` of every chunk that `feed` and `flush`
return equals `guard_text(whole, rules, masker, vault).text` (then `vault.restore` of it when
`restore_pseudonyms` is set), for any split of `whole` into deltas. The concatenated `hits`
equal `guard_text(...).hits`, with offsets into the whole channel text. This is true as long as
each detector's `pending_chars` covers every match that could still grow (see CONTEXT_CHARS).

How: each call rescans the held text plus up to `CONTEXT_CHARS` of already released text, so
look-behinds and word boundaries at the start of the held text see what came before. The
scanner then releases everything except the trailing `pending_chars` of the detectors. It
moves the cut back to the start of any hit that crosses it. When restoring, it also moves the
cut back to the start of a pseudonym token that crosses it, which holds back a token prefix at
the end too. Hits that end after the previous cut and at or before the new cut are reported
and masked exactly once. Restoring runs on released text only, so restored values are never
scanned.

When a hit blocks, that call returns it in `blocking` and releases nothing more. The caller is
expected to end the stream. Later calls return empty chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extguard.scan.engine import Action, Hit, ScanRule, apply_masks, collect_hits, merge_mask_spans
from extguard.scan.findings import Detector, Finding
from extguard.scan.redact import Masker, PseudonymVault

# Released input chars kept for rescans. They let look-behinds at the start of the held text see
# what came before, and let a hit that starts in released text and ends in held text be found
# whole. Such a hit exists only when a detector's `pending_chars` returned less than the rest of
# it. NOTE: of the inline detectors only InjectionDetector does that, for a phrase padded with
# whitespace runs longer than its pending limit. A stream can miss such a phrase, or mask it only
# from the cut on.
CONTEXT_CHARS = 64
# A rescan cannot show the detectors what came before the context, so a look-behind or word
# boundary in the first chars of the window may pass where it fails on the whole text ("-sk-..."
# seen as "sk-..."). Hits starting in these first chars are dropped. They were judged, with full
# context, before they were released. The PII and injection patterns look behind at most 4
# chars. The secrets detector reads up to 48 chars before a value (the name it is assigned to),
# and CONTEXT_CHARS covers that. NOTE: equality with whole-text results for secrets rests on that
# margin and on randomized stream tests, not on a proof.
_UNSEEN_CONTEXT_CHARS = 8


@dataclass(slots=True)
class StreamChunk:
    """The result of one `feed` or `flush`.

    `text` is what to send to the client now: masked and, when requested, with pseudonyms
    restored. `hits` are the hits that became final in this call and `blocking` the BLOCK ones
    among them. `held_chars` is the number of input chars still held back after the call.
    """

    text: str
    hits: list[Hit]
    blocking: list[Hit]
    held_chars: int


class StreamGuard:
    """Guards one text channel of a streamed response. Not thread-safe.

    `max_held_chars` is the largest `held_chars` of any chunk so far, the extra delay in chars
    that the hold-back added.
    """

    __slots__ = (
        "_rules",
        "_detectors",
        "_masker",
        "_vault",
        "_restore_pseudonyms",
        "_context",
        "_held_text",
        "_released_chars",
        "_blocked",
        "_flushed",
        "max_held_chars",
    )

    def __init__(
        self,
        rules: Sequence[ScanRule],
        masker: Masker,
        vault: PseudonymVault | None,
        *,
        restore_pseudonyms: bool,
    ) -> None:
        """Raise ValueError when `restore_pseudonyms` is set without a vault."""
        if restore_pseudonyms and vault is None:
            raise ValueError("restore_pseudonyms needs the exchange's vault, but vault is None")

        self._rules = tuple(rules)
        distinct: dict[int, Detector] = {id(rule.detector): rule.detector for rule in self._rules}
        self._detectors = tuple(distinct.values())
        self._masker = masker
        self._vault = vault
        self._restore_pseudonyms = restore_pseudonyms

        self._context = ""  # the last released input chars, unmasked
        self._held_text = ""
        self._released_chars = 0  # input chars released so far, the stream offset of `_held_text`
        self._blocked = False
        self._flushed = False
        self.max_held_chars = 0

    def feed(self, delta: str) -> StreamChunk:
        """Add `delta` and return what can be released now.

        Raises RuntimeError after `flush`, because the channel has ended.
        """
        if self._flushed:
            raise RuntimeError("feed called after flush: the channel has ended")
        if self._blocked:
            return StreamChunk("", [], [], len(self._held_text))
        if not delta:
            return StreamChunk("", [], [], len(self._held_text))

        self._held_text += delta
        return self._release(final=False)

    def flush(self) -> StreamChunk:
        """Scan and release everything still held. Later calls return empty chunks."""
        if self._blocked or self._flushed:
            return StreamChunk("", [], [], len(self._held_text))

        chunk = self._release(final=True)
        self._flushed = True
        return chunk

    def _release(self, *, final: bool) -> StreamChunk:
        window = self._context + self._held_text
        offset = len(self._context)
        window_hits = self._scan(window, offset)
        cut = len(window) if final else self._find_cut(window, offset, window_hits)

        # Hits ending at or before `offset` were final, and reported, in an earlier call.
        final_hits = [hit for hit in window_hits if offset < hit.finding.end <= cut]
        hits = self._to_stream_offsets(final_hits, offset)
        blocking = [hit for hit in hits if hit.rule.action == Action.BLOCK]
        if blocking:
            self._blocked = True
            return StreamChunk("", hits, blocking, len(self._held_text))

        spans = merge_mask_spans(final_hits, clip_start=offset)
        text = apply_masks(window, spans, self._masker, self._vault, offset, cut)
        if self._restore_pseudonyms and self._vault is not None:
            text = self._vault.restore(text)

        self._released_chars += cut - offset
        self._context = window[max(0, cut - CONTEXT_CHARS) : cut]
        self._held_text = window[cut:]
        held_chars = len(self._held_text)
        if held_chars > self.max_held_chars:
            self.max_held_chars = held_chars
        return StreamChunk(text, hits, [], held_chars)

    def _scan(self, window: str, offset: int) -> list[Hit]:
        if not self._rules:
            return []

        hits = collect_hits(window, self._rules)
        window_starts_in_stream = self._released_chars == offset
        if window_starts_in_stream or not hits or hits[0].finding.start >= _UNSEEN_CONTEXT_CHARS:
            return hits
        return [hit for hit in hits if hit.finding.start >= _UNSEEN_CONTEXT_CHARS]

    def _find_cut(self, window: str, offset: int, hits: list[Hit]) -> int:
        """Return the window index up to which text is final and can be released.

        The cut never moves before `offset`, the start of the held text.
        """
        pending = 0
        for detector in self._detectors:
            pending = max(pending, detector.pending_chars(window))
        cut = len(window) - min(pending, len(window) - offset)

        while True:
            moved = cut
            for hit in hits:
                if hit.finding.start < moved < hit.finding.end:
                    moved = max(hit.finding.start, offset)
            if self._restore_pseudonyms and self._vault is not None and moved > offset:
                # Restoring chunk by chunk equals restoring the whole only if no token is split,
                # whether by the end of the input so far or by a detector's hold-back.
                moved -= self._vault.pending_chars(window[offset:moved])
            if moved == cut:
                return cut
            cut = moved

    def _to_stream_offsets(self, hits: list[Hit], offset: int) -> list[Hit]:
        shift = self._released_chars - offset
        if shift == 0:
            return hits
        return [Hit(hit.rule, _shift_finding(hit.finding, shift)) for hit in hits]


def _shift_finding(finding: Finding, shift: int) -> Finding:
    return Finding(
        finding.detector,
        finding.entity_type,
        finding.start + shift,
        finding.end + shift,
        finding.score,
        finding.rule,
    )
