"""One benchmark measurement, run in a fresh process inside one tool's venv.

Usage (normally only called by ``run.py``)::

    python child.py --tool TOOL --task TASK --batch B --seq S [--variant random]

Prints exactly one line ``RESULT {json}`` on success (other output is noise
from the libraries).  A tool whose API is missing reports
``{"status": "not available", "reason": ...}`` instead of failing.

Tools:  attnlens | hf_eager | hf_forward | tl_hooked (TransformerLens 3.x
HookedTransformer) | tl_bridge (TransformerLens 4.x TransformerBridge) |
nnsight.

Tasks:  patterns (all layers) | layer0 | extraction | verify | fidelity.

Timing: ``--warmup`` untimed calls, then ``--inner`` timed calls
(time.perf_counter; the median of them is reported).  Memory: the peak RSS
(VmHWM, reset through /proc/self/clear_refs) during the *first* call, minus
the RSS just before it, i.e. memory beyond the already loaded model; also the
process' lifetime peak RSS (getrusage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path


# ----------------------------------------------------------------- memory ---
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak RSS growth (MiB) over a block of code."""

    def __enter__(self):
        import gc

        gc.collect()
        self.can_reset = _reset_peak()
        self.rss_before = _status_kb("VmRSS") or 0
        self.ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.can_reset and _status_kb("VmHWM") is not None:
            peak = _status_kb("VmHWM")
        else:  # fallback: only sees growth above the earlier lifetime peak
            peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, self.rss_before)
        self.extra_mib = max(0, peak - self.rss_before) / 1024.0
        self.rss_before_mib = self.rss_before / 1024.0
        return False


# ----------------------------------------------------------------- helpers --
class NotAvailable(Exception):
    pass


def touch(state) -> None:
    """Read every parameter/buffer once so that lazily mapped checkpoint pages
    are resident before memory is measured (otherwise the first call would be
    charged for paging in the model itself)."""
    import torch

    seen = set()
    todo = [state]
    while todo:
        obj = todo.pop()
        if isinstance(obj, (tuple, list)):
            todo.extend(obj)
            continue
        mod = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "_model", None)
        if not isinstance(mod, torch.nn.Module):
            continue
        for t in list(mod.parameters()) + list(mod.buffers()):
            if id(t) not in seen and t.numel():
                seen.add(id(t))
                float(t.detach().float().sum()) if t.is_floating_point() else int(t.sum())


def snapshot_dir() -> Path:
    hub = Path(os.environ["HF_HUB_CACHE"])
    repo = hub / "models--gpt2"
    commit = (repo / "refs" / "main").read_text().strip()
    return repo / "snapshots" / commit


def reference_wte():
    """The token embedding exactly as stored in our checkpoint file."""
    from safetensors import safe_open

    with safe_open(str(snapshot_dir() / "model.safetensors"), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("wte.weight"))  # noqa: SIM118 (safe_open is not iterable)
        return f.get_tensor(key)


def load_hf(attn_implementation: str | None = None):
    from transformers import GPT2LMHeadModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    # "gpt2" is resolved offline through HF_HUB_CACHE to our snapshot
    return GPT2LMHeadModel.from_pretrained("gpt2", **kwargs).eval()


def make_ids(batch: int, seq: int, vocab: int = 50257):
    import torch

    g = torch.Generator().manual_seed(1234 + 7 * batch + seq)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def hf_reference(ids):
    """fp32 patterns from HF eager output_attentions: list over layers of [b,h,q,k]."""
    import torch

    model = load_hf("eager")
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return [a.float() for a in out.attentions]


def max_abs_diff(ref, got) -> float:
    import torch

    if len(ref) != len(got):
        raise RuntimeError(f"layer count differs: {len(ref)} vs {len(got)}")
    m = 0.0
    for r, g in zip(ref, got):
        g = torch.as_tensor(g).float()
        if tuple(g.shape) != tuple(r.shape):
            raise RuntimeError(f"pattern shape differs: {tuple(g.shape)} vs {tuple(r.shape)}")
        m = max(m, float((r - g).abs().max()))
    return m


# ------------------------------------------------------------------ tools ---
# Each tool returns a dict {"load": callable -> state, "<task>": callable(state, ids) -> obj}.
# "patterns_of" returns a per-layer list of [b, h, q, k] tensors (for fidelity).


def tool_attnlens(attn_implementation: str | None = None):
    import torch

    try:
        import attnlens
    except Exception as e:  # pragma: no cover - reported as a row
        raise NotAvailable(f"import attnlens failed: {e!r}")

    def need(name):
        fn = getattr(attnlens, name, None)
        if fn is None:
            raise NotAvailable(f"attnlens.{name} does not exist (yet)")
        return fn

    def load():
        return load_hf(attn_implementation)

    def patterns(model, ids):
        tr = need("trace")(model, ids, store=("pattern",))
        return tr.patterns

    def layer0(model, ids):
        tr = need("trace")(model, ids, layers=[0], store=("pattern",))
        return tr.patterns

    def extraction(model, ids):
        return need("extract_weights")(model)

    def verify(model, ids):
        return need("verify")(model, ids)

    def patterns_of(model, ids):
        p = torch.as_tensor(patterns(model, ids))
        return [p[i] for i in range(p.shape[0])]

    return dict(
        load=load,
        patterns=patterns,
        layer0=layer0,
        extraction=extraction,
        verify=verify,
        patterns_of=patterns_of,
        version=lambda: getattr(attnlens, "__version__", "unknown"),
        preflight=lambda task: need(
            {
                "patterns": "trace",
                "layer0": "trace",
                "fidelity": "trace",
                "extraction": "extract_weights",
                "verify": "verify",
            }[task]
        ),
    )


def tool_hf_eager():
    def load():
        return load_hf("eager")

    def patterns(model, ids):
        return model(ids, output_attentions=True).attentions

    def patterns_of(model, ids):
        return list(patterns(model, ids))

    # HF cannot stop after layer 0: the whole forward is the price of layer 0's pattern
    return dict(load=load, patterns=patterns, layer0=patterns, patterns_of=patterns_of)


def tool_hf_forward():
    """One plain HF forward (default attention implementation), baseline for verify."""

    def load():
        return load_hf()

    def forward(model, ids):
        return model(ids).logits

    return dict(load=load, verify=forward)


def _check_tl_weights(W_E):
    import torch

    ref = reference_wte()
    same = bool(torch.equal(W_E.detach().cpu().float(), ref.float()))
    if not same:
        raise RuntimeError("TransformerLens did not load the benchmark checkpoint (W_E differs)")
    return same


def _is_pattern(name: str) -> bool:
    return name.endswith("hook_pattern")


def _is_pattern0(name: str) -> bool:
    return name == "blocks.0.attn.hook_pattern"


def tool_tl_hooked():
    from transformer_lens import HookedTransformer

    def load():
        model = HookedTransformer.from_pretrained_no_processing("gpt2", device="cpu")
        model.eval()
        model._bench_weights_checked = _check_tl_weights(model.W_E)
        return model

    def patterns(model, ids):
        _, cache = model.run_with_cache(ids, names_filter=_is_pattern)
        return cache

    def layer0(model, ids):
        _, cache = model.run_with_cache(ids, names_filter=_is_pattern0, stop_at_layer=1)
        return cache

    def patterns_of(model, ids):
        cache = patterns(model, ids)
        return [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(model.cfg.n_layers)]

    def extraction_load():
        hf = load_hf()
        from transformers import AutoTokenizer

        return hf, AutoTokenizer.from_pretrained("gpt2")

    def extraction(state, ids):
        hf, tok = state
        return HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf, tokenizer=tok, device="cpu")

    return dict(
        load=load,
        patterns=patterns,
        layer0=layer0,
        patterns_of=patterns_of,
        extraction=extraction,
        extraction_load=extraction_load,
        version=lambda: _dist_version("transformer-lens"),
    )


def tool_tl_bridge():
    from transformer_lens.model_bridge import TransformerBridge

    def load():
        model = TransformerBridge.boot_transformers("gpt2", device="cpu")
        model.eval()
        emb = model.original_model.get_input_embeddings().weight
        model._bench_weights_checked = _check_tl_weights(emb)
        return model

    def patterns(model, ids):
        _, cache = model.run_with_cache(ids, names_filter=_is_pattern)
        return cache

    def layer0(model, ids):
        _, cache = model.run_with_cache(ids, names_filter=_is_pattern0, stop_at_layer=1)
        return cache

    def patterns_of(model, ids):
        cache = patterns(model, ids)
        return [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(model.cfg.n_layers)]

    def extraction_load():
        hf = load_hf("eager")
        from transformers import AutoTokenizer

        return hf, AutoTokenizer.from_pretrained("gpt2")

    def extraction(state, ids):
        hf, tok = state
        return TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=tok, device="cpu")

    return dict(
        load=load,
        patterns=patterns,
        layer0=layer0,
        patterns_of=patterns_of,
        extraction=extraction,
        extraction_load=extraction_load,
        version=lambda: _dist_version("transformer-lens"),
    )


def tool_nnsight():
    from nnsight import NNsight

    def load():
        # attention weights only exist with eager attention; keep the HF model
        # next to its wrapper so that touch() can reach the parameters
        hf = load_hf("eager")
        return NNsight(hf), hf

    def patterns(state, ids):
        model, hf = state
        n = hf.config.n_layer
        saved = []
        with model.trace(ids):
            for i in range(n):
                saved.append(model.transformer.h[i].attn.output[1].save())
        return saved

    def layer0(state, ids):
        model, _ = state
        with model.trace(ids) as tracer:
            saved = model.transformer.h[0].attn.output[1].save()
            tracer.stop()
        return saved

    def patterns_of(state, ids):
        return [getattr(p, "value", p) for p in patterns(state, ids)]

    return dict(
        load=load, patterns=patterns, layer0=layer0, patterns_of=patterns_of, version=lambda: _dist_version("nnsight")
    )


TOOLS = {
    "attnlens": tool_attnlens,
    # The same, on a model loaded with the eager kernel: the reference of the fidelity rows runs eager, so this is the
    # like-for-like comparison (an SDPA model's hidden states differ from eager's by SDPA's rounding).
    "attnlens_eager": lambda: tool_attnlens("eager"),
    "hf_eager": tool_hf_eager,
    "hf_forward": tool_hf_forward,
    "tl_hooked": tool_tl_hooked,
    "tl_bridge": tool_tl_bridge,
    "nnsight": tool_nnsight,
}


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict:
    import platform

    out = {"python": platform.python_version()}
    for d in ("torch", "transformers", "transformer-lens", "nnsight", "attnlens"):
        v = _dist_version(d)
        if v != "not installed":
            out[d] = v
    return out


# ------------------------------------------------------------------- main ---
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True, choices=sorted(TOOLS))
    ap.add_argument("--task", required=True, choices=["patterns", "layer0", "extraction", "verify", "fidelity"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--inner", type=int, default=1)
    args = ap.parse_args()

    result: dict = {
        "tool": args.tool,
        "task": args.task,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "variant": os.environ.get("BENCH_VARIANT", "?"),
    }
    try:
        import torch

        torch.set_num_threads(args.threads)
        result["torch_threads"] = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            spec = TOOLS[args.tool]()
        except NotAvailable:
            raise
        except ImportError as e:
            raise NotAvailable(f"{args.tool} cannot be imported: {e!r}")
        if args.task not in spec and not (args.task == "fidelity" and "patterns_of" in spec):
            raise NotAvailable(f"{args.tool} has no {args.task} runner")
        if "preflight" in spec:
            spec["preflight"](args.task)
        result["versions"] = versions()
        if "version" in spec:
            result["tool_version"] = spec["version"]()
        ids = make_ids(args.batch, args.seq)

        with torch.no_grad():
            if args.task == "fidelity":
                ref = hf_reference(ids)
                state = spec["load"]()
                got = spec["patterns_of"](state, ids)
                result["max_abs_diff"] = max_abs_diff(ref, got)
                result["weights_checked"] = getattr(state, "_bench_weights_checked", None)
                result["status"] = "ok"
            else:
                loader = spec.get(f"{args.task}_load", spec["load"])
                t_load = time.perf_counter()
                state = loader()
                result["load_s"] = time.perf_counter() - t_load
                touch(state)
                result["weights_checked"] = getattr(state, "_bench_weights_checked", None)
                fn = spec[args.task]
                # first call: memory beyond the loaded model (cold, as a user's first call)
                with PeakMeter() as pm:
                    t = time.perf_counter()
                    out = fn(state, ids)
                    first = time.perf_counter() - t
                    del out
                result["extra_rss_mib"] = pm.extra_mib
                result["rss_before_mib"] = pm.rss_before_mib
                result["first_call_s"] = first
                for _ in range(max(0, args.warmup - 1)):
                    del_ = fn(state, ids)
                    del del_
                times = []
                for _ in range(args.inner):
                    t = time.perf_counter()
                    out = fn(state, ids)
                    times.append(time.perf_counter() - t)
                    del out
                result["times_s"] = times
                result["time_s"] = statistics.median(times)
                result["status"] = "ok"
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        result["process_s"] = time.perf_counter() - t0
    except NotAvailable as e:
        result["status"] = "not available"
        result["reason"] = str(e)
    except Exception as e:
        result["status"] = "error"
        result["reason"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-3000:]
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
