"""multipart/related bodies (DICOM PS3.18): parse what STOW-RS clients send, build what we send."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass


class MultipartError(ValueError):
    """The body is not valid multipart/related."""


@dataclass
class Part:
    content_type: str
    body: bytes


def media_params(content_type: str) -> tuple[str, dict[str, str]]:
    """'multipart/related; type="application/dicom"; boundary=x' -> (media type, params)."""
    pieces = content_type.split(";")
    params = {}
    for piece in pieces[1:]:
        key, _, value = piece.strip().partition("=")
        if key:
            params[key.strip().lower()] = value.strip().strip('"')
    return pieces[0].strip().lower(), params


def parse_related(body: bytes, boundary: str) -> list[Part]:
    """Split a multipart body on its boundary; each part's headers and payload."""
    if not boundary or len(boundary) > 200:
        raise MultipartError("missing or invalid boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    if delimiter not in body:
        raise MultipartError("the body does not contain its boundary")
    chunks = body.split(delimiter)
    parts = []
    closed = False
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            closed = True
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = chunk.partition(b"\n\n")
        if not sep:
            raise MultipartError("a part has no header/body separator")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        elif payload.endswith(b"\n"):
            payload = payload[:-1]
        headers = {}
        for line in re.split(rb"\r?\n", head):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(content_type=headers.get("content-type", ""), body=payload))
    if not closed:
        raise MultipartError("the body ends without its closing boundary")
    return parts


def build_related(
    payloads: list[bytes], content_type: str = "application/dicom"
) -> tuple[bytes, str]:
    """(body, Content-Type header) of a multipart/related message of DICOM instances."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for payload in payloads:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
        out += payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f'multipart/related; type="{content_type}"; boundary={boundary}'
