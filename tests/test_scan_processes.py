"""scan across processes: torchrun with 1, 2 and 3 processes gives the same bytes; a killed scan resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import attnlens

ROOT = Path(attnlens.__file__).resolve().parent.parent


def corpus(path: Path, n: int = 120) -> Path:
    import random

    from attnlens.demo.train import make_corpus

    path.write_text("\n\n".join(make_corpus(random.Random(7), n)) + "\n")
    return path


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # Same thread count in every process (torchrun sets 1 only when it starts several): matmuls can round
    # differently with another count.
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(n: int, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
        "-m", "attnlens.cli", "scan", "--data", str(data), "--seq-len", "32", "--batch-size", "2",
        "--max-tokens", "2400", "--out", str(out), *(extra or ("--quiet",)),
    ]  # fmt: skip
    return subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_one_two_and_three_processes_write_the_same_bytes(tmp_path) -> None:
    data = corpus(tmp_path / "corpus.txt")
    outputs = {}
    for n in (1, 2, 3):
        out = tmp_path / f"scan{n}.json"
        done = torchrun(n, data, out)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[n] = out.read_bytes()
    assert outputs[1] == outputs[2] == outputs[3]
    # The API in this process (one thread, see conftest) writes the same bytes too.
    model, tok = attnlens.load_demo()
    here = attnlens.scan(model, data, tokenizer=tok, seq_len=32, batch_size=2, max_tokens=2400, progress=False)
    assert here.to_json().encode() == outputs[1]

    # Two processes write a checkpoint (rank 0) and, run again, both resume from it (rank 0 reads, sends it on).
    checkpoint = tmp_path / "ck.json"
    for name in ("first.json", "again.json"):
        done = torchrun(2, data, tmp_path / name, "--checkpoint", str(checkpoint))
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / name).read_bytes() == outputs[1]
    assert "resuming from" in done.stderr and "resuming from" not in done.stdout
    result = attnlens.ScanResult.load(tmp_path / "scan2.json")
    assert result.n_windows == 2400 // 32 and result.top("induction", 1)[0][:2] == (1, 0)


CHILD = """
import importlib, sys, time
import attnlens
scan_module = importlib.import_module("attnlens.scan")
scan_module._CHECKPOINT_BATCHES = 1
data_path, checkpoint, out, slow = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "slow"
texts = open(data_path).read().split("\\n\\n")

def documents():
    for text in texts:
        if slow:
            time.sleep(0.03)
        yield text

model, tok = attnlens.load_demo()
result = attnlens.scan(model, documents(), tokenizer=tok, seq_len=32, batch_size=2,
                       checkpoint=None if checkpoint == "-" else checkpoint)
result.save(out)
"""


@pytest.mark.slow
def test_a_scan_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path) -> None:
    data = corpus(tmp_path / "corpus.txt", n=150)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    checkpoint, env = tmp_path / "ck.json", environment()

    def child(ck: str, out: Path, mode: str) -> subprocess.Popen[str]:
        command = [sys.executable, str(script), str(data), ck, str(out), mode]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    victim = child(str(checkpoint), tmp_path / "never.json", "slow")
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the scan ended before it could be killed"
    assert checkpoint.exists() and not (tmp_path / "never.json").exists()

    resumed = child(str(checkpoint), tmp_path / "resumed.json", "fast")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resuming from" in err
    plain = child("-", tmp_path / "plain.json", "fast")
    _, err = plain.communicate(timeout=300)
    assert plain.returncode == 0, err[-3000:]
    assert (tmp_path / "resumed.json").read_bytes() == (tmp_path / "plain.json").read_bytes()


FAILING = """
import sys
import torch
import attnlens
from attnlens.models import gpt2

rank = int(sys.argv[2])
model, tok = attnlens.load_demo()
if torch.distributed.is_available() and int(__import__("os").environ["RANK"]) == rank:
    def boom(module, args, output):
        raise RuntimeError("boom in this process")
    attnlens.models.adapt(model).sites.layers[1].qkv[0].register_forward_hook(boom)
attnlens.scan(model, open(sys.argv[1]).read().split("\\n\\n"), tokenizer=tok, seq_len=32, batch_size=2,
              max_tokens=2400, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_process_stops_every_process(tmp_path, failing_rank: int) -> None:
    """One process's error reaches the others (they would otherwise wait in the gather forever)."""
    data = corpus(tmp_path / "corpus.txt")
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(data), str(failing_rank),
    ]  # fmt: skip
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "boom in this process" in done.stderr
    assert f"scan stopped: process {failing_rank} of 2 failed" in done.stderr


REPEATED = """
import sys
import attnlens
import torch.distributed as dist
model, tok = attnlens.load_demo()
results = [
    attnlens.scan(model, sys.argv[1], tokenizer=tok, seq_len=32, batch_size=2, max_tokens=640, progress=False)
    for _ in range(3)
]
assert dist.is_initialized() and dist.get_world_size() == 2  # one group, created by the first call, kept
assert len({r.to_json() for r in results}) == 1
print("rank", dist.get_rank(), "ok", flush=True)
"""


@pytest.mark.slow
def test_scan_called_again_in_the_same_processes(tmp_path) -> None:
    # Creating and destroying the process group on every call raced torchrun's store: refused connections or a
    # hang on the second call. The group is created once and kept for the processes' life.
    data = corpus(tmp_path / "corpus.txt", n=40)
    script = tmp_path / "repeated.py"
    script.write_text(REPEATED)
    for _ in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                   str(data)]  # fmt: skip
        done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count(" ok") == 2


FAMILY = """
import json, sys, warnings
import torch
import torch.distributed as dist
import transformers
import attnlens
folder, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
config = json.loads(open(folder + "/config.json").read())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    cls = getattr(transformers, config["architectures"][0])
    model = cls.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()  # not the stored bf16
docs = json.loads(open(data).read())
result = attnlens.scan(model, docs, seq_len=12, batch_size=2, progress=False)
if not dist.is_initialized() or dist.get_rank() == 0:
    open(out, "w").write(result.to_json())
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_llama_family_scans_the_same_bytes_in_one_and_two_processes(tmp_path: Path, name: str) -> None:
    # Grouped keys from the log-sum-exp (Llama) and a sliding window of 4 in windows of 12 (Mistral's pattern path):
    # the same bytes in one and two processes, and as the API writes them in this process.
    import json

    from test_llama import FIXTURE_NAMES, build
    from test_scan import token_docs

    model = build(FIXTURE_NAMES[name], tmp_path / "model", bos_token_id=1, eos_token_id=2)
    docs = token_docs(n=40, vocab=12)
    data = tmp_path / "docs.json"
    data.write_text(json.dumps(docs))
    script = tmp_path / "family.py"
    script.write_text(FAMILY)
    outputs = {}
    for n in (1, 2):
        out = tmp_path / f"scan{n}.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            str(script), str(tmp_path / "model"), str(data), str(out),
        ]  # fmt: skip
        done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[n] = out.read_bytes()
    assert outputs[1] == outputs[2]
    here = attnlens.scan(model, docs, seq_len=12, batch_size=2, progress=False)
    assert here.to_json().encode() == outputs[1]
    assert attnlens.ScanResult.load(tmp_path / "scan2.json").n_windows >= 8
