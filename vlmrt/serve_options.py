"""The server's limits and access as a frozen dataclass, apart from vlmrt/serve.py so that building
the CLI's parser (which reads the defaults) imports neither torch nor the ASGI stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlmrt.errors import VlmrtError


@dataclass(frozen=True)
class ServeOptions:
    """Limits and access of a server.

    Args:
        max_queue: most requests waiting for an engine slot; one more is answered 503 with Retry-After.
        max_body_mib: largest request body (413 above it).
        body_timeout_s: time to receive a whole body (408 after it: a slow or short body).
        request_timeout_s: longest a request may run, queue included (504 after it; the request is aborted).
        api_key: when set, /v1/* needs `Authorization: Bearer KEY` (401 otherwise).
        allowed_local_media_path: images may be files under this folder ("" = no local files).
        allowed_media_domains: http(s) image URLs on these hosts (or their subdomains) are fetched
            (() = none: every http(s) URL is refused).
        image_fetch_timeout_s: longest an image fetch may take (its size limit is max_body_mib).
        image_cache_mib: vision outputs kept for images asked again (0 = no cache).
        quiet: no access log.
    """

    max_queue: int = 256
    max_body_mib: float = 32.0  # base64 inflates an image file by 4/3
    body_timeout_s: float = 10.0
    request_timeout_s: float = 600.0
    api_key: str = ""
    allowed_local_media_path: str = ""
    allowed_media_domains: tuple[str, ...] = ()
    image_fetch_timeout_s: float = 5.0
    image_cache_mib: float = 256.0
    quiet: bool = False

    def check(self) -> None:
        for flag, value in (("--max-body-mib", self.max_body_mib), ("--body-timeout", self.body_timeout_s),
                            ("--request-timeout", self.request_timeout_s),
                            ("--image-fetch-timeout", self.image_fetch_timeout_s)):
            if value <= 0:
                raise VlmrtError(f"{flag} must be above 0, got {value:g}")
        if self.max_queue < 0 or self.image_cache_mib < 0:
            raise VlmrtError("--max-queue and --image-cache-mib must be 0 or more")
        for domain in self.allowed_media_domains:
            if not domain or any(c in domain for c in "/: "):
                raise VlmrtError(f"--allowed-media-domains takes host names (e.g. images.example.com), got '{domain}'")
        media = self.allowed_local_media_path
        if media and not Path(media).is_dir():
            raise VlmrtError(f"--allowed-local-media-path {media} is not a folder; give the folder images may be read from")
