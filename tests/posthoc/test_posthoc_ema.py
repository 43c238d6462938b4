"""PostHocEMA: snapshots equal the closed form, synthesis is as good as it reports, files are checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import polyak
from polyak.posthoc import PostHocEMA, Snapshots, profile, sigma_rel_to_gamma
from tests.posthoc.helpers import exact, flat, model, random_walk, set_weights


def _train(directory: Path, walk: torch.Tensor, *, every: int = 20, k: int = 1, **kw: object) -> PostHocEMA:
    net = model()
    ph = PostHocEMA(net, snapshot_every=every, directory=directory, update_every=k, **kw)  # type: ignore[arg-type]
    for theta in walk:
        set_weights(net, theta)
        ph.update()
    return ph


@pytest.mark.parametrize("k", [1, 4])
def test_snapshots_equal_the_closed_form(tmp_path: Path, k: int) -> None:
    walk = random_walk(120)
    ph = _train(tmp_path / "run", walk, every=40, k=k)
    snaps = Snapshots(tmp_path / "run")
    assert snaps.steps == (40, 80, 120)
    net = model()
    for step in snaps.steps:
        for gamma, avg in zip(
            ph.gammas, polyak.io.read(tmp_path / "run" / f"snapshot-{step:012d}.safetensors").ema["averages"]
        ):  # type: ignore[index]
            torch.testing.assert_close(flat(avg, net), exact(walk, step, gamma, k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_linear_ramp_equals_the_closed_form(tmp_path: Path, k: int) -> None:
    """theta_t = t: the EMA is sum_j w_j * j k. An EMA that used one step's beta per k-step update (exponent
    (gamma + 1) / k - 1) would be far off for k = 4."""
    steps = 400
    walk = torch.arange(1, steps + 1, dtype=torch.float64).unsqueeze(1).expand(steps, 15)
    ph = _train(tmp_path / "run", walk, every=steps, k=k)
    avg = ph.synthesize(0.10)
    n = steps // k
    want = float(profile(n, sigma_rel_to_gamma(0.10)) @ (torch.arange(1, n + 1, dtype=torch.float64) * k))
    assert torch.allclose(avg["weight"].double(), torch.full((3, 4), want, dtype=torch.float64), rtol=1e-6)
    wrong = float(
        profile(n, (sigma_rel_to_gamma(0.10) + 1) / k - 1) @ (torch.arange(1, n + 1, dtype=torch.float64) * k)
    )
    assert abs(want - wrong) > 1e-3 * want or k == 1


def test_snapshot_label_equals_content(tmp_path: Path) -> None:
    ph = _train(tmp_path / "run", random_walk(60), every=30, k=3)
    for step in (30, 60):
        ckpt = polyak.io.read(tmp_path / "run" / f"snapshot-{step:012d}.safetensors")
        assert ckpt.ema is not None
        assert ckpt.ema["step"] == step
        assert ckpt.extra["posthoc"]["step"] == step
        assert all(v.dtype == torch.float32 for avg in ckpt.ema["averages"] for v in avg.values())
    assert ph.step == 60


def test_stored_width_at_last_snapshot_is_that_snapshot(tmp_path: Path) -> None:
    ph = _train(tmp_path / "run", random_walk(100), every=25)
    w = ph.weights(0.10)
    assert w.error == 0.0
    assert sorted(w.coefficients) == [0.0] * 7 + [1.0]
    stored = polyak.io.read(tmp_path / "run" / "snapshot-000000000100.safetensors").ema["averages"][1]  # type: ignore[index]
    got = ph.synthesize(0.10)
    assert all(torch.equal(got[key], stored[key]) for key in stored)


@pytest.mark.parametrize("sigma", [0.03, 0.05, 0.07, 0.10, 0.15, 0.25])
def test_constant_model_stays_exactly_constant(tmp_path: Path, sigma: float) -> None:
    walk = torch.full((90, 15), 0.3, dtype=torch.float32).double()
    ph = _train(tmp_path / "run", walk, every=10, k=2)
    for at in (30, 90):
        got = ph.synthesize(sigma, at=at)
        assert torch.equal(got["weight"], torch.full((3, 4), 0.3))
        assert torch.equal(got["bias"], torch.full((3,), 0.3))


@pytest.mark.parametrize("sigma", [0.04, 0.07, 0.12, 0.2])
def test_random_walk_within_the_reported_error(tmp_path: Path, sigma: float) -> None:
    """|synth - exact| <= error * ||w_target|| * ||theta||_2 per coordinate (Cauchy-Schwarz), plus float32
    rounding of the stored values amplified by the gain."""
    walk = random_walk(400, seed=1)
    ph = _train(tmp_path / "run", walk, every=20, k=2)
    for at in (200, 400):  # mid-run too: only the snapshots up to `at` are used
        w = ph.weights(sigma, at=at)
        assert max(w.steps) == at
        got = flat(ph.synthesize(sigma, at=at), model())
        want = exact(walk, at, w.gamma, 2)
        thetas = walk[1:at:2]
        bound = w.error * float(profile(at // 2, w.gamma).norm()) * thetas.norm(dim=0)
        rounding = w.gain * 2.0**-23 * walk.abs().max() * 4
        assert ((got - want).abs() <= bound + rounding).all()
        assert w.error < 0.2


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path) -> None:
    walk = random_walk(200, seed=2)
    straight = _train(tmp_path / "a", walk, every=20)
    net = model()
    ph = PostHocEMA(net, snapshot_every=20, directory=tmp_path / "b")
    for theta in walk[:130]:
        set_weights(net, theta)
        ph.update()
        if ph.step == 110:
            polyak.save(tmp_path / "ckpt.safetensors", ph)
    # the process dies at step 130 (snapshot 120 written after the checkpoint); a new one resumes at 110
    net = model()
    resumed = PostHocEMA(net, snapshot_every=20, directory=tmp_path / "b", resume=True)
    polyak.load(tmp_path / "ckpt.safetensors", resumed)
    assert Snapshots(tmp_path / "b").steps[-1] == 100
    for theta in walk[110:]:
        set_weights(net, theta)
        resumed.update()
    for sigma in (0.05, 0.08, 0.10):
        a, b = straight.synthesize(sigma), resumed.synthesize(sigma)
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert straight.weights(sigma) == resumed.weights(sigma)


def test_a_used_directory_is_refused(tmp_path: Path) -> None:
    _train(tmp_path / "run", random_walk(40), every=20)
    with pytest.raises(ValueError, match="already holds the snapshots of run"):
        PostHocEMA(model(), snapshot_every=20, directory=tmp_path / "run")
    with pytest.raises(ValueError, match="sigma_rels|gammas"):
        PostHocEMA(model(), (0.05, 0.2), snapshot_every=20, directory=tmp_path / "run", resume=True)
    resumed = PostHocEMA(model(), snapshot_every=20, directory=tmp_path / "run", resume=True)
    with pytest.raises(RuntimeError, match="load_state_dict"):
        resumed.update()


def test_stale_and_foreign_files_are_refused(tmp_path: Path) -> None:
    _train(tmp_path / "old", random_walk(40, seed=3), every=20)
    _train(tmp_path / "run", random_walk(40), every=20)
    shutil.copy(
        tmp_path / "old" / "snapshot-000000000020.safetensors", tmp_path / "run" / "snapshot-000000000020.safetensors"
    )
    with pytest.raises(ValueError, match="belongs to another run"):
        Snapshots(tmp_path / "run").synthesize(0.07)
    (tmp_path / "run" / "snapshot-000000000020.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="listed in the manifest"):
        Snapshots(tmp_path / "run").synthesize(0.07)
    shutil.copy(
        tmp_path / "run" / "snapshot-000000000040.safetensors", tmp_path / "run" / "snapshot-000000000020.safetensors"
    )
    with pytest.raises(ValueError, match="holds step 40"):
        Snapshots(tmp_path / "run").synthesize(0.07)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a polyak.PostHocEMA snapshot directory"):
        Snapshots(tmp_path / "empty")


def test_state_of_another_run_is_refused(tmp_path: Path) -> None:
    a = _train(tmp_path / "a", random_walk(40), every=20)
    _train(tmp_path / "b", random_walk(40), every=20)
    other = PostHocEMA(model(), snapshot_every=20, directory=tmp_path / "b", resume=True)
    with pytest.raises(ValueError, match="belongs to run"):
        other.load_state_dict(a.state_dict())


def test_a_time_between_snapshots_is_refused(tmp_path: Path) -> None:
    ph = _train(tmp_path / "run", random_walk(40), every=20)
    with pytest.raises(ValueError, match="not a snapshot step"):
        ph.synthesize(0.07, at=30)
    with pytest.raises(ValueError, match="not a multiple of update_every"):
        PostHocEMA(model(), snapshot_every=10, update_every=4, directory=tmp_path / "x")
    ph2 = PostHocEMA(model(), snapshot_every=8, update_every=4, directory=tmp_path / "y")
    for _ in range(5):
        ph2.update()
    with pytest.raises(ValueError, match="cannot snapshot at step 5"):
        ph2.snapshot()


def test_copy_to_loads_the_synthesis(tmp_path: Path) -> None:
    ph = _train(tmp_path / "run", random_walk(60), every=20)
    target = model()
    ph.copy_to(target, 0.08)
    want = ph.synthesize(0.08)
    assert torch.equal(target.weight.detach(), want["weight"])
    assert torch.equal(target.bias.detach(), want["bias"])
    wrong = torch.nn.Linear(4, 5)
    before = wrong.weight.detach().clone()
    with pytest.raises(ValueError, match="shape mismatch"):
        ph.copy_to(wrong, 0.08)
    assert torch.equal(wrong.weight.detach(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sigma_rels": ()}, ValueError, "empty"),
        ({"sigma_rels": (0.1, 0.1)}, ValueError, "distinct"),
        ({"sigma_rels": (0.1, 0.4)}, ValueError, "sigma_rel"),
        ({"sigma_rels": 0.1}, TypeError, "sequence"),
        ({"snapshot_every": 0}, ValueError, "snapshot_every"),
        ({"snapshot_every": True}, TypeError, "snapshot_every"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object], error: type, match: str) -> None:
    args: dict[str, object] = {"snapshot_every": 10, "directory": tmp_path / "run", **kwargs}
    with pytest.raises(error, match=match):
        PostHocEMA(model(), **args)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()  # validated before anything was written


def test_a_manifest_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    from polyak.posthoc._snapshots import MANIFEST_NAME, read_manifest

    _train(tmp_path / "run", random_walk(20), every=20)
    extra = polyak.io.read(tmp_path / "run" / MANIFEST_NAME).extra
    polyak.save(tmp_path / "run" / MANIFEST_NAME, extra={**extra, "version": 99})
    with pytest.raises(ValueError, match="manifest version 99"):
        read_manifest(tmp_path / "run")
    polyak.save(tmp_path / "run" / MANIFEST_NAME, extra={**extra, "steps": "x"})
    with pytest.raises(ValueError, match="corrupt post-hoc EMA manifest"):
        read_manifest(tmp_path / "run")
