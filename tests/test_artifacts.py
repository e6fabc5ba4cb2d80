from __future__ import annotations

import pytest

from dwbench.artifacts import SUCCESS_MARKER, ArtifactStore


def test_output_appears_only_when_complete(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writing("score", "k1") as (out, marker):
        (out / "scores.csv").write_text("id,score\n")
        marker["n"] = 3
        assert not store.is_done("score", "k1")
        assert not store.stage_dir("score", "k1").exists()
    assert store.is_done("score", "k1")
    assert store.marker("score", "k1")["n"] == 3
    assert (store.stage_dir("score", "k1") / "scores.csv").exists()


def test_failure_leaves_nothing_and_keeps_other_outputs(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writing("score", "done") as (out, _):
        (out / "a").write_text("x")
    with pytest.raises(RuntimeError), store.writing("score", "k2") as (out, _):
        (out / "partial").write_text("x")
        raise RuntimeError("killed")
    assert not store.stage_dir("score", "k2").exists()
    assert [p.name for p in (tmp_path / "score").iterdir()] == ["done"]
    assert (store.stage_dir("score", "done") / SUCCESS_MARKER).exists()


def test_stale_staging_of_dead_process_is_cleared(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    stale = tmp_path / "train" / ".tmp-k3-999999999"
    stale.mkdir(parents=True)
    with store.writing("train", "k3") as (out, _):
        (out / "a").write_text("x")
    assert not stale.exists()
    assert store.is_done("train", "k3")


def test_scratch_survives_until_success(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    scratch = store.scratch_dir("train", "k4")
    (scratch / "checkpoint-2").mkdir()
    assert store.scratch_dir("train", "k4") == scratch and (scratch / "checkpoint-2").exists()
    with store.writing("train", "k4") as (out, _):
        (out / "adapter").mkdir()
    assert not scratch.exists()
