"""MediaWiki markup -> clean text, with mwparserfromhell (its C tokenizer; see README for the
comparison with wikitextparser that chose it).

Kept: paragraphs, headings (as their own line), link text, list items, the visible text of a few
inline templates. Removed: other templates, tables, references, file/image/category links,
interlanguage links, HTML comments and the tags whose content is not prose.
"""
from __future__ import annotations

import html
import re

import mwparserfromhell
from mwparserfromhell.nodes import (Argument, Comment, ExternalLink, Heading, HTMLEntity, Tag,
                                    Template, Text, Wikilink)

# Tags whose content is not running prose.
DROP_TAGS = {
    "ref", "references", "table", "gallery", "math", "chem", "ce", "timeline", "imagemap",
    "score", "graph", "mapframe", "maplink", "templatedata", "templatestyles", "syntaxhighlight",
    "source", "pre", "code", "includeonly", "noinclude", "style", "script", "hiero", "inputbox",
    "categorytree", "indicator", "section", "math-chem",
}
BREAK_TAGS = {"br", "hr"}
# Inline templates whose first positional argument is visible text.
TEXT_TEMPLATES = {"nowrap", "nobr", "small", "smaller", "big", "larger", "sc", "smallcaps",
                  "nowiki", "abbr", "em", "strong", "var", "ill", "interlanguage link", "visible anchor"}
# Namespaces of links that are not prose, in English; a dump's own (localized) names are added.
NON_PROSE_NAMESPACES = {"file", "image", "media", "category"}
INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)*$")
MAGIC_WORD = re.compile(r"__[A-Z]+__")
QUOTES = re.compile(r"'{2,}")
SPACES = re.compile(r"[ \t\u00a0]+")
# Lines that are leftovers of table or template syntax, not prose.
JUNK_LINE = re.compile(r"^\s*(\{\||\|\}|\||!|\{\{|\}\}|\[\[)")
# Markup the parser leaves as text when its surroundings are unbalanced.
LEFTOVER_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.IGNORECASE | re.DOTALL)
LEFTOVER_TAG = re.compile(r"</?[a-zA-Z][^>\n]*>")


class WikiCleaner:
    def __init__(self, non_prose_namespaces: set[str] | None = None):
        self.non_prose = NON_PROSE_NAMESPACES | {n.lower() for n in (non_prose_namespaces or ())}

    def clean(self, wikitext: str) -> str:
        code = mwparserfromhell.parse(wikitext)
        raw = html.unescape(LEFTOVER_TAG.sub("", LEFTOVER_REF.sub("", self._render(code))))
        lines = []
        for line in raw.split("\n"):
            if JUNK_LINE.match(line):
                continue
            line = SPACES.sub(" ", QUOTES.sub("", MAGIC_WORD.sub("", line))).strip()
            if line and any(c.isalnum() for c in line):
                lines.append(line)
        return "\n".join(lines)

    def _render(self, code) -> str:
        return "".join(self._node(n) for n in code.nodes)

    def _node(self, node) -> str:
        if isinstance(node, Text):
            return node.value
        if isinstance(node, Wikilink):
            return self._link(node)
        if isinstance(node, Tag):
            name = str(node.tag).strip().lower()
            if name in DROP_TAGS or node.wiki_markup == "{|":
                return ""
            if name in BREAK_TAGS:
                return "\n"
            if node.self_closing or node.contents is None:
                return ""
            return self._render(node.contents)
        if isinstance(node, Heading):
            return "\n" + self._render(node.title).strip() + "\n"
        if isinstance(node, HTMLEntity):
            return node.normalize()
        if isinstance(node, ExternalLink):
            return self._render(node.title) if node.title is not None else ""
        if isinstance(node, Template):
            return self._template(node)
        if isinstance(node, (Comment, Argument)):
            return ""
        return ""

    def _link(self, link: Wikilink) -> str:
        title = str(link.title).strip()
        visible = title.startswith(":")  # [[:Category:X]] is an ordinary link
        prefix, sep, _ = title.lstrip(":").partition(":")
        if sep and not visible:
            p = prefix.strip().lower()
            if p in self.non_prose:
                return ""
            if link.text is None and INTERLANGUAGE.match(p):
                return ""
        if link.text is not None:
            return self._render(link.text)
        return title.lstrip(":").split("#")[0] if not title.startswith("#") else title[1:]

    def _template(self, tpl: Template) -> str:
        name = str(tpl.name).strip().lower().replace("_", " ")
        positional = [p for p in tpl.params if not p.showkey]
        if name in TEXT_TEMPLATES and positional:
            return self._render(positional[0].value)
        if (name == "lang" and len(positional) >= 2) or (name.startswith("lang-") and positional):
            return self._render(positional[-1].value if name == "lang" else positional[0].value)
        if name in ("convert", "cvt") and len(positional) >= 2:
            return f"{str(positional[0].value).strip()} {str(positional[1].value).strip()}"
        return ""
