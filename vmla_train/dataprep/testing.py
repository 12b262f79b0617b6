"""Small real inputs for tests, the benchmark and smoke runs, made offline.

- ``make_mp4``: an H.264 mp4 (PyAV) of moving colour gradients, any size / fps / length.
- ``save_tiny_models``: a folder laid out like a diffusers Wan pipeline (``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``transformer/``) holding tiny random models of the config's geometry and a tiny
  word-level tokenizer, so the CLIs run end to end with their real loaders and nothing downloads.
- ``write_stand_ins``: those models plus OpenVid-format clips and CSV, for a dry run of the whole pipeline
  (``vmla-data stand-ins``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def make_mp4(num_frames: int, height: int, width: int, fps: int, seed: int = 0, codec: str = "libx264",
             crf: int = 23, gop: int = 0, preset: str = "ultrafast", texture: bool = False,
             faststart: bool = False) -> bytes:
    """mp4 bytes of ``num_frames`` frames: a gradient drifting over time plus seeded colour blocks;
    ``texture`` adds a moving seeded noise texture (a realistic bitrate for decoder benchmarks);
    ``faststart`` puts the index (moov) first, so a truncated copy still reports every frame."""
    import tempfile

    from .video import Mp4Writer

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    tint = rng.integers(0, 255, size=3)
    noise = rng.integers(-40, 41, size=(height, width, 1), dtype=np.int16) if texture else None
    opts = {"crf": str(crf), "preset": preset}
    if gop:
        opts["g"] = str(gop)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        with Mp4Writer(path, fps, codec=codec, options=opts, faststart=faststart) as writer:
            for t in range(num_frames):
                img = np.empty((height, width, 3), np.uint8)
                img[..., 0] = ((xx + 3 * t) % 256).astype(np.uint8)
                img[..., 1] = ((yy + 2 * t) % 256).astype(np.uint8)
                img[..., 2] = tint[2]
                img[(t * 4) % height: (t * 4) % height + height // 8, : width // 4] = tint
                if noise is not None:  # the texture pans right 3 px per frame
                    img = np.clip(img.astype(np.int16) + np.roll(noise, 3 * t, axis=1), 0, 255).astype(np.uint8)
                writer.write(img[None])
        return path.read_bytes()


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


STAND_IN_CAPTIONS = ("a red car on a city street at night", "a dog running in the forest with the camera",
                     "snow on the mountain under a dark sky", "a bird flying over the ocean at sunset")


def write_stand_ins(out: str | Path, cfg, seed: int = 0) -> Path:
    """``vmla-data stand-ins OUT``: everything the README pipeline reads, tiny and random, for a dry run::

        OUT/wan/                    a Wan2.1 pipeline folder (transformer/, vae/, text_encoder/, tokenizer/)
                                    of tiny random models at ``cfg.model``'s geometry
        OUT/openvid/OpenVid-1M.csv  OpenVid-1M rows that pass data_prep/openvid.yaml's filters
        OUT/openvid/OpenVid_part0.zip  their clips: 6 s at ``cfg.video``'s size and fps

    Written into a temporary sibling and renamed; an existing OUT is never touched."""
    import csv
    import shutil
    import tempfile
    import zipfile

    from ..config import honour_umask
    from .openvid import COLUMNS

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"stand-ins folder '{out}' exists: give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_tiny_models(tmp / "wan", cfg.model, seed)
        v = cfg.video
        seconds = max(6.0, v.num_frames / v.fps + 1)  # data_prep/openvid.yaml keeps clips of >= 5.1 s
        frames = int(seconds * v.fps)
        (tmp / "openvid").mkdir()
        with zipfile.ZipFile(tmp / "openvid" / "OpenVid_part0.zip", "w") as z, \
                open(tmp / "openvid" / "OpenVid-1M.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(COLUMNS)
            for i, caption in enumerate(STAND_IN_CAPTIONS):
                name = f"stand_in_{i}.mp4"
                z.writestr(f"OpenVid_part0/{name}", make_mp4(frames, v.height, v.width, v.fps, seed=seed + i))
                rows.writerow([name, caption, 5.0, 2.0, 1.0, "pan_right", frames, float(v.fps), seconds])
        honour_umask(tmp)  # mkdtemp makes 0700, safetensors 0600
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
