"""docs/hooks.py turns the docstrings' Sphinx roles, which mkdocstrings leaves as text, into links on the page.

The built site is checked by ``make docs-check`` (no role left as text on any page); these tests pin the rewriting
itself on small pieces of page HTML, as mkdocstrings renders them (``:func:`` then a code span).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

HOOKS = Path(__file__).resolve().parent.parent / "docs" / "hooks.py"
spec = importlib.util.spec_from_file_location("attnlens_docs_hooks", HOOKS)
assert spec is not None and spec.loader is not None
hooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hooks)

PAGE = (
    '<h2 id="attnlens.trace" class="doc doc-heading">trace</h2>'
    '<h2 id="attnlens.AttentionTrace" class="doc doc-heading">AttentionTrace</h2>'
    '<h3 id="attnlens.AttentionTrace.check" class="doc doc-heading">check</h3>'
    '<h2 id="attnlens.residual.ResidualStack" class="doc doc-heading">ResidualStack</h2>'
    '<h3 id="attnlens.residual.ResidualStack.check" class="doc doc-heading">check</h3>'
    '<h2 id="weights">Weights</h2>'
)


def link(target: str, title: str) -> str:
    return f'<a class="autorefs autorefs-internal" href="#{target}" title="{target}"><code>{title}</code></a>'


def test_full_short_and_tilde_names_link_to_the_heading() -> None:
    body = "<p>:func:<code>attnlens.trace</code>, :class:<code>~attnlens.AttentionTrace</code>, :func:`trace`</p>"
    out = hooks.rewrite_roles(PAGE + body)
    expected = f"<p>{link('attnlens.trace', 'attnlens.trace')}, {link('attnlens.AttentionTrace', 'AttentionTrace')}, "
    assert out == PAGE + expected + link("attnlens.trace", "trace") + "</p>"


def test_a_short_name_resolves_to_the_nearest_object() -> None:
    # Two objects have a `check`: each docstring's role names its own class's.
    body = "<p>:meth:<code>check</code></p>"
    out = hooks.rewrite_roles(PAGE + body)
    assert link("attnlens.residual.ResidualStack.check", "check") in out
    nearer = PAGE.replace('<h2 id="attnlens.residual', '<p>:meth:<code>check</code></p><h2 id="attnlens.residual', 1)
    assert link("attnlens.AttentionTrace.check", "check") in hooks.rewrite_roles(nearer)


def test_a_re_exported_path_resolves_and_other_names_stay_code() -> None:
    body = (
        "<p>:class:<code>attnlens.trace.AttentionTrace</code> :func:<code>torch.nn.functional.softmax</code> "
        ":mod:<code>attnlens.weights</code> :meth:<code>title &lt;attnlens.trace&gt;</code></p>"
    )
    out = hooks.rewrite_roles(PAGE + body)
    assert link("attnlens.AttentionTrace", "attnlens.trace.AttentionTrace") in out
    # another package's name and a section heading's id (`weights`) are no objects of the page: plain code
    assert "<code>torch.nn.functional.softmax</code>" in out and 'href="#weights"' not in out
    assert link("attnlens.trace", "title") in out
    assert ":func:" not in out and ":class:" not in out and ":mod:" not in out and ":meth:" not in out
