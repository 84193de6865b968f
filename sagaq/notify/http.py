"""Posting JSON to a notifier endpoint, and turning every failure into a :class:`DeliveryError`.

The delivery task decides whether to retry from ``DeliveryError.retryable`` alone, so this
module is where "429, 5xx and network errors are retried, other 4xx are not" is decided, once,
for every HTTP notifier. Messages name only the scheme and host of the endpoint: webhook URLs,
routing keys and shared secrets are credentials and never appear in an error, a log or an event.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx

from sagaq.notify.base import LINKS, DeliveryError, Notice

DEFAULT_TIMEOUT = 10.0
USER_AGENT = "sagaq-notify/1"
BODY_SNIPPET = 200  # characters of a rejected response's body kept in the error message


def safe_origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: enough to say where, nothing that authenticates."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme or '?'}://{host}{port}"


def iso_utc(moment: datetime) -> str:
    """ISO 8601 with an explicit offset; a naive datetime is taken to be UTC (as sagaq stores)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat()


def format_link(template: str, notice: Notice) -> str:
    """Fill ``{saga_id}`` / ``{saga_name}`` in a saga URL template (validated by the config)."""
    return template.format(saga_id=notice.saga_id, saga_name=notice.saga_name)


def notice_links(notice: Notice, template: str | None = None) -> list[dict[str, str]]:
    """Links for a responder: the saga's page from ``template``, then http(s) ``details.links``.

    Links that cannot be built or are not http(s) are dropped rather than failing the delivery:
    a page without a link is still a page.
    """
    links: list[dict[str, str]] = []
    if template:
        with contextlib.suppress(KeyError, IndexError, ValueError, AttributeError):
            links.append({"href": format_link(template, notice), "text": f"saga {notice.saga_id}"})
    extra = notice.details.get(LINKS)
    for link in extra if isinstance(extra, list | tuple) else ():
        href = link.get("href") if isinstance(link, dict) else None
        if isinstance(href, str) and href.startswith(("http://", "https://")):
            links.append({"href": href, "text": str(link.get("text") or href)})
    return links


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def encode_json(body: Mapping[str, Any]) -> bytes:
    """Serialise once, compactly, as UTF-8: these are the exact bytes sent and signed.

    Values JSON does not know (datetimes, enums, sets) are converted rather than refused, so a
    notice never becomes undeliverable because of one odd detail; NaN and infinities (not JSON)
    are refused with a non-retryable :class:`DeliveryError`, since retrying cannot fix them.
    """
    try:
        text = json.dumps(
            body, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_json_default
        )
    except (TypeError, ValueError) as exc:
        raise DeliveryError(f"notice body is not valid JSON: {exc}", retryable=False) from None
    return text.encode("utf-8")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date; else None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _redact(text: str, url: str, secrets: Iterable[str]) -> str:
    """Remove the URL (and its path, which may be the credential) and any known secret."""
    origin = safe_origin(url)
    text = text.replace(url, origin)
    try:
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
    except ValueError:
        path = ""
    for secret in (path, *secrets):
        if secret and len(secret) > 1:
            text = text.replace(secret, "[redacted]")
    return text


def _snippet(response: httpx.Response, url: str, secrets: Iterable[str]) -> str:
    """The start of the body, one line, redacted *before* it is cut (no half-secrets)."""
    try:
        text = response.text
    except Exception:  # undecodable body: say so instead of failing the mapping
        return "<undecodable body>"
    text = " ".join(_redact(text, url, secrets).split())
    return text if len(text) <= BODY_SNIPPET else text[: BODY_SNIPPET - 1] + "…"


def check_response(
    response: httpx.Response, url: str, *, channel: str = "http", secrets: Iterable[str] = ()
) -> httpx.Response:
    """Return a 2xx response; raise :class:`DeliveryError` for anything else.

    429 and 5xx are retryable (with ``retry_after`` from ``Retry-After`` when given); every
    other status, including redirects (a moved endpoint is a configuration problem), is not.
    """
    status = response.status_code
    if 200 <= status < 300:
        return response
    where = safe_origin(url)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 429:
        message = f"{channel}: rate limited (HTTP 429) by {where}"
        if retry_after is not None:
            message += f"; retry after {retry_after:g}s"
        raise DeliveryError(message, retryable=True, status=status, retry_after=retry_after)
    body = _snippet(response, url, secrets)
    if status >= 500:
        raise DeliveryError(
            f"{channel}: HTTP {status} from {where}: {body}",
            retryable=True,
            status=status,
            retry_after=retry_after,
        )
    raise DeliveryError(
        f"{channel}: HTTP {status} from {where} (not retried): {body}",
        retryable=False,
        status=status,
    )


def post_bytes(
    url: str,
    data: bytes,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    client: httpx.Client | None = None,
    channel: str = "http",
    secrets: Iterable[str] = (),
) -> httpx.Response:
    """POST already-serialised JSON ``data`` (e.g. bytes that were signed) to ``url``.

    ``timeout`` is a total deadline for the whole delivery (connect, send, response), not
    only per read. Network errors and timeouts become retryable :class:`DeliveryError`; HTTP
    statuses are mapped by :func:`check_response`. A ``client`` passed in (tests, custom
    transports) is used as is and left open, with httpx's per-phase timeouts only.
    ``secrets`` are scrubbed from any error message on top of the URL itself.
    """
    secrets = tuple(secrets)
    sent = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    where = safe_origin(url)
    try:
        if client is not None:
            response = client.post(url, content=data, headers=sent, timeout=timeout)
        else:
            response = anyio.run(_post_within, url, data, sent, timeout)
    except TimeoutError:  # the total deadline: a server dripping bytes never trips a read
        raise DeliveryError(
            f"{channel}: timed out after {timeout:g}s posting to {where} (total deadline)",
            retryable=True,
        ) from None
    except httpx.TimeoutException as exc:
        raise DeliveryError(
            f"{channel}: timed out after {timeout:g}s posting to {where} ({type(exc).__name__})",
            retryable=True,
        ) from None
    except httpx.UnsupportedProtocol:
        raise DeliveryError(
            f"{channel}: endpoint is not an http(s) URL ({where})", retryable=False
        ) from None
    except httpx.RequestError as exc:  # connect/read/write errors, protocol errors
        detail = _redact(str(exc), url, secrets) or "no detail"
        raise DeliveryError(
            f"{channel}: network error posting to {where}: {type(exc).__name__}: {detail}",
            retryable=True,
        ) from None
    except httpx.InvalidURL:
        raise DeliveryError(f"{channel}: invalid endpoint URL ({where})", retryable=False) from None
    return check_response(response, url, channel=channel, secrets=secrets)


async def _post_within(url: str, data: bytes, headers: Mapping[str, str],
                       timeout: float) -> httpx.Response:
    """POST and read the whole response within ``timeout`` seconds in total.

    httpx's timeouts bound each connect, write and read, not the request: an endpoint that
    sends a byte every second holds a sync call for as long as it likes. Cancellation on the
    async client ends the request at the deadline, whatever phase it is in.
    """
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as own:
        with anyio.fail_after(timeout):
            return await own.post(url, content=data, headers=headers)


def post_json(
    url: str,
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    client: httpx.Client | None = None,
    channel: str = "http",
    secrets: Iterable[str] = (),
) -> httpx.Response:
    """Serialise ``body`` once with :func:`encode_json` and POST it (see :func:`post_bytes`)."""
    return post_bytes(
        url,
        encode_json(body),
        headers=headers,
        timeout=timeout,
        client=client,
        channel=channel,
        secrets=secrets,
    )
