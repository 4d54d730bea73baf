"""Train the tiny GPT-2 demo checkpoint shipped with :mod:`attnlens.demo`.

The script is fully offline and deterministic for a given seed:

1. It generates English-like text from built-in word lists and sentence templates.
2. It trains a byte-level BPE tokenizer (GPT-2 style, ``<|endoftext|>`` as the only special token) on that text.
3. It trains a small :class:`transformers.GPT2LMHeadModel` on windows of the text in which random spans are copied
   later in the same window (most spans are replaced by random tokens first), so that copying from context pays.
   Because induction heads do not emerge from scratch within a few CPU minutes (the language-model loss alone
   gave previous-token heads of about 0.5 but induction scores of about 0.01 after 3000 steps), the loss has an
   auxiliary term (``--attn-supervision``, weight 1.0) that pulls head L0H0 towards previous-token attention and
   head L1H0 towards induction attention (see :func:`attention_supervision_loss`). The other six heads are not
   supervised; ``--attn-supervision 0`` trains with the language-model loss only.
4. It saves the model (safetensors) and the tokenizer to ``--out`` and prints, per layer and head, the
   previous-token score and the induction score computed from eager attention weights.

Usage::

    python -m attnlens.demo.train --out attnlens/demo/checkpoint --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from attnlens.demo.corpus import EOT, make_corpus

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


def _eot_id(tok: Tokenizer) -> int:
    """Id of ``<|endoftext|>``, which every tokenizer this script trains has."""
    eot_id = tok.token_to_id(EOT)
    if eot_id is None:
        raise ValueError(f"the tokenizer has no {EOT!r} token")
    return int(eot_id)


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE tokenizer.

    Args:
        texts: Training texts.
        vocab_size: Target vocabulary size (including the 256 byte tokens and ``<|endoftext|>``).

    Returns:
        The trained :class:`tokenizers.Tokenizer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """Save the tokenizer so that ``AutoTokenizer.from_pretrained(out)`` gives a ``GPT2TokenizerFast``.

    Writes ``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json``.

    Args:
        tok: The trained tokenizer.
        out: Output directory.
        model_max_length: Maximum sequence length of the model.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    tok.model.save(str(out), None)  # vocab.json + merges.txt
    eot_id = _eot_id(tok)
    special = {"content": EOT, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "pad_token": EOT,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(eot_id): {**special, "special": True}},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {k: EOT for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# ---------------------------------------------------------------------------
# Training data
# ---------------------------------------------------------------------------


def encode_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """Tokenize documents into one long stream separated by ``<|endoftext|>``.

    Args:
        tok: The tokenizer.
        docs: Documents.

    Returns:
        1-D int64 tensor of token ids.
    """
    eot_id = _eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.append(eot_id)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def make_batch(
    stream: torch.Tensor,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    eot_id: int,
    gen: torch.Generator,
    n_positions: int,
    p_random_span: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample training windows and copy random spans later inside each window.

    Each row is a window of the token stream (half of the rows start with ``<|endoftext|>``). One or two spans of
    8-48 tokens are chosen; with probability ``p_random_span`` the span is first overwritten by uniformly random
    tokens. The span is then copied to a later position of the same row, so that predicting the copy rewards
    induction heads. Half of the rows get positions ``0..seq_len-1``; the others are placed at a random offset so
    that all ``n_positions`` position embeddings are trained with short windows.

    Args:
        stream: 1-D token stream.
        batch_size: Number of rows.
        seq_len: Row length.
        vocab_size: Vocabulary size (random tokens are drawn from ``[0, vocab_size)`` minus ``eot_id``).
        eot_id: Id of ``<|endoftext|>``.
        gen: Torch random generator.
        n_positions: Number of positions of the model (``>= seq_len``).
        p_random_span: Probability that a span is made of random tokens.

    Returns:
        ``(input_ids, position_ids)``, both ``(batch_size, seq_len)`` int64 tensors.
    """
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
    rows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).clone()
    offsets = torch.randint(0, n_positions - seq_len + 1, (batch_size, 1), generator=gen)
    offsets[torch.rand(batch_size, generator=gen) < 0.5] = 0
    positions = offsets + torch.arange(seq_len)
    for r in range(batch_size):
        if torch.rand((), generator=gen).item() < 0.5:
            rows[r, 0] = eot_id
        n_spans = 1 if torch.rand((), generator=gen).item() < 0.5 else 2
        region = seq_len // n_spans
        for k in range(n_spans):
            lo = k * region + 1
            span = int(torch.randint(8, min(48, (region - 2) // 2) + 1, (), generator=gen))
            src = lo + int(torch.randint(0, region - 2 * span - 1, (), generator=gen))
            dst = src + span + int(torch.randint(0, lo + region - 1 - (src + 2 * span), (), generator=gen))
            if torch.rand((), generator=gen).item() < p_random_span:
                rnd = torch.randint(1, vocab_size, (span,), generator=gen)
                rnd[rnd == eot_id] = (eot_id + 1) % vocab_size
                rows[r, src : src + span] = rnd
            rows[r, dst : dst + span] = rows[r, src : src + span]
    return rows, positions


def induction_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """For each position, the position after the most recent earlier repeat of the current bigram.

    Position ``i`` gets target ``j + 1`` for the largest ``j < i`` with ``x[j] == x[i]`` and ``x[j - 1] == x[i - 1]``
    (the token an induction head attends to); positions without such a ``j`` get ``-1``.

    Args:
        input_ids: ``(batch, seq)`` token ids.

    Returns:
        ``(batch, seq)`` int64 tensor of key positions or ``-1``.
    """
    seq = input_ids.shape[1]
    same = input_ids[:, :, None] == input_ids[:, None, :]  # (batch, query i, key j)
    both = torch.zeros_like(same)
    both[:, 1:, 1:] = same[:, 1:, 1:] & same[:, :-1, :-1]
    both &= torch.ones(seq, seq, dtype=torch.bool).tril(-1)
    key = torch.arange(seq)
    last = torch.where(both, key, -1).amax(dim=-1)
    return torch.where(last >= 0, last + 1, -1)


def attention_supervision_loss(
    attentions: tuple[torch.Tensor, ...], input_ids: torch.Tensor, prev_head: tuple[int, int], ind_head: tuple[int, int]
) -> torch.Tensor:
    """Auxiliary loss pulling one head towards previous-token attention and one towards induction attention.

    Args:
        attentions: Per-layer ``(batch, head, seq, seq)`` attention weights (eager).
        input_ids: ``(batch, seq)`` token ids.
        prev_head: ``(layer, head)`` trained to attend from ``i`` to ``i - 1``.
        ind_head: ``(layer, head)`` trained to attend to the token after the previous occurrence of the current
            bigram (see :func:`induction_targets`), where there is one.

    Returns:
        Scalar loss (mean negative log attention on the targets).
    """
    eps = 1e-6
    prev = attentions[prev_head[0]][:, prev_head[1]].diagonal(offset=-1, dim1=-2, dim2=-1)
    loss = -(prev + eps).log().mean()
    targets = induction_targets(input_ids)
    valid = targets >= 0
    if valid.any():
        pattern = attentions[ind_head[0]][:, ind_head[1]]
        picked = pattern.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        loss = loss + -(picked[valid] + eps).log().mean()
    return loss


def sinusoidal_positions(n_positions: int, dim: int, amplitude: float) -> torch.Tensor:
    """Sinusoidal position table (used to initialise the learned GPT-2 position embeddings).

    Args:
        n_positions: Number of positions.
        dim: Embedding size.
        amplitude: Peak value of each sine / cosine.

    Returns:
        ``(n_positions, dim)`` float32 tensor.
    """
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return amplitude * table


# ---------------------------------------------------------------------------
# Attention scores
# ---------------------------------------------------------------------------


@torch.no_grad()
def attention_patterns(model: GPT2LMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the model and stack its attention weights.

    Args:
        model: A GPT-2 model loaded with ``attn_implementation="eager"``.
        input_ids: ``(batch, seq)`` token ids.

    Returns:
        ``(n_layer, batch, n_head, seq, seq)`` attention weights.
    """
    out = model(input_ids=input_ids, output_attentions=True)
    return torch.stack([a.float() for a in out.attentions])


def previous_token_scores(model: GPT2LMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position ``i >= 1`` to ``i - 1``.

    Args:
        model: A GPT-2 model loaded with ``attn_implementation="eager"``.
        input_ids: ``(batch, seq)`` token ids (held-out text).

    Returns:
        ``(n_layer, n_head)`` scores in ``[0, 1]``.
    """
    attn = attention_patterns(model, input_ids)
    sub = attn.diagonal(offset=-1, dim1=-2, dim2=-1)  # (layer, batch, head, seq - 1)
    return sub.mean(dim=(1, 3))


def induction_scores(
    model: GPT2LMHeadModel,
    vocab_size: int,
    half_len: int = 50,
    batch_size: int = 16,
    seed: int = 0,
    bos_id: int | None = None,
    exclude_ids: tuple[int, ...] = (),
) -> torch.Tensor:
    """Mean attention on a random sequence repeated twice, from each second-half position ``i`` to ``i - L + 1``.

    Args:
        model: A GPT-2 model loaded with ``attn_implementation="eager"``.
        vocab_size: Vocabulary size.
        half_len: Length ``L`` of the random sequence.
        batch_size: Number of random sequences.
        seed: Seed for the random tokens.
        bos_id: If given, this token is prepended to every row (positions are shifted accordingly).
        exclude_ids: Token ids never drawn.

    Returns:
        ``(n_layer, n_head)`` scores in ``[0, 1]``.
    """
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([t for t in range(vocab_size) if t not in set(exclude_ids)])
    rand = allowed[torch.randint(0, allowed.numel(), (batch_size, half_len), generator=gen)]
    ids = torch.cat([rand, rand], dim=1)
    offset = 0
    if bos_id is not None:
        ids = torch.cat([torch.full((batch_size, 1), bos_id), ids], dim=1)
        offset = 1
    attn = attention_patterns(model, ids)
    queries = torch.arange(offset + half_len, offset + 2 * half_len)
    keys = queries - half_len + 1
    return attn[:, :, :, queries, keys].mean(dim=(1, 3))


def format_scores(prev: torch.Tensor, ind: torch.Tensor, ind_bos: torch.Tensor) -> str:
    """Format the per-head scores as a Markdown table.

    Args:
        prev: ``(n_layer, n_head)`` previous-token scores.
        ind: ``(n_layer, n_head)`` induction scores (no BOS).
        ind_bos: ``(n_layer, n_head)`` induction scores with ``<|endoftext|>`` prepended.

    Returns:
        The table.
    """
    lines = [
        "| head | previous-token | induction | induction (BOS) |",
        "|------|---------------:|----------:|----------------:|",
    ]
    for layer in range(prev.shape[0]):
        for head in range(prev.shape[1]):
            lines.append(
                f"| L{layer}H{head} | {prev[layer, head]:.3f} | {ind[layer, head]:.3f} | {ind_bos[layer, head]:.3f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Entry point: build data and tokenizer, train, save, and report head scores.

    Args:
        argv: Command line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64, help="training window length")
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--p-random-span", type=float, default=0.8)
    parser.add_argument("--pos-amplitude", type=float, default=0.1, help="sinusoidal init of wpe (0: random)")
    parser.add_argument(
        "--attn-supervision",
        type=float,
        default=1.0,
        help="weight of the auxiliary loss on L0H0 (previous token) and L1H0 (induction); 0 disables it",
    )
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=250, help="print head scores every N steps (0: never)")
    args = parser.parse_args(argv)

    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.perf_counter()
    c0 = time.process_time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)

    docs = make_corpus(rng, 40_000)
    tok = train_tokenizer(docs, args.vocab_size)
    vocab_size = tok.get_vocab_size()
    eot_id = _eot_id(tok)
    save_tokenizer(tok, args.out, args.n_positions)
    stream = encode_stream(tok, docs)
    print(f"tokenizer: vocab {vocab_size}, stream {stream.numel()} tokens ({time.perf_counter() - t0:.1f}s)")

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.n_positions,
        n_embd=128,
        n_layer=args.n_layer,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )
    model = GPT2LMHeadModel(config)
    if args.pos_amplitude > 0:
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoidal_positions(args.n_positions, 128, args.pos_amplitude))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(args.seed)
    supervise = args.attn_supervision > 0
    train_impl = "eager" if supervise else "sdpa"
    model.set_attn_implementation(train_impl)
    model.train()
    t_train = time.perf_counter()
    for step in range(args.steps):
        batch, positions = make_batch(
            stream, args.batch_size, args.seq_len, vocab_size, eot_id, gen, args.n_positions, args.p_random_span
        )
        out = model(input_ids=batch, position_ids=positions, labels=batch, output_attentions=supervise)
        loss = out.loss
        if supervise:
            loss = loss + args.attn_supervision * attention_supervision_loss(out.attentions, batch, (0, 0), (1, 0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            msg = f"step {step:5d} loss {loss.item():.3f} ({time.perf_counter() - t_train:.0f}s)"
            if args.eval_every and step % args.eval_every == 0:
                model.eval()
                model.set_attn_implementation("eager")
                prev = previous_token_scores(model, batch[:4])
                ind = induction_scores(model, vocab_size, batch_size=8, seed=args.seed + 1, exclude_ids=(eot_id,))
                model.set_attn_implementation(train_impl)
                model.train()
                msg += f" max prev {prev.max():.2f} max induction {ind.max():.2f}"
            print(msg, flush=True)
    train_time = time.perf_counter() - t_train
    cpu_time = time.process_time() - c0

    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    total_time = time.perf_counter() - t0
    size = (args.out / "model.safetensors").stat().st_size

    # Score heads on the saved checkpoint, reloaded with eager attention.
    eager = GPT2LMHeadModel.from_pretrained(args.out, attn_implementation="eager").eval()
    held_out = make_corpus(random.Random(args.seed + 10_000), 2_000)
    held_stream = encode_stream(tok, held_out)
    n_rows = 16
    text_ids = held_stream[: n_rows * args.n_positions].view(n_rows, args.n_positions)
    prev = previous_token_scores(eager, text_ids)
    ind = induction_scores(eager, vocab_size, seed=args.seed + 1, exclude_ids=(eot_id,))
    ind_bos = induction_scores(eager, vocab_size, seed=args.seed + 1, bos_id=eot_id, exclude_ids=(eot_id,))

    print(
        f"\nwall time: training {train_time:.1f}s, total {total_time:.1f}s; process CPU time {cpu_time:.1f}s; "
        f"{n_params} parameters; model.safetensors {size} bytes"
    )
    print(format_scores(prev, ind, ind_bos))
    bp = divmod(int(prev.argmax()), prev.shape[1])
    bi = divmod(int(ind.argmax()), ind.shape[1])
    print(f"best previous-token head: L{bp[0]}H{bp[1]} {prev.max():.3f}")
    print(f"best induction head: L{bi[0]}H{bi[1]} {ind.max():.3f}")


if __name__ == "__main__":
    main()
