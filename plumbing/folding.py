"""Templates compiled for speed, one environment per language, with the output jinja2 gives.

Every page shows ~50 translated strings, and each `_("...")` costs a chain of runtime calls (the
`_` alias, the newstyle gettext, the catalog lookup, `Markup % {}`) on every render, although a
language's environment has one catalog and its answer never changes. So each environment looks
the strings up once, when it compiles a template (TranslationFolder):

- a call without variables becomes the text the runtime would have produced;
- `{{ _("Pay %(amount)s now", amount=x) }}` is written as its pieces, "Pay ", x, " now" (when every
  placeholder is a plain `%(name)s`), so no Markup is built, formatted and escaped again;
- any other call with variables becomes `Markup(translation) % {...}`, the very operation the
  runtime gettext ends with.

And `{{ value }}` is written as `escape_text(value)`, the text `escape(value)` makes without the
Markup object around it (TextOutputCodeGenerator).

The output is byte-identical by construction: the same catalog function jinja2 installs
(`ugettext`, else `gettext`, so an untranslated message falls back to its msgid), `Markup` only where
autoescape is on (MarkSafeIfAutoescape decides per template, or at run time inside a
`{% autoescape %}` block), and `%` applied as newstyle gettext applies it, so "%%" still becomes "%".
A call the runtime would fail on (a placeholder without a value, a stray "%") is left as it is, so
it fails the same way at render time. A template that binds `_` or `gettext` itself (a `set`, a loop
variable, a macro argument, an import) is not folded at all; a render context must not bind them
either (no caller does: they are the language's catalog). tests/unit/test_render_folding.py renders
every template both ways.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jinja2
import markupsafe
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.visitor import NodeTransformer

# The names the i18n extension resolves at render time: `_` (the alias) and `gettext` (what
# {% trans %} blocks compile to). ngettext/pgettext take counts or contexts and are left alone.
GETTEXT_NAMES = frozenset({"_", "gettext"})


def catalog_gettext(translations: Any) -> Callable[[str], str]:
    """The function jinja2's i18n extension installs for `translations` (jinja2/ext.py `_install`):
    folding must look strings up through the very same one."""
    function: Callable[[str], str] | None = getattr(translations, "ugettext", None)
    if function is None:
        function = translations.gettext
    return function


class TranslationFolder(NodeTransformer):
    """Replaces `_("literal", ...)` and `gettext("literal", ...)` calls with their translation."""

    def __init__(self, gettext: Callable[[str], str], *, split_output: bool = True) -> None:
        self._gettext = gettext
        self._split_output = split_output

    def fold(self, tree: nodes.Template) -> nodes.Template:
        if binds_gettext(tree):
            return tree
        folded = self.visit(tree)
        assert isinstance(folded, nodes.Template)
        return folded

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        children: list[nodes.Node] = []
        for child in node.nodes:
            pieces = self._split(child) if self._split_output else None
            children.extend([self.visit(child)] if pieces is None else pieces)
        node.nodes = children  # type: ignore[assignment]
        return node

    def _split(self, child: nodes.Node) -> list[nodes.Node] | None:
        """`{{ _("Pay %(amount)s now", amount=x) }}` written as the pieces the formatting would join:
        "Pay ", x, " now". Writing `x` escapes it (or turns it into a str without autoescape) exactly
        as `%s` does inside `Markup(...) % {...}` (or `str % {...}`), and the translation's own text is
        written as it is (TemplateData, never escaped), so the page is the same without a Markup
        built, formatted and escaped again for every message. Only for translations whose every
        placeholder is a plain `%(name)s` and whose every variable is used exactly once; anything else
        (widths, `%d`, a variable unused or twice) keeps the `%`."""
        if not isinstance(child, nodes.Call) or not child.kwargs or not is_literal_gettext(child):
            return None
        pieces = split_format(self._gettext(child.args[0].value))  # type: ignore[attr-defined]
        if pieces is None:
            return None
        values = {keyword.key: keyword.value for keyword in child.kwargs}
        names = [piece for piece in pieces if isinstance(piece, Placeholder)]
        if len(values) != len(child.kwargs) or sorted(names) != sorted(values):
            return None
        out: list[nodes.Node] = []
        for piece in pieces:
            if isinstance(piece, Placeholder):
                out.append(self.visit(values[piece]))  # inner calls folded too
            elif piece:
                out.append(nodes.TemplateData(piece, lineno=child.lineno))
        return out

    def visit_Call(self, node: nodes.Call) -> nodes.Node:
        self.generic_visit(node)  # inner calls first: _(error, card=_("your card"))
        if not is_literal_gettext(node):
            return node
        text = self._gettext(node.args[0].value)  # type: ignore[attr-defined]
        if not node.kwargs:
            try:
                # Newstyle gettext always formats, even without variables ("%%" -> "%").
                constant = text % {}
            except (KeyError, ValueError, TypeError):
                return node  # the runtime raises here too: let it, at render time
            return nodes.MarkSafeIfAutoescape(nodes.Const(constant), lineno=node.lineno)
        # `Markup(translation) % {name: value, ...}`, as newstyle gettext does; when every value is a
        # constant, jinja2's compiler folds this as well (and leaves it to run time if it raises).
        variables = nodes.Dict([nodes.Pair(nodes.Const(keyword.key), keyword.value) for keyword in node.kwargs], lineno=node.lineno)
        return nodes.Mod(nodes.MarkSafeIfAutoescape(nodes.Const(text)), variables, lineno=node.lineno)


class Placeholder(str):
    """The name of a `%(name)s` in a split format string (the text around it is a plain str)."""


_FORMAT_TOKEN = re.compile(r"%%|%\((\w+)\)s")


def split_format(text: str) -> list[str] | None:
    """The pieces `text % values` joins: `Pay %(amount)s (100%%)` -> ["Pay ", Placeholder("amount"),
    " (100%)"]; None if the text has any other conversion (`%d`, `%(x)02d`, a stray "%")."""
    pieces: list[str] = [""]
    start = 0
    for token in _FORMAT_TOKEN.finditer(text):
        literal = text[start : token.start()]
        if "%" in literal:
            return None
        pieces[-1] += literal
        if token.group(1) is None:
            pieces[-1] += "%"
        else:
            pieces += [Placeholder(token.group(1)), ""]
        start = token.end()
    if "%" in text[start:]:
        return None
    pieces[-1] += text[start:]
    return pieces


def is_literal_gettext(node: nodes.Call) -> bool:
    """`_("literal")` or `_("literal", name=value, ...)`: no *args/**kwargs, nothing but a string msgid."""
    return (
        isinstance(node.node, nodes.Name)
        and node.node.name in GETTEXT_NAMES
        and node.node.ctx == "load"
        and len(node.args) == 1
        and isinstance(node.args[0], nodes.Const)
        and type(node.args[0].value) is str
        and node.dyn_args is None
        and node.dyn_kwargs is None
    )


def binds_gettext(tree: nodes.Template) -> bool:
    """Whether the template gives `_` or `gettext` a value of its own anywhere (then a name may not
    mean the catalog, and folding would change the output)."""
    bound = {name.name for name in tree.find_all(nodes.Name) if name.ctx in ("store", "param")}
    bound.update(node.target for node in tree.find_all(nodes.Import))
    for imported in tree.find_all(nodes.FromImport):
        bound.update(name if isinstance(name, str) else name[1] for name in imported.names)
    return not bound.isdisjoint(GETTEXT_NAMES)


# markupsafe's own escaping of a str (C), without the Markup around it. Private, hence the public fallback.
_escape_inner: Callable[[str], str] = getattr(markupsafe, "_escape_inner", None) or (lambda text: str(markupsafe.escape(text)))


def escape_text(value: Any) -> str:
    """`markupsafe.escape(value)` as a plain str: the same text, without building a Markup object
    that the page's `"".join` turns back into a str at once."""
    if type(value) is str:
        return _escape_inner(value)
    if hasattr(value, "__html__"):
        return str(markupsafe.escape(value))  # already markup (a macro's output, a Markup): as escape() takes it
    return _escape_inner(str(value))


class TextOutputCodeGenerator(CodeGenerator):
    """Writes `{{ value }}` in an autoescaped template as `escape_text(value)` instead of `escape(value)`.

    Whatever a template writes is joined into a str, or wrapped in Markup again where jinja2 hands
    output on as a value (macros, `{% set %}` blocks, `self.block()`, `{% filter %}`, imported
    modules), so the Markup that `escape` builds for each value is thrown away: only the text counts.
    A template whose autoescaping is decided at run time (`{% autoescape %}` with a variable) is
    compiled as jinja2 compiles it.
    """

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        self.writeline("from plumbing.folding import escape_text")
        super().visit_Template(node, frame)

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        if frame.eval_ctx.volatile or not frame.eval_ctx.autoescape:
            super()._output_child_pre(node, frame, finalize)
            return
        self.write("escape_text(")
        if finalize.src is not None:
            self.write(finalize.src)


class FoldingEnvironment(jinja2.Environment):
    """An Environment that compiles its templates for speed once `fold(gettext)` is called: translations
    folded in as templates are parsed, escaped output written as text. Until then (and without it)
    templates compile exactly as jinja2 compiles them, which is what the tests compare against."""

    fold_with: TranslationFolder | None = None

    def fold(self, gettext: Callable[[str], str]) -> None:
        # Splitting a message's output into pieces would hand a `finalize` the pieces, not the message.
        self.fold_with = TranslationFolder(gettext, split_output=self.finalize is None)
        self.code_generator_class = TextOutputCodeGenerator

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        return tree if self.fold_with is None else self.fold_with.fold(tree)
