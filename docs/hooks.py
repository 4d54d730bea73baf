"""mkdocs hooks: serve MathJax from the site itself, and render the docstrings' Sphinx roles as links.

MathJax 3 comes from a package of the registries (``django-static-mathjax``, in the ``docs`` extra, which ships
MathJax's ``es5`` build as files); after the build, the one component the site loads (``tex-mml-chtml.js``) and the
fonts it asks for are copied to ``site/js/mathjax/``, where ``extra_javascript`` points. Nothing is downloaded at
build time and no page asks a CDN.

attnlens's docstrings cross-reference with Sphinx roles (``:func:`attnlens.trace```), which mkdocstrings leaves as
text (``:func:`` then the code span). After each page is rendered, every role becomes a link to the object's heading
on the same page (mkdocstrings gives each object's heading its dotted path as id); a short or relative name resolves
to the documented object nearest to where it is written, and a name with no heading on the page stays plain code.
"""

from __future__ import annotations

import html
import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

COMPONENT = "tex-mml-chtml.js"
FONTS = Path("output/chtml/fonts/woff-v2")  # MathJax finds these relative to the component's own URL
TARGET = Path("js/mathjax")


def _es5() -> Path:
    spec = importlib.util.find_spec("mathjax")
    roots = [] if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)
    for root in roots:
        es5 = Path(root) / "static" / "mathjax" / "es5"
        if (es5 / COMPONENT).is_file():
            return es5
    raise FileNotFoundError(
        "MathJax is not installed for the docs build (the package django-static-mathjax): pip install -e '.[docs]'"
    )


def on_post_build(config: Any, **kwargs: Any) -> None:
    """Copy MathJax's component and fonts into the built site."""
    es5, target = _es5(), Path(config["site_dir"]) / TARGET
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / COMPONENT, target / COMPONENT)
    shutil.copytree(es5 / FONTS, target / FONTS, dirs_exist_ok=True)


ROLE = re.compile(
    r":(?P<role>func|class|meth|attr|mod|data|obj|exc|const|type|py:\w+):"
    r"(?:<code>(?P<code>[^<]+)</code>|`(?P<tick>[^`]+)`)"
)
EXPLICIT = re.compile(r"^(?P<title>.*?)\s*&lt;(?P<target>[^&]+)&gt;$")  # :func:`title <target>`, escaped by markdown
HEADING = re.compile(r"<h[1-6]\b[^>]*>")
OBJECT_ID = re.compile(r'\bid="(?P<id>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"')


def _common(a: str, b: str) -> int:
    """How many leading dotted parts two paths share."""
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def _resolve(target: str, here: str, ids: list[str]) -> str | None:
    """The page's object id that ``target`` names, written inside the object ``here``; None if the page has none.

    Sphinx's rules, approximately: the full path, else the nearest object whose path ends with the name (the one
    sharing most of ``here``'s path, then the shortest). A full path of the package that the page documents under a
    shorter one (a re-export: ``attnlens.trace.AttentionTrace`` shown as ``attnlens.AttentionTrace``) resolves to an
    object whose path is the full one with middle parts left out; another package's names (``torch.nn...``) do not.
    """
    name = target.lstrip(".")
    found = [i for i in ids if i == name or i.endswith("." + name)]
    if not found:
        parts = name.split(".")
        found = [i for i in ids if len(parts) > 1 and _shortened(i.split("."), parts)]
    if not found:
        return None
    return min(found, key=lambda i: (-_common(i, here), -_common(i, name), len(i)))


def _shortened(path: list[str], full: list[str]) -> bool:
    """Whether ``path`` is ``full`` with some of its middle parts left out (same first and last part)."""
    if path[0] != full[0] or path[-1] != full[-1] or len(path) >= len(full):
        return False
    rest = iter(full[1:-1])
    return all(part in rest for part in path[1:-1])


def rewrite_roles(page_html: str) -> str:
    """Replace the Sphinx roles left in ``page_html`` by links to the objects' headings (or plain code)."""
    anchors = [
        (m.start(), found["id"])
        for m in HEADING.finditer(page_html)
        if "doc-heading" in m[0] and (found := OBJECT_ID.search(m[0]))
    ]
    ids = sorted({i for _, i in anchors})

    def link(m: re.Match[str]) -> str:
        text = m["code"] if m["code"] is not None else html.escape(m["tick"], quote=False)
        explicit = EXPLICIT.match(text)
        title, target = (explicit["title"], explicit["target"]) if explicit else (None, text)
        short = target.startswith("~")
        target = html.unescape(target.lstrip("~"))
        if title is None:
            title = html.escape(target.rsplit(".", 1)[-1] if short else target.lstrip("."), quote=False)
        here = next((i for pos, i in reversed(anchors) if pos < m.start()), "")
        found = _resolve(target, here, ids)
        code = f"<code>{title}</code>"
        if found is None:
            return code
        anchor = html.escape(found)
        return f'<a class="autorefs autorefs-internal" href="#{anchor}" title="{anchor}">{code}</a>'

    return ROLE.sub(link, page_html)


def on_page_content(page_html: str, **kwargs: Any) -> str:
    """Render the Sphinx roles of the docstrings shown on the page as links."""
    return rewrite_roles(page_html)
