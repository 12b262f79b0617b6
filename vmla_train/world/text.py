"""The world's text encoder: a word-level tokenizer over the world's vocabulary and a tiny umT5.

It is saved in the diffusers pipeline layout (``OUT/tokenizer/``, ``OUT/text_encoder/``) and loaded
through the same code path as Wan's umT5 (``wan.load_text_encoder`` + ``wan.encode_prompts``):

- tokenizer: ``tokenizers`` WordLevel over lower-cased words, split on whitespace and punctuation,
  ``</s>`` appended T5-style; ids ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 as in T5. Saved as
  ``tokenizer.json`` + ``tokenizer_config.json`` (``PreTrainedTokenizerFast``), so
  ``transformers.AutoTokenizer.from_pretrained`` loads it offline.
- encoder: a ``UMT5EncoderModel`` with seeded random weights. It stays frozen, as Wan's umT5 does:
  the teacher and the students learn to read its embeddings. Random embeddings of distinct words are
  distinct; what a random encoder lacks is binding (Wan's cross-attention has no positions on the
  text side, so "a red circle and a blue square" and "a blue circle and a red square" differ only
  through context in the embeddings). With the default init umT5's relative position bias is small
  (std ~0.2) and attention near uniform, so swapped prompts give near-identical tokens (cosine
  ~0.998); ``relative_bias_std`` rescales that bias (default 3) so each head attends sharply to its
  own random neighbourhood and a noun's output carries its adjectives (cosine ~0.8).

Shapes: prompts -> ids [B, L] -> embeddings [B, L, d_model] (d_model = the model's ``text_dim``).
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from ..config import MODEL_SIZES, honour_umask

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 (T5's order)
TINY_TEXT_DIM = MODEL_SIZES["tiny"]["model"]["text_dim"]


def _backend(vocab: dict[str, int]):
    """The ``tokenizers`` pipeline: lower-case -> split (whitespace, punctuation) -> WordLevel -> + </s>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return tok


def build_vocab(words: Iterable[str]) -> dict[str, int]:
    """Specials first, then ASCII punctuation and every piece the pre-tokenizer makes of ``words``
    (sorted, deduplicated)."""
    splitter = _backend({PAD: 0, EOS: 1, UNK: 2})
    pieces: set[str] = set(string.punctuation)
    for w in words:
        norm = splitter.normalizer.normalize_str(str(w))
        pieces.update(p for p, _ in splitter.pre_tokenizer.pre_tokenize_str(norm))
    if not pieces - set(string.punctuation):
        raise ValueError("build_text_encoder: 'words' is empty; pass the world's caption vocabulary")
    return {PAD: 0, EOS: 1, UNK: 2, **{p: i + 3 for i, p in enumerate(sorted(pieces))}}


def world_words() -> list[str]:
    """Every word a world caption or a world prompt error can contain: ``captions.VOCABULARY`` plus the
    words of ``captions.vocabulary_line()`` (sorted). Pass it as ``words`` to ``build_text_encoder``."""
    from .captions import VOCABULARY, vocabulary_line

    return sorted(VOCABULARY | set(vocabulary_line().split()))


def build_tokenizer(words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over the world's vocabulary (pad/eos/unk set, T5 ids)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=_backend(build_vocab(words)),
                                   pad_token=PAD, eos_token=EOS, unk_token=UNK)


def umt5_config(vocab_size: int, d_model: int, num_layers: int, num_heads: int):
    """A tiny umT5 encoder config: Wan's umT5 structure (gated-GELU, per-layer relative position
    buckets) at width ``d_model``."""
    from transformers import UMT5Config

    if d_model % num_heads:
        raise ValueError(f"build_text_encoder: d_model={d_model} must be a multiple of num_heads={num_heads}")
    return UMT5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=4 * d_model,
                      num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)


def build_encoder(vocab_size: int, d_model: int = TINY_TEXT_DIM, num_layers: int = 4, num_heads: int = 4,
                  relative_bias_std: float = 3.0, seed: int = 0):
    """A seeded random ``UMT5EncoderModel`` in eval mode; its relative position bias tables are
    rescaled to std ``relative_bias_std`` (0 keeps umT5's init; see the module docstring)."""
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(umt5_config(vocab_size, d_model, num_layers, num_heads)).eval()
    if relative_bias_std > 0:
        with torch.no_grad():
            for name, p in encoder.named_parameters():
                if name.endswith("relative_attention_bias.weight"):  # [num_buckets, num_heads] per layer
                    p.mul_(relative_bias_std / p.std())
    return encoder


def build_text_encoder(out_dir: str | Path, words: Iterable[str], d_model: int = TINY_TEXT_DIM,
                       num_layers: int = 4, num_heads: int = 4, relative_bias_std: float = 3.0, seed: int = 0,
                       overwrite: bool = False) -> Path:
    """Write ``out_dir/tokenizer/`` and ``out_dir/text_encoder/`` (frozen random umT5, seeded).

    ``words``: the vocabulary, normally ``world_words()``; any other word tokenizes to ``<unk>``.
    The same arguments write byte-identical files.

    Both folders are built in a temporary folder inside ``out_dir`` and renamed into place; existing
    ones are replaced only with ``overwrite=True``. Returns ``out_dir``.
    """
    out = Path(out_dir)
    targets = [out / "tokenizer", out / "text_encoder"]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"build_text_encoder: {existing} already exist; pass overwrite=True or another out_dir")
    tokenizer = build_tokenizer(words)
    encoder = build_encoder(len(tokenizer), d_model, num_layers, num_heads, relative_bias_std, seed)

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".text-") as tmp:
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        cfg_path = Path(tmp) / "tokenizer" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # any transformers version resolves this name
        cfg_path.write_text(json.dumps(cfg, indent=1, allow_nan=False))
        encoder.save_pretrained(Path(tmp) / "text_encoder")
        honour_umask(Path(tmp))  # safetensors writes 0600
        for t in targets:
            if t.exists():
                shutil.rmtree(t)
            os.replace(Path(tmp) / t.name, t)
    return out
