"""Small real inputs for tests, the benchmark and smoke runs, made offline.

- ``make_mp4``: an H.264 mp4 (PyAV) of moving colour gradients, any size / fps / length.
- ``save_tiny_models``: a folder laid out like a diffusers Wan pipeline (``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``transformer/``) holding tiny random models of the config's geometry and a tiny
  word-level tokenizer, so the CLIs run end to end with their real loaders and nothing downloads.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def make_mp4(num_frames: int, height: int, width: int, fps: int, seed: int = 0, codec: str = "libx264",
             crf: int = 23, gop: int = 0, preset: str = "ultrafast", texture: bool = False,
             faststart: bool = False) -> bytes:
    """mp4 bytes of ``num_frames`` frames: a gradient drifting over time plus seeded colour blocks;
    ``texture`` adds a moving seeded noise texture (a realistic bitrate for decoder benchmarks);
    ``faststart`` puts the index (moov) first, so a truncated copy still reports every frame."""
    import tempfile

    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.integers(0, 255, size=3)
    noise = rng.integers(-40, 41, size=(height, width, 1), dtype=np.int16) if texture else None
    tmp = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False) if faststart else None  # faststart rewrites a file
    target = tmp.name if tmp else io.BytesIO()
    with av.open(target, mode="w", format="mp4", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        opts = {"crf": str(crf), "preset": preset}
        if gop:
            opts["g"] = str(gop)
        s.options = opts
        for t in range(num_frames):
            img = np.empty((height, width, 3), np.uint8)
            img[..., 0] = ((xx + 3 * t) % 256).astype(np.uint8)
            img[..., 1] = ((yy + 2 * t) % 256).astype(np.uint8)
            img[..., 2] = tint[2]
            img[(t * 4) % height: (t * 4) % height + height // 8, : width // 4] = tint
            if noise is not None:  # the texture pans right 3 px per frame
                img = np.clip(img.astype(np.int16) + np.roll(noise, 3 * t, axis=1), 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    if tmp is None:
        return target.getvalue()
    data = Path(tmp.name).read_bytes()
    Path(tmp.name).unlink()
    return data


def tiny_tokenizer(vocab_words: int = 200):
    """A word-level ``PreTrainedTokenizerFast`` built offline (pad 0, eos 1, unk 2), T5-style eos appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    words = ("a the of and in on with over under camera pans slow fast red blue green cat dog man woman child "
             "river city street forest ocean mountain sky sunset rain snow car bird walking running flying "
             "clip caption video scene close up wide shot night day light dark water tree house road").split()
    for w in words[: vocab_words - len(vocab)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_text_encoder(text_dim: int, vocab_size: int, seed: int = 0):
    """A random 1-layer ``UMT5EncoderModel`` of width ``text_dim``."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=8, d_ff=2 * text_dim, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return UMT5EncoderModel(cfg).eval()


def save_tiny_models(folder: str | Path, model_cfg, seed: int = 0) -> Path:
    """A diffusers-pipeline-shaped folder of tiny random Wan components for ``model_cfg`` (ModelConfig)."""
    from .. import wan

    folder = Path(folder)
    tok = tiny_tokenizer()
    tok.save_pretrained(folder / "tokenizer")
    tiny_text_encoder(model_cfg.text_dim, len(tok), seed).save_pretrained(folder / "text_encoder")
    wan.tiny_vae(seed).save_pretrained(folder / "vae")
    wan.build_wan_transformer(model_cfg, seed=seed).save_pretrained(folder / "transformer")
    return folder
