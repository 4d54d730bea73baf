"""mkdocs hooks: serve MathJax from the site itself, so that formulas render offline.

MathJax 3 comes from a package of the registries (``django-static-mathjax``, in the ``docs`` extra, which ships
MathJax's ``es5`` build as files); after the build, the one component the site loads (``tex-mml-chtml.js``) and the
fonts it asks for are copied to ``site/js/mathjax/``, where ``extra_javascript`` points. Nothing is downloaded at
build time and no page asks a CDN.
"""

from __future__ import annotations

import importlib.util
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
