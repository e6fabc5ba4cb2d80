"""One model-loading path: a pinned revision reaches every consumer, and nothing else loads."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from omegaconf import OmegaConf
from test_cli import REPO

from dwbench import lm_eval_runner, models
from dwbench.methods import lm_signals

PINNED = {
    "name": "pinned",
    "id": "org/pinned-model",
    "revision": "0123abcd",
    "path": None,
    "embedded": None,
    "dtype": "bfloat16",
    "trust_remote_code": False,
}


class Stop(Exception):
    """Raised by the recording stand-ins once the call's arguments are seen."""


@pytest.fixture
def recorded(monkeypatch) -> dict[str, list[dict[str, Any]]]:
    """transformers' and lm-eval's loaders replaced by stand-ins that record their arguments."""
    import lm_eval
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: dict[str, list[dict[str, Any]]] = {"tokenizer": [], "model": [], "lm_eval": []}

    def tokenizer(source: str, **kwargs: Any) -> SimpleNamespace:
        calls["tokenizer"].append({"source": source, **kwargs})
        return SimpleNamespace(chat_template="{{ messages }}", pad_token="<pad>", eos_token="</s>")

    def model(source: str, **kwargs: Any) -> None:
        calls["model"].append({"source": source, **kwargs})
        raise Stop

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model)

    def evaluate(**kwargs: Any) -> None:
        calls["lm_eval"].append(kwargs.get("model_args"))
        raise Stop

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    return calls


def test_a_pinned_revision_reaches_every_consumer(recorded, tmp_path: Path) -> None:
    cfg = OmegaConf.create(PINNED)
    models.load_tokenizer(cfg, tmp_path)  # scoring and training: the tokenizer, then the model
    with pytest.raises(Stop):
        models.load_causal_lm(cfg, tmp_path, "cuda")
    with pytest.raises(Stop):  # perplexity, EL2N, GraNd, LESS, S2L, Nuggets
        lm_signals.load_model(cfg, tmp_path, "cpu")
    args = models.loading_args(cfg, tmp_path, "cuda")
    with pytest.raises(Stop):  # the adapter check before evaluation
        lm_eval_runner.adapter_output_change(args, tmp_path, ["a prompt"])
    eval_jsonl = tmp_path / "eval.jsonl"
    eval_jsonl.write_text(
        '{"id": "e0", "prompt": "1+1?", "response": "#### 2", "references": ["#### 2"]}\n'
    )
    with pytest.raises(Stop):  # evaluation: lm-eval gets the model dwbench.models loaded
        lm_eval_runner.run_lm_eval(
            args, "dwbench_gsm8k", eval_jsonl, adapter_dir=None, batch_size=1, max_new_tokens=4
        )
    loads = recorded["tokenizer"] + recorded["model"]
    assert len(recorded["tokenizer"]) == 4 and len(recorded["model"]) == 4
    assert {(c["source"], c["revision"]) for c in loads} == {("org/pinned-model", "0123abcd")}
    for call in recorded["model"]:
        assert call["use_safetensors"] is True
    assert str(recorded["model"][0]["dtype"]) == "torch.bfloat16"
    assert str(recorded["model"][-1]["dtype"]) == "torch.bfloat16"
    assert recorded["lm_eval"] == []  # never asked to load a model by name


def test_a_local_folder_has_no_revision_and_cpu_runs_float32(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # a Hugging Face model folder
    cfg = OmegaConf.create({**PINNED, "path": str(tmp_path)})
    args = models.loading_args(cfg, tmp_path, "cpu")
    assert (args.source, args.revision, args.dtype) == (str(tmp_path), None, "float32")
    assert "revision" not in args.lm_eval_model_args()


def test_only_dwbench_models_loads_transformers_models() -> None:
    """Every Auto*.from_pretrained call lives in dwbench/models.py (adapters load through peft)."""
    found = []
    for path in (REPO / "dwbench").rglob("*.py"):
        if path.name == "models.py" and path.parent.name == "dwbench":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
                and not (
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "PeftModel"
                )
            ):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, found


def test_auto_dtype_is_bfloat16_only_where_it_is_native(monkeypatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    auto = OmegaConf.create({**PINNED, "path": str(tmp_path), "dtype": "auto"})
    monkeypatch.setattr(models, "native_bfloat16", lambda device: True)
    assert models.loading_args(auto, tmp_path, "cpu").dtype == "bfloat16"
    monkeypatch.setattr(models, "native_bfloat16", lambda device: False)
    assert models.loading_args(auto, tmp_path, "cpu").dtype == "float32"
    assert models.loading_args(auto, tmp_path, "cuda").dtype == "float32"
    explicit = OmegaConf.create({**PINNED, "path": str(tmp_path), "dtype": "bfloat16"})
    assert models.loading_args(explicit, tmp_path, "cpu").dtype == "float32"  # as before


def test_native_bfloat16_reads_the_cpu_flags(monkeypatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    real_path = models.Path

    def fake_path(name: str) -> Path:
        return cpuinfo if name == "/proc/cpuinfo" else real_path(name)

    monkeypatch.setattr(models, "Path", fake_path)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert not models.native_bfloat16("cpu")
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert models.native_bfloat16("cpu")
    assert not models.native_bfloat16("mps")
