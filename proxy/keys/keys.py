"""Virtual keys: load and check keys.json once, then look a presented key up.

Everything is resolved at load: providers joined with their overrides, real keys read
(`api_key_env` from the environment), quotas merged with the defaults, model patterns
compiled. A bad file raises `KeysFileError` naming the file, the key's name and the
field; an unknown field at any level is refused (`proxy.keys.fields`, which also parses the
values several levels share). `VirtualKey` keeps the virtual and the real key out of its
`repr`; logs, metrics and errors only ever see `name` (the key masked, unless keys.json
names it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from proxy.errors import GatewayError
from proxy.keys import fields
from proxy.keys.credentials import presented
from proxy.keys.fields import (
    MAX_NAME_CHARS,
    CachePolicy,
    Defaults,
    KeysFileError,
    UnknownProvider,
    check_fields,
    has_control,
)
from proxy.keys.hashed import PREFIX, digest_of, is_hashed, previous_key
from proxy.keys.hashed import digest as secret_digest
from proxy.keys.plans import parse_plans, parse_providers
from proxy.keys.teams import (
    ModelQuota,
    Team,
    UnknownTeam,
    in_flight,
    parse_model_quotas,
    parse_teams,
    team_of,
)
from proxy.quota.tracker import Budget, Limits, Scope
from proxy.record import REDACTED
from proxy.upstream.providers import MIN_SECRET_CHARS, Provider
from proxy.upstream.targets import Members, Plans, Target


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A client's key, resolved: where it goes, with which real key, under which limits."""

    secret: str = field(repr=False)
    name: str
    # A digest of the name: the tracker's handle, shared across processes, and kept by a
    # reload that rotates the secret under the same name, so the key keeps its window.
    id: str
    plans: Plans  # where its requests go: a target, fallbacks, routes by model
    limits: Limits | None  # None: quotas off
    allowed_models: re.Pattern[str] | None = None  # None: any model
    model_patterns: tuple[str, ...] | None = None  # allowed_models as written, for /admin/keys
    # keys.json's "allow_client_secrets": may mint ephemeral Realtime keys (relay/named.py)
    allows_client_secrets: bool = False
    # keys.json's "stream_usage": "exact" (ask OpenAI chat and completion streams for their
    # usage chunk, `usage.openai_chat`), "estimate" (never), or None: unset.
    stream_usage: str | None = None
    budget: Budget | None = None  # None: no spending cap
    # The output tokens a request naming no cap (max_tokens...) reserves: keys.json's
    # `output_allowance`, else OUTPUT_ALLOWANCE_TOKENS (quota.py reads it).
    output_allowance: int = 4096
    team: Team | None = None  # keys.json's `team`: its limits apply on top of the key's
    model_quotas: tuple[ModelQuota, ...] = ()  # the first group matching the model counts
    # The key's own scope (window, budget, max_in_flight); built by `_key`, or from the above.
    own: Scope | None = None
    # Worked out once (read on every request): admission reserves an estimate, since the
    # key, its team or a model group has a token limit or a budget.
    reserves: bool = field(init=False, default=False)
    # More than the key's own window and budget apply: a team, a slot cap or model windows
    # (the quota then admits over several scopes at once).
    shares: bool = field(init=False, default=False)
    # Ask for the usage chunk: "exact", or unset and metered (`reserves`), so what a stream is
    # charged against a token limit or a budget is the provider's count, not an estimate.
    exact_stream_usage: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        scopes = [self.scope, *(group.scope for group in self.model_quotas)]
        if self.team is not None:
            scopes.append(self.team.scope)
        reserves = any(
            (scope.limits is not None and scope.limits.tokens is not None)
            or scope.budget is not None
            for scope in scopes
        )
        shares = len(scopes) > 1 or self.scope.max_in_flight is not None
        object.__setattr__(self, "reserves", reserves)
        object.__setattr__(self, "shares", shares)
        exact = self.stream_usage == "exact" or (self.stream_usage is None and reserves)
        object.__setattr__(self, "exact_stream_usage", exact)

    @property
    def scope(self) -> Scope:
        """The key's own limits as the tracker counts them."""
        if self.own is not None:
            return self.own
        return Scope(self.id, "key", self.name, self.limits, self.budget)

    def scopes(self, model: str | None) -> tuple[Scope, ...]:
        """Every scope a request for `model` must pass: the key's, its team's, and the
        first model group matching the model."""
        scopes = [self.scope]
        if self.team is not None:
            scopes.append(self.team.scope)
        if model is not None:
            for group in self.model_quotas:
                if group.matches.fullmatch(model) is not None:
                    scopes.append(group.scope)
                    break
        return tuple(scopes)

    cache: CachePolicy | None = None  # None: no response cache (nothing looked up or stored)
    # A rotated key's predecessor: its digest, and until when (Unix seconds) it still works.
    previous: tuple[str, float] | None = field(default=None, repr=False)

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or self.allowed_models.fullmatch(model) is not None

    @property
    def provider(self) -> Provider:
        """The provider a request without a model goes to first: how logs and /usage name it."""
        return self.plans.first.primary.provider

    @property
    def api_key(self) -> str:
        """The first real key of that provider's pool."""
        return self.plans.first.primary.pool.credentials[0].api_key


def masked(secret: str) -> str:
    """At most 4 characters of the key, `…`, and 6 hex digits of its hash: `vk_u…3f9a1c`.

    The hash tells keys apart in logs and metrics; neither part is enough to guess the key
    (a form showing 10 of 12 characters left two to guess). Short keys show fewer characters.
    """
    if is_hashed(secret):
        return f"…{secret.removeprefix(PREFIX)[:6]}"  # the same 6 digits as the key's own
    digest = hashlib.sha256(secret.encode()).hexdigest()[:6]
    shown = secret[:4] if len(secret) >= 12 else secret[:2] if len(secret) >= 8 else ""
    return f"{shown}…{digest}"


# Texts (models, path segments) kept with the secrets found inside them: a bound, so that
# names a client makes up by the thousand do not grow the memory.
INSIDE_TEXTS = 1024


def _lengths(secrets: frozenset[str]) -> list[int]:
    """The lengths of `secrets`, shortest first, then `sys.maxsize`, a bound no text
    reaches: a text longer than the shortest may hold one inside."""
    return [*sorted({len(secret) for secret in secrets}), sys.maxsize]


class KeyRing:
    """The loaded keys, looked up by the key a client presents."""

    def __init__(
        self,
        keys: Mapping[str, VirtualKey],
        digest: str = "",
        teams: Mapping[str, Team] | None = None,
        clock: Callable[[], float] = time.time,
        left_out: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        self._keys = dict(keys)  # by the virtual key as written: the key, or sha256:<hex>
        self.teams = dict(teams or {})  # keys.json's teams by name, with or without members
        self.digest = digest  # of the keys file's bytes: which version of it is in force
        # Entries of the Redis store's document that do not load, left out: ("key", the
        # virtual key as written) or ("team", its name) → why (`from_document`'s left_out).
        self.left_out = dict(left_out or {})
        self._clock = clock  # Unix time: a rotated key's grace ends at a wall-clock time
        self._plain = {
            written: key for written, key in self._keys.items() if not is_hashed(written)
        }
        self._hashed = {
            written.removeprefix(PREFIX): key
            for written, key in self._keys.items()
            if is_hashed(written)
        }
        # A rotated key's predecessor, by its digest, with the end of its grace.
        self._previous = {
            key.previous[0]: (key, key.previous[1])
            for key in self._keys.values()
            if key.previous is not None
        }
        # By the tracker's handle (a digest of the name): whom claimed deferred work charges.
        self._by_id = {key.id: key for key in self._keys.values()}
        # Every real key of every pool, fallback and route: what no log line may show.
        self._real_keys = frozenset(
            credential.api_key
            for key in self._keys.values()
            for target in key.plans.every_target()
            for credential in target.pool.credentials
        )
        # The secrets held as written (real keys, virtual keys not hashed) that are looked
        # for inside longer texts, by their first MIN_SECRET_CHARS characters: not those
        # shorter (a local server's placeholder, `EMPTY`), which would mask ordinary words,
        # as answers are not searched for them (`relay/echoes.py`).
        searched = frozenset(
            secret for secret in (*self._real_keys, *self._plain) if len(secret) >= MIN_SECRET_CHARS
        )
        self._lengths = _lengths(searched)
        self._prefixes = frozenset(secret[:MIN_SECRET_CHARS] for secret in searched)
        self._inside: dict[str, tuple[tuple[str, str], ...]] = {}
        # Pools of several keys, where a key may rest (429, 401, 403): a reload carries
        # their rests over (`replace`); found here, in the reload's thread, not at the swap.
        self._pools = tuple(
            (key.id, index, target.name, target.pool)
            for key in self._keys.values()
            for index, target in enumerate(key.plans.every_target())
            if target.pool.size > 1
        )
        # For /health, worked out here: a reload builds the ring in a thread, and walking
        # 10,000 keys on the event loop at the swap held every request for ~10 ms.
        self._targets = {t.name: t for key in self._keys.values() for t in key.plans.every_target()}
        self._key_counts: dict[str, int] = {}
        for key in self._keys.values():
            for name in {target.provider.name for target in key.plans.every_target()}:
                self._key_counts[name] = self._key_counts.get(name, 0) + 1
        self._members = Members(
            target for key in self._keys.values() for target in key.plans.every_target()
        )

    def replace(self, other: KeyRing) -> tuple[Scope, ...]:
        """Take `other`'s keys in one step; requests in flight keep the key they hold. A pool
        key resting (the provider's 429, 401, 403) still rests under the same key's name.
        Returns the scopes gone: of each key `other` does not have (by id: deleted, or made
        again under its name by the admin API), its own and its model groups', and of each
        team gone alike."""
        kept, teams = other._by_id, other.teams
        gone = [
            scope
            for key_id, key in self._by_id.items()
            if key_id not in kept
            for scope in (key.scope, *(group.scope for group in key.model_quotas))
        ]
        gone += (
            team.scope
            for name, team in self.teams.items()
            if name not in teams or teams[name].scope.id != team.scope.id
        )
        for key_id, index, name, pool in self._pools:
            if pool.has_rested:  # most pools never had a key set aside: nothing to carry
                fresh = other._by_id.get(key_id)
                targets = () if fresh is None else fresh.plans.every_target()
                if index < len(targets) and targets[index].name == name:
                    targets[index].pool.take_rests(pool)
        self._pools = other._pools
        self._keys, self.digest, self._real_keys = other._keys, other.digest, other._real_keys
        self._plain, self._hashed, self._previous = other._plain, other._hashed, other._previous
        self._lengths, self._prefixes, self._inside = other._lengths, other._prefixes, {}
        self.teams, self._targets, self._key_counts = other.teams, other._targets, other._key_counts
        self._members = other._members
        self.left_out = other.left_out
        self._by_id = other._by_id
        return tuple(gone)

    def gone_scopes(self, key: VirtualKey) -> tuple[Scope, ...]:
        """The scopes of `key`, as a request still holds it, that this ring no longer has: its
        own and its model groups' once it was deleted (or made again under its name), its
        team's once that team was (`replace` dropped them; the request's settle opened them
        again). () while both stand: one lookup, two for a key in a team."""
        gone: tuple[Scope, ...] = ()
        if key.id not in self._by_id:
            gone = (key.scope, *(group.scope for group in key.model_quotas))
        team = key.team
        if team is not None:
            now = self.teams.get(team.name)
            if now is None or now.scope.id != team.scope.id:
                gone += (team.scope,)
        return gone

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, headers: Mapping[str, str]) -> VirtualKey:
        """The key named by the request's headers. Raises 401."""
        return self.key_for(presented(headers))

    def key_for(self, secret: str | None) -> VirtualKey:
        """The key `secret` names (what the headers present, `presented`). Raises 401."""
        if not secret:
            raise GatewayError(
                401,
                "invalid_api_key",
                "No virtual key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
            )
        key = self._find(secret)
        if key is None:
            raise GatewayError(
                401,
                "invalid_api_key",
                "Virtual key not found in the gateway's keys file. "
                "Check the key, or ask the gateway's operator to add it.",
            )
        return key

    def _find(self, secret: str) -> VirtualKey | None:
        key = self._plain.get(secret)
        if key is not None or not (self._hashed or self._previous):
            return key
        hexdigest = secret_digest(secret)
        key = self._hashed.get(hexdigest)
        if key is None:
            previous = self._previous.get(hexdigest)
            if previous is not None and self._clock() < previous[1]:
                key = previous[0]
        return key

    def by_id(self, key_id: str) -> VirtualKey | None:
        """The key whose tracker handle is `key_id`, as keys.json has it now; None if gone."""
        return self._by_id.get(key_id)

    def real_keys(self) -> frozenset[str]:
        """Every real key of the file: what must never be shown (the same object each call)."""
        return self._real_keys

    def secrets_in(self, texts: list[str]) -> list[tuple[str, str]]:
        """Each of `texts` that is a secret of the file, and how a log line or a metric shows
        it: a real key as `[redacted]`, a virtual key masked. Most requests name none: one
        call, a set and a dict lookup a text (a digest too, for hashed keys)."""
        real, plain, is_hashed = self._real_keys, self._plain, bool(self._hashed or self._previous)
        found = []
        for text in texts:
            if text in real:
                found.append((text, REDACTED))
            elif text in plain or (is_hashed and text and self._find(text) is not None):
                found.append((text, masked(text)))
        return found

    def secrets_inside(self, texts: list[str]) -> list[tuple[str, str]]:
        """As `secrets_in`, and also a secret held as written (a real key, a virtual key not
        hashed) of MIN_SECRET_CHARS or more inside a longer text, glued to other letters
        (`gpt-4o:<key>`). Each text's findings are kept (texts repeat: models, path
        segments); most are shorter than any key and cost one comparison."""
        found = self.secrets_in(texts)
        shortest = self._lengths[0]
        for text in texts:
            if len(text) > shortest:
                inside = self._inside.get(text)
                if inside is None:
                    if len(self._inside) >= INSIDE_TEXTS:
                        self._inside.clear()
                    inside = self._inside[text] = self._held_inside(text)
                found += inside
        return found

    def _held_inside(self, text: str) -> tuple[tuple[str, str], ...]:
        """The secrets held as written inside `text` (not `text` itself), longest first: one
        holding another is masked whole. One look-up of a prefix at each place in `text`,
        however many keys and lengths (a path segment of 2 KB, 10,000 keys: 0.25 ms)."""
        real, plain, prefixes = self._real_keys, self._plain, self._prefixes
        width = MIN_SECRET_CHARS
        held: dict[str, str] = {}
        for at in range(len(text) - width + 1):
            if text[at : at + width] in prefixes:
                for length in self._lengths:
                    if at + length > len(text) or length == len(text):
                        break
                    piece = text[at : at + length]
                    if piece in real:
                        held[piece] = REDACTED
                    elif piece in plain:
                        held[piece] = masked(piece)
        return tuple(sorted(held.items(), key=lambda pair: -len(pair[0])))

    def key_counts(self) -> dict[str, int]:
        """Provider name → number of keys that can send requests to it, for /health."""
        return dict(self._key_counts)

    def members_report(self) -> dict[str, dict[str, dict[str, object]]]:
        """/health's view of each target's keys by label (`targets.Members`)."""
        return self._members.report()

    def every_target(self) -> list[Target]:
        """Every target of every key, several of one name included (each has its own pool)."""
        return [t for key in self._keys.values() for t in key.plans.every_target()]

    def targets(self) -> dict[str, Target]:
        """Every target of every key, by name (one breaker each)."""
        return dict(self._targets)

    @classmethod
    def load(
        cls,
        path: str,
        environ: Mapping[str, str],
        defaults: Defaults,
        clock: Callable[[], float] = time.time,
    ) -> KeyRing:
        """Read and check keys.json. Raises KeysFileError."""
        raw = read_file(path)
        document = parsed(path, raw)
        digest = hashlib.sha256(raw).hexdigest()[:16]
        return cls.from_document(path, document, digest, environ, defaults, clock)

    @classmethod
    def from_document(
        cls,
        path: str,
        document: Any,
        digest: str,
        environ: Mapping[str, str],
        defaults: Defaults,
        clock: Callable[[], float] = time.time,
        leave_out: bool = False,
    ) -> KeyRing:
        """Check a keys.json document (read from a file or a key store). Raises KeysFileError.

        `leave_out`: a key or team that does not load is left out (the ring's `left_out`
        says why) rather than refusing the whole document; the document's own structure
        must still load. For the Redis store, which an older version may have filled with
        values this one refuses, and which no file edit can mend: the admin API does."""
        if not isinstance(document, dict):
            raise KeysFileError(f"{path}: must be a JSON object with 'virtual_keys'")
        problems: list[KeysFileError] = []
        teams: dict[str, Team] = {}
        bad_teams: dict[str, KeysFileError] = {}  # each said once; their keys say nothing more
        try:
            check_fields(path, document, "top-level")
            teams = parse_teams(path, document.get("teams"), defaults, bad_teams)
        except KeysFileError as error:
            problems.append(error)
        if not leave_out:
            problems.extend(bad_teams.values())
        bad_keys: dict[str, str] | None = {} if leave_out else None
        keys = _parse(path, document, environ, defaults, teams, problems, bad_keys, set(bad_teams))
        for team in _keys_among(teams, keys):
            named = KeysFileError(_team_named_as_a_key(path, team))
            if bad_keys is None:
                problems.append(named)
                continue
            bad_teams[team] = named  # left out, and its keys with it
            del teams[team]
            for secret, key in list(keys.items()):
                if key.team is not None and key.team.name == team:
                    bad_keys[secret] = (
                        f"{path}: key '{key.name}': its team '{masked(team)}' is left out (the "
                        "team's name is a key of the file)"
                    )
                    del keys[secret]
        shown = {value for key in keys.values() for _, value in _shown_values(key)}
        among = set(_keys_among(shown, keys))  # once over every distinct value: at load only
        for secret, key in list(keys.items()) if among else []:
            field = next((field for field, value in _shown_values(key) if value in among), None)
            if field is None:
                continue
            why = _shown_as_a_key(path, key.name, field)
            if bad_keys is None:
                problems.append(KeysFileError(why))
            else:
                bad_keys[secret] = why  # left out
                del keys[secret]
        if problems:
            # The first one's kind (an unknown field is the admin API's 400), every message.
            messages = [message for problem in problems for message in problem.problems]
            raise type(problems[0])(messages[0], messages)
        left_out = {("team", name): str(why) for name, why in bad_teams.items()}
        left_out.update({("key", secret): why for secret, why in (bad_keys or {}).items()})
        return cls(keys, digest, teams, clock, left_out)


def parsed(path: str, raw: bytes) -> Any:
    """keys.json's document. Raises KeysFileError for bytes that are not JSON, and for a name
    written twice in one object: JSON keeps the last silently, so a virtual key copied into a
    new entry and left unchanged would serve the first entry's clients as the second's."""
    text = raw.removeprefix(b"\xef\xbb\xbf")  # editors may add a BOM
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise KeysFileError(f"{path}: not valid JSON ({error})") from None
    try:
        twice = written_twice(text)
    except RecursionError:  # orjson reads 1,024 levels, the standard parser about 1,000
        raise KeysFileError(f"{path}: nested too deeply to be a keys file") from None
    if twice is not None:
        entries = document.get("virtual_keys") if isinstance(document, dict) else None
        if isinstance(entries, dict) and twice in entries:
            raise KeysFileError(
                f"{path}: key '{masked(twice)}': the virtual key is written twice in "
                "'virtual_keys' (JSON keeps only the last entry): give each entry its own key"
            )
        raise KeysFileError(
            f"{path}: {shown_name(twice)} is written twice in one object (JSON keeps only the "
            "last): keep one"
        )
    return document


def written_twice(text: bytes) -> str | None:
    """The first name an object of this JSON (one orjson read) holds twice, or None: orjson
    cannot tell; the standard parser's hook sees every object's names in order. Raises
    RecursionError for a document nested deeper than the standard parser reads (~1,000)."""
    try:
        json.loads(text, object_pairs_hook=_refuse_repeats)
    except _WrittenTwice as twice:
        return twice.name
    return None


def shown_name(name: str) -> str:
    """A field's name as a message quotes it: cut to 80 characters, in repr (a newline in
    it stays on one line)."""
    return repr(name[:80])


class _WrittenTwice(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


def _refuse_repeats(pairs: list[tuple[str, Any]]) -> None:
    """json.loads' hook: raise at the first name an object holds twice; None (only names matter)."""
    names = {name for name, _ in pairs}
    if len(names) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _WrittenTwice(name)
            seen.add(name)


def read_file(path: str) -> bytes:
    """keys.json's bytes. Raises KeysFileError saying what to do."""
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_nlink == 0:
                raise KeysFileError(_replaced_under_a_mount(path))
            return file.read()
    except FileNotFoundError:
        raise KeysFileError(
            f"{path}: no such file. Create it from keys.example.json "
            f"(cp keys.example.json {path}) or set KEYS_FILE_PATH"
        ) from None
    except IsADirectoryError:
        # What Docker leaves when it bind-mounts a keys.json that did not exist.
        raise KeysFileError(
            f"{path}: is a directory, not a file. Docker creates one when the keys.json "
            f"it should mount does not exist: remove it, create keys.json "
            f"(cp keys.example.json keys.json), start again"
        ) from None
    except PermissionError:
        raise KeysFileError(
            f"{path}: not readable by this process (uid {os.getuid()}); the image runs "
            f"as uid 10001: chmod 644 the file, or give it that owner"
        ) from None
    except OSError as error:
        raise KeysFileError(f"{path}: cannot be read ({error.strerror})") from None


def _replaced_under_a_mount(path: str) -> str:
    """Why a file that no directory holds any more is not read: one mounted alone (Docker's
    `-v $PWD/keys.json:/app/keys.json`, a Kubernetes `subPath`) pins the file it was given,
    so an editor's save by rename (vim, VS Code, `sed -i`) or a Secret's update on the
    other side leaves this process the old keys, which a reload would take as current."""
    return (
        f"{path}: was replaced where it comes from, but this process still sees the old file "
        "(a file mounted alone, as `docker run -v $PWD/keys.json:/app/keys.json` or a "
        "Kubernetes subPath mount, keeps the one it was given): mount its directory instead "
        "(-v $PWD/keys:/app/keys -e KEYS_FILE_PATH=/app/keys/keys.json), or restart the "
        "container to take the new file"
    )


def _parse(
    path: str,
    document: dict[str, Any],
    environ: Mapping[str, str],
    defaults: Defaults,
    teams: Mapping[str, Team],
    problems: list[KeysFileError],
    left_out: dict[str, str] | None = None,
    refused_teams: frozenset[str] | set[str] = frozenset(),
) -> dict[str, VirtualKey]:
    """Every key of the file; each problem found is added to `problems`, and the rest of the
    file is still checked, so that one reading names every mistake. With `left_out`, a key's
    own problem leaves it out instead, its virtual key (as written) mapped to why."""
    providers, refused = _providers(path, document.get("providers", {}), problems)
    entries = document.get("virtual_keys")
    if not isinstance(entries, dict):
        problems.append(
            KeysFileError(f"{path}: 'virtual_keys' must be an object of key → settings")
        )
        return {}
    if not entries:
        # A gateway without keys refuses every request: surely not what was meant.
        problems.append(
            KeysFileError(f"{path}: 'virtual_keys' is empty; add a key (see keys.example.json)")
        )
    keys: dict[str, VirtualKey] = {}
    names: set[str] = set()
    digests: set[str] = set()  # a key written plainly and as its digest is one key twice
    for secret, entry in entries.items():
        found: list[KeysFileError] = []
        # Names are checked first, so a name taken twice is said even if a key fails below.
        name = _name(secret, entry) if isinstance(entry, dict) else None
        if isinstance(name, str) and name in entries:  # not parsed: each message would say it
            if left_out is not None:
                left_out[secret] = _named_as_a_key(path, secret)
            else:
                problems.append(KeysFileError(_named_as_a_key(path, secret)))
            continue
        if isinstance(name, str) and name in names:
            found.append(KeysFileError(f"{path}: key '{name}': name is used by another key"))
        if isinstance(name, str):
            names.add(name)
        try:
            key = _key(path, secret, entry, providers, environ, defaults, teams)
            hexdigest = digest_of(path, secret) if is_hashed(secret) else secret_digest(secret)
        except UnknownTeam as error:
            if error.team not in refused_teams:  # else the team's own problem is said
                found.append(error)
            elif left_out is not None:
                left_out[secret] = str(error)
            key = None
        except UnknownProvider as error:
            if error.provider not in refused:  # else its declaration's problem is said
                found.append(error)
            key = None
        except KeysFileError as error:
            found.append(error)
            key = None
        if key is not None and hexdigest in digests:
            found.append(
                KeysFileError(f"{path}: key '{key.name}': the virtual key is another key's")
            )
        if found and left_out is not None:
            left_out[secret] = str(found[0])
            continue
        problems.extend(found)
        if key is not None:
            digests.add(hexdigest)
            keys[secret] = key
    real = {
        credential.api_key
        for key in keys.values()
        for target in key.plans.every_target()
        for credential in target.pool.credentials
    }
    for secret in [secret for secret, key in keys.items() if key.name in real]:
        if left_out is not None:
            left_out[secret] = _named_as_a_key(path, secret)
        else:
            problems.append(KeysFileError(_named_as_a_key(path, secret)))
        del keys[secret]
    return keys


def _named_as_a_key(path: str, secret: str) -> str:
    """Why a key whose name is a virtual or a real key of the file is refused: a name is in
    every log line of its key (SPEC: no full key in a log line). The name is not shown."""
    return (
        f"{path}: key '{masked(secret)}': name is a key of the file (a virtual or a real one), "
        "and a name is written in every log line: give the key a name that is not a key"
    )


def _keys_among(names: Iterable[str], keys: Mapping[str, VirtualKey]) -> list[str]:
    """The names that are a key of the file: a virtual key (as written, or by the digest of a
    hashed or rotated one) or a real key. A team's name is in its keys' log lines and in the
    `team` label of its metrics; a cache scope on `/usage` and `GET /admin/keys`."""
    names = list(names)
    if not names:
        return []
    real = {
        credential.api_key
        for key in keys.values()
        for target in key.plans.every_target()
        for credential in target.pool.credentials
    }
    digests = {written.removeprefix(PREFIX) for written in keys if is_hashed(written)}
    digests.update(key.previous[0] for key in keys.values() if key.previous is not None)
    return [
        name
        for name in names
        if name in keys or name in real or (digests and secret_digest(name) in digests)
    ]


def _team_named_as_a_key(path: str, team: str) -> str:
    """Why a team whose name is a key of the file is refused; the name is not shown."""
    return (
        f"{path}: team '{masked(team)}': name is a key of the file (a virtual or a real one), "
        "and a team's name is written in its keys' log lines and in metrics: give the team a "
        "name that is not a key"
    )


def _shown_values(key: VirtualKey) -> Iterator[tuple[str, str]]:
    """The values of a key's entry, besides its name and team, that are shown as written,
    with their field: a target's model is in the target's name (the unauthenticated /health,
    the log's attempts, metrics), a cache scope and a model quota's patterns on /usage,
    every pattern by GET /admin/keys."""
    if key.cache is not None and key.cache.scope is not None:
        yield "cache.scope", key.cache.scope
    for target in key.plans.every_target():
        if target.model is not None:
            yield "a target's model", target.model
    for pattern in key.model_patterns or ():
        yield "a pattern of allowed_models", pattern
    for route in key.plans.routes:
        for pattern in route.patterns:
            yield "a pattern of a route's models", pattern
    for group in key.model_quotas:
        for pattern in group.patterns:
            yield "a pattern of a model quota's models", pattern


def _shown_as_a_key(path: str, name: str, field: str) -> str:
    """Why a key with a shown value that is a key of the file is refused; it is not shown."""
    return (
        f"{path}: key '{name}': {field} is a key of the file (a virtual or a real one), and it "
        "is shown as written (/health, /usage, the admin API, log lines or metrics): give it "
        "a value that is not a key"
    )


def _providers(
    path: str, section: Any, problems: list[KeysFileError]
) -> tuple[dict[str, Provider], set[str]]:
    """keys.json's `providers`, each checked on its own: every bad one is added to
    `problems`, and its name to the refused names returned beside the good ones."""
    providers = parse_providers(path, {})  # the built-in ones
    refused: set[str] = set()
    if not isinstance(section, dict):
        problems.append(KeysFileError(f"{path}: 'providers' must be an object of name → settings"))
        return providers, refused
    for name, entry in section.items():
        try:
            providers[name] = parse_providers(path, {name: entry})[name]
        except KeysFileError as error:
            problems.append(error)
            refused.add(name)
    return providers, refused


def _name(secret: str, entry: Mapping[str, Any]) -> Any:
    """The key's `name` as written, else the key masked (hashed only then: it costs)."""
    return entry["name"] if "name" in entry else masked(secret)


def _key(
    path: str,
    secret: str,
    entry: Any,
    providers: Mapping[str, Provider],
    environ: Mapping[str, str],
    defaults: Defaults,
    teams: Mapping[str, Team],
) -> VirtualKey:
    if has_control(secret):  # its masked form (an unnamed key's name) would carry it
        raise KeysFileError(
            f"{path}: the virtual key contains a control character (an escape or a line "
            "break): a virtual key must be printable text"
        )
    if not isinstance(entry, dict):
        raise KeysFileError(f"{path}: key '{masked(secret)}': must be an object")
    name = _name(secret, entry)
    if not isinstance(name, str) or not name.strip():
        raise KeysFileError(f"{path}: key '{masked(secret)}': name must be a non-empty string")
    if has_control(name):  # as the admin API refuses it: not quoted, it would garble the line
        raise KeysFileError(
            f"{path}: key '{masked(secret)}': name contains a control character (a NUL, tab, "
            "line break or escape): a name must be printable text"
        )
    if name != name.strip():  # as the admin API refuses it; quoted (printable: see above)
        raise KeysFileError(  # by name: what the admin API's DELETE or a search needs
            f"{path}: key '{masked(secret)}': name {name[:80]!r} has a space at an end: another "
            "name than without it, shown alike in logs and metrics; remove it"
        )
    if len(name) > MAX_NAME_CHARS:  # as the admin API refuses it
        raise KeysFileError(
            f"{path}: key '{masked(secret)}': name must be at most {MAX_NAME_CHARS} characters "
            "(it is in every log line and metric of the key)"
        )
    where = f"{path}: key '{name}'"
    check_fields(where, entry, "key")
    if not secret.strip() or secret != secret.strip():
        raise KeysFileError(f"{where}: the virtual key must be non-empty, without spaces")
    plans = parse_plans(where, entry, providers, environ)
    patterns = entry.get("allowed_models")
    stream_usage = entry.get("stream_usage")
    if stream_usage not in (None, "exact", "estimate"):
        raise KeysFileError(f'{where}: stream_usage must be "exact" or "estimate"')
    allows_client_secrets = entry.get("allow_client_secrets", False)
    if not isinstance(allows_client_secrets, bool):
        raise KeysFileError(f"{where}: allow_client_secrets must be true or false")
    if allows_client_secrets and patterns is not None:
        raise KeysFileError(
            f"{where}: allow_client_secrets cannot go with allowed_models "
            "(an ephemeral key may use any model)"
        )
    if is_hashed(secret):
        digest_of(where, secret)
    # A name deleted and created again through the admin API starts fresh windows: its
    # `created_at` (set by the API) is part of the id; keys.json's own keys have none.
    created_at = entry.get("created_at")
    if created_at is not None and not isinstance(created_at, str):
        raise KeysFileError(f"{where}: created_at must be a timestamp (text)")
    key_id = hashlib.sha256(
        (name + (f"\n{created_at}" if created_at else "")).encode()
    ).hexdigest()[:24]
    limits = fields.limits(where, entry.get("quota"), defaults)
    budget = fields.budget(where, entry, defaults)
    cap, queue = in_flight(where, entry, defaults)
    window = limits.window_seconds if limits is not None else defaults.window_seconds
    return VirtualKey(
        secret=secret,
        name=name,
        id=key_id,
        plans=plans,
        limits=limits,
        allowed_models=fields.patterns(where, patterns),
        model_patterns=None if patterns is None else tuple(patterns),
        allows_client_secrets=allows_client_secrets,
        stream_usage=stream_usage,
        budget=budget,
        output_allowance=fields.output_allowance(where, entry, defaults),
        team=team_of(where, entry, teams),
        model_quotas=parse_model_quotas(where, entry.get("model_quotas"), key_id, defaults, window),
        own=Scope(key_id, "key", name, limits, budget, cap, queue),
        cache=fields.cache(where, entry),
        previous=previous_key(where, entry),
    )
