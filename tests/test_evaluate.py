"""The evaluation protocol: per-step accuracy, 95% CI over tasks, summary line, untrained models."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from maml_func import Conv4, build
from maml_func.data import ImageClasses
from maml_func.evaluate import EvalResult, evaluate
from maml_func.tasks import EpisodeSampler

SUMMARY = re.compile(r"^\d+-way \d+-shot: \d+\.\d% ± \d+\.\d \(\d+ tasks, \d+ steps\)$")


def random_classes(n_classes: int = 12, per_class: int = 6, size: int = 16, seed: int = 0) -> ImageClasses:
    """Classes that are a fixed random pattern each, plus noise per image: easy, but not trivially."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.rand(n_classes, 1, 1, size, size, generator=g)
    noise = torch.rand(n_classes, per_class, 1, size, size, generator=g)
    images = (255 * (0.7 * pattern + 0.3 * noise)).to(torch.uint8)
    return ImageClasses(images, torch.full((n_classes,), per_class), [f"c{i}" for i in range(n_classes)])


def algorithm(name: str = "maml", n_way: int = 4, **options):
    torch.manual_seed(0)
    return build(name, Conv4(n_way=n_way, hidden=8, image_size=16), inner_lr=0.4, inner_steps=1, **options)


@pytest.fixture(scope="module")
def sampler() -> EpisodeSampler:
    return EpisodeSampler(random_classes(), n_way=4, k_shot=1, n_query=3)


@pytest.mark.slow
def test_accuracy_and_ci_match_the_protocol(sampler: EpisodeSampler) -> None:
    algo = algorithm()
    meta = algo.init()
    result = evaluate(algo, meta, sampler, num_tasks=10, steps=2, batch_size=4, seed=5)
    # The same tasks by hand: one generator, batches of 4, 4 and 2.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        acc = torch.cat([algo.scores(meta, sampler.sample(t, g), steps=2)["accuracy"] for t in (4, 4, 2)]).double()
    assert acc.shape == (10, 3)
    assert result.accuracy == pytest.approx(acc.mean(0).tolist(), abs=1e-12)
    expected_ci = [1.96 * acc[:, s].std(correction=0).item() / math.sqrt(10) for s in range(3)]
    assert result.ci95 == pytest.approx(expected_ci, abs=1e-12)
    assert (result.n_way, result.k_shot, result.n_query, result.num_tasks, result.steps) == (4, 1, 3, 10, 2)
    assert len(result.loss) == 3 and all(math.isfinite(v) for v in result.loss)


def test_untrained_model_evaluates_and_adaptation_helps(sampler: EpisodeSampler) -> None:
    algo = algorithm()
    meta = algo.init()
    result = evaluate(algo, meta, sampler, num_tasks=60, steps=3, batch_size=20)
    assert len(result.accuracy) == 4 and all(0 <= a <= 1 for a in result.accuracy)
    assert abs(result.accuracy[0] - 0.25) < 0.15  # before adapting, about chance
    assert result.accuracy[3] > result.accuracy[0] + 0.2  # the classes are easy; three steps learn them
    assert all(p.grad is None for p in algo.parameters(meta))  # no meta-gradient was built


def test_same_seed_same_tasks_other_seed_other_tasks(sampler: EpisodeSampler) -> None:
    algo = algorithm()
    meta = algo.init()
    a = evaluate(algo, meta, sampler, num_tasks=12, steps=1, seed=1)
    b = evaluate(algo, meta, sampler, num_tasks=12, steps=1, seed=1)
    c = evaluate(algo, meta, sampler, num_tasks=12, steps=1, generator=torch.Generator().manual_seed(2))
    assert a == b and a.loss != c.loss


def test_steps_default_to_the_algorithm_and_other_algorithms_work(sampler: EpisodeSampler) -> None:
    for name in ("maml", "fomaml", "anil", "metasgd", "reptile"):
        algo = algorithm(name)
        result = evaluate(algo, algo.init(), sampler, num_tasks=4)
        assert result.steps == algo.inner_steps == 1 and len(result.accuracy) == 2, name


def test_float64_meta_parameters_get_float64_tasks(sampler: EpisodeSampler) -> None:
    torch.manual_seed(0)
    algo = build("maml", Conv4(n_way=4, hidden=8, image_size=16).double(), inner_lr=0.4)
    result = evaluate(algo, algo.init(), sampler, num_tasks=3, steps=1)
    assert result.num_tasks == 3


def test_summary_line_and_json() -> None:
    result = EvalResult(n_way=5, k_shot=1, n_query=15, num_tasks=600, steps=3,
                        accuracy=[0.2, 0.9, 0.97, 0.981], ci95=[0.01, 0.01, 0.005, 0.004], loss=[1.6, 0.4, 0.2, 0.1])
    assert result.summary() == "5-way 1-shot: 98.1% ± 0.4 (600 tasks, 3 steps)"
    assert SUMMARY.match(result.summary())
    data = json.loads(json.dumps(result.to_dict()))
    assert data["accuracy"] == [0.2, 0.9, 0.97, 0.981] and data["summary"] == result.summary()
    assert result.final_accuracy == 0.981 and result.final_ci95 == 0.004


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_tasks": 0}, "num_tasks must be an int >= 1, got 0"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"steps": -1}, "steps must be an int >= 0, got -1"),
])
def test_bad_arguments_are_named(sampler: EpisodeSampler, kwargs: dict, message: str) -> None:
    algo = algorithm()
    with pytest.raises(ValueError, match=f"evaluate: {message}"):
        evaluate(algo, algo.init(), sampler, **kwargs)
