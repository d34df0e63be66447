"""The execution policy: every candidate gives the same meta-gradient; the search, its choice, its state and cache."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_same_meta, classification_batch, rel_err, tiny
from torch import nn

from maml_func import MAML, Callback, build, fit, meta_gradient
from maml_func.batching import Way
from maml_func.execution import ROUNDS, ExecutionPolicy, setup_key, ways
from maml_func.reference import loop_meta_grad


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 3)).double()


@pytest.mark.parametrize("name", ["maml", "metasgd", "anil"])
def test_every_candidate_gives_the_loops_meta_gradient(name):
    model = small_cnn()
    batch = classification_batch(9, n_way=3, k=2, q=2, size=4)
    algorithm = build(name, model, inner_lr=0.3, inner_steps=2)
    meta = algorithm.init()
    grads, split = {}, {}
    policy = ExecutionPolicy("auto")
    for way in ways(batch.num_tasks, layouts=True):
        assert Way.parse(way.name) == way
        loss, _ = algorithm.meta_loss(meta, batch, way=way)
        grads[way.name] = torch.autograd.grad(loss, algorithm.parameters(meta))
        # as the policy runs it: one backward per call of the way, the gradients summed
        meta_gradient(algorithm, meta, batch, 0, way=way, tasks_per_backward=policy.tasks_per_backward_for(way, 9))
        split[way.name] = [p.grad for p in algorithm.parameters(meta)]
    assert sorted(grads) == ["chunk=2", "chunk=2/nchw", "chunk=4", "chunk=4/nchw", "chunk=8", "chunk=8/nchw",
                             "loop", "vmap", "vmap/nchw"]
    for name_ in grads:
        assert rel_err(list(grads[name_]), list(grads["loop"])) < TOL, name_
        assert rel_err(split[name_], list(grads["loop"])) < TOL, name_
    if name == "maml":
        want = loop_meta_grad(model, meta["model"], batch, inner_lr=0.3, steps=2)
        assert rel_err(list(grads["vmap"]), list(want)) < TOL


def test_the_search_times_each_candidate_then_keeps_the_fastest_and_its_state_round_trips():
    algorithm = MAML(small_cnn(), inner_lr=0.3)
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    meta = algorithm.init()
    policy = ExecutionPolicy("auto")
    seen = []

    def step(way, per_backward):
        seen.append(way.name)
        assert per_backward == {"loop": 1, "chunk=2": 2, "vmap": None}[way.name.removesuffix("/nchw")]  # per call
        return meta_gradient(algorithm, meta, batch, 0, way=way, tasks_per_backward=per_backward)

    candidates = [w.name for w in ways(4, layouts=True)]  # image tasks on the CPU: both layouts
    assert candidates == ["loop", "chunk=2", "chunk=2/nchw", "vmap", "vmap/nchw"]
    for _ in range(ROUNDS * len(candidates)):
        assert policy.searching
        policy.run(batch, torch.device("cpu"), step)
    assert not policy.searching and policy.choice in candidates
    # least memory first, twice each (warm-up, the run whose memory counts), then a round of every candidate once
    assert ROUNDS == 3 and seen == [c for c in candidates for _ in range(2)] + candidates
    assert set(policy.timings) == set(candidates) and all(t["seconds"] > 0 for t in policy.timings.values())
    assert policy.summary().startswith(f"execution: {policy.choice} (")
    policy.run(batch, torch.device("cpu"), step)
    assert seen[-1] == policy.choice
    resumed = ExecutionPolicy("auto")
    resumed.load_state_dict(policy.state_dict())
    assert not resumed.searching and resumed.way(4).name == policy.choice
    for other in ExecutionPolicy("auto", max_memory_mb=10.0), ExecutionPolicy("auto", tasks_per_backward=2):
        other.load_state_dict(policy.state_dict())  # another budget or split: the choice does not carry over
        assert other.searching


def test_the_auto_policy_runs_one_backward_per_call_unless_told_otherwise():
    auto = ExecutionPolicy("auto")
    assert [auto.tasks_per_backward_for(w, 32) for w in ways(32)] == [1, 2, 4, 8, None]
    assert [auto.tasks_per_backward_for(w, 32) for w in ways(32, layouts=True)] == [1, 2, 2, 4, 4, 8, 8, None, None]
    told = ExecutionPolicy("auto", tasks_per_backward=3)
    assert {told.tasks_per_backward_for(w, 32) for w in ways(32)} == {3}
    assert ExecutionPolicy("vmap").tasks_per_backward_for(Way(4), 32) is None  # a fixed way: one backward
    assert ExecutionPolicy("loop", tasks_per_backward=5).tasks_per_backward_for(Way(None, vectorize=False), 32) == 5
    with pytest.raises(ValueError, match="tasks_per_backward must be a positive int or None"):
        ExecutionPolicy("auto", tasks_per_backward=0)


def test_the_choice_takes_least_memory_among_the_near_fastest_within_the_budget():
    policy = ExecutionPolicy("auto")
    policy.timings = {"vmap": {"runs": 3, "seconds": 1.00, "memory_mb": 900.0},
                      "chunk=2": {"runs": 3, "seconds": 1.02, "memory_mb": 500.0},
                      "loop": {"runs": 3, "seconds": 1.50, "memory_mb": 400.0}}
    assert policy._choose() == "chunk=2"
    policy.max_memory_mb = 450.0
    assert policy._choose() == "loop"
    policy.max_memory_mb, policy.timings["chunk=2"]["seconds"] = None, 1.2
    assert policy._choose() == "vmap"


def test_fixed_modes_skip_the_search_and_a_second_run_reads_the_cache(tmp_path):
    algorithm = MAML(small_cnn(), inner_lr=0.3)
    assert ExecutionPolicy("loop").way(8).vectorize is False
    assert ExecutionPolicy("vmap", chunk_size=3).way(8).chunk_size == 3
    batch = classification_batch(4, n_way=3, k=2, q=2, size=4)
    key = setup_key(algorithm, batch)
    first = ExecutionPolicy("auto", cache_dir=tmp_path)
    first.choice, first.timings = "chunk=2", {"chunk=2": {"runs": 2, "seconds": 0.1, "memory_mb": 1.0}}
    first.remember(key)
    second = ExecutionPolicy("auto", cache_dir=tmp_path)
    assert second.recall(key) and second.choice == "chunk=2" and not second.searching
    assert "(cached)" in second.summary()
    assert not ExecutionPolicy("auto", cache_dir=tmp_path).recall({**key, "threads": 99})
    (next(tmp_path.iterdir())).write_text("{not json")
    assert not ExecutionPolicy("auto", cache_dir=tmp_path).recall(key)
    with pytest.raises(ValueError, match="mode must be one of"):
        ExecutionPolicy("fast")


class LogKinds(Callback):
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def on_log(self, record) -> None:
        self.kinds.append(record["kind"])


@pytest.mark.slow
def test_fit_searches_once_logs_the_choice_and_a_resume_keeps_it_bit_for_bit(glyphs, tmp_path, monkeypatch):
    """meta_batch 4: the loop, chunk=2 and vmap, 2 iterations each; the run goes on past the search.

    The choice follows timings, which differ from run to run; for two runs to be comparable bit for bit,
    both choose chunk=2 here (what is tested is that a resumed run keeps its checkpoint's choice).
    """
    monkeypatch.setattr(ExecutionPolicy, "_choose", lambda self: "chunk=2")
    searched = len(ways(4, layouts=True)) * ROUNDS  # image tasks on the CPU: both layouts
    config = tiny(glyphs, tmp_path / "a", iterations=searched + 2, execution="auto")
    logged = LogKinds()
    whole = fit(config, progress=False, callbacks=[logged])
    records = [r for r in whole.history if r["kind"] == "execution"]
    assert len(records) == 1 and records[0]["iteration"] == searched and not records[0]["cached"]
    assert logged.kinds.count("execution") == 1  # the callbacks see it too
    timings = records[0]["timings"]
    assert set(timings) == {"vmap", "vmap/nchw", "chunk=2", "chunk=2/nchw", "loop"} and records[0]["choice"] in timings
    fit(config.replace(save_to=str(tmp_path / "b"), iterations=searched + 1), progress=False)
    seen = []
    original = ExecutionPolicy.run
    monkeypatch.setattr(ExecutionPolicy, "_choose", lambda self: "vmap")  # a new search would choose otherwise

    def spy(self, batch, device, step):
        seen.append(self.searching)
        return original(self, batch, device, step)

    monkeypatch.setattr(ExecutionPolicy, "run", spy)
    resumed = fit(config.replace(save_to=str(tmp_path / "b")), resume=tmp_path / "b", progress=False)
    assert seen == [False], "the resumed run did not search again"
    assert_same_meta(resumed.meta, whole.meta)  # it ran chunk=2, its checkpoint's choice
    looped = fit(tiny(glyphs, tmp_path / "c", execution="loop", iterations=2), progress=False)
    assert not [r for r in looped.history if r["kind"] == "execution"]


@pytest.mark.slow
def test_a_second_run_of_the_same_setup_reads_the_cached_choice(glyphs, tmp_path, monkeypatch):
    monkeypatch.setenv("MAML_FUNC_CACHE_DIR", str(tmp_path / "cache"))
    searched = len(ways(4, layouts=True)) * ROUNDS
    first = fit(tiny(glyphs, tmp_path / "a", iterations=searched, val_every=0, execution="auto"), progress=False)
    second = fit(tiny(glyphs, tmp_path / "b", iterations=2, val_every=0, execution="auto"), progress=False)
    (a,) = [r for r in first.history if r["kind"] == "execution"]
    (b,) = [r for r in second.history if r["kind"] == "execution"]
    assert b["cached"] and b["iteration"] == 1 and b["choice"] == a["choice"]


def test_a_candidate_predicted_not_to_fit_is_skipped_and_one_out_of_memory_is_dropped(monkeypatch):
    algorithm = MAML(small_cnn(), inner_lr=0.3)
    batch = classification_batch(9, n_way=3, k=2, q=2, size=4)
    meta = algorithm.init()
    policy = ExecutionPolicy("auto", max_memory_mb=100.0)
    policy.timings = {"loop": {"runs": ROUNDS, "seconds": 1.0, "memory_mb": 10.0},
                      "chunk=2/nchw": {"runs": ROUNDS, "seconds": 0.9, "memory_mb": 35.0},
                      "chunk=2": {"runs": ROUNDS, "seconds": 0.8, "memory_mb": 40.0}}
    calls = []

    def step(way, per_backward):
        calls.append(way.name)
        if way.name == "chunk=4":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return algorithm.meta_loss(meta, batch, way=way)[0]

    # chunk=4 is predicted at 40 + 30 * 2 = 100 MiB (the most measured at 2 tasks per call, either layout):
    # under 0.9 * 100? no: skipped, in both layouts; so are chunk=8 and vmap.
    policy.run(batch, torch.device("cpu"), step)
    assert policy.choice == "chunk=2" and calls == ["chunk=2"]
    assert policy.timings["chunk=4"]["skipped"].startswith("needs about") and "vmap skipped" in policy.summary()
    roomy = ExecutionPolicy("auto")
    roomy.timings = {"loop": {"runs": ROUNDS, "seconds": 1.0, "memory_mb": None},
                     "chunk=2": {"runs": ROUNDS, "seconds": 0.8, "memory_mb": None},
                     "chunk=2/nchw": {"runs": ROUNDS, "seconds": 0.9, "memory_mb": None}}
    calls.clear()
    roomy.run(batch, torch.device("cpu"), step)  # chunk=4 runs out of memory: chunk=4/nchw runs instead
    assert calls == ["chunk=4", "chunk=4/nchw"]
    assert roomy.timings["chunk=4"] == {"runs": ROUNDS, "skipped": "out of memory"}
