"""Concurrent attnlens calls on one model, and attnlens beside a user's own forward passes in other threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_bitwise, make_gpt2, random_ids

import attnlens
from attnlens import capture

THREADS = 4
ROUNDS = 6


def run_together(jobs: list[Callable[[], Any]], rounds: int = ROUNDS) -> list[list[Any]]:
    """Run each job in its own thread ``rounds`` times, all released together by a barrier each round.

    Returns each job's results; re-raises the first exception any thread met.
    """
    barrier = threading.Barrier(len(jobs))
    results: list[list[Any]] = [[] for _ in jobs]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for _ in range(rounds):
                barrier.wait(timeout=60)
                results[index].append(jobs[index]())
        except BaseException as error:  # handed to the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def state(model: Any) -> dict[str, Any]:
    return {
        "impl": model.config._attn_implementation,
        "training": [m.training for m in model.modules()],
        "hooks": [(list(m._forward_hooks.items()), list(m._forward_pre_hooks.items())) for m in model.modules()],
        "flags": [m.__dict__.get("_output_capturing_hooks_installed") for m in model.modules()],
    }


STORE = ("pattern", "scores", "q", "k", "v", "z", "result")


def assert_same_trace(a: attnlens.AttentionTrace, b: attnlens.AttentionTrace) -> None:
    """The same trace call on the same inputs, run alone or among other threads: the same bits."""
    assert a.layers == b.layers
    for name in STORE:
        assert_bitwise(a[name], b[name], "same call")


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
def test_concurrent_traces_each_get_the_single_threaded_result(implementation: str, training: bool) -> None:
    model = make_gpt2(n_layer=3, attn_implementation=implementation).train(training)
    before = state(model)
    # Each thread its own inputs and layers, so that a mix-up between threads could not go unnoticed.
    calls = [
        {"input_ids": random_ids(model, batch=2, pos=8 + i, seed=i), "layers": [i % 3, (i + 1) % 3]}
        for i in range(THREADS)
    ]
    alone = [attnlens.trace(model, store=STORE, **call) for call in calls]
    assert state(model) == before
    jobs = [lambda call=call: attnlens.trace(model, store=STORE, **call) for call in calls]
    results = run_together(jobs)
    for job, expected in zip(results, alone, strict=True):
        assert len(job) == ROUNDS
        for got in job:
            assert_same_trace(got, expected)
    assert state(model) == before


def test_concurrent_traces_and_verifies_on_a_training_sdpa_model() -> None:
    """verify switches an sdpa model to eager for its patterns: a trace meanwhile must still run sdpa."""
    model = make_gpt2(n_layer=2, attn_implementation="sdpa").train()
    before = state(model)
    ids = random_ids(model)
    trace_alone = attnlens.trace(model, ids, store=STORE)
    report_alone = attnlens.verify(model, ids)
    assert report_alone.ok, str(report_alone)

    def errors(report: attnlens.VerificationReport) -> list[tuple[Any, ...]]:
        return [(r.layer, r.head, r.quantity, r.max_abs_error) for r in report.rows]

    jobs: list[Callable[[], Any]] = [
        lambda: attnlens.trace(model, ids, store=STORE),
        lambda: attnlens.verify(model, ids),
        lambda: attnlens.trace(model=model, input_ids=ids, store=STORE),
        lambda: attnlens.verify(model=model, input_ids=ids),
    ]
    traces_a, reports_a, traces_b, reports_b = run_together(jobs)
    for t in traces_a + traces_b:
        assert_same_trace(t, trace_alone)
    assert all(errors(r) == errors(report_alone) and r.attn_implementation == "sdpa" for r in reports_a + reports_b)
    assert state(model) == before


@pytest.mark.parametrize("attnlens_call", ["trace", "verify"])
def test_a_users_concurrent_forward_is_untouched(attnlens_call: str) -> None:
    model = make_gpt2(n_layer=3)  # eval mode and eager: nothing attnlens switches for its own pass
    user_ids = random_ids(model, batch=3, pos=10, seed=7)
    ids = random_ids(model)
    with torch.no_grad():
        user_alone = model(user_ids).logits
    before = state(model)
    call = attnlens.trace if attnlens_call == "trace" else attnlens.verify
    # Layer 0 only: attnlens's pass stops there with StopForward, which must never reach the user's pass.
    kwargs: dict[str, Any] = {"layers": [0]}

    def user() -> torch.Tensor:
        with torch.no_grad():
            return model(user_ids).logits

    results = run_together([lambda: call(model, ids, **kwargs), user, user], rounds=10)
    for logits in results[1] + results[2]:
        assert_bitwise(logits, user_alone, "same call")
    assert state(model) == before


def test_hooks_act_only_in_the_thread_that_registered_them() -> None:
    model = make_gpt2(n_layer=2)
    sites = attnlens.models.adapt(model).sites
    seen: list[int] = []

    def stop(module: Any, args: Any, output: Any) -> None:
        seen.append(threading.get_ident())
        raise capture.StopForward

    other: list[Any] = []
    with capture.forward_hooks([(sites.layers[0].qkv[0], stop)]):
        thread = threading.Thread(target=lambda: other.append(model(random_ids(model)).logits))
        thread.start()
        thread.join()
        assert other and other[0].shape[-1] == model.config.vocab_size  # the other thread's pass ran to the end
        assert seen == []
        assert capture.run_until(lambda: model(random_ids(model)))  # in this thread the hook acts
    assert seen == [threading.get_ident()]
    assert all(not m._forward_hooks for m in model.modules())


def test_one_lock_per_model_shared_by_its_transformer() -> None:
    model, other = make_gpt2(), make_gpt2()
    lock = capture.model_lock(model)
    assert capture.model_lock(model) is lock
    assert capture.model_lock(model.transformer) is lock
    assert capture.model_lock(other) is not lock
    assert "lock" not in "".join(model.state_dict())
    # While another thread holds the model's lock, attnlens waits; a user's forward does not.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(timeout=60)
    done: list[Any] = []
    waiter = threading.Thread(target=lambda: done.append(attnlens.trace(model, random_ids(model))))
    waiter.start()
    waiter.join(timeout=0.5)
    assert not done and waiter.is_alive()
    with torch.no_grad():
        model(random_ids(model))
    release.set()
    waiter.join(timeout=60)
    holder.join(timeout=60)
    assert len(done) == 1


def test_preserved_undoes_only_what_it_changed() -> None:
    """What a user changes meanwhile (in another thread) is kept, unless it is the very flag attnlens restores."""
    model = make_gpt2(n_layer=2, attn_implementation="sdpa")
    model.transformer.h[0].train()  # attnlens switches these off and back on
    user_hook: list[Any] = []
    with capture.preserved(model):
        assert not any(m.training for m in model.modules())
        model.transformer.h[1].mlp.train()  # not attnlens's to restore: kept
        user_hook.append(model.transformer.h[1].register_forward_hook(lambda *a: None))
        model.set_attn_implementation("eager")  # attnlens did not switch the kernel: kept
    assert model.transformer.h[0].training and all(m.training for m in model.transformer.h[0].modules())
    assert model.transformer.h[1].mlp.training and not model.transformer.h[1].training
    assert model.config._attn_implementation == "eager"
    assert len(model.transformer.h[1]._forward_hooks) == 1
    user_hook[0].remove()
    # A kernel switched by attnlens is switched back, unless someone switched it to yet another one meanwhile.
    with capture.preserved(model, attn_implementation="sdpa"):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "eager"
