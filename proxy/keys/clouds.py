"""A cloud target's fields in keys.json: AWS credentials or a Google service account, a region.

A `bedrock` target holds `aws_access_key_id`, `aws_secret_access_key` and optionally
`aws_session_token` (each also as `<name>_env`, the environment variable holding it) and
`region`; a `vertex` target a service account (`service_account_file`, a key file's path, or
`service_account_json_env`, a variable holding its JSON), `project` and `region`. They are
read once, at load, into the target's one credential, which signs each request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.keys.fields import CLOUD_FIELDS, KeysFileError, has_control, redacted
from proxy.record import REDACTED
from proxy.settings import outbound_proxies
from proxy.upstream.providers import Provider
from proxy.upstream.signing import GoogleToken, SigV4
from proxy.upstream.targets import Credential

AWS_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
# The cloud fields each way of signing reads (keys.fields.CLOUD_FIELDS are all of them): any
# other on a target is refused, not ignored (a region on an Azure key changes nothing).
READ_BY = {
    "sigv4": frozenset({"region", *AWS_FIELDS, *(f"{field}_env" for field in AWS_FIELDS)}),
    "google": frozenset({"region", "project", "service_account_file", "service_account_json_env"}),
    "": frozenset(),
}


def unread_cloud_field(where: str, entry: Mapping[str, Any], provider: Provider) -> None:
    """Refuse a cloud field the provider's target does not read. Raises KeysFileError."""
    unread = sorted((CLOUD_FIELDS & entry.keys()) - READ_BY.get(provider.signing, frozenset()))
    if unread:
        raise KeysFileError(f"{where}{unread[0]} does not apply to provider '{provider.name}'")


# A region or a project goes into a host name or a path: letters, digits, dashes.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def cloud_target(
    where: str, entry: Mapping[str, Any], provider: Provider, environ: Mapping[str, str]
) -> tuple[str, Provider, Credential, str | None]:
    """The target's name (`<provider>/<region>`: each region is an endpoint of its own, with
    its own breaker), the provider at that region, its credential, and Vertex's project path."""
    for refused in ("api_key", "api_key_env", "api_keys", "model"):
        if refused in entry:
            why = "names its model in the path" if refused == "model" else "signs each request"
            raise KeysFileError(
                f"{where}{refused} does not apply to provider '{provider.name}': it {why}"
            )
    unread_cloud_field(where, entry, provider)
    region = _name(where, entry, "region")
    regional = provider.in_region(region)
    name = f"{provider.name}/{region}"
    if provider.signing == "sigv4":
        access, secret, token = (_secret(where, entry, field, environ) for field in AWS_FIELDS)
        if access is None or secret is None:
            raise KeysFileError(
                f"{where}provider '{provider.name}' needs aws_access_key_id and "
                "aws_secret_access_key (or their _env)"
            )
        signer = SigV4(access, secret, token, region)
        return name, regional, Credential(secret, f"{name}#1", signer=signer), None
    info = _service_account(where, entry, environ)
    try:
        google = GoogleToken(info, outbound_proxies(environ))
    except (ValueError, KeyError) as error:
        raise KeysFileError(
            f"{where}the service account is not a key file's JSON ({error})"
        ) from None
    project = _name(where, entry, "project")
    private_key_id = str(info.get("private_key_id") or info.get("client_email") or name)
    credential = Credential(private_key_id, f"{name}#1", signer=google)
    return name, regional, credential, f"projects/{project}/locations/{region}"


def _name(where: str, entry: Mapping[str, Any], field: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise KeysFileError(f"{where}{field} must be a name such as us-east-1 (lowercase, dashes)")
    return value


def _secret(
    where: str, entry: Mapping[str, Any], field: str, environ: Mapping[str, str]
) -> str | None:
    """The value of `field` or of the variable `<field>_env` names; None when neither is set."""
    variable_field = f"{field}_env"
    if field in entry and variable_field in entry:
        raise KeysFileError(f"{where}set one of {field} and {variable_field}, not both")
    if field in entry:
        value = entry[field]
        source = field
    elif variable_field in entry:
        variable = entry[variable_field]
        if not isinstance(variable, str) or not variable:
            raise KeysFileError(f"{where}{variable_field} must name an environment variable")
        value, source = environ.get(variable, ""), f"{variable_field} {variable}"
    else:
        return None
    if not isinstance(value, str) or not value.strip():
        raise KeysFileError(f"{where}{source} must be a non-empty string (is it set?)")
    if has_control(value.strip()):
        raise KeysFileError(f"{where}{source} contains a control character (a line break?)")
    if value.strip() == REDACTED and source == field:
        raise KeysFileError(redacted(where.rstrip(": ."), field))
    return value.strip()


def _service_account(where: str, entry: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    """The service account's JSON, from its file or the environment variable named."""
    path, variable = entry.get("service_account_file"), entry.get("service_account_json_env")
    if (path is None) == (variable is None):
        raise KeysFileError(
            f"{where}set exactly one of service_account_file and service_account_json_env"
        )
    if path is not None:
        if not isinstance(path, str) or not path:
            raise KeysFileError(f"{where}service_account_file must be a file's path")
        try:
            with open(path, "rb") as file:
                text = file.read()
        except OSError as error:
            raise KeysFileError(
                f"{where}service_account_file cannot be read ({error.strerror})"
            ) from None
        except ValueError:  # open() refuses a path holding a NUL
            raise KeysFileError(
                f"{where}service_account_file cannot be read (the path holds a null byte)"
            ) from None
        source = "service_account_file"
    else:
        if not isinstance(variable, str) or not variable:
            raise KeysFileError(f"{where}service_account_json_env must name a variable")
        text = environ.get(variable, "").encode("utf-8", "surrogateescape")  # its bytes
        source = f"service_account_json_env {variable}"
        if not text.strip():
            raise KeysFileError(f"{where}{source} is not set")
    try:
        info = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise KeysFileError(f"{where}{source} does not hold JSON") from None
    if not isinstance(info, dict) or info.get("type") != "service_account":
        raise KeysFileError(f'{where}{source} is not a service account key ("type")')
    return info
