"""scan from the log-sum-exp and trace(queries="last") against a bare SDPA forward of the transformer body.

Speed: one process, calls interleaved (order rotated per repetition, one warm-up round), on a GPT-2-small-shaped
GPT2LMHeadModel run with SDPA (12 layers, 12 heads, d_model 768, vocab 50257, seeded random weights, the shape of
``benchmarks/make_checkpoint.py``'s ``random`` variant), fp32, CPU, ``torch.set_num_threads(--threads)``:

* ``forward``: ``model.transformer(ids, use_cache=False)``, the body without the LM head: the floor;
* ``scan``: ``attnlens.scan`` over the same tokens (one batch), statistics from q, k and each row's lse;
* ``scan_pattern``: the same scan through the pattern path it replaces (``scan._from_lse`` forced off);
* ``trace_last``: ``attnlens.trace(model, ids, queries="last")``, every layer's last row.

Ratios are paired within a repetition, reported as median (min-max). Tokens: half a window of random ids, repeated,
so every token has an earlier copy (duplicate and induction rows everywhere).

Memory (``--memory``): one fresh process per (call, length), peak resident memory of the call beyond what the process
held after loading (``VmHWM`` reset through ``/proc/self/clear_refs`` just before the call), as the sequence grows 4x,
beside what ``output_attentions`` would hold: the square ``[batch, head, q_pos, k_pos]`` of every layer in the model's
dtype (``square_mib``; one layer's: ``square_layer_mib``).

``--model llama``: a small Llama-shaped LlamaForCausalLM instead (4 layers, d_model 512, 8 query heads over 2
key/value heads of 64 features, SwiGLU MLP of 1408, vocabulary 32000, rope base 10000, 16384 positions, seeded random
weights, SDPA, fp32); ``forward`` is ``model.model``. For the lengths where the square itself would not fit this
machine, leave ``scan_pattern`` out of ``--memory-calls``.

    python benchmarks/rows_bench.py --speed 1x1024,4x256 --trace-sizes 4x1024 --repeats 3 --memory 256,1024 \
        --json benchmarks/results/rows.json
    python benchmarks/rows_bench.py --model llama --speed "" --trace-sizes "" --memory 2048,4096,8192,16384 \
        --memory-calls forward,scan,trace_last --json benchmarks/results/rows_llama.json

Standard library, torch, transformers and attnlens only; no hub; writes only the ``--json`` file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import transformers

import attnlens

scan_module = sys.modules["attnlens.scan"]


def build(seed: int, kind: str = "gpt2") -> Any:
    torch.manual_seed(seed)
    if kind == "llama":
        llama = transformers.LlamaConfig(
            hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
            intermediate_size=1408, vocab_size=32000, max_position_embeddings=16384, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        llama._attn_implementation = "sdpa"
        return transformers.LlamaForCausalLM(llama).eval()
    config = transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    config._attn_implementation = "sdpa"
    return transformers.GPT2LMHeadModel(config).eval()


def body(model: Any) -> Any:
    """The transformer without its LM head: GPT-2's ``transformer``, Llama's ``model``."""
    return model.model if hasattr(model, "model") else model.transformer


def tokens(batch: int, pos: int, vocab: int = 50257) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 7919 + pos)
    half = torch.randint(3, vocab - 1, (batch, pos // 2), generator=generator)  # never a special id of either model
    return torch.cat([half, half], dim=1)


def scan_call(model: Any, ids: torch.Tensor, from_lse: bool) -> Callable[[], Any]:
    batch, pos = ids.shape
    stream = ids.flatten()[1:]  # scan puts the end-of-text id first: its windows differ in that one token

    def run() -> Any:
        real = scan_module._from_lse
        if not from_lse:
            scan_module._from_lse = lambda *args: False
        try:
            return attnlens.scan(model, [stream], seq_len=pos, batch_size=batch, max_tokens=batch * pos, progress=False)
        finally:
            scan_module._from_lse = real

    return run


def calls_for(model: Any, ids: torch.Tensor, names: tuple[str, ...]) -> dict[str, Callable[[], Any]]:
    every = {
        "forward": lambda: body(model)(ids, use_cache=False).last_hidden_state,
        "scan": scan_call(model, ids, True),
        "scan_pattern": scan_call(model, ids, False),
        "trace_last": lambda: attnlens.trace(model, ids, queries="last"),
    }
    return {name: every[name] for name in names}


def timed(call: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    with torch.no_grad():
        out = call()
    seconds = time.perf_counter() - start
    del out
    return seconds


def measure(model: Any, batch: int, pos: int, names: tuple[str, ...], repeats: int) -> dict[str, Any]:
    calls = calls_for(model, tokens(batch, pos, model.config.vocab_size), names)
    for call in calls.values():
        timed(call)  # warm-up, not counted
    rounds: list[dict[str, float]] = []
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        rounds.append({name: timed(calls[name]) for name in order})
    ratios = {}
    for name in names[1:]:
        per_round = [r[name] / r["forward"] for r in rounds]
        ratios[f"{name}/forward"] = (statistics.median(per_round), min(per_round), max(per_round))
    if "scan_pattern" in names:
        per_round = [r["scan_pattern"] / r["scan"] for r in rounds]
        ratios["scan_pattern/scan"] = (statistics.median(per_round), min(per_round), max(per_round))
    return {
        "size": f"{batch}x{pos}",
        "seconds": {name: statistics.median(r[name] for r in rounds) for name in names},
        "ratios": ratios,
        "rounds": rounds,
        "load": os.getloadavg()[0],
    }


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def square_mib(model: Any, batch: int, pos: int) -> tuple[float, float]:
    """What ``output_attentions`` holds: ``[batch, head, pos, pos]`` per layer in the model's dtype; all, one layer."""
    config = model.config
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    layer = batch * n_heads * pos * pos * model.dtype.itemsize / 2**20
    return n_layers * layer, layer


def memory_child(name: str, pos: int, seed: int, kind: str) -> dict[str, Any]:
    """Peak resident memory of one call beyond the process's after loading (run in a fresh process)."""
    model = build(seed, kind)
    ids = tokens(1, pos, model.config.vocab_size)
    call = calls_for(model, ids, ("forward", "scan", "scan_pattern", "trace_last"))[name]
    gc.collect()
    before = _kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    with torch.no_grad():
        call()
    seconds = time.perf_counter() - start
    square, square_layer = square_mib(model, 1, pos)
    return {
        "model": kind,
        "call": name,
        "pos": pos,
        "growth_mib": (_kb("VmHWM") - before) / 1024,
        "seconds": seconds,
        "square_mib": square,
        "square_layer_mib": square_layer,
    }


def sizes(text: str) -> list[tuple[int, int]]:
    """``BATCHxPOS`` sizes, comma-separated (``""``: none)."""
    return [(int(b), int(p)) for b, p in (item.lower().split("x") for item in text.split(",") if item)]


def environment() -> dict[str, Any]:
    """What a result depends on besides the code measured: versions, CPUs, threads, the load, the command line."""
    return {
        "attnlens": attnlens.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_start": os.getloadavg(),
        "argv": sys.argv[1:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", default="1x1024,4x256", help="BATCHxPOS sizes for forward/scan/scan_pattern")
    parser.add_argument("--trace-sizes", default="4x1024", help="BATCHxPOS sizes for forward/trace_last")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", default="256,1024", help="sequence lengths for the memory section ('' for none)")
    parser.add_argument("--memory-calls", default="forward,scan,scan_pattern,trace_last", help="calls measured there")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2", help="GPT-2-small shape or small Llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("CALL", "POS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(memory_child(args.child[0], int(args.child[1]), args.seed, args.model)))
        return

    header = {**environment(), "model": args.model}
    print(json.dumps(header))
    model = build(args.seed, args.model)
    results: dict[str, Any] = {"header": header, "speed": [], "memory": []}
    jobs = [(s, ("forward", "scan", "scan_pattern")) for s in sizes(args.speed)]
    jobs += [(s, ("forward", "trace_last")) for s in sizes(args.trace_sizes)]
    for (batch, pos), names in jobs:
        result = measure(model, batch, pos, names, args.repeats)
        results["speed"].append(result)
        print(f"\n## {result['size']} (load {result['load']:.2f})")
        for name, seconds in result["seconds"].items():
            print(f"  {name}: {seconds:.3f} s")
        for key, (median, low, high) in result["ratios"].items():
            print(f"  {key}: {median:.2f}x ({low:.2f}-{high:.2f}x)")
    del model
    for pos in (int(p) for p in args.memory.split(",") if p):
        for name in args.memory_calls.split(","):
            command = [sys.executable, __file__, "--child", name, str(pos), "--threads", str(args.threads)]
            command += ["--model", args.model, "--seed", str(args.seed)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results["memory"].append(row)
            print(
                f"  memory {name} 1x{pos}: +{row['growth_mib']:.0f} MiB in {row['seconds']:.1f} s"
                f" (output_attentions' square: {row['square_mib']:.0f} MiB, {row['square_layer_mib']:.0f} per layer)",
                flush=True,
            )
    results["load_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
