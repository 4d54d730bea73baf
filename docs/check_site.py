"""Open the built docs site in headless Chromium: every page reads well, every notebook page shows what it made.

Run after ``make docs`` (``mkdocs build --strict``, which executes the notebooks)::

    python docs/check_site.py site --screenshots /tmp/attnlens-site

This serves ``site/`` on localhost and opens every page in Chromium, in a 1440 x 900 window (a laptop's screen) with
every request to another host refused. Every page fails unless:

* a code block of 120 columns (the width attnlens's code and outputs are written to) fits its container without
  scrolling sideways: a probe line of 120 characters is put in a code block, a notebook cell's input and a notebook
  output as the page styles them, and no code block of the page whose lines are at most 120 columns scrolls;
* its text shows no Sphinx role left unrendered (``:func:`` followed by a name, ``:class:``, ``:meth:``...: the
  docstrings' cross-references, which docs/hooks.py turns into links).

For each notebook under ``docs/`` (the tutorials and the gallery), the page also fails unless:

* the page exists and shows the notebook's code cells, every one with an execution count (``In [n]:``, never
  ``In [ ]:``), and at least one output;
* no output is an error or a traceback, and no script on the page throws;
* a notebook whose code draws (``plot_``, ``.plot(``, ``subplots``, ``Image(``) shows at least one figure: an
  ``<img>`` in an output, loaded, at least 100 x 100 pixels;
* every attnlens HTML view in an output (an element with ``data-state``) gets drawn without the network
  (``data-state="drawn"``) and its canvas is not blank;
* no output shows a path of the machine that built the site (the checkout, the temporary or the home folder);
* the page's screenshot is not blank.

A full-page screenshot of each page is written to the folder given by ``--screenshots`` (keep it out of the
repository). Requests to other hosts are refused and listed, and none is allowed (the theme uses the system's fonts
and MathJax is served by the site), so a page or an output that needs the network fails the check.

Needs ``playwright`` (the Python package; the browser is the system's Chromium, ``--chromium`` to point elsewhere).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import importlib.util
import json
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DOCS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# None: the theme uses the system's fonts (font: false) and MathJax is served by the site (docs/hooks.py), so a request
# to another host is a page that would not work offline.
ALLOWED_HOSTS: set[str] = set()
DRAWS = re.compile(r"\bplot_\w+\(|\.plot\(|\bsubplots\(|\bImage\(")
MIN_FIGURE_PX = 100
# Folders of the machine that built the site (the checkout, the temporary folder, the home folder): an output that
# shows one shows the reader a path that means nothing on their machine.
BUILD_PATHS = tuple(sorted({str(DOCS.parent), tempfile.gettempdir(), str(Path.home())}))
VIEW_TIMEOUT_MS = 15_000
VIEWPORT = {"width": 1440, "height": 900}
COLUMNS = 120

# Runs in the page: whether a line of `columns` characters fits each kind of code block. A probe copies the page's own
# block (a code block of the text, a notebook cell's input, a notebook output), holds the line, and is removed again;
# the page's real blocks whose lines are at most `columns` long must not scroll either.
WIDTH_JS = """(columns) => {
  const content = document.querySelector('.md-content');
  if (!content) return {probes: [], scrolling: []};
  const line = 'x'.repeat(columns);
  const scrolls = e => e.scrollWidth > e.clientWidth + 1;
  const column = content.querySelector('article') || content;
  const overflows = e => {  // the block or anything inside it scrolls, or it sticks out of the content column
    if ([e, ...e.querySelectorAll('*')].some(scrolls)) return true;
    const style = getComputedStyle(column);
    const right = column.getBoundingClientRect().right - parseFloat(style.paddingRight);
    return e.getBoundingClientRect().right > right + 1;
  };
  const outside = e => !e.closest('.jupyter-wrapper');
  const nb_output = content.querySelector('.jupyter-wrapper .jp-OutputArea-output pre');
  const kinds = [
    ['code block', [...content.querySelectorAll('.md-typeset .highlight')].filter(outside)[0], true],
    ['notebook input', content.querySelector('.jupyter-wrapper .jp-CodeCell'), false],
    ['notebook output', nb_output && nb_output.closest('.jp-OutputArea-child'), false],
  ];
  const probes = [];
  for (let [kind, block, always] of kinds) {
    let probe;
    if (block) {
      probe = block.cloneNode(true);
      const pre = probe.matches('pre') ? probe : probe.querySelector('pre');
      const code = pre && (pre.querySelector('code') || pre);
      if (!code) continue;
      code.textContent = line;
      probe.querySelectorAll('.jp-OutputArea').forEach(e => e.remove());  // a cell's input only
      block.after(probe);
    } else if (always) {  // a page without code: the theme's code block, in the content column
      probe = document.createElement('div');
      probe.className = 'highlight';
      probe.innerHTML = '<pre><code></code></pre>';
      probe.querySelector('code').textContent = line;
      column.append(probe);
    } else continue;
    const pre = probe.matches('pre') ? probe : probe.querySelector('pre');
    const needed = Math.max(...[pre, ...pre.querySelectorAll('*')].map(e => e.scrollWidth));
    probes.push({kind, fits: !overflows(probe), block: Math.round(pre.clientWidth), needed: Math.round(needed)});
    probe.remove();
  }
  const scrolling = [...content.querySelectorAll('pre')].filter(pre => {
    const longest = Math.max(...pre.textContent.split('\\n').map(l => l.length));
    return longest <= columns && overflows(pre);
  }).map(pre => pre.textContent.split('\\n')[0].slice(0, 60));
  return {probes, scrolling};
}"""
# A docstring's Sphinx role left as text: `:func:` and the name (its backticks became a code span, or stayed).
ROLE_TEXT = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc|const|type):\S")

# Runs in the page: what the notebook part of the page shows.
SUMMARY_JS = """() => {
  const nb = document.querySelector('.jupyter-wrapper');
  if (!nb) return null;
  const prompts = [...nb.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim());
  const outputs = nb.querySelectorAll('.jp-OutputArea-output');
  const errors = [...outputs].filter(e =>
    e.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr' && /Traceback|Error/.test(e.textContent)
  ).length + nb.querySelectorAll('.jp-OutputArea-child .ansi-red-fg, .jp-OutputArea-output .traceback').length;
  const images = [...nb.querySelectorAll('.jp-OutputArea-output img')].map(img => ({
    complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
  }));
  const views = [...nb.querySelectorAll('.jp-OutputArea-output [data-state]')].map(view => {
    // Inked: some canvas of the view (a thumbnail may be a few pixels wide) holds at least 3 colours.
    let inked = null;
    const canvases = [...view.querySelectorAll('canvas')].filter(c => c.width && c.height);
    for (const c of canvases) {
      const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      const step = 4 * Math.max(1, Math.floor(data.length / 4 / 20000));
      const colours = new Set();
      for (let i = 0; i < data.length && colours.size < 3; i += step) colours.add(data.slice(i, i + 4).join());
      inked = colours.size >= 3;
      if (inked) break;
    }
    const canvas = canvases.length > 0;
    return {state: view.getAttribute('data-state'), cls: view.className, canvas, inked};
  });
  const texts = [...outputs].map(e => e.innerText);
  return {prompts, outputs: outputs.length, errors, images, views, texts};
}"""


@dataclass
class PageReport:
    """What one page showed, and what is wrong with it."""

    name: str
    url: str
    notebook: Path | None = None
    summary: dict | None = None
    width: dict | None = None
    roles: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshot: Path | None = None


def site_pages(site: Path) -> list[str]:
    """The URL path of every page of the built site (directory URLs: a folder with an ``index.html``)."""
    return sorted(
        "" if page.parent == site else page.parent.relative_to(site).as_posix() + "/"
        for page in site.rglob("index.html")
    )


def notebook_pages(docs: Path) -> list[tuple[str, Path]]:
    """``(url path, notebook)`` of every notebook under docs/, as mkdocs names its page (directory URLs)."""
    return [(nb.relative_to(docs).with_suffix("").as_posix() + "/", nb) for nb in sorted(docs.rglob("*.ipynb"))]


def expects_figure(notebook: Path) -> bool:
    """Whether the notebook's code draws a figure (then its page must show one)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return any(DRAWS.search("".join(cell["source"])) for cell in cells if cell["cell_type"] == "code")


@contextmanager
def serve(folder: Path) -> Iterator[str]:
    """Serve ``folder`` on 127.0.0.1 (a free port) from a thread; yields the base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def blank(png: Path) -> bool:
    """Whether a screenshot is one flat colour."""
    from PIL import Image

    with Image.open(png) as image:
        return all(low == high for low, high in image.convert("RGB").getextrema())


def judge_reading(report: PageReport) -> None:
    """Fill ``report.problems`` from what every page must do: code fits at 120 columns, no role left as text."""
    width = report.width or {"probes": [], "scrolling": []}
    for probe in width["probes"]:
        if not probe["fits"]:
            report.problems.append(
                f"a {COLUMNS}-column line does not fit a {probe['kind']} at {VIEWPORT['width']} px: "
                f"{probe['block']} px wide, {probe['needed']} px needed"
            )
    if width["scrolling"]:
        scrolling = width["scrolling"]
        report.problems.append(f"{len(scrolling)} code blocks of at most {COLUMNS} columns scroll: {scrolling[:3]}")
    if report.roles:
        report.problems.append(f"{len(report.roles)} Sphinx roles shown as text: {report.roles[:5]}")


def judge(report: PageReport, notebook: Path) -> None:
    """Fill ``report.problems`` from what a notebook page showed."""
    s = report.summary
    problems = report.problems
    if s is None:
        problems.append("no notebook on the page (no .jupyter-wrapper)")
        return
    code_cells = sum(1 for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code")
    if len(s["prompts"]) != code_cells:
        problems.append(f"{len(s['prompts'])} code cells on the page, the notebook has {code_cells}")
    unrun = [p for p in s["prompts"] if not re.fullmatch(r"In\s\[\d+\]:", p)]
    if unrun:
        problems.append(f"{len(unrun)} code cells were not executed (prompts {sorted(set(unrun))})")
    if s["outputs"] == 0:
        problems.append("no outputs")
    if s["errors"]:
        problems.append(f"{s['errors']} error outputs")
    figures = [i for i in s["images"] if i["complete"] and min(i["width"], i["height"]) >= MIN_FIGURE_PX]
    if len(figures) != len(s["images"]):
        problems.append(f"images that did not load or are smaller than {MIN_FIGURE_PX} px: {s['images']}")
    if expects_figure(notebook) and not figures:
        problems.append("the notebook draws, but the page shows no figure")
    for view in s["views"]:
        if view["state"] != "drawn" or (view["canvas"] and not view["inked"]):
            problems.append(f"a view was not drawn: {view}")
    leaks = sorted({path for text in s["texts"] for path in BUILD_PATHS if path + "/" in text})
    if leaks:
        problems.append(f"outputs show paths of the build machine: {leaks}")
    if report.page_errors:
        problems.append(f"script errors: {report.page_errors}")
    if report.screenshot is not None and blank(report.screenshot):
        problems.append(f"blank screenshot {report.screenshot}")


def check(site: Path, screenshots: Path, chromium: str) -> tuple[list[PageReport], set[str]]:
    """Open every page of ``site``; returns the page reports and the URLs refused (other hosts)."""
    from playwright.sync_api import Error, Route, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    def collect(into: list[str]) -> Callable[[Error], None]:
        return lambda error: into.append(str(error))

    screenshots.mkdir(parents=True, exist_ok=True)
    refused: set[str] = set()
    reports = []
    with serve(site) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport=VIEWPORT)

        def route(r: Route) -> None:
            if urlsplit(r.request.url).hostname in ("127.0.0.1", None):
                r.continue_()
            else:
                refused.add(r.request.url)
                r.abort()

        context.route("**/*", route)
        notebooks = dict(notebook_pages(DOCS))
        for path in sorted(set(site_pages(site)) | set(notebooks)):
            report = PageReport(name=path.rstrip("/") or "index", url=base + path, notebook=notebooks.get(path))
            reports.append(report)
            if not (site / path / "index.html").is_file():
                report.problems.append(f"page missing: {site / path / 'index.html'}")
                continue
            page = context.new_page()
            page.on("pageerror", collect(report.page_errors))
            page.goto(report.url, wait_until="load")
            report.width = page.evaluate(WIDTH_JS, COLUMNS)
            text = page.evaluate("() => (document.querySelector('.md-content') || document.body).innerText")
            report.roles = [text[max(0, m.start() - 20) : m.end() + 30] for m in ROLE_TEXT.finditer(text)]
            report.screenshot = screenshots / (report.name.replace("/", "__") + ".png")
            if report.notebook is None:
                page.screenshot(path=str(report.screenshot))  # the first screen: what a reader sees on opening it
                page.close()
                judge_reading(report)
                if report.page_errors:
                    report.problems.append(f"script errors: {report.page_errors}")
                continue
            try:  # the views draw from their own script; give them time, then judge what is there
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.jp-OutputArea-output [data-state]')]"
                    ".every(v => v.getAttribute('data-state') !== 'loading')",
                    timeout=VIEW_TIMEOUT_MS,
                )
            except PlaywrightTimeout as error:  # judged below, from the views' state
                report.page_errors.append(f"views still loading after {VIEW_TIMEOUT_MS} ms: {error}")
            report.summary = page.evaluate(SUMMARY_JS)
            page.screenshot(path=str(report.screenshot), full_page=True)
            page.close()
            judge_reading(report)
            judge(report, report.notebook)
        browser.close()
    return reports, refused


def main(argv: list[str] | None = None) -> int:
    """Command line: check the site, print one line per page, exit 1 on any problem."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site (mkdocs build's site/ folder)")
    parser.add_argument("--screenshots", type=Path, required=True, help="folder for the page screenshots")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the Chromium executable (default {CHROMIUM})")
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"error: {args.site} is not a built site (no index.html); run `make docs` first", file=sys.stderr)
        return 2
    if importlib.util.find_spec("playwright") is None:
        print("error: the site check needs playwright: pip install playwright (no browser download)", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"error: no Chromium at {args.chromium}; install it or pass --chromium", file=sys.stderr)
        return 2
    reports, refused = check(args.site.resolve(), args.screenshots, args.chromium)
    failed = False
    for r in reports:
        s = r.summary or {"prompts": [], "outputs": 0, "images": [], "views": []}
        fits = ", ".join(f"{p['kind']} {p['block']} px" for p in (r.width or {"probes": []})["probes"])
        line = f"{r.name}: {fits or 'no code'}"
        if r.notebook is not None:
            line += (
                f"; {len(s['prompts'])} code cells, {s['outputs']} outputs, {len(s['images'])} figures, "
                f"{len(s['views'])} views"
            )
        line += f" -> {r.screenshot}"
        print(("FAIL " if r.problems else "ok   ") + line)
        for problem in r.problems:
            print(f"     - {problem}")
        failed |= bool(r.problems)
    hosts = sorted({urlsplit(url).hostname or "?" for url in refused})
    print(f"requests to other hosts refused: {len(refused)} ({', '.join(hosts) or 'none'})")
    unexpected = sorted(url for url in refused if urlsplit(url).hostname not in ALLOWED_HOSTS)
    if unexpected:
        print(f"FAIL requests to hosts other than {sorted(ALLOWED_HOSTS)}: {unexpected}")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
