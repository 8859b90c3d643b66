"""A self-signed certificate for a TLS test server, made by openssl on the test's machine."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path


def self_signed(
    folder: Path, name: str, alt_names: str | None = None
) -> tuple[Path, ssl.SSLContext]:
    """A certificate for CN=localhost (and `alt_names`, e.g. "IP:127.0.0.1,DNS:localhost")
    written to `folder`/`name`.pem, and a server context that presents it."""
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    extension = ["-addext", f"subjectAltName={alt_names}"] if alt_names else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=localhost", *extension, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return cert, context
