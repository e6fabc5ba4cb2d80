from __future__ import annotations

import math

import pytest
import torch

from dwbench.methods.gradient_features import (
    FeatureShards,
    RademacherProjector,
    adam_preconditioned,
    less_scores,
    unit_rows,
)


def _f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_adam_preconditioned_by_hand() -> None:
    # beta1=0.5, beta2=0.75, step=0 (bias corrections 0.5 and 0.25), eps=0:
    # m_hat = (0.5*m0 + 0.5*g) / 0.5 = m0 + g = [2, 2, -2]
    # v_hat = (0.75*v0 + 0.25*g^2) / 0.25 = 3*v0 + g^2 = [4, 4, 4]
    direction = adam_preconditioned(
        _f64(1, 2, 1), _f64(1, 0, -3), _f64(1, 0, 1), step=0, beta1=0.5, beta2=0.75, eps=0.0
    )
    torch.testing.assert_close(direction, _f64(1, 1, -1), rtol=0, atol=1e-15)


def test_adam_preconditioned_default_betas_put_eps_outside_the_root() -> None:
    # zero moments, step=0: m_hat = g and v_hat = g^2, so the direction is g / (|g| + eps);
    # a zero gradient gives 0 / eps = 0.
    direction = adam_preconditioned(_f64(0.1, -0.2, 0.0), _f64(0, 0, 0), _f64(0, 0, 0), step=0)
    expected = _f64(0.1 / (0.1 + 1e-8), -0.2 / (0.2 + 1e-8), 0.0)
    torch.testing.assert_close(direction, expected, rtol=1e-14, atol=0)
    assert direction[0].item() == pytest.approx(0.99999990000001, abs=1e-14)


def test_adam_preconditioned_is_torch_adams_next_step() -> None:
    torch.manual_seed(0)
    lr = 0.1
    param = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    optimizer = torch.optim.Adam([param], lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    for _ in range(3):
        param.grad = torch.randn(6, dtype=torch.float64)
        optimizer.step()
    state = optimizer.state[param]
    step = int(state["step"])
    exp_avg, exp_avg_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    next_grad = torch.randn(6, dtype=torch.float64) * torch.tensor([1, 1, 1, 1e-3, 1e-5, 0.0])
    before = param.detach().clone()
    param.grad = next_grad
    optimizer.step()
    change = param.detach() - before
    direction = adam_preconditioned(next_grad, exp_avg, exp_avg_sq, step)
    assert step == 3
    torch.testing.assert_close(lr * direction, -change, rtol=1e-9, atol=1e-12)


def test_adam_preconditioned_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        adam_preconditioned(torch.zeros(3), torch.zeros(3), torch.zeros(4), step=0)


def _matrix(projector: RademacherProjector) -> torch.Tensor:
    return projector.project(torch.eye(projector.input_dim))


def test_projector_entries_are_scaled_signs_in_every_bit_position() -> None:
    projector = RademacherProjector(input_dim=2000, proj_dim=40, seed=3, block_rows=300)
    matrix = _matrix(projector)
    assert matrix.shape == (2000, 40) and matrix.dtype == torch.float32
    assert torch.equal(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(40)))
    positive_share = (matrix > 0).float().mean(dim=0)  # column k reads bit k of a random word
    assert positive_share.min() > 0.4 and positive_share.max() < 0.6


def test_projector_is_a_function_of_its_seed() -> None:
    first = _matrix(RademacherProjector(50, 64, seed=1, block_rows=16))
    again = _matrix(RademacherProjector(50, 64, seed=1, block_rows=16))
    other = _matrix(RademacherProjector(50, 64, seed=2, block_rows=16))
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.3


@pytest.mark.parametrize("cache_blocks", [True, False])
def test_projection_does_not_depend_on_how_examples_are_batched(cache_blocks: bool) -> None:
    vectors = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    projector = RademacherProjector(50, 64, seed=1, block_rows=16, cache_blocks=cache_blocks)
    whole = projector.project(vectors)
    batched = torch.cat([projector.project(vectors[:2]), projector.project(vectors[2:])])
    assert whole.shape == (5, 64)
    torch.testing.assert_close(whole, batched)
    assert projector.caches_blocks == cache_blocks
    assert len(projector._cached_blocks) == (projector.num_blocks if cache_blocks else 0)


def test_cached_and_regenerated_blocks_agree() -> None:
    vectors = torch.randn(3, 50, dtype=torch.bfloat16)
    cached = RademacherProjector(50, 64, seed=1, block_rows=16).project(vectors)
    too_big = RademacherProjector(50, 64, seed=1, block_rows=16, cache_limit_bytes=100)
    assert not too_big.caches_blocks
    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, too_big.project(vectors))


def test_projection_roughly_preserves_norms() -> None:
    vectors = torch.randn(8, 5000, generator=torch.Generator().manual_seed(0))
    projected = RademacherProjector(5000, 2048, seed=0).project(vectors)
    relative_error = (projected.norm(dim=1) / vectors.norm(dim=1) - 1).abs()
    assert relative_error.max() < 0.2


def test_projector_rejects_wrong_input_dim() -> None:
    with pytest.raises(ValueError, match=r"\(n, 50\)"):
        RademacherProjector(50, 64).project(torch.zeros(2, 49))


def test_unit_rows_normalises_and_keeps_zero_rows() -> None:
    rows = unit_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1e-30, 0.0]]))
    torch.testing.assert_close(rows, torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))


def test_less_scores_match_a_double_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    pools = [torch.randn(4, 3, generator=generator) for _ in range(2)]
    targets = [torch.randn(2, 3, generator=generator), torch.randn(5, 3, generator=generator)]
    learning_rates = [2e-5, 1e-5]
    expected = torch.zeros(4)
    for pool, target, lr in zip(pools, targets, learning_rates, strict=True):
        for i in range(4):
            cosines = [
                torch.nn.functional.cosine_similarity(pool[i], target[j], dim=0)
                for j in range(len(target))
            ]
            expected[i] += lr * sum(cosines) / len(cosines)
    scores = less_scores([unit_rows(p) for p in pools], targets, learning_rates)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-12)


def test_less_scores_reject_inconsistent_shapes() -> None:
    pool, target = torch.ones(4, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="one entry per checkpoint"):
        less_scores([pool, pool], [target], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        less_scores([], [], [])
    with pytest.raises(ValueError, match="pool dim 3 != target dim 2"):
        less_scores([pool], [torch.ones(2, 2)], [1.0])
    with pytest.raises(ValueError, match="same pool"):
        less_scores([pool, torch.ones(5, 3)], [target, target], [1.0, 1.0])
    with pytest.raises(ValueError, match="2-D"):
        less_scores([torch.ones(3)], [target], [1.0])
    with pytest.raises(ValueError, match="no target rows"):
        less_scores([pool], [torch.ones(0, 3)], [1.0])


def test_feature_shards_round_trip_and_resume(tmp_path) -> None:
    shards = FeatureShards(tmp_path)
    batches = [torch.full((2, 3), float(i)) for i in range(3)]
    shards.write("pool-ckpt1", 0, batches[0])
    shards.write("pool-ckpt1", 2, batches[2])  # shard 1 "killed" before it was written
    assert shards.done("pool-ckpt1", 0) and not shards.done("pool-ckpt1", 1)
    assert not shards.done("targets", 0)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        shards.read("pool-ckpt1")
    resumed = [i for i in range(3) if not shards.done("pool-ckpt1", i)]
    assert resumed == [1]
    shards.write("pool-ckpt1", 1, batches[1])
    assert torch.equal(shards.read("pool-ckpt1"), torch.cat(batches))
    assert sorted(p.name for p in (tmp_path / "pool-ckpt1").iterdir()) == [
        "shard-00000.pt",
        "shard-00001.pt",
        "shard-00002.pt",
    ]
    with pytest.raises(FileNotFoundError):
        shards.read("targets")
    with pytest.raises(ValueError, match="plain file name"):
        shards.write("../escape", 0, batches[0])
