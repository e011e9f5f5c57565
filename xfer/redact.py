"""Keep secrets out of everything xfer writes: one helper for every URI or URL.

A URL can carry a secret in two places:

    userinfo      http://user:PASSWORD@host/...   https://TOKEN@host/...
    query values  ?token=...  ?access_token=...  ?sig=...  ?X-Amz-Signature=...

`redact_url` replaces each such secret by ***, keeping the rest (scheme, user
name, host, path, harmless query values) so a message still says where;
`redact` does the same to every URL inside a longer text (an error message, a
log line); `url_secrets` lists the secret strings themselves, so a caller can
refuse a URL that carries any (params.yaml is recorded in dvc.lock and MLflow);
`split_userinfo` takes the credentials out of a URL for a client that accepts
them separately (MLflow reads MLFLOW_TRACKING_USERNAME / _PASSWORD).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# Query keys whose values are secrets (compared in lower case): bearer tokens, API keys,
# and the signatures and credentials of presigned S3 / GCS / Azure SAS / OSS URLs.
SECRET_QUERY_KEYS = frozenset(
    {
        "token", "access_token", "refresh_token", "id_token", "auth", "authorization", "key", "api_key", "apikey",
        "api-key", "secret", "client_secret", "password", "passwd", "pwd", "pass", "sig", "signature", "code",
        "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
        "x-goog-signature", "x-goog-credential", "googleaccessid", "x-oss-signature", "ossaccesskeyid",
        "private_token", "session", "sessionid", "sas", "jwt",
    }
)  # fmt: skip
# ... and any key naming one of these (x-api-key, hf_token, my_secret, Signature, ...).
_SECRET_KEY_PARTS = ("token", "secret", "signature", "password", "credential", "apikey", "api_key", "api-key", "access_key", "accesskey")
# A URL inside free text: scheme://, then up to whitespace, a quote or a closing bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`)\]]+")
# A query piece left without its URL (a message quoting a cut line): ?key=value or &key=value.
_QUERY_IN_TEXT = re.compile(r"([?&])([A-Za-z0-9_.~%-]+)=([^&\s'\"<>`#]+)")


def is_secret_key(key: str) -> bool:
    """Whether a query parameter named `key` carries a secret value."""
    k = unquote(key).strip().lower()
    return k in SECRET_QUERY_KEYS or any(part in k for part in _SECRET_KEY_PARTS)


def _split(url: str):
    """urlsplit, or None when `url` is no URL (no scheme://, or unparseable)."""
    if not isinstance(url, str) or "://" not in url:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    return parts if parts.scheme else None


def _userinfo(netloc: str) -> tuple[str | None, str]:
    """(userinfo or None, host[:port]) of a netloc; the last @ separates them, as urllib does."""
    userinfo, at, host = netloc.rpartition("@")
    return (userinfo, host) if at else (None, netloc)


def _query_pairs(query: str) -> list[tuple[str, str | None]]:
    """The query's key=value pieces as written (no decoding), value None for a bare key."""
    pairs = []
    for piece in query.split("&"):
        key, eq, value = piece.partition("=")
        pairs.append((key, value if eq else None))
    return pairs


def url_secrets(url: str) -> list[str]:
    """The secret strings `url` carries (a password, a token as user name, secret query values), as written."""
    parts = _split(url)
    if parts is None:
        return []
    found = []
    userinfo, _ = _userinfo(parts.netloc)
    if userinfo:
        user, colon, password = userinfo.partition(":")
        # A user name alone (https://TOKEN@host) is how many services take a token.
        found += [password] if colon else [user]
    for key, value in _query_pairs(parts.query):
        if value and is_secret_key(key):
            found.append(value)
    return [s for s in found if s]


def redact_url(url: str) -> str:
    """`url` with every secret (see module doc) replaced by ***; anything that is no URL comes back as it was."""
    parts = _split(url)
    if parts is None:
        return url
    userinfo, host = _userinfo(parts.netloc)
    netloc = parts.netloc
    if userinfo is not None:
        user, colon, password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = parts.query
    if query:
        pieces = []
        for key, value in _query_pairs(query):
            if value is None:
                pieces.append(key)
            else:
                pieces.append(f"{key}={MASK if value and is_secret_key(key) else value}")
        query = "&".join(pieces)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """`text` with every URL in it passed through redact_url, and any ?key=value or &key=value
    piece whose key names a secret masked too (a URL cut short): for messages and log lines."""
    if not isinstance(text, str):
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _QUERY_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}={MASK}" if is_secret_key(m.group(2)) else m.group(0), text)


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without its userinfo, user name, password), both decoded; (url, None, None) when it has none."""
    parts = _split(url)
    if parts is None:
        return url, None, None
    userinfo, host = _userinfo(parts.netloc)
    if userinfo is None:
        return url, None, None
    user, colon, password = userinfo.partition(":")
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, unquote(user), unquote(password) if colon else None


def with_query(url: str, extra: str | None) -> str:
    """`url` with the query string `extra` (``a=1&b=2``, a leading ? allowed) appended; for the request only."""
    extra = (extra or "").strip().lstrip("?&")
    if not extra:
        return url
    parts = urlsplit(url)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
