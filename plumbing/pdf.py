"""HTML to PDF with WeasyPrint, off the event loop.

WeasyPrint is pure CPU (layout, font subsetting): tens of milliseconds per page. `render_pdf` runs it
on a small thread pool of its own, so a burst of downloads neither blocks the event loop nor takes
every thread of the default executor (which aiosqlite and the page reader share). Fonts are embedded
(subset) by WeasyPrint; the documents name DejaVu Sans, which Debian's fonts-dejavu-core provides.
Images come only as data: URIs (the logo): the fetcher refuses every URL, so a template can never
make the server fetch a file or a remote address.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

PDF_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
_pool = ThreadPoolExecutor(max_workers=PDF_THREADS, thread_name_prefix="pdf")


class PdfError(RuntimeError):
    """The document could not be rendered."""


def html_to_pdf(html: str) -> bytes:
    """Render one HTML document to PDF bytes (blocking: call `render_pdf` from async code)."""
    import weasyprint  # imported on first use: the web process starts without loading pango
    from weasyprint.urls import URLFetcher

    fetcher = URLFetcher(allowed_protocols={"data"}, allow_redirects=False)
    document = weasyprint.HTML(string=html, url_fetcher=fetcher, base_url="data:,")
    result = document.write_pdf(pdf_identifier=False, uncompressed_pdf=False)
    if not result:
        raise PdfError("WeasyPrint produced no PDF")
    return bytes(result)


async def render_pdf(html: str) -> bytes:
    """`html_to_pdf` on the PDF thread pool."""
    return await asyncio.get_running_loop().run_in_executor(_pool, html_to_pdf, html)
