"""Lines of an event stream, read chunk by chunk, by the SSE specification's one rule.

A line ends at CRLF, LF or CR (HTML Living Standard, "Server-sent events", §9.2.5
"Parsing an event stream"). A stream arrives in chunks cut anywhere, so a line may span
chunks, and a CRLF may be cut between its CR and its LF: that is one line end, not a line
end and an empty line (an empty line ends an event). Everything that splits a response
stream into lines (the usage tap, the filter that withholds a usage chunk) uses this
reader, so they cannot disagree about where a line ends.

Two ways to read, one rule: `feed` gives the lines without their ends, at once (a CR at the
end of a chunk ends its line; a LF opening the next chunk is then skipped); `feed_raw`
gives the lines with their ends, byte for byte, so the bytes can be passed on, at once: a
line ending with a CR at the end of a chunk is given then (a stream with bare CRs must not
lag one chunk behind), and a LF opening the next chunk, the rest of that CRLF, comes alone
as the first line of that chunk (`b"\\n"`): the caller that passes bytes on sends it where
the CR went (`openai_chat.UsageChunkFilter`). What it does not do:
bound the unfinished line (the caller knows its memory: `held_bytes`), or parse fields.
"""

from __future__ import annotations

from collections.abc import Sequence

_CR, _LF = b"\r", b"\n"
_CR_BYTE = 13  # `13 in data` is one memchr; `b"\r" in data` a (slower) substring search


class LineReader:
    """Splits a byte stream into lines; holds the unfinished last line between chunks."""

    __slots__ = ("_held", "_is_after_cr")

    def __init__(self) -> None:
        # The unfinished last line (with `feed_raw`: maybe its CR); grown in place, so a
        # long line that comes in many chunks is not copied once per chunk.
        self._held = bytearray()
        self._is_after_cr = False  # `feed`: the last chunk ended with a CR

    @property
    def held_bytes(self) -> int:
        return len(self._held)

    def feed(self, data: bytes) -> Sequence[bytes | bytearray]:
        """The lines `data` finishes, without their line ends."""
        if not data:  # nothing yet: a CR just read may still be followed by its LF
            return []
        if self._is_after_cr:
            self._is_after_cr = False
            if data[:1] == _LF:  # the second half of a CRLF cut between two chunks
                data = data[1:]
        if _CR_BYTE not in data:  # every provider: LF only (a held part never holds a CR)
            end = data.rfind(_LF)
            held = self._held
            if end < 0:
                held += data
                return []
            if held:
                held += data[:end]
                self._held = bytearray(data[end + 1 :])
                return held.split(_LF)
            if end + 1 < len(data):
                held += data[end + 1 :]  # held is empty: it grows in place
            return data[:end].split(_LF)
        text = self._held + data
        lines = text.splitlines()  # bytes.splitlines: exactly CRLF, LF and CR
        last = text[-1:]
        self._is_after_cr = last == _CR
        self._held = bytearray() if last in (_CR, _LF) else lines.pop()
        return lines

    def feed_raw(self, data: bytes) -> Sequence[bytes | bytearray]:
        """The lines `data` finishes, each with its line end, every byte kept (a LF after a
        CR that ended the last chunk: alone, first)."""
        text = self._held + data if self._held else data
        lines = text.splitlines(keepends=True)
        # Unfinished: held (a line ending with a CR is finished, whatever follows it).
        is_held = bool(lines) and lines[-1][-1:] not in (_LF, _CR)
        self._held = bytearray(lines.pop()) if is_held else bytearray()
        return lines

    def cut(self, keep: int) -> bytearray:
        """The unfinished line's last `keep` bytes, taken out: the rest of it is let go (a
        line too long to hold; what follows until its end is the caller's)."""
        tail, self._held = self._held[-keep:], bytearray()
        return tail

    def rest(self) -> bytes:
        """At the end of the stream: what is held (a last line without its end), let go."""
        rest, self._held, self._is_after_cr = bytes(self._held), bytearray(), False
        return rest
