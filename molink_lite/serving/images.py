"""Images in chat requests: ``image_url`` content parts to image bytes, and a prompt with images to tokens.

* :func:`load_image`: a ``data:image/...;base64,`` URL is decoded here; an ``http(s)://`` URL is fetched only when
  the gateway was started with ``--allow-image-urls`` (at most ``max_bytes``, within ``timeout`` seconds, no
  redirects), and only from a public address: a host that is or resolves to a loopback, private, link-local or
  otherwise non-global address is refused (the gateway is no door into its own network), checked on the addresses
  the connection uses; anything else is refused. The bytes must be a PNG, JPEG, GIF or BMP whose header
  says a sane size (:func:`molink_lite.wire.media.sniff_image`): the projector decodes nothing else.
* The chat template sees :data:`MEDIA_MARKER` where each image goes (mtmd's marker); :func:`split_at_markers`
  cuts the rendered prompt there, the text pieces are tokenized as mtmd does (special tokens only on the first),
  and :func:`molink_lite.wire.media.plan_media` lays the images in between.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
from typing import List
from urllib.parse import urlsplit

from ..wire.media import sniff_image
from ..wire.protocol import ProtocolError

MEDIA_MARKER = "<__media__>"        # where an image goes in the rendered prompt (mtmd_default_marker)
MAX_IMAGES = 16                     # images in one request
DEFAULT_MAX_IMAGE_BYTES = 8 << 20
FETCH_TIMEOUT = 10.0                # seconds to fetch one remote image (--allow-image-urls)


class ImageError(ValueError):
    """An image the request cannot use (the message says why; a 400)."""


async def load_image(url: str, *, allow_remote: bool = False, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                     timeout: float = FETCH_TIMEOUT, allow_private: bool = False) -> bytes:
    """The bytes of an ``image_url`` (see the module docstring); :class:`ImageError` otherwise."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64") or not head[5:].lower().startswith("image/"):
            raise ImageError("a data URL image must be 'data:image/<type>;base64,<data>'")
        if len(payload) > (max_bytes * 4) // 3 + 4:
            raise ImageError(f"the image is larger than {max_bytes} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data URL's base64 does not decode") from None
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ImageError("image URLs are not fetched by this server (start the gateway with --allow-image-urls); "
                             "send the image as a data: URL")
        data = await _fetch(url, max_bytes, timeout, allow_private)
    else:
        raise ImageError("an image_url must be a data: URL (or http(s):// with --allow-image-urls)")
    if len(data) > max_bytes:
        raise ImageError(f"the image is larger than {max_bytes} bytes")
    try:
        sniff_image(data)
    except ProtocolError as e:
        raise ImageError(str(e)) from None
    return data


def _private(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return not ip.is_global


async def _fetch(url: str, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    import aiohttp
    from aiohttp.abc import AbstractResolver

    class PublicResolver(AbstractResolver):
        """The system resolver, refusing names that lead to non-global addresses (the connection uses these)."""

        def __init__(self) -> None:
            self._r = aiohttp.ThreadedResolver()

        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list:
            got = await self._r.resolve(host, port, family)
            if not allow_private and any(_private(str(x["host"])) for x in got):
                raise OSError(f"{host} resolves to a non-public address")
            return got

        async def close(self) -> None:
            await self._r.close()

    host = urlsplit(url).hostname or ""
    if not allow_private and (_private(host) or host.lower() in ("localhost", "localhost.localdomain")):
        raise ImageError("the image URL points at a non-public address; it is not fetched")
    try:
        connector = aiohttp.TCPConnector(resolver=PublicResolver())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector) as session:
            async with session.get(url, allow_redirects=False) as r:
                if 300 <= r.status < 400:
                    raise ImageError(f"fetching the image gave a redirect (HTTP {r.status}); redirects are not "
                                     "followed: give the final URL")
                if r.status != 200:
                    raise ImageError(f"fetching the image gave HTTP {r.status}")
                if r.content_length is not None and r.content_length > max_bytes:
                    raise ImageError(f"the image is larger than {max_bytes} bytes")
                buf = bytearray()
                async for chunk in r.content.iter_chunked(1 << 16):
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise ImageError(f"the image is larger than {max_bytes} bytes")
                return bytes(buf)
    except asyncio.TimeoutError:
        raise ImageError(f"fetching the image took longer than {timeout:g} s") from None
    except aiohttp.ClientConnectorError as e:
        raise ImageError(f"the image could not be fetched: {e.os_error or e}") from None
    except aiohttp.ClientError as e:
        raise ImageError(f"the image could not be fetched: {type(e).__name__}") from None


def split_at_markers(prompt: str, n_images: int) -> List[str]:
    """The rendered prompt's text pieces around its image markers (``n_images + 1`` of them)."""
    pieces = prompt.split(MEDIA_MARKER)
    if len(pieces) != n_images + 1:
        raise ImageError(f"the prompt holds {len(pieces) - 1} image markers ({MEDIA_MARKER!r}) for {n_images} "
                         "images: the text may not contain the marker itself")
    return pieces

