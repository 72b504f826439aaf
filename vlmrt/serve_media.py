"""Where the server may take an image from: a base64 data: URL always; a file only under
`--allowed-local-media-path`; an http(s) URL only on a host named by `--allowed-media-domains`
(vLLM's spelling; here off by default), fetched with a timeout and a size limit.

```
 url ─► data:...;base64,  ─► decode                                  ─► RGB PIL image
     ─► http(s)://host/.. ─► host in the domains? ─► GET (no redirect, no proxy,
                             else 400                 <= max_bytes, whole within timeout_s)
     ─► file:// or path   ─► under the folder and a file? else 400 (one answer for both)
```
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from vlmrt.errors import VlmrtError
from vlmrt.serve_loop import HttpError


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from.

    Args:
        local_root: a folder whose files may be named as images ("" = none).
        domains: hosts whose http(s) URLs are fetched (a subdomain of one counts; () = none).
        timeout_s: longest a fetch may take, connect to last byte.
        max_bytes: largest image a fetch may return.
    """

    local_root: str = ""
    domains: tuple[str, ...] = ()
    timeout_s: float = 5.0
    max_bytes: int = 32 << 20


def load_image_url(url: str, media: MediaPolicy | None = None):
    """A base64 data: URL, a file under the policy's folder (a file:// URL or a path), or an http(s)
    URL on an allowed host -> RGB PIL image. A file outside the folder and a missing one get the
    same answer."""
    media = media or MediaPolicy()
    if url.startswith("data:"):
        return _decode_data_url(url)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return _decode(fetch_image(url, media), f"the image at {url[:200]}")
    if scheme not in ("file", "") and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive
        raise HttpError(400, f"unsupported image URL scheme '{scheme}:'; use a data: URL (or a file:// URL)")
    if len(url) > 4096:  # not a path: most likely base64 sent without its data: prefix
        raise HttpError(400, "the image URL is not a data: URL and too long for a path; send data:image/png;base64,...")
    return _local_image(unquote(urlparse(url).path) if scheme == "file" else url, media.local_root)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead off the allowed hosts
        return None


def fetch_image(url: str, media: MediaPolicy) -> bytes:
    """The bytes at an http(s) URL whose host is allowed; a clear 400 for anything else."""
    host = (urlparse(url).hostname or "").lower()
    if not media.domains:
        raise HttpError(400, "image URLs over http(s) are not fetched by this server (start it with "
                             "--allowed-media-domains HOST to allow some); send the image inline as "
                             "data:image/jpeg;base64,...")
    if not any(host == d or host.endswith("." + d) for d in media.domains):
        raise HttpError(400, f"the image host '{host}' is not in the server's --allowed-media-domains; send the "
                             "image inline as a data: URL")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)
    deadline = time.monotonic() + media.timeout_s
    what = f"fetching the image at {url[:200]}"
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "vlmrt"}), timeout=media.timeout_s) as r:
            if r.status != 200:
                raise HttpError(400, f"{what} answered HTTP {r.status}; give a URL that serves the image itself")
            data = bytearray()
            while chunk := r.read1(1 << 16):
                data += chunk
                if len(data) > media.max_bytes:
                    raise HttpError(400, f"{what}: it is larger than {media.max_bytes} bytes; send a smaller image")
                if time.monotonic() > deadline:
                    raise TimeoutError
    except HttpError:
        raise
    except urllib.error.HTTPError as e:
        raise HttpError(400, f"{what} answered HTTP {e.code}; check the URL") from None
    except (TimeoutError, OSError) as e:  # URLError is an OSError; a socket timeout a TimeoutError
        late = isinstance(e, TimeoutError) or "timed out" in str(e)
        reason = f"it took longer than {media.timeout_s:g} s" if late else f"{getattr(e, 'reason', e)}"
        raise HttpError(400, f"{what} failed: {reason}; retry, or send the image inline as a data: URL") from None
    return bytes(data)


def _local_image(path: str, media_root: str):
    from vlmrt.processor import load_image

    unavailable = HttpError(400, f"the image file {path} is not available: the server reads local files only under "
                                 "its --allowed-local-media-path (and only ones that exist); send the image inline "
                                 "as a data: URL")
    if not media_root:
        raise unavailable
    root = Path(media_root).resolve()
    full = (root / path).resolve()  # an absolute path stays itself; symlinks and .. resolved
    if not full.is_relative_to(root) or not full.is_file():
        raise unavailable
    try:
        return load_image(full)
    except VlmrtError as e:
        raise HttpError(400, str(e)) from None


def _decode_data_url(url: str):
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise HttpError(400, "an image data: URL must be base64, e.g. data:image/png;base64,iVBORw0KGgo...")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, "the image data: URL's payload is not valid base64") from None
    return _decode(raw, "the image data: URL")


def _decode(raw: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    from vlmrt.processor import to_rgb

    what = f"{where} does not hold an image PIL can read (JPEG, PNG, WebP ...)"
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except UnidentifiedImageError:  # its message names the BytesIO object, which tells a client nothing
        raise HttpError(400, what) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise HttpError(400, f"{what}: {e}") from None
    return to_rgb(img)
