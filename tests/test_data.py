"""Text, windows and the on-disk activation cache."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from tiny_models import SHARED_WIKITEXT_DIR, WIKITEXT_DIR
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hh_lightning.cache import (
    BoundaryPairDataset,
    activation_cache_reader,
    build_activation_cache,
    cache_fingerprint,
    ensure_activation_cache,
    open_activation_cache,
    read_boundary,
    read_windows,
    write_boundary_file,
)
from hh_lightning.files import DirectoryLocked
from hh_lightning.text import (
    calibration_windows,
    evaluation_windows,
    load_text_file,
    load_wikitext_text,
    tokenize_text,
    wikitext_rows,
)

# The real file's own rows are checked only where the real file is; the rest runs on any clone.
needs_wikitext = pytest.mark.skipif(WIKITEXT_DIR != SHARED_WIKITEXT_DIR,
                                    reason=f"no WikiText-2 at {SHARED_WIKITEXT_DIR}")
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
VOCAB_SIZE = 300
N_SAMPLES, SEQ_LEN, BATCH_SIZE = 5, 16, 2  # 5 / 2 leaves a short last batch on purpose
CORPUS = [
    " = Homarus gammarus = \n",
    " Homarus gammarus , known as the European lobster or common lobster , is a species of clawed lobster "
    "from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea . \n",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>")


def tiny_model(model_type: str = "llama"):
    torch.manual_seed(0)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[model_type]
    return model_class(config_class(vocab_size=VOCAB_SIZE, **TINY_SIZES)).eval()


def fingerprint_for(model, **overrides):
    values = dict(model_source="tiny", model=model, tokenizer=tiny_tokenizer(), data_source="corpus",
                  split="validation", n_samples=N_SAMPLES, seq_len=SEQ_LEN, seed=0, dtype="bfloat16")
    values.update(overrides)
    return cache_fingerprint(**values)


def windows_for(seed: int = 0) -> torch.Tensor:
    ids = tokenize_text(tiny_tokenizer(), "\n\n".join(CORPUS * 4))
    return calibration_windows(ids, N_SAMPLES, SEQ_LEN, seed)


# ---------------------------------------------------------------- text


@needs_wikitext
def test_valid_rows_rebuild_the_hf_text():
    rows = wikitext_rows("validation", WIKITEXT_DIR)
    assert len(rows) == 3760
    assert rows[0] == "" and rows[1] == " = Homarus gammarus = \n" and rows[-1] == ""
    # The PROVENANCE rebuild rule, inverted, gives back the file byte for byte.
    raw = (WIKITEXT_DIR / "wiki.valid.raw").read_text(encoding="utf-8")
    assert "".join(row if row else " \n" for row in rows) == raw
    text = load_wikitext_text("valid", WIKITEXT_DIR)
    assert text == "\n\n".join(rows)
    # rows: "", " = Homarus gammarus = \n", "", " Homarus gammarus , ..."
    assert text.startswith("\n\n = Homarus gammarus = \n\n\n\n\n Homarus gammarus , known as")
    assert text.endswith(" = = = Television roles = = = \n\n\n\n\n")


def test_wikitext_source_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HH_DATA_DIR", str(WIKITEXT_DIR))
    assert load_wikitext_text("test") == load_wikitext_text("test", WIKITEXT_DIR)
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        load_wikitext_text("test", tmp_path)
    with pytest.raises(ValueError, match="'dev'"):
        load_wikitext_text("dev", tmp_path)


def test_load_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    assert load_text_file(path) == "a\nb\n"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------- windows


def test_windows_shapes_and_seeds():
    ids = torch.arange(100)
    a, b, c = (calibration_windows(ids, 4, 10, seed) for seed in (1, 1, 2))
    assert a.shape == (4, 10) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 9, dtype=torch.long))  # contiguous spans
    evaluation = evaluation_windows(ids, 30)
    assert torch.equal(evaluation, ids[:90].reshape(3, 30))
    assert evaluation_windows(ids, 30, max_windows=2).shape == (2, 30)
    with pytest.raises(ValueError, match="100 tokens < seq_len 101"):
        calibration_windows(ids, 1, 101, 0)
    with pytest.raises(ValueError, match="100 tokens < seq_len 200"):
        evaluation_windows(ids, 200)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_tokens,n_samples,seq_len,held_out", [(400, 3, 16, 2), (2000, 20, 50, 8), (300, 1, 100, 5)])
def test_held_out_windows_share_no_token_with_training_windows(seed, n_tokens, n_samples, seq_len, held_out):
    ids = torch.arange(n_tokens)  # each token id is its position
    windows = calibration_windows(ids, n_samples, seq_len, seed, held_out=held_out)
    assert windows.shape == (n_samples + held_out, seq_len)
    # The training windows are exactly those drawn without held-out ones (cached runs stay valid).
    assert torch.equal(windows[:n_samples], calibration_windows(ids, n_samples, seq_len, seed))
    training = set(windows[:n_samples].flatten().tolist())
    for window in windows[n_samples:]:
        assert not training & set(window.tolist())
        assert torch.equal(window, torch.arange(window[0], window[0] + seq_len))  # contiguous text


def test_a_text_too_short_for_disjoint_validation_windows_is_an_error():
    """A text too short for held-out windows disjoint from the training windows is refused, not overlapped."""
    with pytest.raises(ValueError, match="no window of seq_len=128 tokens outside the n_samples=1 training"):
        calibration_windows(torch.arange(138), 1, 128, seed=0, held_out=2)


def test_tokenize_text_has_no_special_tokens():
    tokenizer = tiny_tokenizer()
    ids = tokenize_text(tokenizer, "the European lobster")
    assert ids.dim() == 1 and ids.dtype == torch.long
    assert tokenizer.eos_token_id not in ids.tolist()


# ---------------------------------------------------------------- activation cache


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_cache_boundaries_equal_hidden_states(tmp_path, model_type):
    model, windows = tiny_model(model_type), windows_for()
    manifest = build_activation_cache(model, windows, tmp_path / "cache", batch_size=BATCH_SIZE,
                                      fingerprint=fingerprint_for(model), progress=False)
    n_layers = TINY_SIZES["num_hidden_layers"]
    assert manifest.shape == (N_SAMPLES, SEQ_LEN, 64) and manifest.n_boundaries == n_layers + 1
    assert torch.equal(read_windows(manifest), windows)

    last_outputs = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: last_outputs.append(output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        hidden_states = model(windows, output_hidden_states=True).hidden_states
    hook.remove()
    references = list(hidden_states[:n_layers]) + [last_outputs[0]]
    for index, reference in enumerate(references):
        stored = read_boundary(manifest, index)
        assert stored.dtype == torch.float32
        # bf16 keeps 8 mantissa bits: relative rounding error <= 2^-8.
        torch.testing.assert_close(stored, reference, rtol=2**-8, atol=1e-6)
    # The final norm makes HF's last hidden state differ from the stored boundary.
    assert not torch.allclose(read_boundary(manifest, n_layers), hidden_states[n_layers], atol=1e-2)
    torch.testing.assert_close(read_boundary(manifest, 1, [3, 0]), read_boundary(manifest, 1)[[3, 0]])
    assert read_boundary(manifest, 2, 4).shape == (SEQ_LEN, 64)


def test_cache_reuse_rebuild_and_corruption(tmp_path, caplog):
    model, windows = tiny_model(), windows_for()
    cache_dir = tmp_path / "cache"
    fingerprint = fingerprint_for(model)
    first = ensure_activation_cache(model, windows, cache_dir, fingerprint=fingerprint, progress=False)
    again = ensure_activation_cache(model, windows, cache_dir, fingerprint=fingerprint, progress=False)
    assert again.build_id == first.build_id  # reused, not rebuilt
    assert open_activation_cache(cache_dir, fingerprint, verify=True).build_id == first.build_id

    other = fingerprint_for(model, seed=1)
    assert open_activation_cache(cache_dir, other) is None
    rebuilt = ensure_activation_cache(model, windows, cache_dir, fingerprint=other, progress=False)
    assert rebuilt.build_id != first.build_id
    assert not list(tmp_path.glob(".cache.*-*"))  # no temporary or stale directories left

    assert ensure_activation_cache(model, windows_for(seed=3), cache_dir, fingerprint=other,
                                   progress=False).build_id != rebuilt.build_id  # other windows

    victim = cache_dir / "boundary_002.bin"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 2)
    with caplog.at_level(logging.WARNING, logger="hh_lightning.cache"):
        assert open_activation_cache(cache_dir, other) is None
    assert "boundary_002.bin" in caplog.text

    ensure_activation_cache(model, windows_for(seed=3), cache_dir, fingerprint=other, progress=False)
    data = bytearray(victim.read_bytes())
    data[0] ^= 0xFF
    victim.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hh_lightning.cache"):
        assert open_activation_cache(cache_dir, other) is not None  # sizes alone look fine
        assert open_activation_cache(cache_dir, other, verify=True) is None
    assert "boundary_002.bin" in caplog.text and "sha256" in caplog.text


def _cache_state(cache_dir):
    return {path.name: path.read_bytes() for path in sorted(cache_dir.iterdir())}


def test_a_cache_being_read_is_never_replaced_under_its_reader(tmp_path):
    """A run with other settings (here data.seed) sharing a cache_dir must not rebuild it while another run reads it."""
    model, cache_dir = tiny_model(), tmp_path / "cache"
    fingerprint, other = fingerprint_for(model), fingerprint_for(model, seed=1)
    reader = activation_cache_reader(cache_dir)
    first = ensure_activation_cache(model, windows_for(), cache_dir, fingerprint=fingerprint, progress=False,
                                    reader=reader)
    before = _cache_state(cache_dir)
    for kwargs in ({"fingerprint": other}, {"fingerprint": fingerprint, "dtype": "float16"}):
        with pytest.raises(DirectoryLocked, match=r"data\.cache_dir=.*differs in: (seed|cache_dtype)"):
            ensure_activation_cache(model, windows_for(seed=1), cache_dir, progress=False, **kwargs)
        assert _cache_state(cache_dir) == before  # the reader's files are untouched
    # Runs of the same settings share the cache.
    shared = ensure_activation_cache(model, windows_for(), cache_dir, fingerprint=fingerprint, progress=False,
                                     reader=activation_cache_reader(cache_dir))
    assert shared.build_id == first.build_id
    reader.release()
    rebuilt = ensure_activation_cache(model, windows_for(seed=1), cache_dir, fingerprint=other, progress=False)
    assert rebuilt.build_id != first.build_id  # no reader left: rebuilt for the new settings


def test_a_reader_in_another_process_blocks_a_rebuild(tmp_path):
    model, cache_dir = tiny_model(), tmp_path / "cache"
    ensure_activation_cache(model, windows_for(), cache_dir, fingerprint=fingerprint_for(model), progress=False)
    lock_path = activation_cache_reader(cache_dir).path
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hh_lightning.files import FileLock; "
         f"lock = FileLock({str(lock_path)!r}); lock.acquire(shared=True); print('held', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLocked, match="being read by another run"):
            ensure_activation_cache(model, windows_for(seed=1), cache_dir, fingerprint=fingerprint_for(model, seed=1),
                                    progress=False)
    finally:
        holder.communicate("", timeout=30)
    ensure_activation_cache(model, windows_for(seed=1), cache_dir, fingerprint=fingerprint_for(model, seed=1),
                            progress=False)  # the holder exited: its lock went with it


def test_fingerprint_must_agree_with_windows(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="n_samples"):
        build_activation_cache(model, windows_for()[:3], tmp_path / "cache",
                               fingerprint=fingerprint_for(model), progress=False)


def test_boundary_pair_dataset_and_written_inputs(tmp_path):
    model, windows = tiny_model(), windows_for()
    manifest = build_activation_cache(model, windows, tmp_path / "cache", fingerprint=fingerprint_for(model),
                                      dtype="bfloat16", batch_size=BATCH_SIZE, progress=False)
    dataset = BoundaryPairDataset.for_layer(manifest, 1, indices=[4, 2])
    assert len(dataset) == 2
    x, y = dataset[0]
    assert x.shape == y.shape == (SEQ_LEN, 64) and x.dtype == y.dtype == torch.float32
    torch.testing.assert_close(x, read_boundary(manifest, 1, 4))
    torch.testing.assert_close(y, read_boundary(manifest, 2, 4))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    xb, yb = next(iter(loader))
    assert xb.shape == (2, SEQ_LEN, 64)

    # Sequential "quantized" input mode: a file of the same layout feeds x.
    replacement = torch.randn(N_SAMPLES, SEQ_LEN, 64)
    for dtype in ("bfloat16", "float16"):
        path = tmp_path / f"quantized_input_{dtype}.bin"
        record = write_boundary_file(path, (replacement[i : i + 2] for i in range(0, N_SAMPLES, 2)),
                                     manifest.shape, dtype)
        assert record["bytes"] == path.stat().st_size
        x_path = path if dtype == manifest.dtype else None
        if x_path is not None:
            x, y = BoundaryPairDataset.for_layer(manifest, 1, input_path=x_path)[3]
            torch.testing.assert_close(x, replacement[3], rtol=2**-8, atol=0)
        x16, _ = BoundaryPairDataset(path, path, manifest.shape, dtype)[3]
        torch.testing.assert_close(x16, replacement[3], rtol=2**-8, atol=1e-6)
    with pytest.raises(ValueError, match="n_samples=5"):
        write_boundary_file(tmp_path / "short.bin", [replacement[:4]], manifest.shape, "bfloat16")
    assert not (tmp_path / "short.bin").exists() and not list(tmp_path.glob(".short.bin.*"))
    with pytest.raises(ValueError, match="short_input.bin"):
        (tmp_path / "short_input.bin").write_bytes(b"\0" * 10)
        BoundaryPairDataset(tmp_path / "short_input.bin", manifest.boundary_path(2), manifest.shape)
