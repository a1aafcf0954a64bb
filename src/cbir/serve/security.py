"""What keeps the server from becoming a hole in the machine it runs on.

Two rules are enforced here and nowhere else:

* write endpoints need a bearer token, compared in constant time (``hmac.compare_digest``),
  and the server refuses to start with writes enabled on a non-loopback address
  without one;
* uploads are identified by their bytes (Pillow's own format sniffers), never by
  the file name or the ``Content-Type`` the client claims.

(The request-body size limit is FastAPI's own ``max_body_size``, set in the app.)
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import socket
import stat
from pathlib import Path

from PIL import Image

from cbir.data.decode import register_heif
from cbir.errors import CbirError

#: Upload formats the server accepts (Pillow format names). Everything else is 415.
#: HEIF (phones' HEIC) and AVIF are sniffed only once pillow-heif / Pillow's AVIF plug-in is registered.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "HEIF", "AVIF")

#: MIME type to send for each accepted format (also used for ``GET /images/{id}``).
MIME_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "WEBP": "image/webp",
    "TIFF": "image/tiff",
    "PPM": "image/x-portable-anymap",
}

#: File suffix for each accepted format, for files the server writes itself.
SUFFIXES = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "BMP": ".bmp",
    "WEBP": ".webp",
    "TIFF": ".tif",
    "PPM": ".ppm",
    "HEIF": ".heic",
    "AVIF": ".avif",
}

#: Shortest token accepted from a token file: 128 bits of hex, well past guessing.
MIN_TOKEN_LENGTH = 16

#: Bytes Pillow's sniffers look at (``Image.open`` reads 16 too).
_SNIFF_BYTES = 16


class ServeConfigError(CbirError, ValueError):
    """The server was asked to start in a configuration it refuses (reported, then exit)."""

    exit_code = 2  # invalid usage (docs/cli.md, "Exit codes")


def sniff_image_format(head: bytes) -> str | None:
    """The image format the first bytes belong to, by Pillow's own signature checks.

    Only :data:`ACCEPTED_FORMATS` are considered, so a PDF, an SVG (script inside an
    "image"), HTML or an executable is ``None`` whatever its name or declared type.
    """
    register_heif()  # the HEIF/AVIF openers, registered lazily like the decoder's
    Image.init()
    prefix = head[:_SNIFF_BYTES]
    for fmt in ACCEPTED_FORMATS:
        entry = Image.OPEN.get(fmt)
        if entry is None:
            continue
        accept = entry[1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # a sniffer that chokes on a short prefix is a "no"
            continue
    return None


def sniff_file_format(path: str | os.PathLike) -> str | None:
    """:func:`sniff_image_format` of a file on disk (``None`` if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            return sniff_image_format(fh.read(_SNIFF_BYTES))
    except OSError:
        return None


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine.

    Names are resolved, and every address they resolve to must be loopback: a name
    like ``localhost`` that some resolver maps to a public address is not trusted.
    ``0.0.0.0`` / ``::`` (all interfaces) are not loopback.
    """
    host = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses
    )


def read_token_file(path: str | os.PathLike) -> str:
    """The bearer token in ``path`` (surrounding whitespace ignored).

    Refuses a missing, empty or short token with a message saying how to make a good
    one, because a guessable token is worse than none: it looks like protection.
    """
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError as exc:
        raise ServeConfigError(f"token file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeConfigError(f"cannot read token file {path}: {exc}") from exc
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ServeConfigError(
            f"token in {path} must be at least {MIN_TOKEN_LENGTH} characters without spaces; "
            "make one with: python -c 'import secrets; print(secrets.token_hex(32))' > FILE"
        )
    return token


def token_file_is_private(path: str | os.PathLike) -> bool:
    """False when group or others may read the token file (worth a warning at start-up)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True
    return not (mode & (stat.S_IRGRP | stat.S_IROTH))


def write_new_token(path: str | os.PathLike) -> str:
    """Create ``path`` with a fresh random token, readable by the owner only."""
    token = secrets.token_hex(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison, so response timing does not leak the token prefix."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
