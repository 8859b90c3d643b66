"""A failed attempt in words, for the client's 502 or 504, the log line's attempt and
/health: what failed (refused, DNS, TLS and why, a proxy, a timeout), never a credential."""

from __future__ import annotations

import errno
import re
import resource
import ssl

import aiohttp
from yarl import URL

from proxy.upstream.targets import Target
from proxy.upstream.wire import LOOKUP_FAILED


def where(target: Target, url: URL | None = None) -> str:
    """A target in words for errors and /health: its provider and host, never a key. `url`:
    the attempt's, whose host is named (Bedrock's control plane is not its runtime's host);
    None: the target's base URL's."""
    url = target.provider.base_url if url is None else url
    return f"provider '{target.provider.name}' at {_authority(url.host or '', url.port)}"


def _authority(host: str, port: int | None) -> str:
    """host:port, an IPv6 address bracketed as a URL writes it (or its port is lost in it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The process's or the system's limit on open files reached: no socket for the provider, which
# no provider can mend, nor counts against one.
OUT_OF_FILES = frozenset((errno.EMFILE, errno.ENFILE))


def out_of_files(error: aiohttp.ClientError) -> str | None:
    """Words for a connection the gateway could not begin for want of a file descriptor
    (EMFILE, ENFILE), naming the limit to raise; None for any other failure."""
    if not isinstance(error, aiohttp.ClientConnectorError):
        return None
    if error.os_error.errno not in OUT_OF_FILES:
        return None
    return limit_reached(error.os_error.errno)


def limit_reached(code: int) -> str:
    """Which limit on open files EMFILE (the process's) or ENFILE (the system's) says is
    reached, in words naming it (also for a client connection the gateway could not take)."""
    if code == errno.ENFILE:
        return (
            "the gateway is out of file descriptors (the system's limit, fs.file-max, is reached)"
        )
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return f"the gateway is out of file descriptors (its limit on open files, {limit}, is reached)"


def described(error: aiohttp.ClientError) -> str:
    """An aiohttp client error in words: what failed, never a credential."""
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        if error.os_error.errno in LOOKUP_FAILED:  # the resolver's failure, not the name's
            return f"the DNS lookup of its host name failed ({error.os_error.strerror})"
        return "the host name was not found (DNS)"
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return _refused_certificate(error.certificate_error)
    if isinstance(error, aiohttp.ClientSSLError):
        return _tls_failed(error.os_error)
    if isinstance(error, aiohttp.ClientProxyConnectionError):  # the wire's, or aiohttp's
        reason = error.os_error.strerror or type(error.os_error).__name__
        return f"through the outbound proxy {_authority(error.host, error.port)}: {reason}"
    if isinstance(error, aiohttp.ClientHttpProxyError):  # aiohttp's CONNECT refused (WebSocket)
        return f"through the outbound proxy: it refused the tunnel ({error.status})"
    if isinstance(error, aiohttp.ClientConnectorError):
        if error.os_error.errno == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(error.os_error, ssl.SSLCertVerificationError):
            return _refused_certificate(error.os_error)
        if isinstance(error.os_error, ssl.SSLError):
            return _tls_failed(error.os_error)
        return f"could not connect ({error.os_error.strerror or type(error.os_error).__name__})"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "closed the connection before answering"
    if isinstance(error, aiohttp.ServerTimeoutError):
        return "timed out"
    if isinstance(error, aiohttp.ClientOSError):
        return f"the connection failed ({error.strerror or 'reset'})"
    if isinstance(error, aiohttp.ClientResponseError):
        return f"sent an answer that is not valid HTTP ({_unquoted(error.message)[:80]})"
    return f"failed ({type(error).__name__})"


def _unquoted(message: str) -> str:
    """A parser's words for the answer it refused, without the line it quotes after them
    (aiohttp's, for a WebSocket handshake: llhttp's `reason:\\n\\n  b'...'`, its pure-Python
    parser's `Bad status line '...'`): a broken server's line may reflect the key it was sent."""
    head = _QUOTE.split(message, maxsplit=1)[0]
    said = (line.strip(" :.") for line in head.splitlines())
    return ": ".join(words for words in said if words) or "malformed"


# Where a parser's message begins to quote what it refused: bytes' repr, or a str's.
_QUOTE = re.compile(r"""b?['"]""")

# OpenSSL's verify codes for a chain that ends at no trusted authority (X509_V_ERR_...): a
# private CA the gateway was not told of.
_UNTRUSTED_ISSUER = frozenset((18, 19, 20, 21))  # self-signed leaf, self-signed in chain,
# unable to get local issuer, unable to verify the first certificate


def _refused_certificate(error: Exception) -> str:
    """A provider's certificate refused, saying why as OpenSSL does (a name it is not for,
    an authority not trusted: then where to trust one)."""
    if not isinstance(error, ssl.SSLCertVerificationError):
        return "TLS failed: its certificate was refused"
    why = (error.verify_message or error.reason or "not verified").rstrip(".")[:120]
    if error.verify_code in _UNTRUSTED_ISSUER:
        why += "; a private CA is trusted through SSL_CERT_FILE"
    return f"TLS failed: its certificate was refused ({why})"


def _tls_failed(error: OSError) -> str:
    """TLS that failed before any certificate was judged: OpenSSL's reason, and a server that
    answered in plain HTTP named as such (an https:// base_url for vLLM, Ollama...)."""
    reason = getattr(error, "reason", None)
    if reason in _NOT_TLS:
        return "TLS failed: the server did not answer in TLS (plain HTTP behind an https:// URL?)"
    if reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED":
        return (
            "TLS failed: the provider requires a client certificate, which the gateway does "
            f"not present ({reason})"
        )
    if reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":  # TLS 1.2's one word for it, among others
        return (
            f"TLS failed: the provider refused the handshake ({reason}: it may require a "
            "client certificate, which the gateway does not present)"
        )
    if isinstance(reason, str) and "_ALERT_" in reason:  # the provider's refusal, by name
        return f"TLS failed: the provider refused the handshake ({reason})"
    return f"TLS failed ({reason or type(error).__name__})"


# OpenSSL's reasons when the first bytes back are not a TLS record (an HTTP answer's).
_NOT_TLS = frozenset(("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG"))
