"""Draw the README's picture, docs/img/readme.png, from the embedded demo model (offline, a few seconds).

    python docs/make_readme_image.py            # writes docs/img/readme.png
    python docs/make_readme_image.py OUT.png

The picture: on a sentence said twice, the demo model's previous-token head (L0H0) beside its induction head (L1H0),
which attends from each token of the repeat to the token that followed it the first time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attnlens
from attnlens import viz

OUT = Path(__file__).resolve().parent / "img" / "readme.png"
TEXT = "Karen painted seven lamps. The fox slept often. Karen painted seven lamps. The fox slept often."
MAX_BYTES = 150_000


def main(argv: list[str]) -> int:
    """Write the picture to ``argv[0]`` (default docs/img/readme.png) and print its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(argv[0]) if argv else OUT
    model, tokenizer = attnlens.load_demo()
    tr = attnlens.trace(model, TEXT, tokenizer=tokenizer)
    assert tr.tokens is not None  # kept because a tokenizer was given
    tokens = tr.tokens[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    viz.plot_pattern(tr.pattern(0)[0, 0], tokens, ax=axes[0], title="L0H0: the previous token")
    viz.plot_pattern(tr.pattern(1)[0, 0], tokens, ax=axes[1], title="L1H0: induction (what came next last time)")
    fig.suptitle("attnlens: two heads of the demo model on a sentence said twice")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    viz.save_figure(fig, out, dpi=90)
    plt.close(fig)
    size = out.stat().st_size
    print(f"wrote {out} ({size:,} bytes)")
    if size > MAX_BYTES:
        print(f"error: {out} is over {MAX_BYTES:,} bytes; lower the dpi or the figure size", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
