"""What one answer said so far, as its dialect read it: the dialects write it, the tap asks it.

The dialect modules (`openai_chat`, `responses`, `anthropic`) know where each fact sits in
their events and bodies; this holds the facts: the usage the provider reported, the
characters it generated (for an estimate when it reported none), the text kept for the log
(LOG_BODIES), the model that answered, an error the provider sent inside its answer (an
event stream's error event, under the 200 already sent), and a Responses API object's id and
status (a background response's charge). It does not parse bytes or decide what is charged (`usage`).
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.usage.provider_usage import ProviderUsage

ID_CHARS = 200  # a provider's response id, bounded: it names a key in the tracker
MODEL_CHARS = 200
ERROR_KIND_CHARS = 64  # a provider's error type or code, bounded: it goes in the log line


class Reading:
    """The facts of one answer, written by its dialect as its events or body are read."""

    __slots__ = (
        "chars",
        "error_kind",
        "is_ended",
        "is_started_noted",
        "is_stored_noted",
        "is_usage_provisional",
        "kept_chars",
        "model",
        "reported",
        "service_tier",
        "speed",
        "stored_id",
        "stored_status",
        "texts",
    )

    def __init__(
        self, keep_text: bool, is_stored_noted: bool = False, is_started_noted: bool = False
    ) -> None:
        self.reported = ProviderUsage()
        # The completion count reported so far is the provider's running count, not its
        # total (Anthropic's `message_start` says 1): a stream cut before the total came is
        # charged at least what it delivered (`usage`).
        self.is_usage_provisional = False
        # The stream's last event was read (OpenAI's `data: [DONE]`, Anthropic's
        # `message_stop` or the `message_delta` saying why it stopped, a Response's
        # `response.completed`, `.incomplete` or `.failed`, …; each dialect knows its own):
        # a client that leaves after it has the whole answer.
        self.is_ended = False
        self.chars = 0  # characters the provider generated, of every kind
        self.texts: list[str] | None = [] if keep_text else None  # the answer's text, for the log
        self.kept_chars = 0  # the characters `texts` holds (the tap bounds them)
        # The model the provider says answered (traces' gen_ai.response.model); None: unsaid.
        self.model: str | None = None
        # The OpenAI service tier the provider says served it (priced at its own rates).
        self.service_tier: str | None = None
        # Anthropic's fast mode: the `speed` its usage says served it ("fast": its own rates).
        self.speed: str | None = None
        # The type (or code) of the first error the provider sent inside its answer; only
        # that, never its message, which may quote anything (a key, the prompt).
        self.error_kind: str | None = None
        # A Responses API object's id and status: noted when it is finished (`is_stored_noted`:
        # a background response, or one fetched) or, for a background stream, while it runs.
        self.is_stored_noted = is_stored_noted
        self.is_started_noted = is_started_noted
        self.stored_id: str | None = None
        self.stored_status: str | None = None

    def add_text(self, text: object) -> None:
        """The answer's text: counted, and kept for the log."""
        if isinstance(text, str) and text:
            self.chars += len(text)
            if self.texts is not None:
                self.texts.append(text)
                self.kept_chars += len(text)

    def add_generated(self, text: object) -> None:
        """Anything else the provider generated (tool-call arguments, reasoning): counted."""
        if isinstance(text, str):
            self.chars += len(text)

    def note_model(self, model: object) -> None:
        if isinstance(model, str) and model:
            self.model = model[:MODEL_CHARS]

    def note_tier(self, tier: object) -> None:
        """OpenAI's `service_tier` of the answer: the tier that served it ("default",
        "flex", "priority"), not the one asked for ("auto")."""
        if isinstance(tier, str) and tier:
            self.service_tier = tier[:MODEL_CHARS]

    def note_speed(self, usage: object) -> None:
        """Anthropic's `usage.speed`: "fast" (fast mode) or "standard"."""
        speed = usage.get("speed") if isinstance(usage, dict) else None
        if isinstance(speed, str) and speed:
            self.speed = speed[:MODEL_CHARS]

    def note_error(self, error: object) -> None:
        """The provider sent an error object inside its answer: its `type`, else its `code`,
        else its `status` (Google's, beside a numeric code), else its numeric code
        (OpenRouter's: the HTTP status it stands for)."""
        if self.error_kind is not None:
            return  # the first one is what ended the answer
        kind = None
        if isinstance(error, dict):
            kind = error.get("type") or error.get("code")
            if not isinstance(kind, str):
                status = error.get("status")
                kind = status if status is not None or type(kind) is not int else str(kind)
        if isinstance(kind, str) and len(kind) <= ERROR_KIND_CHARS and kind.isprintable():
            self.error_kind = kind
        else:
            self.error_kind = "unknown"

    def note_stored(self, response: Mapping[str, object]) -> None:
        """Note a Responses API object's id and status (a background response's charge)."""
        response_id, status = response.get("id"), response.get("status")
        if isinstance(response_id, str) and 0 < len(response_id) <= ID_CHARS:
            self.stored_id = response_id
            self.stored_status = status if isinstance(status, str) else None
