"""multipart/form-data bodies (audio and file uploads) as a record describes them.

Field by field: files by name, filename, content type and size; short text
fields with their value. File contents are never kept.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

#: A multipart field without a filename keeps its value when shorter than this.
MULTIPART_VALUE_BYTES = 1024
#: At most this many multipart fields are described; more marks it truncated.
MULTIPART_MAX_FIELDS = 64


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``form-data; name="a;b"; filename=x`` into the value and its parameters."""
    params: dict[str, str] = {}
    i = value.find(";")
    if i < 0:
        return value.strip().lower(), params
    main = value[:i].strip().lower()
    n = len(value)
    while i < n:
        i += 1  # past the ";"
        eq = value.find("=", i)
        if eq < 0:
            break
        name = value[i:eq].strip().lower()
        j = eq + 1
        while j < n and value[j] in " \t":
            j += 1
        if j < n and value[j] == '"':
            # Quoted string: may hold ";"; backslash escapes one character.
            chars = []
            j += 1
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(value[j])
                j += 1
            param = "".join(chars)
            semi = value.find(";", j)
        else:
            semi = value.find(";", j)
            param = value[j : semi if semi >= 0 else n].strip()
        params[name] = param
        if semi < 0:
            break
        i = semi
    return main, params


def describe_multipart(body: bytes, content_type: str | bytes) -> tuple[dict[str, Any], bool]:
    """The description of a multipart body, and whether fields were left out."""
    size = len(body)
    fallback = {"content_type": "multipart/form-data", "size": size}
    if isinstance(content_type, bytes):
        content_type = content_type.decode("latin-1")
    boundary = _header_params(content_type)[1].get("boundary")
    if not boundary:
        return fallback, False
    try:
        delimiter = b"--" + boundary.encode("latin-1")
    except UnicodeEncodeError:
        return fallback, False
    fields: list[dict[str, Any]] = []
    truncated = False
    pos = body.find(delimiter)
    # The first delimiter starts the body or a line after a preamble.
    if pos < 0 or (pos > 0 and body[pos - 1] != 0x0A):
        return fallback, False
    next_delimiter = b"\n" + delimiter
    while True:
        after = pos + len(delimiter)
        if body.startswith(b"--", after):
            break  # close delimiter
        eol = body.find(b"\n", after)
        if eol < 0:
            break
        start = eol + 1
        nxt = body.find(next_delimiter, start)
        # Leniency: a missing close delimiter ends the last part at the body's end.
        end = nxt if nxt >= 0 else size
        if end > start and body[end - 1] == 0x0D:
            end -= 1
        if len(fields) >= MULTIPART_MAX_FIELDS:
            truncated = True
            break
        fields.append(_describe_part(body, start, end))
        if nxt < 0:
            break
        pos = nxt + 1
    if not fields:
        return fallback, False
    return {
        "content_type": "multipart/form-data",
        "size": size,
        "fields": fields,
    }, truncated


def _describe_part(body: bytes, start: int, end: int) -> dict[str, Any]:
    # The headers end at the first blank line, CRLF or (leniently) LF.
    if body.startswith(b"\r\n", start):
        header_end, content_start = start, start + 2
    elif body.startswith(b"\n", start):
        header_end, content_start = start, start + 1
    else:
        header_end = body.find(b"\r\n\r\n", start, end)
        if header_end >= 0:
            content_start = header_end + 4
        else:
            header_end = body.find(b"\n\n", start, end)
            content_start = header_end + 2 if header_end >= 0 else end
            if header_end < 0:
                header_end = end
    name = filename = part_type = None
    for raw_line in body[start:header_end].split(b"\n"):
        header, sep, value = raw_line.decode("utf-8", "replace").partition(":")
        if not sep:
            continue
        header = header.strip().lower()
        if header == "content-disposition":
            params = _header_params(value)[1]
            name = params.get("name")
            filename = params.get("filename")
            extended = params.get("filename*")
            if extended is not None:
                # RFC 5987: charset'language'percent-encoded
                charset, _, rest = extended.partition("'")
                _, _, encoded = rest.partition("'")
                try:
                    filename = unquote(encoded, encoding=charset or "utf-8", errors="replace")
                except LookupError:
                    filename = unquote(encoded, errors="replace")
        elif header == "content-type":
            part_type = value.strip()
    part_size = max(end - content_start, 0)
    described: dict[str, Any] = {"name": name}
    if filename is not None:
        described["filename"] = filename
    if part_type is not None:
        described["content_type"] = part_type
    if filename is None and part_size < MULTIPART_VALUE_BYTES:
        described["value"] = body[content_start:end].decode("utf-8", "replace")
    else:
        described["size"] = part_size
    return described
