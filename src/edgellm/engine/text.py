"""Turning sampled tokens into client-visible text: UTF-8 reassembly and stop strings."""

from __future__ import annotations

import codecs


class TextStream:
    """Incremental detokenizer for one request.

    Token pieces are raw bytes and a multi-byte character may span tokens, so bytes go through
    an incremental UTF-8 decoder. Text that could be the start of a stop string is held back
    until it is known not to be one: a client never sees a partial stop string.
    """

    __slots__ = ("_decoder", "_held", "_stops", "emitted")

    def __init__(self, stops: tuple[str, ...]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stops if s)
        self._held = ""  # decoded text not yet released
        self.emitted = ""  # everything released so far

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add a token's bytes; return (text safe to release now, whether a stop string hit)."""
        self._held += self._decoder.decode(piece)
        if not self._stops:
            return self._release(len(self._held)), False
        cut = self._find_stop()
        if cut is not None:
            delta = self._held[:cut]
            self._held = ""
            self.emitted += delta
            return delta, True
        return self._release(len(self._held) - self._partial_stop_len()), False

    def flush(self) -> str:
        """Release what is held at the end of generation (it was not a stop string)."""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(len(self._held))

    def _release(self, n: int) -> str:
        delta, self._held = self._held[:n], self._held[n:]
        self.emitted += delta
        return delta

    def _find_stop(self) -> int | None:
        # Only held text needs searching: any suffix that could begin a stop string was held
        # back, so a stop string can never start inside text already released.
        hits = [i for i in (self._held.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self) -> int:
        """Length of the longest held suffix that is a proper prefix of some stop string."""
        best = 0
        held = self._held
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(held)), best, -1):
                if held.endswith(stop[:k]):
                    best = k
                    break
        return best
