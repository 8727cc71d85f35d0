"""Image URLs under a policy: a server never reads its own disk or the network because a request asked.

* ``data:`` URLs (base64) are always accepted (within the size limit);
* ``file://`` only under the folder named with ``--allowed-local-media-path``;
* ``http(s)://`` only for hosts named with ``--allowed-media-domains`` (and their
  subdomains), fetched with a size limit, a timeout per read and a total deadline (the
  request's remaining time: a server that trickles one byte a second never times out a read),
  redirects not followed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import VlmkitError


class MediaError(VlmkitError):
    """An image URL is refused or cannot be read; ``param`` names the request field."""

    def __init__(self, message: str, param: str, *, status: int = 400, code: str = "invalid_image"):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: Path | None = None
    allowed_domains: frozenset[str] = field(default_factory=frozenset)
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 10.0

    def domain_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == d or host.endswith("." + d) for d in self.allowed_domains)


async def fetch_image(url: str, policy: MediaPolicy, param: str, deadline: float | None = None) -> bytes:
    """The bytes an image URL stands for, or ``MediaError`` saying why not.

    Args:
        deadline: ``time.monotonic()`` by which a download must be complete (None: no total limit).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, policy, param)
    if scheme == "file":
        return _local_file(url, policy, param)
    if scheme in ("http", "https"):
        return await _remote(url, policy, param, deadline)
    raise MediaError(f"unsupported image URL scheme {scheme!r}: use a data: URL (base64)", param)


def _data_url(url: str, policy: MediaPolicy, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise MediaError("a data: image URL must be base64 encoded (data:image/png;base64,...)", param)
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise MediaError(f"the image is larger than the limit of {policy.max_bytes} bytes", param, status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL is not valid base64", param) from None


def _local_file(url: str, policy: MediaPolicy, param: str) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError("file:// image URLs are refused: the server was started without "
                         "--allowed-local-media-path", param)
    path = Path(unquote(urlparse(url).path)).resolve()
    root = policy.allowed_local_path.resolve()
    if not path.is_relative_to(root):
        raise MediaError(f"file:// image URLs are only allowed under {root}", param)
    if not path.is_file():
        raise MediaError(f"no such image file: {path.name}", param)
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"the image is larger than the limit of {policy.max_bytes} bytes", param, status=413)
    return path.read_bytes()


async def _remote(url: str, policy: MediaPolicy, param: str, deadline: float | None) -> bytes:
    host = urlparse(url).hostname or ""
    if not policy.domain_allowed(host):
        raise MediaError(f"image URLs from {host!r} are refused; the server allows "
                         f"{', '.join(sorted(policy.allowed_domains)) or 'no domain'} (--allowed-media-domains)", param)
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        return await asyncio.wait_for(_download(url, policy, param), timeout=left)
    except asyncio.TimeoutError:
        raise MediaError(f"fetching the image from {host!r} did not finish within the request's time "
                         "(--request-timeout)", param, status=504, code="timeout") from None


async def _download(url: str, policy: MediaPolicy, param: str) -> bytes:
    import httpx2 as httpx

    data = bytearray()
    try:
        async with httpx.AsyncClient(timeout=policy.timeout, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(f"fetching the image gave HTTP {response.status_code}", param)
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > policy.max_bytes:
                        raise MediaError(f"the image is larger than the limit of {policy.max_bytes} bytes", param,
                                         status=413)
    except httpx.HTTPError as e:
        raise MediaError(f"fetching the image failed: {type(e).__name__}", param) from None
    return bytes(data)
