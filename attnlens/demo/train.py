"""Train the tiny GPT-2 demo checkpoint shipped with :mod:`attnlens.demo`.

The script is fully offline and deterministic for a given seed:

1. It generates English-like text from built-in word lists and sentence templates.
2. It trains a byte-level BPE tokenizer (GPT-2 style, ``<|endoftext|>`` as the only special token) on that text.
3. It trains a small :class:`transformers.GPT2LMHeadModel` with the language-model loss only (no loss term on
   attention). Three rows in four are ``<|endoftext|>``, a sequence of random tokens and the same sequence again,
   with a period that varies from row to row, so that only an induction head predicts the second copy (see
   :func:`make_batch`); the other rows are windows of the text. Every ``--eval-every`` steps it measures the loss,
   the loss on the repeated halves and every head's previous-token and induction score; ``--log`` writes them to a
   JSON file (:mod:`attnlens.demo.plot_training` draws it).
4. It saves the model (safetensors) and the tokenizer to ``--out`` and prints, per layer and head, the
   previous-token score and the induction score computed from eager attention weights.

Usage::

    python -m attnlens.demo.train --out attnlens/demo/checkpoint --seed 0 --log docs/img/demo-training.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import GPT2LMHeadModel

EOT = "<|endoftext|>"
STEPS = 3000
THREADS = 1

# ---------------------------------------------------------------------------
# Synthetic text generator
# ---------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NAMES = _words(
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paul Quinn Rosa Sam "
    "Tom Uma Victor Wendy Xavier Yara Zoe Anna Ben Clara Daniel Ella Felix Hannah Ivan Julia Kevin Laura Max "
    "Olivia Peter"
)
DETS = _words("the a this that every some one my our their his her")
ADJS = _words(
    "quick lazy happy sad small large old young bright dark quiet loud green blue red yellow warm cold tall "
    "short strange gentle brave clever tired hungry busy lucky curious careful proud calm wild soft heavy "
    "light empty full early late simple famous hidden golden silver wooden broken ancient modern friendly"
)
NOUNS = _words(
    "dog cat bird fox horse rabbit teacher doctor farmer child student king queen river mountain forest city "
    "village garden house window door table chair book letter song story road bridge boat train car tree "
    "flower apple bread cup lamp key box ship island castle market school library kitchen field lake storm "
    "cloud star moon sun friend neighbor painter sailor baker soldier wizard dragon robot computer clock "
    "mirror coin map bell candle basket"
)
VERBS = _words(
    "saw found liked painted carried followed watched opened closed built visited helped called found "
    "chased cleaned wrote read lost kept sold bought moved pushed pulled fixed answered remembered "
    "forgot noticed touched borrowed admired ignored greeted met"
)
IVERBS = _words(
    "slept laughed waited smiled danced ran walked sang cried jumped arrived left stayed worked rested "
    "listened shouted whispered"
)
ADVS = _words("quickly slowly quietly happily suddenly carefully often never always again yesterday today soon")
PREPS = _words("near behind under above beside inside across along around through into from with without")
CONJS = _words("and but because while although when so")
PLACES = _words("Paris London Berlin Rome Madrid Vienna Oslo Lisbon Dublin Prague Athens Cairo Tokyo Lima Quito Seoul")
NUMS = _words("two three four five six seven eight nine ten twelve twenty many several few")

TEMPLATES = (
    "{Name} {verb} {det} {adj} {noun}.",
    "{Det} {adj} {noun} {verb} {det} {noun} {prep} the {noun}.",
    "{Name} {iverb} {adv} {prep} the {adj} {noun}.",
    "{Det} {noun} {iverb} {adv}.",
    "In {place}, {name} {verb} {num} {noun}s.",
    "{Name} and {name} {verb} the {noun} {conj} the {noun} {iverb}.",
    "{Det} {noun} was {adj} {conj} {det} {noun} was {adj}.",
    "{Name} said that the {noun} {verb} {det} {adj} {noun}.",
    "Yesterday {name} {iverb} {prep} the {noun} in {place}.",
    "There were {num} {adj} {noun}s {prep} the {noun}.",
    "Why did {name} {verb_base} the {adj} {noun}?",
    "{Name} {verb} {name}, {conj} {name} {iverb} {adv}.",
)
_BASE = {
    "saw": "see",
    "found": "find",
    "wrote": "write",
    "read": "read",
    "lost": "lose",
    "kept": "keep",
    "sold": "sell",
    "bought": "buy",
    "forgot": "forget",
    "met": "meet",
    "built": "build",
}


def _base(verb: str) -> str:
    if verb in _BASE:
        return _BASE[verb]
    if verb.endswith("ied"):
        return verb[:-3] + "y"
    if verb.endswith(("ed",)) and verb[:-1].endswith(("ase", "ose", "ove", "ire", "ete", "ure", "ice")):
        return verb[:-1]
    return verb[:-2] if verb.endswith("ed") else verb


def make_sentence(rng: random.Random) -> str:
    """Generate one English-like sentence from the built-in templates and word lists.

    Args:
        rng: Source of randomness.

    Returns:
        A sentence ending with punctuation.
    """
    template = rng.choice(TEMPLATES)
    pools = {
        "name": NAMES,
        "det": DETS,
        "adj": ADJS,
        "noun": NOUNS,
        "verb": VERBS,
        "iverb": IVERBS,
        "adv": ADVS,
        "prep": PREPS,
        "conj": CONJS,
        "place": PLACES,
        "num": NUMS,
    }
    out: list[str] = []
    pos = 0
    while True:
        start = template.find("{", pos)
        if start < 0:
            out.append(template[pos:])
            break
        end = template.index("}", start)
        out.append(template[pos:start])
        key = template[start + 1 : end]
        if key == "verb_base":
            word = _base(rng.choice(VERBS))
        else:
            word = rng.choice(pools[key.lower()])
            if key[0].isupper():
                word = word[0].upper() + word[1:]
        out.append(word)
        pos = end + 1
    return "".join(out)


def make_document(rng: random.Random, n_sentences: int) -> str:
    """Generate a short paragraph of sentences, sometimes repeating an earlier sentence verbatim.

    Args:
        rng: Source of randomness.
        n_sentences: Number of sentences in the document.

    Returns:
        The document text.
    """
    sentences: list[str] = []
    for _ in range(n_sentences):
        if sentences and rng.random() < 0.15:
            sentences.append(rng.choice(sentences))
        else:
            sentences.append(make_sentence(rng))
    return " ".join(sentences)


def make_corpus(rng: random.Random, n_docs: int) -> list[str]:
    """Generate a list of documents.

    Args:
        rng: Source of randomness.
        n_docs: Number of documents.

    Returns:
        The documents.
    """
    return [make_document(rng, rng.randint(3, 12)) for _ in range(n_docs)]


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
    pool: torch.Tensor,
    eot_id: int,
    gen: torch.Generator,
    n_positions: int,
    p_repeat: float = 1.0,
    min_period: int = 8,
    max_period: int = 24,
    max_prefix: int = 8,
    fill: bool = False,
    skip: torch.Tensor | None = None,
    p_skip: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample training rows: repeated random tokens, or windows of text.

    With probability ``p_repeat`` a row is ``<|endoftext|>``, ``q`` tokens of text (``q`` uniform in
    ``[0, max_prefix]``, so that the copies start at varied positions), ``P`` random tokens drawn uniformly from
    ``pool`` and the same ``P`` tokens again, with the period ``P`` uniform in ``[min_period, max_period]``; the rest
    of the row is text. The second copy can only be predicted by finding the earlier occurrence of the current token
    and reading the token after it (an induction head); the varying period and start keep a fixed positional offset
    from doing the same. The other rows are plain windows of the text stream, half of them given position ids at a
    random offset so that all ``n_positions`` position embeddings are trained with short windows (repeated rows
    start at position 0).

    Args:
        stream: 1-D token stream.
        batch_size: Number of rows.
        seq_len: Row length.
        pool: 1-D ids the random tokens are drawn from.
        eot_id: Id of ``<|endoftext|>``.
        gen: Torch random generator.
        n_positions: Number of positions of the model (``>= seq_len``).
        p_repeat: Probability that a row is a repeated random sequence.
        min_period: Shortest period of a repeated random sequence.
        max_period: Longest period of a repeated random sequence.
        max_prefix: Longest text prefix before the random tokens.
        fill: Repeat the random tokens until the end of the row instead of copying them once.
        skip: ``(vocab,)`` map of ids used by skip rows.
        p_skip: Probability that a row (among those that are not repeated) is a skip row: ``<|endoftext|>``, two
            random ids from ``pool``, then ``x[t + 1] = skip[x[t - 1]]``, which is predicted by reading the token
            before the current one (a previous-token head).

    Returns:
        ``(input_ids, position_ids, repeated)``, all ``(batch_size, seq_len)``: int64 ids and positions, and a bool
        mask of the positions ``i`` of the second copy whose next token ``i + 1`` is predictable by induction.
    """
    if not 1 <= min_period <= max_period or 1 + max_prefix + 2 * max_period > seq_len:
        raise ValueError(
            f"need 1 <= min_period <= max_period and 1 + max_prefix + 2 * max_period <= seq_len ({seq_len}), got "
            f"min_period {min_period}, max_period {max_period}, max_prefix {max_prefix}"
        )
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
    rows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).clone()
    repeat = torch.rand(batch_size, generator=gen) < p_repeat
    repeated = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    for r in torch.nonzero(repeat).flatten().tolist():
        period = int(torch.randint(min_period, max_period + 1, (), generator=gen))
        first = 1 + int(torch.randint(0, max_prefix + 1, (), generator=gen))
        rnd = pool[torch.randint(0, pool.numel(), (period,), generator=gen)]
        rows[r, 0] = eot_id
        rows[r, first : first + period] = rnd
        if fill:
            reps = (seq_len - first + period - 1) // period
            rows[r, first:] = rnd.repeat(reps)[: seq_len - first]
            repeated[r, first + period : seq_len - 1] = True
        else:
            rows[r, first + period : first + 2 * period] = rnd
            repeated[r, first + period : first + 2 * period - 1] = True
    if skip is not None and p_skip > 0:
        skipped = ~repeat & (torch.rand(batch_size, generator=gen) < p_skip)
        for r in torch.nonzero(skipped).flatten().tolist():
            rows[r, 0] = eot_id
            rows[r, 1:3] = torch.randint(1, skip.numel(), (2,), generator=gen)
            rows[r, 1:3][rows[r, 1:3] == eot_id] = 1 if eot_id != 1 else 2
            for t in range(3, seq_len):
                rows[r, t] = skip[rows[r, t - 2]]
    offsets = torch.randint(0, n_positions - seq_len + 1, (batch_size, 1), generator=gen)
    offsets[(torch.rand(batch_size, generator=gen) < 0.5) | repeat] = 0
    return rows, offsets + torch.arange(seq_len), repeated


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
    pool: torch.Tensor | None = None,
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
        pool: If given, the ids to draw from (instead of the vocabulary minus ``exclude_ids``).

    Returns:
        ``(n_layer, n_head)`` scores in ``[0, 1]``.
    """
    gen = torch.Generator().manual_seed(seed)
    allowed = pool if pool is not None else torch.tensor([t for t in range(vocab_size) if t not in set(exclude_ids)])
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


def _scores(
    model: GPT2LMHeadModel, text_ids: torch.Tensor, vocab_size: int, eot_id: int, seed: int, pool: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Previous-token and induction scores of a model in training, measured in eval mode with eager attention."""
    impl = model.config._attn_implementation
    model.eval()
    model.set_attn_implementation("eager")
    try:
        prev = previous_token_scores(model, text_ids)
        ind = induction_scores(model, vocab_size, batch_size=8, seed=seed, exclude_ids=(eot_id,))
        ind_pool = induction_scores(model, vocab_size, batch_size=8, seed=seed, pool=pool)
    finally:
        model.set_attn_implementation(impl)
        model.train()
    return prev, ind, ind_pool


def _best(scores: torch.Tensor) -> tuple[str, float]:
    layer, head = divmod(int(scores.argmax()), scores.shape[1])
    return f"L{layer}H{head}", float(scores.max())


def main(argv: list[str] | None = None) -> None:
    """Entry point: build data and tokenizer, train, save, and report head scores.

    Args:
        argv: Command line arguments (defaults to ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--log", type=Path, help="write the training curve and head scores over training here (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64, help="training window length")
    parser.add_argument("--n-positions", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the weight matrices")
    parser.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    parser.add_argument("--p-repeat", type=float, default=1.0, help="fraction of rows that are repeated random tokens")
    parser.add_argument("--min-period", type=int, default=8, help="shortest period of a repeated random sequence")
    parser.add_argument("--max-period", type=int, default=24, help="longest period of a repeated random sequence")
    parser.add_argument("--max-prefix", type=int, default=8, help="longest text prefix before the random tokens")
    parser.add_argument("--p-skip", type=float, default=0.0, help="fraction of other rows that are skip rows")
    parser.add_argument("--skip-identity", action="store_true", help="skip rows repeat the token two back")
    parser.add_argument("--fill", action="store_true", help="repeat the random tokens to the end of the row")
    parser.add_argument("--pool-size", type=int, default=128, help="random tokens are drawn from this many ids")
    parser.add_argument(
        "--full-pool-step", type=int, default=-1, help="from this step on, draw from all ids (-1: never)"
    )
    parser.add_argument(
        "--late-p-repeat", type=float, default=-1.0, help="p-repeat from --full-pool-step on (-1: same)"
    )
    parser.add_argument("--pos-amplitude", type=float, default=0.0, help="sinusoidal init of wpe (0: random)")
    parser.add_argument("--pos-std", type=float, default=0.01, help="std of the random init of wpe")
    parser.add_argument("--n-inner", type=int, default=256, help="MLP width")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--eval-every", type=int, default=50, help="record head scores every N steps (0: never)")
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
    held_stream = encode_stream(tok, make_corpus(random.Random(args.seed + 10_000), 2_000))
    print(f"tokenizer: vocab {vocab_size}, stream {stream.numel()} tokens ({time.perf_counter() - t0:.1f}s)")

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.n_positions,
        n_embd=128,
        n_layer=args.n_layer,
        n_head=4,
        n_inner=args.n_inner,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        if args.pos_amplitude > 0:
            model.transformer.wpe.weight.copy_(sinusoidal_positions(args.n_positions, 128, args.pos_amplitude))
        else:
            model.transformer.wpe.weight.normal_(0.0, args.pos_std)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} parameters")

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_lambda(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.tensor([t for t in range(vocab_size) if t != eot_id])
    small_pool = ids[torch.randperm(ids.numel(), generator=gen)[: args.pool_size]].sort().values
    # one cycle through all ids, so that a skip row never repeats and only the previous token predicts the next
    cycle = ids[torch.randperm(ids.numel(), generator=gen)]
    skip = torch.arange(vocab_size)
    skip[cycle] = cycle.roll(-1)
    if args.skip_identity:
        skip = torch.arange(vocab_size)
    eval_text = held_stream[: 4 * args.seq_len].view(4, args.seq_len)
    records: list[dict[str, object]] = []
    loss_sum = rep_sum = 0.0
    n_since = 0
    model.set_attn_implementation("sdpa")
    model.train()
    t_train = time.perf_counter()
    c_train = time.process_time()
    for step in range(args.steps + 1):
        if n_since and (step == args.steps or (args.eval_every and step % args.eval_every == 0)):
            prev, ind, ind_pool = _scores(model, eval_text, vocab_size, eot_id, args.seed + 1, small_pool)
            record = {
                "step": step,
                "loss": loss_sum / n_since,
                "loss_repeated": rep_sum / n_since,
                "previous_token": prev.tolist(),
                "induction": ind.tolist(),
                "induction_pool": ind_pool.tolist(),
                "wall_s": time.perf_counter() - t_train,
                "cpu_s": time.process_time() - c_train,
            }
            records.append(record)
            loss_sum = rep_sum = 0.0
            n_since = 0
            (bp, sp), (bi, si) = _best(prev), _best(ind)
            print(
                f"step {step:5d} loss {record['loss']:.3f} repeated half {record['loss_repeated']:.3f} "
                f"previous-token {bp} {sp:.2f} induction {bi} {si:.2f} pool {ind_pool.max():.2f} "
                f"({record['wall_s']:.0f}s, cpu {record['cpu_s']:.0f}s)",
                flush=True,
            )
        if step == args.steps:
            break
        late = 0 <= args.full_pool_step <= step
        batch, positions, repeated = make_batch(
            stream,
            args.batch_size,
            args.seq_len,
            ids if late else small_pool,
            eot_id,
            gen,
            args.n_positions,
            args.late_p_repeat if late and args.late_p_repeat >= 0 else args.p_repeat,
            args.min_period,
            args.max_period,
            args.max_prefix,
            args.fill,
            skip,
            args.p_skip,
        )
        logits = model(input_ids=batch, position_ids=positions).logits
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none"
        ).view(batch.shape[0], -1)
        loss = per_token.mean()  # the language-model loss, nothing else
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_sum += loss.item()
        rep_sum += per_token[repeated[:, :-1]].mean().item()
        n_since += 1
    train_time = time.perf_counter() - t_train
    train_cpu = time.process_time() - c_train
    cpu_time = time.process_time() - c0

    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    total_time = time.perf_counter() - t0
    size = (args.out / "model.safetensors").stat().st_size

    # Score heads on the saved checkpoint, reloaded with eager attention.
    eager = GPT2LMHeadModel.from_pretrained(args.out, attn_implementation="eager").eval()
    n_rows = 16
    text_ids = held_stream[: n_rows * args.n_positions].view(n_rows, args.n_positions)
    prev = previous_token_scores(eager, text_ids)
    ind = induction_scores(eager, vocab_size, seed=args.seed + 1, exclude_ids=(eot_id,))
    ind_bos = induction_scores(eager, vocab_size, seed=args.seed + 1, bos_id=eot_id, exclude_ids=(eot_id,))

    print(
        f"\nthreads {args.threads}; training {args.steps} steps: wall {train_time:.1f}s, process CPU {train_cpu:.1f}s; "
        f"total wall {total_time:.1f}s, process CPU {cpu_time:.1f}s; {n_params} parameters; "
        f"model.safetensors {size} bytes"
    )
    print(format_scores(prev, ind, ind_bos))
    (bp, sp), (bi, si) = _best(prev), _best(ind)
    print(f"best previous-token head: {bp} {sp:.3f}")
    print(f"best induction head: {bi} {si:.3f}")
    if args.log is not None:
        log = {
            "command": "python -m attnlens.demo.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "threads": args.threads,
            "train_wall_s": train_time,
            "train_cpu_s": train_cpu,
            "total_wall_s": total_time,
            "total_cpu_s": cpu_time,
            "records": records,
        }
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text(json.dumps(log, indent=1) + "\n")


if __name__ == "__main__":
    main()
