"""CSV downloads for every page that offers one: cells safe to open in a spreadsheet, and
querysets streamed a chunk at a time without holding the table."""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

CHUNK_SIZE = 2000


class _Echo:
    """A file-like object whose write returns what it was given (for csv.writer)."""

    def write(self, value: str) -> str:
        return value


def writer() -> Any:
    """A csv writer whose writerow returns the line instead of writing it."""
    return csv.writer(_Echo())


def cell(value: Any) -> str:
    """A value as CSV text; text that a spreadsheet would run as a formula is quoted
    (gateway text is untrusted)."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        text = json.dumps(value, sort_keys=True)
    elif hasattr(value, "isoformat"):
        text = value.isoformat()
    else:
        text = str(value)
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


def queryset_response(
    request: HttpRequest,
    queryset: QuerySet[Any],
    columns: Sequence[tuple[str, str]],
    filename: str,
) -> StreamingHttpResponse:
    """Stream `columns` ((field, title) pairs) of the queryset as CSV. Under ASGI (daphne)
    the stream must be async, or Django collects it whole first.

    Not `values_list().aiterator()`: its iterable runs the query when it is made, in the
    event loop, and Django refuses that (SynchronousOnlyOperation; the download hung under
    daphne). The sync iterator is made and advanced in the request's sync thread instead,
    one chunk per hop (ASGIHandler keeps one thread per request, so one connection)."""
    out = writer()
    header = out.writerow([title for _, title in columns])
    values = queryset.values_list(*[name for name, _ in columns])

    async def arows() -> AsyncIterator[str]:
        yield header
        source: Iterator[tuple[Any, ...]] | None = None

        def next_chunk() -> list[str]:
            nonlocal source
            if source is None:
                source = values.iterator(chunk_size=CHUNK_SIZE)
            return [
                out.writerow([cell(v) for v in row])
                for row in itertools.islice(source, CHUNK_SIZE)
            ]

        while chunk := await sync_to_async(next_chunk)():
            yield "".join(chunk)

    def rows() -> Iterator[str]:
        yield header
        for row in values.iterator(chunk_size=CHUNK_SIZE):
            yield out.writerow([cell(v) for v in row])

    stream = arows() if isinstance(request, ASGIRequest) else rows()
    response = StreamingHttpResponse(stream, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
