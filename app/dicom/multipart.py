"""Multipart bodies: multipart/related (DICOM PS3.18) from STOW-RS clients, and the
multipart/form-data uploads of /v1/predict, parsed as they stream in; what we send to a PACS."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from email.utils import collapse_rfc2231_value


class MultipartError(ValueError):
    """The body is not valid multipart/related."""


class TooManyPartsError(MultipartError):
    """More parts than the caller allows."""


@dataclass
class Part:
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names

    def form_field(self) -> tuple[str | None, str | None]:
        """(name, filename) of a multipart/form-data part: `filename*=` (RFC 2231/5987, how
        clients send non-ASCII names) decoded, and preferred over `filename=`."""
        from email.message import Message

        message = Message()
        message["content-disposition"] = self.headers.get("content-disposition", "")
        name = message.get_param("name", header="content-disposition")
        if isinstance(name, tuple):
            name = collapse_rfc2231_value(name)
        return (str(name) if name is not None else None), message.get_filename()


def media_params(content_type: str) -> tuple[str, dict[str, str]]:
    """'multipart/related; type="application/dicom"; boundary=x' -> (media type, params);
    quoted values may hold ';' (RFC 2045 parameter syntax, parsed by the email package)."""
    from email.message import Message

    message = Message()
    message["content-type"] = content_type or "application/octet-stream"
    params = message.get_params() or []
    media = params[0][0].lower() if params else ""
    return media, {str(k).lower(): str(v) for k, v in params[1:]}


class RelatedParser:
    """Incremental multipart/related parser on python-multipart's RFC 2046 state machine (a
    delimiter is CRLF + "--" + boundary, so a payload holding the boundary string is not cut):
    feed chunks as they arrive; memory is the parts themselves, never copies of the body."""

    def __init__(self, boundary: str, max_parts: int):
        from python_multipart.multipart import MultipartParser

        if not boundary or len(boundary) > 200:
            raise MultipartError("missing or invalid boundary parameter")
        self.max_parts = max_parts
        self.parts: list[Part] = []
        self._data = bytearray()
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self.closed = False
        callbacks = {
            "on_part_begin": self._begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def _begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise TooManyPartsError(f"more than {self.max_parts} parts")
        self._data, self._headers = bytearray(), {}

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def _part_end(self) -> None:
        self.parts.append(
            Part(self._headers.get("content-type", ""), bytes(self._data), self._headers)
        )
        self._data = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self._headers[name] = self._value.decode("latin-1").strip()
        self._field, self._value = b"", b""

    def _end(self) -> None:
        self.closed = True

    def feed(self, chunk: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MultipartError(f"the multipart body is malformed ({exc})") from None

    def finish(self) -> list[Part]:
        self._parser.finalize()
        if not self.closed:
            raise MultipartError("the body ends without its closing boundary")
        return self.parts


def parse_related(body: bytes, boundary: str, max_parts: int = 1000) -> list[Part]:
    """Every part of a complete multipart/related body."""
    parser = RelatedParser(boundary, max_parts)
    parser.feed(body)
    return parser.finish()


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
