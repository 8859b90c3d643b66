"""Signing a request for a cloud: AWS SigV4 over the exact bytes, or a Google access token.

A cloud target sends no key: each attempt's request (method, URL, headers, the exact body
bytes that go) is signed just before it is sent, by the target's `Signer`, so a retry is
signed anew and a refreshed credential is used at once. Both use the clouds' own libraries:
botocore's SigV4 signer, google-auth's service-account credentials.

What SigV4 signs: the method, the URL (host, path as sent, query), `x-amz-date`, the
session token if any, and the SHA-256 of the body. No other header is signed, so a header
added after signing (a trace's `traceparent`) does not break the signature; a changed body
byte does. The client's own AWS signature headers never reach here: `providers` drops
them with the other credentials.

A Google access token is minted from the service account when there is none or the one
held is about to expire (google-auth's `valid`: within 3m45s of its expiry), never per
request; one refresh at a time, in a thread (google-auth's transport blocks), whose token or
failure every request that waited on it shares.
The token is good for its hour to anyone who holds it: it is one of a signer's `bearers`,
which no answer may echo (relay/echoes.py), as a real key; so is a token refreshed away while
it has not expired, which a request sent before the refresh still carries. So is SigV4's
session token, which every signed request carries in `x-amz-security-token`.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import Mapping
from typing import Any, Protocol

from multidict import CIMultiDict
from yarl import URL

from proxy.upstream.egress import Egress, origin_of

# An OAuth error code (RFC 6749 5.2): `invalid_grant`, `unauthorized_client`, ...
_OAUTH_CODE = re.compile(r"[a-z_]{1,64}")
# What a Vertex token may do: the scope Vertex AI asks for.
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
# A token request that hangs must not hold every request of the target for long.
TOKEN_TIMEOUT_SECONDS = 10.0
_SIGNED_BY_SIGV4 = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token")


class SigningFailed(Exception):
    """No signature or token could be had; the message says why, never a credential."""


class Signer(Protocol):
    """Adds a cloud's credential to one request, just before it is sent."""

    async def sign(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> None:
        """Set the credential headers for exactly these bytes. Raises SigningFailed."""
        ...

    @property
    def bearers(self) -> tuple[str, ...]:
        """What the signed requests carry that anyone holding it could use (access tokens):
        no answer may echo one. The one held now, and those refreshed away that requests
        still out may carry, until they expire; () when there is nothing of the kind."""
        ...


class SigV4:
    """AWS Signature Version 4 for one set of credentials, one region, one service."""

    __slots__ = ("_auth", "_bearers")

    def __init__(
        self,
        access_key_id: str,
        secret_access_key: str,
        session_token: str | None,
        region: str,
        service: str = "bedrock",
    ) -> None:
        from botocore.auth import SigV4Auth  # type: ignore[import-untyped]
        from botocore.credentials import Credentials  # type: ignore[import-untyped]

        credentials = Credentials(access_key_id, secret_access_key, session_token)
        self._auth = SigV4Auth(credentials, service, region)
        # The session token goes in every request (x-amz-security-token), the secret never.
        self._bearers = (session_token,) if session_token else ()

    async def sign(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> None:
        from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]

        # Only the URL and the body go in: the signed headers are host and botocore's own.
        request = AWSRequest(method=method, url=str(url), data=body)
        self._auth.add_auth(request)
        for name in _SIGNED_BY_SIGV4:
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value

    @property
    def bearers(self) -> tuple[str, ...]:
        return self._bearers  # a signature is good for its one request only


class GoogleToken:
    """A service account's OAuth access token, minted when needed and reused until then."""

    __slots__ = ("_credentials", "_earlier", "_refreshing", "_transport")

    def __init__(self, info: Mapping[str, Any], proxies: Mapping[str, str] | None = None) -> None:
        """`info`: the service-account key file's JSON. Raises ValueError when it is not one.
        `proxies`: the outbound proxy variables (settings' `outbound_proxies`): the token
        endpoint is reached through the one that applies to it, as providers are."""
        import urllib3
        from google.auth.transport.urllib3 import Request as GoogleRequest
        from google.oauth2 import service_account

        from_info = service_account.Credentials.from_service_account_info
        self._credentials = from_info(  # type: ignore[no-untyped-call]
            dict(info), scopes=[CLOUD_PLATFORM]
        )
        self._refreshing: asyncio.Future[None] | None = None  # the refresh under way, if any
        # Tokens refreshed away, with their expiry: until then, a request sent with one may
        # have it echoed in its answer.
        self._earlier: list[tuple[str, datetime.datetime]] = []
        timeout = urllib3.Timeout(total=TOKEN_TIMEOUT_SECONDS)
        egress = Egress.of(proxies or {})
        hop = egress.hop(origin_of(URL(self.token_uri))) if egress is not None else None
        pool: urllib3.PoolManager
        if hop is None:
            pool = urllib3.PoolManager(timeout=timeout)
        else:  # urllib3 reads no proxy variable itself; the URL given holds no credentials
            told = {"Proxy-Authorization": hop.authorization} if hop.authorization else None
            pool = urllib3.ProxyManager(str(hop.url), timeout=timeout, proxy_headers=told)
        self._transport = GoogleRequest(pool)  # type: ignore[no-untyped-call]

    @property
    def token_uri(self) -> str:
        return str(self._credentials._token_uri)

    async def sign(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> None:
        headers["Authorization"] = f"Bearer {await self.token()}"

    @property
    def bearers(self) -> tuple[str, ...]:
        token = self._credentials.token
        held = (token,) if isinstance(token, str) and token else ()
        if not self._earlier:
            return held
        return held + tuple(earlier for earlier, _ in self._earlier)

    async def token(self) -> str:
        """The held token while it is valid; else a new one. One refresh at a time, whose
        outcome every request that needed it meanwhile shares: its token, or its failure
        (each asking again in turn, the last of many waited for every refusal before it)."""
        credentials = self._credentials
        if not credentials.valid:
            refreshing = self._refreshing
            if refreshing is None:
                refreshing = self._refreshing = asyncio.ensure_future(self._refresh())
                refreshing.add_done_callback(self._refreshed)
            # Shielded: a request that leaves does not cut the refresh the others wait on.
            await asyncio.shield(refreshing)
        return str(credentials.token)

    def _refreshed(self, refreshing: asyncio.Future[None]) -> None:
        """The refresh ended: the next request that needs a token starts another."""
        self._refreshing = None
        if not refreshing.cancelled():
            refreshing.exception()  # retrieved, should every request that awaited it have left

    async def _refresh(self) -> None:
        from google.auth.exceptions import GoogleAuthError

        credentials = self._credentials
        token, expiry = credentials.token, credentials.expiry
        # Kept before the refresh, not after: the thread sets the new token before this
        # coroutine resumes, and an answer relayed meanwhile must find the one it replaced.
        # (A refresh that fails leaves it held: kept once, not once per attempt.)
        earlier = self._earlier
        if isinstance(token, str) and token and (not earlier or earlier[-1][0] != token):
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # google-auth's
            self._earlier = [(held, until) for held, until in earlier if until > now]
            if expiry is not None:
                self._earlier.append((token, expiry))
        try:
            await asyncio.to_thread(self._credentials.refresh, self._transport)
        except GoogleAuthError as error:
            # Its OAuth error code only: google-auth's message quotes the endpoint's answer,
            # which may quote the signed assertion (an access token for its hour) back.
            raise SigningFailed(
                f"no access token from the token endpoint ({_code(error)})"
            ) from None


def _code(error: Exception) -> str:
    """The OAuth error code of a token endpoint's refusal (`invalid_grant`), else the
    exception's class: nothing the endpoint wrote in its own words."""
    answer = error.args[1] if len(error.args) > 1 else None
    code = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(code, str) and _OAUTH_CODE.fullmatch(code):
        return code
    return error.__class__.__name__
