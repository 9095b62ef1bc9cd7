"""Tokenizing long prompts with llama.cpp in linear time, and a cheap lower bound on their size.

Why: llama.cpp's special-token pass (`tokenizer_st_partition`) walks its fragment list from the
head again for every special token it finds, so one tokenize call over a prompt holding N
chat-template markers costs O(N²): 20,000 short messages took 34 s, 100,000 held a worker for
minutes. Here the prompt is cut, right before a special token, into pieces of at most
`MARKERS_PER_PIECE` special tokens each, and each piece is tokenized on its own. A cut is made
only where llama.cpp's own partition of the whole text has a boundary and where nothing carries
over it (no special token spans it, no whitespace is stripped across it, and the token starting
there is the one llama.cpp would match), so the tokens are exactly those of one call.

Tokenizing piece by piece also lets the caller stop early: once a prompt has more tokens than the
context, the rest need not be counted; and a cancelled job stops between pieces.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import llama_cpp

#: Special tokens per tokenize call: each call costs O(markers²) inside llama.cpp.
MARKERS_PER_PIECE = 64
# The attributes that put a token in llama.cpp's special-token pass (its cache_special_tokens).
_SPECIAL = (
    llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
)
_STRIPS = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
_WHITESPACE = frozenset(b" \t\n\v\f\r")  # C isspace(), what llama.cpp strips
_PIECE_BUFFER = 256


@dataclass
class Counted:
    """Tokens of a text; `complete` is False when counting stopped at the limit."""

    tokens: list[int]
    complete: bool


class PromptTokenizer:
    """The tokenizer of one loaded `Llama`, special tokens parsed, in bounded pieces."""

    def __init__(self, llm):
        self._llm = llm
        vocab = llm._model.vocab
        specials: set[bytes] = set()
        strips = False
        for token in range(llm.n_vocab()):
            attr = llama_cpp.llama_vocab_get_attr(vocab, token)
            if attr & _SPECIAL:
                text = llama_cpp.llama_vocab_get_text(vocab, token)
                if text:
                    specials.add(text)
                    strips = strips or bool(attr & _STRIPS)
        self._strips = strips
        self._longest_special = max(map(len, specials), default=0)
        # Longest first: at each position the alternation then matches the longest special token.
        ordered = sorted(specials, key=lambda text: (-len(text), text))
        self._pattern = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None
        vocab_type = llama_cpp.llama_vocab_type(vocab)
        self._adds_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        # Byte-level BPE and SentencePiece cover every input byte with tokens of at most
        # `_bytes_per_token` bytes; other tokenizers normalise text (drop spaces, fold accents),
        # and stripping around special tokens drops whitespace, so no bound is known for them.
        self._bounded = vocab_type in (llama_cpp.LLAMA_VOCAB_TYPE_BPE, llama_cpp.LLAMA_VOCAB_TYPE_SPM) and not strips
        self._bytes_per_token: int | None = None

    # -- the cheap bound -------------------------------------------------------------------------

    def at_least(self, size: int) -> int:
        """A lower bound on the tokens of any text of `size` UTF-8 bytes (0 when none is known)."""
        if not self._bounded or size == 0:
            return 0
        if self._bytes_per_token is None:
            self._bytes_per_token = self._longest_piece()
        return -(-size // self._bytes_per_token)

    def _longest_piece(self) -> int:
        """The most input bytes one token can stand for (a UTF-8 character, at least)."""
        buffer = ctypes.create_string_buffer(_PIECE_BUFFER)
        vocab = self._llm._model.vocab
        longest = 4
        for token in range(self._llm.n_vocab()):
            size = llama_cpp.llama_token_to_piece(vocab, token, buffer, _PIECE_BUFFER, 0, True)
            longest = max(longest, abs(size))
        return longest

    # -- tokenization ----------------------------------------------------------------------------

    def tokenize(
        self, data: bytes, *, add_special: bool, limit: int | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Counted | None:
        """The tokens of `data` (special-token text parsed as such), as one llama.cpp call gives them.

        Stops once `limit` tokens are reached (`complete` False); None when `cancelled()` turns
        true between pieces.
        """
        tokens: list[int] = []
        first = True
        pieces = [data] if add_special and self._adds_eos else self.pieces(data)  # EOS belongs at the very end
        for piece in pieces:
            if limit is not None and len(tokens) >= limit:
                return Counted(tokens, complete=False)
            if cancelled is not None and cancelled():
                return None
            tokens.extend(self._llm.tokenize(piece, add_bos=add_special and first, special=True))
            first = False
        return Counted(tokens, complete=True)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """`data` cut at clean boundaries into pieces of at most MARKERS_PER_PIECE special tokens."""
        if self._pattern is None:
            yield data
            return
        start, markers = 0, 0
        for match in self._pattern.finditer(data):
            markers += 1
            if markers > MARKERS_PER_PIECE and self._clean_cut(data, match):
                yield data[start : match.start()]
                start, markers = match.start(), 1
        yield data[start:]

    def _clean_cut(self, data: bytes, match: re.Match) -> bool:
        """True when llama.cpp's partition of the whole `data` has a special-token fragment
        starting at `match` and nothing couples the text on either side of it."""
        at, size = match.start(), len(match.group())
        if at == 0:
            return False
        # no special token spans the cut
        for begin in range(max(0, at - self._longest_special + 1), at):
            other = self._pattern.match(data, begin)
            if other is not None and other.end() > at:
                return False
        # no special token llama.cpp tries before this one starts inside it (it would win)
        for begin in range(at + 1, at + size):
            other = self._pattern.match(data, begin)
            if other is not None and len(other.group()) >= size:
                return False
        # with l/rstrip tokens, whitespace next to the cut could be stripped across it
        return not self._strips or (data[at - 1] not in _WHITESPACE and data[at] not in _WHITESPACE)
