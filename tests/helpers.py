"""What several test modules share: tolerances, comparisons, small models and batches, fake data on disk.

Imported by name (``from helpers import rel_err``): ``tests/`` is on ``sys.path``
under pytest, as for ``_user_models``. The fixtures built on these (``folder``,
``glyphs``) are in ``conftest.py``.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from maml_func import Conv4, TaskBatch
from maml_func.cli import main
from maml_func.config import TrainConfig, make_config

REPO = Path(__file__).resolve().parents[1]
SHARED_OMNIGLOT = REPO.parent / "shared" / "data" / "omniglot"
# The one line ``maml-func eval`` prints.
SUMMARY = re.compile(r"^\d+-way \d+-shot: \d+\.\d% ± \d+\.\d \(\d+ tasks, \d+ steps\)$")

# Float64 meta-gradients against a reference: relative on the norm of all of them together (docs/design.md,
# "BatchNorm under vmap", says why not per tensor).
TOL = 1e-10
# An iteration inside the annealing of MAML++'s multi-step loss over the 10 iterations the tests set: the step
# weights are neither uniform nor one-hot there, so a wrong weight shows.
ITERATION = 4


# ------------------------------------------------------------ comparisons
def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Every tensor flattened and concatenated, in order: ``[sum of numels]``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(got: torch.Tensor | Iterable[torch.Tensor], want: torch.Tensor | Iterable[torch.Tensor]) -> float:
    """``||got - want|| / ||want||`` over all entries together; a sequence of tensors counts as its concatenation."""
    got, want = (x.reshape(-1) if isinstance(x, torch.Tensor) else flat(x) for x in (got, want))
    return ((got - want).norm() / want.norm()).item()


def assert_same_meta(a: dict, b: dict) -> None:
    """Two meta-parameter dicts (``{group: {name: tensor}}``) equal bit for bit."""
    assert a.keys() == b.keys()
    for group in a:
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), f"{group}.{name} differs"


# ------------------------------------------------------------ models, batches, meta-gradients
def conv4(seed: int = 0, n_way: int = 3) -> Conv4:
    """A float64 Conv4 of 8 channels for 16x16 images, initialized under ``seed``."""
    torch.manual_seed(seed)
    return Conv4(n_way=n_way, hidden=8, image_size=16).double()


def classification_batch(T: int, n_way: int, k: int, q: int, size: int, seed: int = 0,
                         channels: int = 1) -> TaskBatch:
    """``T`` random ``n_way``-way tasks of ``channels x size x size`` float64 images, support labels class-major."""
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(
        torch.rand(T, n_way * k, channels, size, size, generator=g, dtype=torch.float64),
        torch.arange(n_way).repeat_interleave(k).expand(T, -1).clone(),
        torch.rand(T, n_way * q, channels, size, size, generator=g, dtype=torch.float64),
        torch.randint(0, n_way, (T, n_way * q), generator=g),
    )


def meta_grads(algo, meta, batch, iteration: int = ITERATION, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """The meta-loss (detached) and its gradient in every meta-parameter, flattened; ``options`` go to meta_loss."""
    loss, _ = algo.meta_loss(meta, batch, iteration, **options)
    return loss.detach(), flat(torch.autograd.grad(loss, algo.parameters(meta)))


def spread_rates(meta: dict) -> dict:
    """Scale each learned rate in ``meta["rule"]`` by its own seeded factor in [0.5, 1.5), in place.

    Distinct rates per element and per step, so that a mixed-up index or step shows.
    """
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for r in meta["rule"].values():
            r.mul_(0.5 + torch.rand(r.shape, generator=g, dtype=r.dtype))
    return meta


# ------------------------------------------------------------ image folders and runs
def noise_folder(root: Path, n_classes: int = 20, per_class: int = 5, size: int = 16) -> Path:
    """An ImageFolder tree of random-pattern classes (enough for train/val/test splits of 3-way tasks)."""
    g = torch.Generator().manual_seed(0)
    for c in range(n_classes):
        (root / f"class{c:02d}").mkdir(parents=True)
        pattern = torch.rand(size, size, generator=g)
        for i in range(per_class):
            pixels = (255 * (0.7 * pattern + 0.3 * torch.rand(size, size, generator=g))).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(root / f"class{c:02d}" / f"{i}.png")
    return root


def make_glyph_folder(root: Path, n_classes: int = 40, per_class: int = 10, size: int = 20, seed: int = 0) -> Path:
    """An ImageFolder tree of synthetic glyphs: a class is three fixed random strokes, an image a jittered drawing.

    Learnable (the strokes are the class) but not trivial (shift, rotation, stroke
    width and end points vary per image).
    """
    rng = random.Random(seed)
    big = 4 * size  # drawn large, then shrunk with LANCZOS: smooth strokes
    for c in range(n_classes):
        strokes = [[(rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)) for _ in range(rng.choice((2, 3)))]
                   for _ in range(3)]
        folder = root / f"glyph{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("L", (big, big), 0)
            draw = ImageDraw.Draw(image)
            dx, dy = rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)
            for stroke in strokes:
                points = [((x + dx + rng.uniform(-0.03, 0.03)) * big, (y + dy + rng.uniform(-0.03, 0.03)) * big)
                          for x, y in stroke]
                draw.line(points, fill=255, width=int(big * rng.uniform(0.06, 0.09)))
            image = image.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
            image.resize((size, size), Image.LANCZOS).save(folder / f"{i:02d}.png")
    return root


def tiny(glyphs: Path, save_to: Path | None, **changes: object) -> TrainConfig:
    """A run of a few iterations on the ``glyphs`` folder that takes about a second on the CPU."""
    values: dict[str, object] = dict(
        dataset=str(glyphs), data_root=str(glyphs.parent / "cache"), image_size=16, hidden=8, n_way=3, k_shot=1,
        n_query=2, meta_batch=4, inner_steps=1, eval_inner_steps=2, iterations=6, val_every=3, val_tasks=6,
        save_every=2, log_every=1, device="cpu", seed=3, rotations=True,
        save_to=None if save_to is None else str(save_to),
        # One way of running the tasks: the execution search chooses by timing, and these tests compare runs bit
        # for bit (tests/test_execution.py tests the search).
        execution="vmap",
    )
    values.update(changes)
    return make_config(**values)


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """``main(argv)`` of the command line in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def tiny_flags(folder: Path, tmp_path: Path) -> list[str]:
    """``maml-func train`` flags for a run of seconds on a ``noise_folder``."""
    return ["--dataset", str(folder), "--data-root", str(tmp_path / "cache"), "--image-size", "16", "--hidden", "8",
            "--n-way", "3", "--k-shot", "1", "--n-query", "2", "--meta-batch", "2", "--device", "cpu",
            "--val-tasks", "4", "--no-progress"]


# ------------------------------------------------------------ data sources
def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` by relative path, with its bytes: equal snapshots mean nothing was modified."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def forbid(monkeypatch: pytest.MonkeyPatch, *targets: tuple[object, str]) -> None:
    """Make each ``(module, name)`` fail the test if called: a second load must read the cache, not decode again."""
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    for owner, name in targets:
        monkeypatch.setattr(owner, name, fail)


def serve(directory: Path, request: pytest.FixtureRequest) -> str:
    """Serve ``directory`` over HTTP on localhost until the test ends (a release site that nothing leaves the
    machine for); its base URL, ``http://127.0.0.1:PORT/``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    request.addfinalizer(server.shutdown)
    return f"http://127.0.0.1:{server.server_address[1]}/"
