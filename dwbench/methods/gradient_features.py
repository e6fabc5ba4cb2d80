"""The tensor math of LESS (Xia et al., ICML 2024), kept apart from model loading.

LESS scores a pool example by how well its gradient lines up with the gradients of a few target
task examples: per warm-up checkpoint, the example's LoRA gradient is preconditioned with that
checkpoint's Adam moments, randomly projected (Rademacher) to a few thousand dimensions and
L2-normalised; the score sums, over checkpoints, the checkpoint's learning rate times the mean
cosine similarity to the targets (Xia et al., ICML 2024).

Nothing here loads a model, so every step can be tested on tiny tensors on CPU, and the caller
decides where gradients come from and on which device they live.

What differs from the authors' released code, on purpose:
- `adam_preconditioned` is the direction of the Adam step that would follow the checkpoint
  (torch.optim.Adam's formula, bias corrections and eps outside the square root). The released
  `obtain_gradients_with_adam` uses m / sqrt(v + eps) with no bias correction. Both bias
  corrections together scale every coordinate by the same factor, which the L2 normalisation
  removes, so only eps's placement differs: it damps coordinates whose second moment is below
  about 1e-8 here and below about 1e-16 in torch's (and our) Adam.
- The projection is generated block by block from seeded generators instead of by trak's
  fused CUDA kernel, so it runs on any device and needs no compiled extension.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# IEEE-754 float32 bit patterns: OR-ing a random sign bit into the pattern of 1.0 gives +-1.0
# exactly, which turns 32 random bits into 32 signs with three integer passes.
_SIGN_BIT = -(2**31)
_ONE_BITS = 0x3F800000
_SIGNS_PER_WORD = 32


def adam_preconditioned(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The Adam update direction a checkpoint would take for this gradient.

    LESS compares examples by the update they would cause under the warm-up optimizer, not by
    their raw gradients, since Adam rescales coordinates very unevenly. `exp_avg` and
    `exp_avg_sq` are the checkpoint's Adam moments (flattened like `grad`) and `step` is the
    number of optimizer steps already completed (torch.optim.Adam's `state["step"]`), so the
    bias corrections use step + 1, as the next Adam step would. This is
    torch.optim.Adam's step direction: lr * adam_preconditioned(g, ...) is minus the change
    that one more Adam step with gradient g makes. It follows LESS's `obtain_gradients_with_adam`
    in updating the moments with g first, but unlike it applies bias correction and keeps eps
    outside the square root (module docstring: the difference after normalisation is eps's
    placement only).
    """
    if not (grad.shape == exp_avg.shape == exp_avg_sq.shape):
        raise ValueError(
            f"grad {tuple(grad.shape)}, exp_avg {tuple(exp_avg.shape)} and exp_avg_sq "
            f"{tuple(exp_avg_sq.shape)} must have the same shape"
        )
    if step < 0:
        raise ValueError(f"step counts completed optimizer steps, so it is >= 0, not {step}")
    dtype = torch.promote_types(grad.dtype, torch.float32)
    grad = grad.to(dtype)
    exp_avg = exp_avg.to(device=grad.device, dtype=dtype)
    exp_avg_sq = exp_avg_sq.to(device=grad.device, dtype=dtype)
    next_step = step + 1
    m_hat = (beta1 * exp_avg + (1 - beta1) * grad) / (1 - beta1**next_step)
    v_hat = (beta2 * exp_avg_sq + (1 - beta2) * grad.square()) / (1 - beta2**next_step)
    return m_hat / (v_hat.sqrt() + eps)


class RademacherProjector:
    """Random projection R^input_dim -> R^proj_dim with i.i.d. entries +-1/sqrt(proj_dim).

    Gradients of a LoRA model have millions of coordinates, and the full input_dim x proj_dim
    matrix would take tens of GB, so it is never built: rows come in blocks of `block_rows`,
    block b drawn from a generator seeded with (seed, b), and each block is generated, used and
    dropped (or cached, below). The matrix is therefore a function of (seed, input_dim,
    proj_dim, block_rows) and of the kind of device the generator runs on (CPU and CUDA
    generators give different streams for one seed). The generator device is `generator_device`
    or, if None, the device of the first vectors projected (CPU where that device has no
    generator); later calls keep it and move blocks to the vectors' device, so one projector
    applies one matrix to pool and targets alike. To resume a run elsewhere with the same
    matrix, pass `generator_device` explicitly.

    With `cache_blocks`, the generated blocks are kept (as float32, on the vectors' device) when
    the whole matrix takes at most `cache_limit_bytes`, so small problems do not regenerate it
    for every batch of examples; larger ones regenerate, since generating costs about as much
    as the matrix product on CPU.
    """

    # Measured on this project's 2-core shared CPU (torch 2.13, float32): project() of 64
    # vectors with input_dim=1_000_000, proj_dim=8192, block_rows=4096 (too big to cache)
    # took 22 s: per block, about 45 ms generating signs and 35 ms in the matrix product.
    # Drawing one sign per torch.randint(0, 2, ...) draw took 220 ms per block (54 s in all).

    def __init__(
        self,
        input_dim: int,
        proj_dim: int = 8192,
        seed: int = 0,
        block_rows: int = 4096,
        cache_blocks: bool = True,
        cache_limit_bytes: int = 2**30,
        generator_device: str | torch.device | None = None,
    ) -> None:
        if input_dim < 1 or proj_dim < 1 or block_rows < 1:
            raise ValueError(
                f"input_dim ({input_dim}), proj_dim ({proj_dim}) and block_rows ({block_rows}) "
                "must be positive"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, not {seed}")
        self.input_dim = input_dim
        self.proj_dim = proj_dim
        self.seed = seed
        self.block_rows = block_rows
        self.scale = 1.0 / math.sqrt(proj_dim)
        matrix_bytes = input_dim * proj_dim * 4
        self.caches_blocks = cache_blocks and matrix_bytes <= cache_limit_bytes
        self.generator_device = None if generator_device is None else torch.device(generator_device)
        self._cached_blocks: dict[int, torch.Tensor] = {}

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.input_dim / self.block_rows)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(n, input_dim) -> (n, proj_dim) float32 on the vectors' device."""
        if vectors.ndim != 2 or vectors.shape[1] != self.input_dim:
            raise ValueError(
                f"expected vectors of shape (n, {self.input_dim}), got {tuple(vectors.shape)}"
            )
        vectors = vectors.to(torch.float32)
        projected = torch.zeros(
            vectors.shape[0], self.proj_dim, dtype=torch.float32, device=vectors.device
        )
        for block_index in range(self.num_blocks):
            start = block_index * self.block_rows
            stop = min(start + self.block_rows, self.input_dim)
            signs = self._signs(block_index, vectors.device)
            projected.addmm_(vectors[:, start:stop], signs)
        return projected.mul_(self.scale)

    def _signs(self, block_index: int, device: torch.device) -> torch.Tensor:
        """Block `block_index` of the +-1 matrix (unscaled: the scale is applied once, after)."""
        cached = self._cached_blocks.get(block_index)
        if cached is not None:
            return cached.to(device)
        generator_device = self._pin_generator_device(device)
        generator = torch.Generator(device=generator_device)
        generator.manual_seed(self._block_seed(block_index))
        rows = min(self.block_rows, self.input_dim - block_index * self.block_rows)
        words_per_row = math.ceil(self.proj_dim / _SIGNS_PER_WORD)
        words = torch.randint(
            -(2**31),
            2**31,
            (rows, words_per_row, 1),
            generator=generator,
            dtype=torch.int32,
            device=generator_device,
        )
        shifts = torch.arange(_SIGNS_PER_WORD, dtype=torch.int32, device=generator_device)
        bits = words << shifts  # bit k of each word lands in the sign bit of column k
        bits.bitwise_and_(_SIGN_BIT).bitwise_or_(_ONE_BITS)
        signs = bits.view(torch.float32).reshape(rows, -1)[:, : self.proj_dim].to(device)
        if self.caches_blocks:
            self._cached_blocks[block_index] = signs
        return signs

    def _pin_generator_device(self, device: torch.device) -> torch.device:
        if self.generator_device is None:
            try:
                torch.Generator(device=device)
                self.generator_device = device
            except RuntimeError:
                self.generator_device = torch.device("cpu")
        return self.generator_device

    def _block_seed(self, block_index: int) -> int:
        # SeedSequence hashes (seed, block) so that nearby pairs give unrelated streams.
        state = np.random.SeedSequence([self.seed, block_index]).generate_state(1, np.uint64)
        return int(state[0])


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm; all-zero rows (no gradient signal) stay zero, not NaN."""
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D tensor of rows, got shape {tuple(x.shape)}")
    # Dividing by the largest entry first keeps the squares from underflowing on tiny rows
    # (float32 squares of values below ~1e-19 are 0, which would leave such rows unnormalised).
    largest = x.abs().amax(dim=1, keepdim=True)
    x = x / torch.where(largest > 0, largest, torch.ones_like(largest))
    norms = x.norm(dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def less_scores(
    pool_features: list[torch.Tensor],
    target_features: list[torch.Tensor],
    learning_rates: list[float],
) -> torch.Tensor:
    """LESS score of each pool example: sum_c lr_c * mean_j cos(pool_c[i], target_c[j]).

    One entry per checkpoint c in each list: pool (N, d_c) and targets (M_c, d_c). Rows are
    normalised here too (a no-op for unit rows), so the result is a cosine whatever the caller
    passed. The mean over targets of dot products equals the dot product with the targets' mean,
    which keeps memory at O(N d) rather than O(N M).
    """
    if not pool_features:
        raise ValueError("need features from at least one checkpoint")
    if not (len(pool_features) == len(target_features) == len(learning_rates)):
        raise ValueError(
            f"one entry per checkpoint in each list: got {len(pool_features)} pool, "
            f"{len(target_features)} target features and {len(learning_rates)} learning rates"
        )
    contributions = []
    for checkpoint, (pool, targets, lr) in enumerate(
        zip(pool_features, target_features, learning_rates, strict=True)
    ):
        if pool.ndim != 2 or targets.ndim != 2:
            raise ValueError(
                f"checkpoint {checkpoint}: features must be 2-D, got pool {tuple(pool.shape)} "
                f"and targets {tuple(targets.shape)}"
            )
        if pool.shape[0] != pool_features[0].shape[0]:
            raise ValueError(
                f"checkpoint {checkpoint} has {pool.shape[0]} pool rows, checkpoint 0 has "
                f"{pool_features[0].shape[0]}: every checkpoint must score the same pool"
            )
        if targets.shape[0] == 0:
            raise ValueError(f"checkpoint {checkpoint} has no target rows")
        if pool.shape[1] != targets.shape[1]:
            raise ValueError(
                f"checkpoint {checkpoint}: pool dim {pool.shape[1]} != target dim "
                f"{targets.shape[1]}"
            )
        mean_target = unit_rows(targets).to(device=pool.device, dtype=pool.dtype).mean(dim=0)
        contributions.append(lr * (unit_rows(pool) @ mean_target))
    return torch.stack(contributions).sum(dim=0)


class FeatureShards:
    """Projected features on disk, one file per batch of examples, for resumable scoring.

    Scoring a large pool takes hours and its projected gradients need not stay in memory: each
    batch is written as `folder/name/shard-00000.pt`, ... (atomically, so a killed run leaves
    whole shards or none), a resumed run skips batches whose shard is `done`, and `read`
    concatenates the shards in index order.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def write(self, name: str, index: int, features: torch.Tensor) -> None:
        path = self._path(name, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        torch.save(features.detach().cpu().contiguous(), partial)
        os.replace(partial, path)

    def done(self, name: str, index: int) -> bool:
        return self._path(name, index).exists()

    def read(self, name: str) -> torch.Tensor:
        """All shards of `name` in order; a gap means an unfinished run, so it is an error."""
        indices = sorted(
            int(path.stem.removeprefix("shard-")) for path in self._folder(name).glob("shard-*.pt")
        )
        if not indices:
            raise FileNotFoundError(f"no feature shards under {self._folder(name)}")
        if indices != list(range(len(indices))):
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            raise ValueError(f"feature shards of {name!r} are incomplete: missing {missing}")
        shards = [torch.load(self._path(name, i), weights_only=True) for i in indices]
        return torch.cat(shards)

    def blocks(self, name: str) -> dict[int, Path]:
        """index -> file of every finished shard of `name` in this folder."""
        return {
            int(path.stem.removeprefix("shard-")): path
            for path in self._folder(name).glob("shard-*.pt")
        }

    def _folder(self, name: str) -> Path:
        if not name or Path(name).name != name or name in {".", ".."}:
            raise ValueError(f"shard set name must be a plain file name, not {name!r}")
        return self.folder / name

    def _path(self, name: str, index: int) -> Path:
        if index < 0:
            raise ValueError(f"shard index must be >= 0, not {index}")
        return self._folder(name) / f"shard-{index:05d}.pt"


def read_blocks(folders: Sequence[FeatureShards], name: str) -> torch.Tensor:
    """The blocks of `name` spread over several folders (a sharded run's), in index order; a
    missing or doubled block is an error."""
    paths: dict[int, Path] = {}
    for shards in folders:
        for index, path in shards.blocks(name).items():
            if index in paths:
                raise ValueError(f"feature block {index} of {name!r} is in two shard folders")
            paths[index] = path
    if sorted(paths) != list(range(len(paths))) or not paths:
        missing = sorted(set(range(max(paths, default=-1) + 1)) - set(paths))
        raise ValueError(f"feature blocks of {name!r} are incomplete: missing {missing or [0]}")
    return torch.cat([torch.load(paths[i], weights_only=True) for i in range(len(paths))])
