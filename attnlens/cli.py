"""attnlens: quick looks at the attention of a Hugging Face checkpoint from a terminal.

``attnlens weights | verify | heads | inspect | scan | generate [MODEL]``. MODEL is a hub name or a local checkpoint
folder; without one, the embedded demo checkpoint is used, so every command works offline.

Exit status: 0 on success, 1 when ``verify`` (or ``generate``'s check) finds a mismatch, 2 on a usage error (a bad
option value, a checkpoint that cannot be loaded, an unusable device, a missing optional dependency), reported as one
line on stderr.

This module imports only the standard library at the top (torch and attnlens on first use), so that the parser can be
built without them: the console command (:mod:`attnlens_cli`) answers ``--help`` and usage errors in a few tens of
milliseconds, where importing torch alone takes seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from attnlens.models import Adapter
else:

    class _Torch:
        """torch, imported at the first attribute read (the parser needs no torch)."""

        def __getattr__(self, name: str) -> Any:
            import torch

            return getattr(torch, name)

    torch = _Torch()

__all__ = ["main"]

DEFAULT_TEXT = "The cat sat on the mat, and the dog sat on the rug. The cat sat on the mat, and the dog sat on the rug."
_DTYPES = ("bfloat16", "float16", "float32", "float64")


def _check_device(name: str) -> None:
    """Refuse a device that torch does not know or that this machine lacks, before any loading."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch asserts on backends it was built without
        reason = str(error).strip().splitlines()[0].split(". ")[0]  # torch's first sentence; the rest is a dump
        raise ValueError(f"--device {name} is not usable on this machine ({reason})") from None


def _load(args: argparse.Namespace) -> tuple[Adapter, Any]:
    """(the model's adapter, tokenizer or None) from the MODEL argument, or the demo checkpoint."""
    from attnlens.loading import load
    from attnlens.models import adapt

    _check_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    return adapt(model), tokenizer


def _inputs(args: argparse.Namespace, model: Adapter, tokenizer: Any) -> tuple[torch.Tensor, list[str] | None]:
    """Token ids ``[1, pos]`` from --ids or --text (checked against the model), and their strings if possible."""
    if args.ids:
        ids = torch.tensor([args.ids])
    else:
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer; pass token ids with --ids")
        ids = tokenizer(args.text, return_tensors="pt")["input_ids"]
    model.check_inputs(ids)  # ids out of the vocabulary or too many: a named error before the tokenizer's own
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist()) if tokenizer is not None else None
    return ids, tokens


def _gpt2_small() -> Any:
    """A GPT-2-small-shaped model (GPT2Config() defaults) with seeded random weights: GPT-2's shapes, offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


def cmd_weights(args: argparse.Namespace) -> int:
    """Print the weight walk-through: config, embeddings, the fused q/k/v split and per-head shapes."""
    from attnlens.models import adapt, extract_weights

    if args.gpt2_small:
        model = adapt(_gpt2_small())
        source = "GPT-2-small-shaped model with seeded random weights (GPT2Config() defaults)"
    else:
        model, _ = _load(args)
        source = args.model or "the embedded demo checkpoint"
    w = extract_weights(model)
    if not 0 <= args.layer < w.n_layers:
        raise ValueError(f"--layer must lie in [0, {w.n_layers}), got {args.layer}")
    layer = w.layers[args.layer]
    n_kv = layer.n_kv_heads
    kv_heads = f" ({n_kv} key/value heads, each read by {w.n_heads // n_kv})" if n_kv != w.n_heads else ""
    # head_dim is a config field of its own in the Llama family (Qwen3-4B: 128 where d_model / heads = 80).
    d_head = (
        f"{w.d_model} / {w.n_heads} = {w.d_head}"
        if w.d_model == w.n_heads * w.d_head
        else f"{w.d_head} (its own setting: d_model / heads = {w.d_model} / {w.n_heads} = {w.d_model / w.n_heads:g})"
    )
    lines = [
        f"model: {source} ({type(model.model).__name__}, {model.kernel} attention, {w.dtype})",
        *model.describe(),
        f"W_E (token embedding)    {list(w.W_E.shape)}  = {w.W_E.numel():,} parameters",
        f"W_pos (position embed.)  {list(w.W_pos.shape)}  = {w.W_pos.numel():,} parameters"
        if w.W_pos is not None
        else "W_pos (position embed.)  none: positions enter as a rotation of q and k (rotary)",
        *model.layout_lines(w, args.layer),
        f"heads: {w.n_heads} per layer{kv_heads}, d_head = {d_head}; scale 1/sqrt(d_head) = {layer.scale:.6g}",
        f"total parameters: {sum(p.numel() for p in model.model.parameters()):,}"
        + (" (W_U is tied to W_E)" if w.W_U is not None and w.W_U.data_ptr() == w.W_E.data_ptr() else ""),
    ]
    print("\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Recompute attention from the extracted weights and compare with the model's own; exit 1 on failure."""
    from attnlens.verify import verify

    overrides = {}
    for item in args.tolerance or []:
        quantity, _, value = item.partition("=")
        try:
            overrides[quantity] = float(value)
        except ValueError:
            raise ValueError(f"--tolerance takes QUANTITY=NUMBER, got {item!r}") from None
    model, tokenizer = _load(args)
    ids, _ = _inputs(args, model, tokenizer)
    report = verify(model, ids, tolerances=overrides or None)
    print(report.to_json() if args.json else report)
    return 0 if report.ok else 1


def cmd_heads(args: argparse.Namespace) -> int:
    """Print the top heads for each head score: on the text, and induction on repeated random tokens."""
    from attnlens import metrics
    from attnlens.trace import trace

    if args.prepend_bos and args.ids:
        raise ValueError("--prepend-bos applies to --text; with --ids, put the bos id first yourself")
    model, tokenizer = _load(args)
    ids, _ = _inputs(args, model, tokenizer)
    # The text's ids checked above; with --prepend-bos, trace tokenizes it again with the bos in front.
    tr = trace(model, args.text, tokenizer=tokenizer, prepend_bos=True) if args.prepend_bos else trace(model, ids)
    scores = metrics.head_scores(tr)
    table: dict[str, list[tuple[int, int, float]]] = {}
    for name in scores.names:
        if getattr(scores, name) is not None:  # undefined for this text (e.g. no repeated token)
            lowest = name == "entropy"  # low entropy = sharp head
            table[f"{name} ({'lowest' if lowest else 'highest'})"] = scores.top(name, args.top, largest=not lowest)
    induction = metrics.induction_scores(
        model, seq_len=args.seq_len, batch=args.batch, seed=0, prepend_bos=args.prepend_bos
    )
    table["induction on repeated random tokens"] = metrics.top_heads(induction, args.top)
    if args.json:
        print(json.dumps({name: [list(row) for row in rows] for name, rows in table.items()}, indent=2))
        return 0
    width = max(len(name) for name in table)
    for name, rows in table.items():
        cells = "  ".join(f"L{layer}H{head} {score:.3f}" for layer, head, score in rows)
        print(f"{name:<{width}}  {cells}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Draw a head, every head (overview) or the text view to a PNG/SVG/PDF or a self-contained HTML file."""
    from attnlens import viz
    from attnlens.trace import trace

    html = args.out.endswith(".html")
    if args.view == "text" and not html:
        raise ValueError(f"--view text writes a page: give --out FILE.html, not {args.out}")
    if args.view == "head" and args.layer is None:
        raise ValueError("--view head needs --layer N (or use --view overview for every layer)")
    if not html:
        import matplotlib  # noqa: F401 - to name the missing extra before any work is done

    model, tokenizer = _load(args)
    ids, _ = _inputs(args, model, tokenizer)
    n_layers = model.n_layers
    if args.layer is not None and not 0 <= args.layer < n_layers:
        raise ValueError(f"--layer must lie in [0, {n_layers}), got {args.layer}")
    labels = viz.token_texts(tokenizer, ids[0]) if tokenizer is not None else [str(i) for i in ids[0].tolist()]
    if args.view == "head":
        t = trace(model, ids, layers=[args.layer])
        pattern = t.pattern(args.layer)[0].float()  # [head, q_pos, k_pos]
        if args.head is not None and not 0 <= args.head < pattern.shape[0]:
            raise ValueError(f"--head must lie in [0, {pattern.shape[0]}), got {args.head}")
        if html:
            viz.save_html(viz.pattern_html(pattern[None], labels, layers=[args.layer]), args.out)
        else:
            head = 0 if args.head is None else args.head
            fig = viz.plot_pattern(pattern[head], labels, title=f"layer {args.layer}, head {head}")
            viz.save_figure(fig, args.out)
    else:
        t = trace(model, ids, tokenizer=tokenizer)
        if args.head is not None and not 0 <= args.head < t.n_heads:
            raise ValueError(f"--head must lie in [0, {t.n_heads}), got {args.head}")
        if args.view == "overview" and html:
            viz.overview_html(t, labels, title="attnlens overview").save(args.out)
        elif args.view == "overview":
            viz.save_figure(viz.plot_overview(t.patterns[:, 0]), args.out)
        else:
            layer = n_layers - 1 if args.layer is None else args.layer
            head = 0 if args.head is None else args.head
            viz.text_html(t, labels, heads=[(layer, head)], title="attnlens text view").save(args.out)
    print(f"wrote {args.out}")
    return 0


def _number_list(values: list[str] | None, option: str) -> list[int] | None:
    """Layer or head numbers from an option's words, each a number or a comma-separated list (``0 3``, ``0,3``)."""
    if values is None:
        return None
    numbers = []
    for item in (part for value in values for part in value.split(",")):
        try:
            numbers.append(int(item))
        except ValueError:
            raise ValueError(f"{option} takes integers (e.g. {option} 0 3 or {option} 0,3), got {item!r}") from None
    return numbers


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan a corpus (or, with neither MODEL nor --data, the demo's held-out text) and write the statistics as JSON."""
    import os
    import random

    from attnlens._indices import check_indices
    from attnlens.scan import scan

    if args.data is None and args.model is not None:
        raise ValueError("--data is needed with a MODEL: a .txt file (blank-line-separated documents) or a .jsonl file")
    layers, heads = _number_list(args.layers, "--layers"), _number_list(args.heads, "--heads")
    # Under torchrun each process takes its own GPU: --device cuda means cuda:LOCAL_RANK.
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    model, tokenizer = _load(args)
    # Checked here too, so that the message names the options (scan itself says "layers" / "heads").
    if layers is not None:
        check_indices(layers, model.n_layers, "--layers")
    if heads is not None:
        check_indices(heads, model.n_heads, "--heads")
    if args.data is None:
        from attnlens.demo.corpus import make_corpus

        # The demo trainer's own generator, with the seed of its held-out text (training seed 0 + 10000).
        data: Any = make_corpus(random.Random(10_000), 400)
    else:
        data = args.data
    result = scan(
        model,
        data,
        tokenizer=tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        layers=layers,
        heads=heads,
        progress=not args.quiet,
        checkpoint=args.checkpoint,
        text_field=args.text_field,
        encoding=args.encoding,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # every process holds the result; the first writes it
    result.save(args.out)
    if not args.quiet:
        window = result.provenance["scan"]["seq_len"]
        print(f"{result.n_tokens:,} tokens in {result.n_windows:,} windows of {window} tokens")
        width = max(len(name) for name in result.scores)
        for name in result.scores:
            lowest = name in ("entropy", "distance")  # sharp, local heads first
            cells = "  ".join(f"L{i}H{j} {v:.3f}" for i, j, v in result.top(name, args.top, largest=not lowest))
            print(f"{name:<{width}}  {'lowest ' if lowest else 'highest'}  {cells}")
    print(f"wrote {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt, trace every step's attention, check it, and optionally write the text view."""
    from attnlens.generation import trace_generate

    if args.out is not None and not args.out.endswith(".html"):
        raise ValueError(f"--out writes the text view: give FILE.html, not {args.out}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = _load(args)
    if tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; --prompt needs one")
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.seed is not None}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        options["pad_token_id"] = tokenizer.eos_token_id  # GPT-2's tokenizer has no pad token
    g = trace_generate(model, ids, tokenizer=tokenizer, **options)
    report = g.check(raise_error=False)
    print(f"prompt: {args.prompt!r}")
    print("generated: " + repr("".join(g.step_tokens())))
    print(report)
    if args.out is not None:
        layer = model.n_layers - 1
        g.view(heads=[(layer, 0)], title=f"attnlens generate: {args.prompt}").save(args.out)
        print(f"wrote {args.out}")
    return 0 if report.ok else 1


class _Formatter(argparse.HelpFormatter):
    """Each option's default after its help, unless the help already says it (or there is none to say)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnlens", description=__doc__.splitlines()[0], formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_Formatter)
        p.add_argument("model", nargs="?", help="hub name or local checkpoint folder (default: the demo checkpoint)")
        p.add_argument("--dtype", choices=_DTYPES, default="float32", help="the dtype to load the weights in")
        p.add_argument("--device", default="cpu", help="the device to run on: cpu, cuda, cuda:1, ...")
        p.add_argument(
            "--strict", action="store_true", help="refuse a config with keys of unknown effect instead of warning"
        )
        return p

    def with_input(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        group = p.add_mutually_exclusive_group()
        group.add_argument(
            "--text", default=DEFAULT_TEXT, help="text to run (needs the checkpoint's tokenizer; default: a demo text)"
        )
        group.add_argument("--ids", type=int, nargs="+", help="token ids to run instead of text (default: the text's)")
        return p

    p = command("weights", "print the GPT-2 weight walk-through: config, W_E, the fused q/k/v split, heads")
    p.add_argument("--layer", type=int, default=0, help="the layer whose q/k/v split and heads are shown")
    p.add_argument("--gpt2-small", action="store_true", help="use a GPT-2-small-shaped model with random weights")
    p.set_defaults(func=cmd_weights)

    p = with_input(
        command("verify", "check attnlens's recomputation against the model, layer by layer and head by head")
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--tolerance",
        action="append",
        metavar="QUANTITY=NUMBER",
        help="override one relative tolerance, e.g. --tolerance pattern=1e-6 (repeatable; default: the derived ones)",
    )
    p.set_defaults(func=cmd_verify)

    p = with_input(command("heads", "print the top heads for each head score"))
    p.add_argument("--top", type=int, default=3, help="heads to list per score")
    p.add_argument(
        "--seq-len",
        type=int,
        help="length of the repeated random sequence (induction; default 50, or less where n_ctx or a sliding "
        "window needs it)",
    )
    p.add_argument("--batch", type=int, default=8, help="repeated random sequences for the induction score")
    p.add_argument(
        "--prepend-bos",
        action="store_true",
        help="put the bos token (GPT-2: <|endoftext|>) in front of the text and of each random sequence",
    )
    p.add_argument("--json", action="store_true", help="print the top heads as JSON")
    p.set_defaults(func=cmd_heads)

    p = with_input(command("inspect", "draw attention patterns (a head, every head, or the text view) to PNG or HTML"))
    p.add_argument(
        "--view",
        choices=("head", "overview", "text"),
        default="head",
        help="head: one layer's heads (default); overview: every layer x head; text: tokens coloured by attention",
    )
    p.add_argument(
        "--layer",
        type=int,
        help="the layer (needed by --view head; text view: the first head's layer, default the last layer)",
    )
    p.add_argument(
        "--head", type=int, help="the head drawn in image output, or selected first in the text view (default 0)"
    )
    p.add_argument(
        "--out", required=True, help="FILE.png, FILE.svg, FILE.pdf or FILE.html (--view text: .html); required"
    )
    p.set_defaults(func=cmd_inspect)
    p = command("scan", "head statistics over a corpus, written as JSON (works under torchrun)")
    p.add_argument("--data", help="a .txt (blank-line-separated documents) or .jsonl file (default: demo text)")
    p.add_argument("--text-field", default="text", help="the field holding the text in .jsonl lines")
    p.add_argument("--encoding", default="utf-8", help="the encoding of the --data file")
    p.add_argument("--seq-len", type=int, help="tokens per window (default: the model's n_ctx, at most 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, help="scan at most this many tokens (default: all of the data)")
    p.add_argument(
        "--layers",
        nargs="+",
        metavar="LAYER",
        help="scan only these layers, e.g. --layers 0 5 or --layers 0,5 (negative count from the end; default all)",
    )
    p.add_argument("--heads", nargs="+", metavar="HEAD", help="keep only these heads, e.g. --heads 1,3 (default all)")
    p.add_argument("--out", default="scan.json", help="the JSON file to write")
    p.add_argument(
        "--checkpoint",
        help="save partial sums here every few batches; resume from it if it exists (default: no checkpoint)",
    )
    p.add_argument("--top", type=int, default=3, help="heads to list per score")
    p.add_argument("--quiet", action="store_true", help="no progress and no summary")
    p.set_defaults(func=cmd_scan)

    p = command("generate", "generate from a prompt, trace each step's attention over the cache, and check it")
    p.add_argument("--prompt", required=True, help="the text to continue (required; needs the checkpoint's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="how many tokens to generate")
    p.add_argument("--seed", type=int, help="sample with this seed (default: greedy)")
    p.add_argument(
        "--out", help="write the text view, stepping through the generated tokens, to FILE.html (default: none)"
    )
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnlens`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    from attnlens.errors import AttentionCaptureError, strict_config

    try:
        with strict_config(args.strict):
            return int(args.func(args))
    # Usage errors and named attnlens errors (UnsupportedModelError is a ValueError): one line, exit 2 as argparse
    # does; exit 1 is kept for "verification failed".
    except (ValueError, TypeError, OSError, AttentionCaptureError) as error:
        print("attnlens: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    except ImportError as error:
        print("attnlens: " + _missing_extra(error), file=sys.stderr)
        return 2


# Optional dependencies and the extra that installs each.
_EXTRAS = {"matplotlib": "viz"}


def _missing_extra(error: ImportError) -> str:
    """One line naming the missing module and the ``pip install`` that brings it."""
    name = (error.name or "").split(".")[0]
    if not name:  # an ImportError raised by hand (attnlens.viz's own says what to install)
        return " ".join(str(error).split())
    extra = _EXTRAS.get(name)
    if extra is not None:
        return f"this needs {name}, which is not installed: pip install 'attnlens[{extra}]'"
    return f"this needs the module {name}, which is not installed: pip install {name}"


if __name__ == "__main__":
    sys.exit(main())
