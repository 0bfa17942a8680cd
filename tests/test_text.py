import json

import pytest
import torch

from m4v.text import (
    BuiltinTextEncoder,
    CachedTextEncoder,
    CLIPTextEncoder,
    EmbeddingCache,
    PretrainedTextEncoder,
    T5TextEncoder,
    TextEmbedding,
)

PROMPTS = ["a red circle moves to the left", "", "a blue square moves up on a green background"]
WORDS = "a red circle moves to the left blue square up on green background".split()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --- tiny transformers folders, built offline -----------------------------------------------


def _save_tiny_t5(folder, vocab_size_hint=64):
    """A random T5 encoder + a Unigram tokenizer trained here with `tokenizers` (no sentencepiece
    model needed: T5TokenizerFast wraps it and save_pretrained writes tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size_hint, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator([" ".join(WORDS)] * 4 + PROMPTS, trainer)
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    torch.manual_seed(1)
    config = T5Config(
        vocab_size=tok.get_vocab_size(),
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _save_tiny_clip(folder, projection):
    """A random CLIP text model + a CLIPTokenizer from a tiny BPE vocab written here."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    folder.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = ["r e", "re d</w>", "c i", "l e</w>", "o n</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(2)
    end = vocab["<|endoftext|>"]
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=80,
        projection_dim=8,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=end,
        pad_token_id=end,
    )
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _save_tiny_t5(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _save_tiny_clip(tmp_path_factory.mktemp("clip") / "text_encoder", projection=False)


# --- built-in encoder ---------------------------------------------------------------------------


def test_builtin_shapes_mask_padding_and_empty_prompt():
    enc = BuiltinTextEncoder(width=32, max_len=12, pooled_dim=24, layers=1, heads=4)
    out = enc(PROMPTS)
    assert out.tokens.shape == (3, 12, 32) and out.pooled.shape == (3, 24)
    # Reference token counts from the packaged BPE directly: start + BPE + end.
    bpe = [len(enc.tokenizer.encode(p)) for p in PROMPTS]
    assert out.mask.sum(1).tolist() == [n + 2 for n in bpe]
    assert out.mask.sum(1)[1] == 2  # "" -> [start, end]
    assert (out.tokens[~out.mask] == 0).all()
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    ids, mask = enc.tokenize(["a red circle"])
    assert ids[0, 0] == enc.tokenizer.encoder["<start_of_text>"]
    assert ids[0, mask[0].sum() - 1] == enc.tokenizer.encoder["<end_of_text>"]


def test_builtin_is_deterministic_and_padding_does_not_leak():
    enc = BuiltinTextEncoder(width=32, max_len=12, pooled_dim=16, layers=2, heads=2).eval()
    a = enc(["a red circle"])
    b = enc(["a red circle", "a much longer prompt that fills more of the token window"])
    # Same prompt -> same embedding, whatever else is in the batch (padding is masked out).
    torch.testing.assert_close(a.tokens[0], b.tokens[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.pooled[0], b.pooled[0], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(b.pooled[0], b.pooled[1])


def test_builtin_truncation_and_strict():
    long = " ".join(["red"] * 30)
    enc = BuiltinTextEncoder(width=16, max_len=8, pooled_dim=8, layers=1, heads=2)
    ids, mask = enc.tokenize([long])
    assert mask.all() and ids[0, -1] == enc.tokenizer.encoder["<end_of_text>"]
    strict = BuiltinTextEncoder(width=16, max_len=8, pooled_dim=8, layers=1, heads=2, strict=True)
    with pytest.raises(ValueError, match=r"prompts\[0\]: 30 tokens, expected at most 6"):
        strict([long])
    with pytest.raises(ValueError, match="prompts"):
        enc("a bare string")


def test_builtin_trains():
    torch.manual_seed(0)
    enc = BuiltinTextEncoder(width=16, max_len=8, pooled_dim=4, layers=1, heads=2)
    target = torch.randn(2, 4)
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (enc(["a red circle", "a blue square"]).pooled - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


# --- T5 / CLIP from local folders ---------------------------------------------------------------


def test_t5_matches_transformers(t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    enc = T5TextEncoder(t5_dir, max_len=10)
    out = enc(PROMPTS)
    assert out.tokens.shape == (3, 10, 16) and out.pooled is None and enc.text_dim == 16
    # Independent reference: the transformers model and tokenizer called directly.
    tok = AutoTokenizer.from_pretrained(t5_dir)
    model = T5EncoderModel.from_pretrained(t5_dir).eval()
    batch = tok(PROMPTS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.equal(out.mask, mask) and mask[1].sum() == 1  # "" -> [</s>]
    torch.testing.assert_close(out.tokens[mask], ref[mask])
    assert (out.tokens[~mask] == 0).all()
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # a parent's train() must not enable T5 dropout


@pytest.mark.parametrize("projection", [False, True])
def test_clip_matches_transformers(tmp_path, projection):
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = _save_tiny_clip(tmp_path / "clip", projection)
    enc = CLIPTextEncoder(folder, max_len=20)
    assert enc.projection == projection and enc.pooled_dim == (8 if projection else 16)
    out = enc(PROMPTS)
    tok = AutoTokenizer.from_pretrained(folder)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model = cls.from_pretrained(folder).eval()
    # The reference runs without attention mask, as FLUX does: CLIP's causal mask makes padding
    # irrelevant to real tokens and to the pooled end token.
    ids = tok(
        PROMPTS, padding="max_length", max_length=20, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        ref = model(input_ids=ids)
    ref_pooled = ref.text_embeds if projection else ref.pooler_output
    torch.testing.assert_close(out.pooled, ref_pooled)
    torch.testing.assert_close(out.tokens[out.mask], ref.last_hidden_state[out.mask])
    # Independent pooled check: the end token's final state (first end-of-text in each row).
    if not projection:
        end = (ids == tok.convert_tokens_to_ids("<|endoftext|>")).int().argmax(1)
        torch.testing.assert_close(out.pooled, ref.last_hidden_state[torch.arange(3), end])


def test_pretrained_encoder_combines_t5_tokens_and_clip_pooled(t5_dir, clip_dir):
    enc = PretrainedTextEncoder(t5_dir, clip_dir, max_len=10)
    out = enc(PROMPTS)
    t5, clip = T5TextEncoder(t5_dir, max_len=10)(PROMPTS), CLIPTextEncoder(clip_dir)(PROMPTS)
    torch.testing.assert_close(out.tokens, t5.tokens)
    assert torch.equal(out.mask, t5.mask)
    torch.testing.assert_close(out.pooled, clip.pooled)
    assert (enc.text_dim, enc.pooled_dim, enc.max_len) == (16, 16, 10)


def test_missing_folders_name_the_folder_and_files(tmp_path, t5_dir):
    with pytest.raises(
        FileNotFoundError,
        match=r"T5 text encoder model folder .*nope.* does not "
        r"exist.*config.json.*model.safetensors",
    ):
        T5TextEncoder(tmp_path / "nope")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError,
        match=r"CLIP text model model folder .*partial.* is "
        r"incomplete.*weights: model.safetensors",
    ):
        CLIPTextEncoder(tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match=r"tokenizer folder .*empty.*tokenizer.json"):
        (tmp_path / "empty").mkdir()
        T5TextEncoder(t5_dir, tokenizer_dir=tmp_path / "empty")


# --- embedding cache ----------------------------------------------------------------------------


def test_cache_returns_same_tensors_and_skips_recomputation(tmp_path, t5_dir, clip_dir):
    enc = PretrainedTextEncoder(t5_dir, clip_dir, max_len=10)
    calls = []
    inner = enc.t5.model.forward
    enc.t5.model.forward = lambda *a, **k: calls.append(k["input_ids"].shape[0]) or inner(*a, **k)
    direct = enc(PROMPTS)
    calls.clear()

    cached = CachedTextEncoder(enc, tmp_path / "cache")
    first = cached(PROMPTS + [PROMPTS[0]])  # a duplicate is encoded once
    assert calls == [3] and cached.cache.misses == 3 and cached.cache.hits == 1
    second = CachedTextEncoder(enc, EmbeddingCache(tmp_path / "cache"))(list(reversed(PROMPTS)))
    assert calls == [3]  # nothing recomputed, even through a fresh cache object
    for got in (first, second):
        order = range(3) if got is first else [2, 1, 0]
        for row, i in enumerate(order):
            torch.testing.assert_close(got.tokens[row], direct.tokens[i], atol=0, rtol=0)
            torch.testing.assert_close(got.pooled[row], direct.pooled[i], atol=0, rtol=0)
            assert torch.equal(got.mask[row], direct.mask[i])
    assert cached.text_dim == 16  # attributes pass through the wrapper
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3
    assert not list((tmp_path / "cache").rglob(".*tmp*"))


def test_cache_refuses_trainable_encoders(tmp_path):
    with pytest.raises(ValueError, match="trainable"):
        CachedTextEncoder(
            BuiltinTextEncoder(width=16, max_len=8, pooled_dim=8, layers=1, heads=2), tmp_path
        )


def test_text_embedding_validates_and_moves():
    emb = TextEmbedding(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 5))
    moved = emb.to(torch.float64)
    assert moved.tokens.dtype == torch.float64 and moved.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="mask"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="pooled"):
        TextEmbedding(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, 5))
