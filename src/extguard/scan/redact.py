"""Mask styles for detected values, and the vault that maps pseudonyms back to their values."""

from __future__ import annotations

import enum
import hashlib
import hmac
import re

# Characters that PARTIAL stars. Separators stay, so the value keeps its shape ("**** **** **** 1111").
_NON_SEPARATOR = re.compile(r"[^\s.@\-]")
_PARTIAL_KEPT_CHARS = 4
_HASH_HEX_CHARS = 12
_ENTITY_TYPE = re.compile(r"[A-Za-z0-9_]+")
# Any pseudonym shape. Hash tokens contain ":" and placeholders have no number, so they do not
# match a known pseudonym and stay as they are.
_TOKEN = re.compile(r"<[A-Za-z0-9_]+>")


class MaskStyle(enum.StrEnum):
    """Replacement style for a detected value."""

    PLACEHOLDER = "placeholder"  # <EMAIL_ADDRESS>
    PARTIAL = "partial"  # ****@*******.com: the last 4 chars and the separators stay
    HASH = "hash"  # <EMAIL_ADDRESS:1f2e3d4c5b6a>: keyed hash, equal values give equal tokens
    PSEUDONYM = "pseudonym"  # <EMAIL_ADDRESS_1>: numbered per exchange, restorable from the vault


class PseudonymVault:
    """The pseudonyms of one HTTP exchange and the values they replace.

    Tokens have the form `<ENTITY_TYPE_N>`, numbered from 1 per entity type in the order they
    are minted. Equal (value, entity type) pairs get the same token. Not thread-safe: an
    exchange owns its vault.
    """

    __slots__ = ("_tokens", "_values", "_counters", "_token_prefixes", "_max_token_chars")

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, str], str] = {}
        self._values: dict[str, str] = {}
        self._counters: dict[str, int] = {}
        self._token_prefixes: set[str] = set()
        self._max_token_chars = 0

    def __len__(self) -> int:
        return len(self._values)

    def token_for(self, value: str, entity_type: str) -> str:
        """Return the token for `value`, minting the next number for `entity_type` if it is new.

        Raises ValueError when `entity_type` has characters other than ASCII letters, digits
        and underscores, because `restore` could not find such a token again.
        """
        token = self._tokens.get((entity_type, value))
        if token is not None:
            return token

        if not _ENTITY_TYPE.fullmatch(entity_type):
            raise ValueError(f"invalid entity type {entity_type!r} for a pseudonym: use letters, digits and '_'")
        number = self._counters.get(entity_type, 0) + 1
        self._counters[entity_type] = number
        token = f"<{entity_type}_{number}>"

        self._tokens[(entity_type, value)] = token
        self._values[token] = value
        self._token_prefixes.update(token[:end] for end in range(1, len(token)))
        self._max_token_chars = max(self._max_token_chars, len(token))
        return token

    def restore(self, text: str) -> str:
        """Return `text` with every token of this vault replaced by its value.

        Tokens the vault did not mint stay as they are. Restored values are not searched again.
        """
        if not self._values or "<" not in text:
            return text
        return _TOKEN.sub(self._restore_match, text)

    def pending_chars(self, text: str) -> int:
        """Return the length of the longest suffix of `text` that is a proper prefix of a token.

        Returns 0 when the vault is empty.
        """
        if not self._values:
            return 0

        index = text.find("<", max(0, len(text) - self._max_token_chars + 1))
        while index != -1:
            if text[index:] in self._token_prefixes:
                return len(text) - index
            index = text.find("<", index + 1)
        return 0

    def _restore_match(self, match: re.Match[str]) -> str:
        token = match.group()
        return self._values.get(token, token)


class Masker:
    """Replaces detected values according to a MaskStyle. Safe to share between threads."""

    __slots__ = ("_keyed_hash",)

    def __init__(self, hash_key: bytes) -> None:
        """Prepare the HMAC-SHA256 of the HASH style.

        Raises ValueError when `hash_key` is empty: without a secret key anyone could hash a
        guessed card number or address and compare it with a HASH token.
        """
        if not hash_key:
            raise ValueError("hash_key is empty: pass a secret key for the hash mask style")
        # Keyed once here. Each mask copies this state, which never changes after this line.
        self._keyed_hash = hmac.new(hash_key, digestmod=hashlib.sha256)

    def mask(self, value: str, entity_type: str, style: MaskStyle, vault: PseudonymVault | None = None) -> str:
        """Return the replacement for `value`, a detected `entity_type`, in `style`.

        PSEUDONYM mints or reuses a token in `vault` and raises ValueError when `vault` is None.
        """
        match style:
            case MaskStyle.PLACEHOLDER:
                return f"<{entity_type}>"
            case MaskStyle.PARTIAL:
                return _mask_partially(value)
            case MaskStyle.HASH:
                return f"<{entity_type}:{self._hash_hex(value)}>"
            case MaskStyle.PSEUDONYM:
                if vault is None:
                    raise ValueError(f"the pseudonym mask style needs a vault, but none was given for {entity_type}")
                return vault.token_for(value, entity_type)
        raise ValueError(f"unknown mask style {style!r}: use one of {', '.join(MaskStyle)}")

    def _hash_hex(self, value: str) -> str:
        keyed_hash = self._keyed_hash.copy()
        keyed_hash.update(value.encode("utf-8"))
        return keyed_hash.hexdigest()[:_HASH_HEX_CHARS]


def _mask_partially(value: str) -> str:
    """Star every char but the last 4 and the separators (whitespace, ".", "@", "-").

    A value of 4 chars or fewer is starred completely.
    """
    if len(value) <= _PARTIAL_KEPT_CHARS:
        return "*" * len(value)
    return _NON_SEPARATOR.sub("*", value[:-_PARTIAL_KEPT_CHARS]) + value[-_PARTIAL_KEPT_CHARS:]
