"""What the pay page renders to, kept in memory and keyed by everything that changes it.

Rendering the page costs more than the rest of GET /pay/l/<link> together, and on payday the same few
states of the same pages are rendered again and again. So a page is rendered once, with placeholders
for the two values that differ per answer (the CSP nonce and the CSRF tokens of its forms, see
`plumbing.web.Placeholders`), and every answer puts its own values in at send time, with its own
cookies (`views.render.finish_page`).

Never stale, with no invalidation: the key is derived from the page's data as read on *this*
request (the one point read that happens anyway): every loaded column of every ORM row and every
field of every dataclass in the tree the view renders (link, invoice, customer, live payment, cards,
and whatever the page data grows), plus the language, the path, the query string, the day (UTC), the
template set and translations, and the settings. A write anywhere changes what the next read sees,
and so the key, on every worker of every machine; an old entry is simply never asked for again and
falls out of the LRU. Three bookkeeping columns of the link that no page shows (open counts, written
every second while a link is being opened) are left out of the key, so that a link opened often
stays cached; `uncacheable_reason` refuses any template that names them.

Bounded: at most `max_entries` pages and `max_bytes` of (compressed) page bodies (and `MAX_HOT` uncompressed), least recently used
out first. A page is compressed against the first page kept of its template, language and status
(zlib's preset dictionary; that page's text stays in memory for the process's life, at most MAX_BASES):
pages of one template differ in a few values, so a pay page of ~8 KB keeps ~0.4-0.7 KB (~2.8 KB
compressed alone, which made 10,000 links' pages overflow `max_bytes`: payday's pages were rendered
again and again), and comes back faster (~10 us, was ~14.5 us: mostly copies from the dictionary).
Only answers that are pages of the link's state are kept (200, and 410 for a void invoice or a
withdrawn link); an answer with cookies of its own or a template that reads the request itself is
served once and not kept. Error pages are raised, not returned, and never reach the cache.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import pickle
import re
import secrets
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta, nodes
from sqlalchemy import Row, inspect
from starlette.requests import Request
from starlette.responses import Response

from links.models import PaymentLink
from payments.page_reader import PageRows
from plumbing.rendering import ROOT, pages
from plumbing.settings import Settings
from plumbing.web import RENDER_ONCE, Placeholders, csrf_token
from views.render import finish_page

log = logging.getLogger("paylink.page_cache")
MAX_ENTRIES = 12_000
MAX_BYTES = 32 * 1024 * 1024  # compressed page bodies and their bookkeeping; a pay page keeps ~1 KB in all (see _pack)
MAX_HOT = 256  # pages kept uncompressed too (~2 MB)
# Preset dictionaries (`_pack`): one page's text per template, language and status, at most this many
# (~8 KB each; 64 x BASE_MAX_BYTES = 2 MB at most), kept for the process's life (not counted in max_bytes:
# neither is MAX_HOT).
# zlib looks back at most 32 KB.
MAX_BASES = 64
BASE_MAX_BYTES = 32 * 1024
PACK_LEVEL = 6  # ~0.4 KB a pay page against its base (level 1: ~0.7 KB); compressing costs ~38 us, once per render
CACHEABLE_STATUS = frozenset({200, 410})  # a page of the link's state (410: void invoice, withdrawn link)
# What a template may read that differs per request, besides the CSP nonce and the CSRF tokens (which
# every answer fills in): a template that reads it is rendered for its request only.
PER_REQUEST = frozenset({"request"})
# Columns written on every open (links/opens.py) that no page shows: not part of the key.
NOT_SHOWN = {PaymentLink: PaymentLink.OPEN_COUNTERS}
NOT_SHOWN_NAMES = frozenset().union(*NOT_SHOWN.values())
MAX_FIXED = 256  # answer_fixed's remembered keys (error pages: a few per language)
# Scope keys: the raw hot path (views/hot_path.py) missed its key; the render it falls back to is kept
# under that key too, if it is the page of that path in that language.
FAST_KEY = "paylink.page_cache.fast_key"
FAST_LOCALE = "paylink.page_cache.fast_locale"
FAST_ROWS = "paylink.page_cache.fast_rows"  # the rows the key was made of: the app renders the page of these


class Uncacheable(Exception):
    """The page data holds a value the key cannot represent exactly: render without the cache."""


# --- the key: the page's data as read on this request ---------------------------------------------


def fingerprint(value: Any) -> Hashable:
    """`value` as a tree of plain values whose `repr` is equal for two values exactly when they render
    the same: dataclasses field by field, ORM rows by every loaded column (and loaded relationship),
    containers item by item. The leaves are kept as they are: the repr of a str, int, bool, float,
    Decimal, UUID, date, time or timezone-aware datetime is exact (1, 1.0 and True differ, and so do
    Decimal("1.0") and Decimal("1.00")). Anything else raises Uncacheable: its repr might hide a
    difference."""
    kind = type(value)
    if kind in _LEAVES or isinstance(value, enum.Enum):
        return value  # type: ignore[no-any-return]
    if isinstance(value, Row):  # a Core result row (attribute access like an ORM row)
        return ("Row", value._fields, *map(fingerprint, value))
    if kind is list or kind is tuple:
        return (kind.__name__, *[v if type(v) in _LEAVES else fingerprint(v) for v in value])
    if kind is dict:
        return ("dict", *[(fingerprint(k), fingerprint(v)) for k, v in value.items()])
    if hasattr(kind, "__mapper__"):
        return _row(value)
    if isinstance(value, uuid.UUID) and repr(value) == f"UUID('{value}')":
        _LEAVES.add(kind)  # asyncpg's own UUID class (a subclass): its repr is as exact
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (kind.__qualname__, *[fingerprint(getattr(value, name)) for name in _fields(kind)])
    raise Uncacheable(f"cannot key a {kind.__qualname__}")


_LEAVES: set[type] = {str, int, bool, float, type(None), Decimal, uuid.UUID, datetime, date, time, timedelta, bytes}
_FIELDS: dict[type, tuple[str, ...]] = {}
_ROW_KEYS: dict[type, tuple[str, ...]] = {}
_UNLOADED = "<not loaded>"


def _fields(kind: type) -> tuple[str, ...]:
    names = _FIELDS.get(kind)
    if names is None:
        names = _FIELDS[kind] = tuple(f.name for f in dataclasses.fields(kind))
    return names


def _row(row: Any) -> Hashable:
    """Every loaded attribute of an ORM row (columns, and relationships loaded on purpose; an unloaded
    one cannot be rendered: they raise on lazy load), except the columns no page shows."""
    kind = type(row)
    keys = _ROW_KEYS.get(kind)
    if keys is None:
        skipped = next((names for model, names in NOT_SHOWN.items() if issubclass(kind, model)), frozenset())
        keys = _ROW_KEYS[kind] = tuple(attr.key for attr in inspect(kind).attrs if attr.key not in skipped)
    loaded = row.__dict__  # the instance's loaded state (what sqlalchemy.inspect(row).dict returns)
    values = [loaded.get(key, _UNLOADED) for key in keys]
    return (kind.__qualname__, *[v if type(v) in _LEAVES else fingerprint(v) for v in values])


# --- which pages may be kept -------------------------------------------------------------------------


def uncacheable_reason(environment: jinja2.Environment, name: str) -> str | None:
    """Why the template `name` (with every template it extends or includes) cannot be rendered once
    for many answers, or None: it reads the request itself, or a column the key leaves out."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        assert environment.loader is not None
        source, _, _ = environment.loader.get_source(environment, current)
        tree = environment.parse(source)
        per_request = meta.find_undeclared_variables(tree) & PER_REQUEST
        if per_request:
            return f"{current} reads {', '.join(sorted(per_request))}"
        hidden = {node.attr for node in tree.find_all(nodes.Getattr) if node.attr in NOT_SHOWN_NAMES}
        if hidden:
            return f"{current} shows {', '.join(sorted(hidden))}, which the key leaves out"
        todo.extend(t for t in meta.find_referenced_templates(tree) if t is not None)
    return None


def fingerprint_of_files(*directories: Path) -> str:
    """The template set and translations as deployed (names, sizes, modification times)."""
    digest = hashlib.sha256()
    for directory in directories:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


# --- the cache -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachedPage:
    """A rendered page: its text without the placeholders, compressed (against `base`, another page's text,
    when there is one: a pay page of ~8 KB keeps ~0.4 KB), and where each placeholder goes back in."""

    text: bytes  # zlib, with `base` as its preset dictionary
    holes: tuple[tuple[int, uuid.UUID | None], ...]  # (offset in the text, CSRF subject or None for the nonce)
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # without content-length (and, if kept, without set-cookie)
    locale: str
    size: int
    base: bytes | None = None  # the preset dictionary `text` was compressed with (shared by many pages)


class PageCache:
    def __init__(self, settings: Settings, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._pages: OrderedDict[bytes, CachedPage] = OrderedDict()
        self._bytes = 0
        self._verdicts: dict[str, str | None] = {}
        self._fixed: dict[tuple[Hashable, ...], bytes] = {}
        # The texts of the pages answered most lately, uncompressed (decompressing costs more than the rest
        # of a hit): the same page for many answers (one link opened again and again, an error page).
        self._hot: OrderedDict[bytes, bytes] = OrderedDict()  # answer_fixed's keys (a few per language)
        self._warned: set[str] = set()
        self._bases: dict[tuple[str, str, int], bytes] = {}  # (template, language, status) -> preset dictionary (`_pack`)
        # Random per process: data on a page (an invoice's notes) cannot spell a placeholder.
        marker = secrets.token_hex(8)
        self._nonce = f"plnonce{marker}-"
        self._csrf = f"plcsrf{marker}-"
        self._split = re.compile(re.escape(self._nonce).encode() + b"|" + re.escape(self._csrf).encode() + rb"([0-9a-f]{32})-")
        settings_digest = hashlib.sha256(repr(settings).encode()).hexdigest()[:16]
        self._generation = (settings_digest, fingerprint_of_files(ROOT / "templates", ROOT / "locales"))
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._pages)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def key(self, request: Request, data: Iterable[Any]) -> bytes:
        """The key of the page `data` renders to for this request: a digest of the exact tree (the
        tree itself would hold a copy of every page's data in memory)."""
        tree = (
            self._generation,
            datetime.now(UTC).date(),  # anything a page says about "today" changes with the day
            request.scope["path"],
            request.scope["query_string"],
            *map(fingerprint, data),
        )
        return hashlib.blake2b(repr(tree).encode(), digest_size=20).digest()

    def fast_key(self, path: str, locale: str, rows: Hashable, day: date | None = None) -> bytes:
        """The hot path's key (views/hot_path.py): the page's rows exactly as the database driver gave
        them (payments/page_reader.PageRows: str, int, float, bytes, None, datetime, UUID, Decimal,
        pickled with their types), the path, the language, the day and the generation. Its own
        namespace: never equal to a `key`."""
        day = day or datetime.now(UTC).date()
        material = pickle.dumps(("fast", self._generation, day, path, locale, rows), protocol=5)
        return hashlib.blake2b(material, digest_size=20).digest()

    def fast_key_of(self, path: str, locale: str, rows: PageRows) -> bytes:
        """`fast_key` of `rows.rows`, worked out once per PageRows object (the same object answers every
        request of a gathered PostgreSQL batch, and SQLite's remembered reads): pickling a PostgreSQL row
        (its UUIDs and aware datetimes) costs ~10 us."""
        day = datetime.now(UTC).date()
        memo = (self._generation, path, locale, day)
        key = rows.keys.get(memo)
        if key is None:
            key = rows.keys[memo] = self.fast_key(path, locale, rows.rows, day)
        return key

    def lookup(self, key: bytes) -> tuple[CachedPage, bytes] | None:
        """The page kept under `key` and its text, or None. A hit is counted; a miss is not (the app
        answers the request then, and counts it)."""
        page = self._pages.get(key)
        if page is None:
            return None
        self._pages.move_to_end(key)
        self.hits += 1
        return page, self._text(key, page)

    def answer(self, request: Request, data: Iterable[Any], render: Callable[[], Response]) -> Response:
        """The page `render()` makes of `data` (with the language the caller chose among it), from the
        cache or rendered now and kept; filled with this answer's nonce, form tokens and cookies."""
        fast_key = request.scope.get(FAST_KEY)
        if fast_key is not None:
            # The hot path has just looked for this page under its own key and missed: render it (the
            # view renders the very rows that key was made of, views/pages.py) and keep it there, if it
            # is the page of that language (no key of this kind to work out: it would go unused).
            return self._answer(request, None, render, CACHEABLE_STATUS, fast_key=fast_key, fast_locale=request.scope.get(FAST_LOCALE))
        try:
            key = self.key(request, data)
        except (Uncacheable, RecursionError) as exc:  # (RecursionError: rows that refer to each other)
            self._warn_once(str(exc) or type(exc).__name__)
            return render()
        return self._answer(request, key, render, CACHEABLE_STATUS)

    def answer_fixed(self, request: Request, data: tuple[Hashable, ...], render: Callable[[], Response]) -> Response:
        """Like `answer`, for a page that `data` alone decides (not the path, not the query string: the
        caller puts the language in `data`), of any status: "this link does not work" for every forged
        link, rendered once per language. `data` is plain values (str, int, tuples of them)."""
        try:
            key = self.fixed_key(data)
        except (Uncacheable, RecursionError) as exc:
            self._warn_once(str(exc) or type(exc).__name__)
            return render()
        return self._answer(request, key, render, None)

    def fixed_key(self, data: tuple[Hashable, ...]) -> bytes:
        """`answer_fixed`'s key of `data` (remembered for hashable data: the hot path asks for it on every
        forged link)."""
        try:
            key = self._fixed.get(data)
            remember = True
        except TypeError:  # an unhashable value: keyed below, not remembered
            key, remember = None, False
        if key is None:
            tree = ("fixed", self._generation, fingerprint(data))
            key = hashlib.blake2b(repr(tree).encode(), digest_size=20).digest()
            if remember and len(self._fixed) < MAX_FIXED:
                self._fixed[data] = key
        return key

    def _answer(
        self,
        request: Request,
        key: bytes | None,
        render: Callable[[], Response],
        statuses: frozenset[int] | None,
        *,
        fast_key: bytes | None = None,
        fast_locale: str | None = None,
    ) -> Response:
        found = self.lookup(key) if key is not None else None
        if found is not None:
            return self._fill(request, *found)
        self.misses += 1
        placeholders = Placeholders(self._nonce, self._csrf)
        request.scope[RENDER_ONCE] = placeholders
        try:
            response = render()
        finally:
            del request.scope[RENDER_ONCE]
        body = getattr(response, "body", None)
        if not isinstance(body, bytes) or placeholders.template is None or placeholders.locale is None:
            return response  # not a rendered page (no placeholders in it either)
        keep = self._keepable(response, placeholders.template, statuses)
        page, text = self._page_of(response, body, placeholders.locale, keep_cookies=not keep, template=placeholders.template)
        if keep:
            # Under the hot path's key if it asked for this page (it answers that page's next requests),
            # else under this one.
            if fast_key is not None and fast_locale == placeholders.locale:
                key = fast_key
            if key is not None:
                self._store(key, page)
                self._keep_hot(key, text)
        return self._fill(request, page, text)

    def _keepable(self, response: Response, template: str, statuses: frozenset[int] | None) -> bool:
        if statuses is not None and response.status_code not in statuses:
            return False
        if any(name == b"set-cookie" for name, _ in response.raw_headers):
            return False  # something of this request's own
        if template not in self._verdicts:
            reason = self._verdicts[template] = uncacheable_reason(pages.environment("en"), template)
            if reason is not None:
                self._warn_once(reason)
        return self._verdicts[template] is None

    def _warn_once(self, reason: str) -> None:
        """A page that cannot be cached is still right, only slow: say so once, for whoever made it so."""
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("page_cache.not_cached reason=%s", reason)

    def _page_of(self, response: Response, body: bytes, locale: str, *, keep_cookies: bool, template: str) -> tuple[CachedPage, bytes]:
        """The page as kept, and its text (without the placeholders) uncompressed."""
        pieces: list[bytes] = []
        holes: list[tuple[int, uuid.UUID | None]] = []
        at = offset = 0
        for match in self._split.finditer(body):
            pieces.append(body[at : match.start()])
            offset += match.start() - at
            subject = match.group(1)
            holes.append((offset, uuid.UUID(subject.decode()) if subject else None))
            at = match.end()
        pieces.append(body[at:])
        text = b"".join(pieces)
        packed, base = self._pack(text, (template, locale, response.status_code), new_base=not keep_cookies)
        headers = tuple(
            (name, value) for name, value in response.raw_headers if name != b"content-length" and (keep_cookies or name != b"set-cookie")
        )
        size = len(packed) + 64 * len(holes) + 256
        return CachedPage(packed, tuple(holes), response.status_code, headers, locale, size, base), text

    def _pack(self, text: bytes, kind: tuple[str, str, int], *, new_base: bool) -> tuple[bytes, bytes | None]:
        """`text` compressed against the base of its kind (template, language, status: the first page
        kept of that kind becomes it, `new_base`), or alone when there is none and no room for another."""
        base = self._bases.get(kind)
        if base is None and new_base and len(self._bases) < MAX_BASES and len(text) <= BASE_MAX_BYTES:
            base = self._bases[kind] = text
        if base is None:
            return zlib.compress(text, PACK_LEVEL), None
        packer = zlib.compressobj(PACK_LEVEL, zdict=base)
        return packer.compress(text) + packer.flush(), base

    def _store(self, key: bytes, page: CachedPage) -> None:
        if page.size > self.max_bytes:
            return
        old = self._pages.pop(key, None)  # (the same key stored again: its old size goes)
        if old is not None:
            self._bytes -= old.size
        self._pages[key] = page
        self._bytes += page.size
        while len(self._pages) > self.max_entries or self._bytes > self.max_bytes:
            _, old = self._pages.popitem(last=False)
            self._bytes -= old.size

    def _text(self, key: bytes, page: CachedPage) -> bytes:
        text = self._hot.get(key)
        if text is not None:
            self._hot.move_to_end(key)
            return text
        text = zlib.decompress(page.text) if page.base is None else zlib.decompressobj(zdict=page.base).decompress(page.text)
        self._keep_hot(key, text)
        return text

    def _keep_hot(self, key: bytes, text: bytes) -> None:
        self._hot[key] = text
        self._hot.move_to_end(key)
        if len(self._hot) > MAX_HOT:
            self._hot.popitem(last=False)

    def _fill(self, request: Request, page: CachedPage, text: bytes) -> Response:
        settings = request.app.state.settings
        body = fill(page, text, str(request.scope.get("csp_nonce", "")).encode(), lambda subject: csrf_token(request, settings, subject))
        response = Response(body, status_code=page.status)
        response.raw_headers.extend(page.headers)
        finish_page(request, response, page.locale)
        return response


def fill(page: CachedPage, text: bytes, nonce: bytes, token_for: Callable[[uuid.UUID], str]) -> bytes:
    """The page's text with this answer's nonce and form tokens (`token_for(subject)`) in its holes."""
    tokens: dict[uuid.UUID, bytes] = {}
    chunks: list[bytes] = []
    at = 0
    for offset, subject in page.holes:
        chunks.append(text[at:offset])
        if subject is None:
            chunks.append(nonce)
        else:
            token = tokens.get(subject)
            if token is None:
                token = tokens[subject] = token_for(subject).encode()
            chunks.append(token)
        at = offset
    chunks.append(text[at:])
    return b"".join(chunks)


def page_cache_of(request: Request) -> PageCache:
    """The app's page cache (one per process; made on first use)."""
    state = request.app.state
    cache: PageCache | None = getattr(state, "page_cache", None)
    if cache is None:
        cache = state.page_cache = PageCache(state.settings)
    return cache
