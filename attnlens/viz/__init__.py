"""Pictures of attention: matplotlib figures and self-contained interactive HTML views.

Everything here takes plain tensors (torch or numpy) and token strings, so it draws patterns from any source:
:func:`attnlens.trace`, a model's own ``outputs.attentions``, or hand-made arrays. The overview and text views
also take an :class:`attnlens.AttentionTrace` directly.

* Figures (:mod:`attnlens.viz.figures`, need matplotlib): :func:`plot_pattern` (one head), :func:`plot_head_scores`
  (a ``[layer, head]`` grid of scores, also of a ``HeadScores`` or ``ScanResult``), :func:`plot_heads` (chosen
  ``(layer, head)`` pairs of a trace side by side, one colour bar), :func:`plot_overview` (every head at once),
  :func:`plot_logit_lens` (the logit read after each layer, a ``ResidualStack``), :func:`save_figure`.
* HTML views (no extra dependency): :func:`pattern_html` (one head at a time, layer and head select boxes),
  :func:`overview_html` (every layer x head as thumbnails with their scores; a click opens one large),
  :func:`text_html` (the tokens as running text, coloured by a token's attention), :func:`lines_html` (one head's
  chosen query rows as arcs over the running text, for long inputs); :func:`save_html`. Each returns
  an :class:`HTMLView`, a ``str`` that a notebook displays and ``.save(path)`` writes as a page.
* Token labels (:mod:`attnlens.viz.labels`): :func:`token_labels` and :func:`token_texts` decode each id with the
  tokenizer, :func:`visible` shows spaces, newlines and tabs as ``␣``, ``⏎``, ``⇥``.

Caveats:

* matplotlib is an optional dependency (``pip install 'attnlens[viz]'``) imported inside the plotting functions
  only: importing this package, or making HTML, never loads it.
* The HTML works offline and fetches nothing: data, style and script are inline. Token text only reaches the page as
  JSON (with ``<``, ``>`` and ``&`` escaped) that the script puts on a canvas or in ``textContent``, so a token such as
  ``</script><script>...`` or ``<img onerror=...>`` shows as text and never runs.
* :func:`pattern_html` stores weights to 4 decimals up to a million weights; beyond, it and the overview and text
  views store one byte per weight (within 0.002 of the value) of the lower triangle, compressed, within a budget
  (``max_bytes``, 4 MB): a view of every head of GPT-2 small over 1024 tokens stays under 5 MB. What does not fit is
  reduced (the overview and head view store each head's maxima over blocks of tokens) or left out (the text view
  keeps whole heads, the selected first), and the page says so. Figures of long inputs keep a fixed size and draw
  block maxima (or means), said in their titles; neither figures nor views copy a whole stack of patterns.
"""

from __future__ import annotations

from attnlens.viz.figures import (
    plot_head_scores,
    plot_heads,
    plot_logit_lens,
    plot_overview,
    plot_pattern,
    save_figure,
)
from attnlens.viz.html import HTMLView, pattern_html, save_html
from attnlens.viz.labels import token_labels, token_texts, visible
from attnlens.viz.lines import lines_html
from attnlens.viz.overview import overview_html
from attnlens.viz.text import text_html

__all__ = [
    "HTMLView",
    "lines_html",
    "overview_html",
    "pattern_html",
    "plot_head_scores",
    "plot_heads",
    "plot_logit_lens",
    "plot_overview",
    "plot_pattern",
    "save_figure",
    "save_html",
    "text_html",
    "token_labels",
    "token_texts",
    "visible",
]
