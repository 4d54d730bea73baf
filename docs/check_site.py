"""Open the built docs site in headless Chromium and check that every notebook page shows what its notebook made.

Run after ``make docs`` (``mkdocs build --strict``, which executes the notebooks)::

    python docs/check_site.py site --screenshots /tmp/attnlens-site

For each notebook under ``docs/`` (the tutorials and the gallery) this serves ``site/`` on localhost, opens the page
in Chromium with every request to another host refused, and fails unless:

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
    """What one notebook page showed, and what is wrong with it."""

    name: str
    url: str
    summary: dict | None = None
    page_errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshot: Path | None = None


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


def judge(report: PageReport, notebook: Path) -> None:
    """Fill ``report.problems`` from what the page showed."""
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
    """Open every notebook page of ``site``; returns the page reports and the URLs refused (other hosts)."""
    from playwright.sync_api import Error, Route, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    def collect(into: list[str]) -> Callable[[Error], None]:
        return lambda error: into.append(str(error))

    screenshots.mkdir(parents=True, exist_ok=True)
    refused: set[str] = set()
    reports = []
    with serve(site) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900})

        def route(r: Route) -> None:
            if urlsplit(r.request.url).hostname in ("127.0.0.1", None):
                r.continue_()
            else:
                refused.add(r.request.url)
                r.abort()

        context.route("**/*", route)
        for path, notebook in notebook_pages(DOCS):
            report = PageReport(name=path.rstrip("/"), url=base + path)
            reports.append(report)
            if not (site / path / "index.html").is_file():
                report.problems.append(f"page missing: {site / path / 'index.html'}")
                continue
            page = context.new_page()
            page.on("pageerror", collect(report.page_errors))
            page.goto(report.url, wait_until="load")
            try:  # the views draw from their own script; give them time, then judge what is there
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.jp-OutputArea-output [data-state]')]"
                    ".every(v => v.getAttribute('data-state') !== 'loading')",
                    timeout=VIEW_TIMEOUT_MS,
                )
            except PlaywrightTimeout as error:  # judged below, from the views' state
                report.page_errors.append(f"views still loading after {VIEW_TIMEOUT_MS} ms: {error}")
            report.summary = page.evaluate(SUMMARY_JS)
            report.screenshot = screenshots / (report.name.replace("/", "__") + ".png")
            page.screenshot(path=str(report.screenshot), full_page=True)
            page.close()
            judge(report, notebook)
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
        line = (
            f"{r.name}: {len(s['prompts'])} code cells, {s['outputs']} outputs, {len(s['images'])} figures, "
            f"{len(s['views'])} views -> {r.screenshot}"
        )
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
