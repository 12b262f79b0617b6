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
    tokenizer = build_tokenizer(words)
    encoder = build_encoder(len(tokenizer), d_model, num_layers, num_heads, relative_bias_std, seed)
    return _write(out_dir, tokenizer, encoder, overwrite)


def _write(out_dir: str | Path, tokenizer, encoder, overwrite: bool, report: dict | None = None) -> Path:
    """``out_dir/tokenizer/``, ``out_dir/text_encoder/`` (and ``training.json`` for a ``report``), each
    renamed into place from a temporary folder inside ``out_dir``."""
    out = Path(out_dir)
    targets = [out / "tokenizer", out / "text_encoder"] + ([out / "training.json"] if report else [])
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"build_text_encoder: {existing} already exist; pass overwrite=True or another out_dir")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".text-") as tmp:
        tokenizer.save_pretrained(Path(tmp) / "tokenizer")
        cfg_path = Path(tmp) / "tokenizer" / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # any transformers version resolves this name
        cfg_path.write_text(json.dumps(cfg, indent=1, allow_nan=False))
        encoder.save_pretrained(Path(tmp) / "text_encoder")
        if report:
            (Path(tmp) / "training.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        honour_umask(Path(tmp))  # safetensors writes 0600
        for t in targets:
            if t.is_dir():
                shutil.rmtree(t)
            os.replace(Path(tmp) / t.name, t)
    return out


# ----------------------------------------------------------------------------------------------
# Pretraining the encoder on the world's captions
# ----------------------------------------------------------------------------------------------
# Wan's umT5 comes pretrained on language: its output token for "circle" already knows which colour and
# motion the sentence gives that circle. A random encoder does not (the module docstring), and the DiT's
# cross-attention, which has no positions on the text side, then has to untangle the binding itself.
# `train_encoder` gives the world's encoder that knowledge the way a tagger would learn it: every token of an
# object's clause predicts that object's attributes, every token the caption's object count and background,
# from captions of random attribute draws (paraphrases included). The heads are dropped afterwards; what
# is kept is an encoder whose tokens each carry their object's description.
UNSAID = "unsaid"  # a caption may leave out the size, the speed and the background
WORLD_TEXT_LEN = MODEL_SIZES["world"]["model"]["text_len"]  # text slots of the world's DiT


def attribute_classes() -> dict[str, tuple[str, ...]]:
    """The targets of ``train_encoder``: per attribute its classes. Object attributes (colour, shape, size,
    direction, speed) are targets of the tokens of that object's clause; ``objects`` (the count) and
    ``background`` of every real token."""
    from .captions import MAX_OBJECTS
    from .scene import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS

    return {"colour": tuple(COLOURS), "shape": tuple(SHAPES), "size": (*SIZES, UNSAID),
            "direction": tuple(DIRECTIONS), "speed": (*SPEEDS, UNSAID),
            "objects": tuple(str(n) for n in range(1, MAX_OBJECTS + 1)), "background": (*BACKGROUNDS, UNSAID)}


def caption_pieces(tokenizer, text: str) -> list[str]:
    """The word-level pieces the tokenizer makes of ``text`` (before ``</s>``): one token id each."""
    backend = tokenizer.backend_tokenizer
    return [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))]


def token_targets(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [B, L], mask [B, L] bool, targets [B, L, A] long, -100 = no target) for ``train_encoder``; A
    follows ``attribute_classes()``. Object attributes come from ``parse_prompt`` (what the caption says),
    clause membership from ``captions.clause_roles``."""
    from .captions import clause_roles, parse_prompt

    classes = attribute_classes()
    batch = tokenizer(list(captions), padding="max_length", max_length=max_len, truncation=True,
                      add_special_tokens=True, return_tensors="pt")
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    targets = torch.full((*ids.shape, len(classes)), -100, dtype=torch.long)
    names = list(classes)
    for b, text in enumerate(captions):
        pieces, spec = caption_pieces(tokenizer, text), parse_prompt(text)
        if len(pieces) + 1 > max_len:
            raise ValueError(f"token_targets: caption of {len(pieces) + 1} tokens > max_len={max_len}: {text!r}")
        n = int(mask[b].sum())
        targets[b, :n, names.index("objects")] = classes["objects"].index(str(len(spec.objects)))
        targets[b, :n, names.index("background")] = classes["background"].index(spec.background or UNSAID)
        for t, k in enumerate(clause_roles(pieces)):
            if k < 0:
                continue
            o = spec.objects[k]
            for attr, value in (("colour", o.colour), ("shape", o.shape), ("size", o.size or UNSAID),
                                ("direction", o.direction), ("speed", o.speed or UNSAID)):
                targets[b, t, names.index(attr)] = classes[attr].index(value)
    return ids, mask, targets


def random_captions(rng, n: int) -> list[str]:
    """``n`` captions of scenes with uniformly drawn attributes (1-3 objects, distinct colours, every other
    attribute and the background kind uniform) at the world's default geometry; positions are irrelevant to
    a caption and left at 0."""
    from .captions import MAX_OBJECTS, caption
    from .openvid import WorldDataConfig
    from .scene import COLOURS, DIRECTIONS, SHAPES, SIZES, SPEEDS, Scene, WorldObject, sample_background

    height, width, fps = WorldDataConfig.height, WorldDataConfig.width, WorldDataConfig.fps
    out = []
    for _ in range(n):
        colours = rng.choice(list(COLOURS), size=int(rng.integers(1, MAX_OBJECTS + 1)), replace=False)
        objects = tuple(WorldObject(str(rng.choice(SHAPES)), str(c), str(rng.choice(list(SIZES))),
                                    str(rng.choice(list(DIRECTIONS))), str(rng.choice(list(SPEEDS))),
                                    0.0, 0.0, 0.0, 0.0, depth=i) for i, c in enumerate(colours))
        out.append(caption(Scene(height, width, fps, sample_background(rng, height, fps), objects), rng))
    return out


def tagging_accuracy(encoder, heads, ids, mask, targets) -> dict[str, float]:
    """Per attribute: the share of targeted tokens whose head's argmax is right."""
    with torch.no_grad():
        h = encoder(ids, attention_mask=mask.long()).last_hidden_state.float()
    out = {}
    for a, (name, head) in enumerate(heads.items()):
        t = targets[..., a]
        keep = t >= 0
        out[name] = float((head(h[keep]).argmax(-1) == t[keep]).float().mean())
    return out


def train_encoder(encoder, tokenizer, steps: int, batch_size: int = 128, lr: float = 3e-3,
                  max_len: int = WORLD_TEXT_LEN, heldout: int = 1000, seed: int = 0, frozen: bool = False,
                  log=print) -> dict:
    """Pretrain ``encoder`` (a ``UMT5EncoderModel``, float32, trained in place and returned to eval mode) for
    ``steps`` AdamW steps of token tagging on fresh random captions (``random_captions``, stream ``seed``);
    returns ``{"history": [...], "heldout_accuracy": {...}}`` measured on ``heldout`` captions of another
    stream. Deterministic for a seed on one machine. ``frozen``: fit only the linear heads (what a linear
    readout finds in the encoder's tokens as they are)."""
    import numpy as np

    classes = attribute_classes()
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(encoder.config.d_model, len(c)) for a, c in classes.items()})
    params = [*([] if frozen else encoder.parameters()), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20))
                                              * max(0.0, 1.0 - s / max(1, steps)) ** 0.5)
    rng, test_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    test = token_targets(tokenizer, random_captions(test_rng, heldout), max_len)
    history = []
    encoder.train(not frozen)
    for step in range(steps):
        ids, mask, targets = token_targets(tokenizer, random_captions(rng, batch_size), max_len)
        with torch.set_grad_enabled(not frozen):
            h = encoder(ids, attention_mask=mask.long()).last_hidden_state.float()
        loss = sum(torch.nn.functional.cross_entropy(head(h).flatten(0, 1), targets[..., a].flatten(),
                                                     ignore_index=-100) for a, head in enumerate(heads.values()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            encoder.eval()
            acc = tagging_accuracy(encoder, heads, *test)
            encoder.train(not frozen)
            history.append({"step": step + 1, "loss": round(loss.item(), 5),
                            **{k: round(v, 4) for k, v in acc.items()}})
            log(f"text encoder step {step + 1}/{steps}: loss {loss.item():.4f}, held-out token accuracy "
                + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    encoder.eval()
    return {"history": history, "heldout_accuracy": history[-1] if history else {}}


def pretrain_text_encoder(out_dir: str | Path, d_model: int = TINY_TEXT_DIM, steps: int = 600, batch_size: int = 128,
                          lr: float = 3e-3, seed: int = 0, max_len: int = WORLD_TEXT_LEN, heldout: int = 1000,
                          overwrite: bool = False, log=print) -> dict:
    """``build_text_encoder`` (the world's vocabulary, seed ``seed``) followed by ``train_encoder``; writes
    ``out_dir/tokenizer/``, ``out_dir/text_encoder/`` and ``out_dir/training.json`` (settings, history,
    held-out accuracy) and returns that report."""
    tokenizer = build_tokenizer(world_words())
    encoder = build_encoder(len(tokenizer), d_model, seed=seed)
    result = train_encoder(encoder, tokenizer, steps, batch_size, lr, max_len, heldout, seed=seed, log=log)
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "max_len": max_len, "heldout": heldout,
              "d_model": d_model, "torch": torch.__version__, **result}
    _write(out_dir, tokenizer, encoder, overwrite, report)
    return report
