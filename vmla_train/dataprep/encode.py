"""Stage 2, ``vmla-data encode``: raw shards -> training shards (Wan VAE latents + umT5 embeddings).

Input shard ``i`` (sorted order of ``prep.encode.input``) is handled by rank ``i mod world`` (torchrun or
Slurm environment, see ``common.dist_env``) and becomes ``<output>/<same name>.tar`` holding

    <key>.latents.npy  [F', C, H/8, W/8] normalised VAE latents (float16, or bfloat16 bits as uint16)
    <key>.text.npy     [L, text_dim] umT5 embedding trimmed to the caption's L tokens (same dtype)
    <key>.txt          caption
    <key>.json         the raw sample's json + {"dtype", "text_tokens", "clip": {num_frames, fps, height, width}}

Clips are decoded by ``prep.encode.decoder`` (decord by default) in child processes under a timeout:
``video.num_frames`` frames at ``video.fps``, resized + center-cropped to ``video.height x width``.
Shards whose output exists are skipped (resume); outputs are written to a temp name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import Config, honour_umask, json_finite, resolve_device, torch_dtype
from ..data import encode_array, expand_shards
from . import common
from .video import ClipSpec, DecodePool, Probe, Reject


def my_shards(paths: list[str], rank: int, world: int) -> list[tuple[int, str]]:
    return [(i, p) for i, p in enumerate(paths) if i % world == rank]


def _raw_samples(path: str, where: list[dict]) -> Iterator[tuple[str, bytes, str, dict]]:
    """(key, mp4, caption, json) of a raw shard via webdataset; unreadable samples -> ``where``."""
    import webdataset as wds

    def handler(exn: Exception) -> bool:
        where.append({"reason": "unreadable shard member", "detail": f"{type(exn).__name__}: {exn}", "shard": path})
        return True  # keep going

    # this rank's own shard, read whole: no node/worker splitting
    ds = wds.WebDataset(path, shardshuffle=False, handler=handler, empty_check=False, nodesplitter=None, workersplitter=None)
    for s in ds:
        key = s.get("__key__", "?")
        if "mp4" not in s:
            where.append({"reason": "no mp4 member", "detail": f"members {sorted(k for k in s if not k.startswith('__'))}",
                          "shard": path, "key": key})
            continue
        try:
            meta = json.loads(s["json"]) if "json" in s else {}
        except Exception:
            meta = {}
        caption = s["txt"].decode("utf-8", errors="replace") if "txt" in s else meta.get("caption", "")
        yield key, s["mp4"], caption, meta


class Encoder:
    """The VAE and the text encoder on one device."""

    def __init__(self, cfg: Config):
        from .. import wan

        e = cfg.prep.encode
        if not e.vae or not e.text_encoder:
            raise ValueError(f"prep.encode.vae and prep.encode.text_encoder must be local folders "
                             f"(found {e.vae!r}, {e.text_encoder!r})")
        self.cfg = cfg
        self.device = resolve_device(e.device)
        self.vae = wan.load_vae(e.vae, self.device, torch_dtype(e.vae_dtype)).eval()
        self.tok, self.text = wan.load_text_encoder(e.text_encoder, self.device, torch_dtype(e.text_dtype))
        wan.check_vae(self.vae, cfg, e.vae)
        if self.text.config.d_model != cfg.model.text_dim:
            raise ValueError(f"text encoder '{e.text_encoder}' has width {self.text.config.d_model}, "
                             f"expected model.text_dim={cfg.model.text_dim}")

    @torch.no_grad()
    def latents(self, frames: list[np.ndarray]) -> torch.Tensor:
        """uint8 clips [F, H, W, 3] -> normalised latents [B, F', C, h, w] (float32, CPU)."""
        from .. import wan

        x = torch.from_numpy(np.stack(frames)).to(self.device)  # (B, F, H, W, 3) uint8
        x = x.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)  # (B, 3, F, H, W) in [-1, 1]
        return wan.vae_encode(self.vae, x, one_pass=self.cfg.prep.encode.one_pass).cpu()

    @torch.no_grad()
    def prompts(self, captions: list[str]) -> list[torch.Tensor]:
        """Captions -> per-caption embeddings [L_i, D] trimmed to their tokens (float32, CPU)."""
        from .. import wan

        emb, mask = wan.encode_prompts(self.tok, self.text, captions, self.cfg.model.text_len)
        return [emb[i, : int(mask[i].sum())].float().cpu() for i in range(len(captions))]


def encode_shard(cfg: Config, enc: Encoder, pool: DecodePool, src: str, final: Path) -> common.Summary:
    """One raw shard -> one training shard (temp name, then rename)."""
    import webdataset as wds

    e, v = cfg.prep.encode, cfg.video
    spec = ClipSpec(v.num_frames, float(v.fps), v.height, v.width, e.decode_threads)
    want = (v.latent_frames, cfg.model.in_channels, v.latent_height, v.latent_width)
    summary = common.Summary("encode")
    rejects: list[dict] = []
    meta_of: dict[str, tuple[str, dict]] = {}

    def items():
        for key, data, caption, meta in _raw_samples(src, rejects):
            summary.bytes_in += len(data)
            pr = meta.get("probe")
            meta_of[key] = (caption, meta)
            yield key, data, spec, Probe(**pr) if isinstance(pr, dict) and set(pr) == set(Probe.__annotations__) else None

    tmp = common.tmp_path(final)
    count = 0
    with wds.TarWriter(str(tmp)) as writer:
        batch: list[tuple[str, np.ndarray]] = []

        def flush() -> None:
            nonlocal count
            if not batch:
                return
            keys = [k for k, _ in batch]
            captions = [meta_of[k][0] for k in keys]
            try:
                lat = enc.latents([f for _, f in batch])
                texts = enc.prompts(captions)
            except Exception as exc:  # e.g. CUDA OOM on one odd clip: count it, keep the job alive
                for k in keys:
                    summary.failed["encode failed"] += 1
                    rejects.append({"reason": "encode failed", "detail": f"{type(exc).__name__}: {exc}", "shard": src, "key": k})
                batch.clear()
                return
            for k, z, t, cap in zip(keys, lat, texts, captions):
                if tuple(z.shape) != want or not torch.isfinite(z).all():
                    summary.failed["bad latents"] += 1
                    rejects.append({"reason": "bad latents", "detail": f"shape {tuple(z.shape)} (want {want}) or non-finite",
                                    "shard": src, "key": k})
                    continue
                meta = dict(meta_of.pop(k)[1])
                meta.update(dtype=e.latent_dtype, text_tokens=int(t.shape[0]), raw_shard=Path(src).name,
                            clip=dict(num_frames=v.num_frames, fps=v.fps, height=v.height, width=v.width))
                sample = {"__key__": k, "latents.npy": encode_array(z, e.latent_dtype),
                          "text.npy": encode_array(t, e.latent_dtype), "txt": cap,
                          "json": json.dumps(json_finite(meta), ensure_ascii=False, allow_nan=False).encode("utf-8")}
                writer.write(sample)
                summary.bytes_out += sum(len(x) for x in (sample["latents.npy"], sample["text.npy"], sample["json"]))
                summary.kept += 1
                count += 1
            batch.clear()

        for key, res in pool.imap(items()):
            if isinstance(res, Reject):
                summary.failed[res.reason] += 1
                rejects.append(common.reject_record(res, shard=src, key=key))
                continue
            batch.append((key, res))
            if len(batch) >= e.batch_size:
                flush()
        flush()
    common.finish_shard(final, count, rejects, {"input": src})
    summary.shards_written = 1
    return summary


def run(cfg: Config, rank: int | None = None, world: int | None = None, progress: bool = True) -> common.Summary:
    from tqdm import tqdm

    e = cfg.prep.encode
    if not e.input or not e.output:
        raise ValueError(f"prep.encode.input and prep.encode.output must be set (found {e.input!r}, {e.output!r})")
    env_rank, env_world = common.dist_env()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    paths = sorted(expand_shards(e.input))
    if not paths:
        raise FileNotFoundError(f"prep.encode.input={e.input!r} matches no shards")
    names = [Path(p).name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"prep.encode.input: shard file names repeat across folders ({len(names) - len(set(names))}); "
                         "output shards are named like their inputs")
    out = Path(e.output)
    out.mkdir(parents=True, exist_ok=True)
    mine = my_shards(paths, rank, world)
    summary = common.Summary("encode")
    todo = []
    for i, p in mine:
        final = out / Path(p).name
        if final.is_file():
            summary.shards_skipped += 1
        else:
            todo.append((p, final))
    print(f"encode: rank {rank}/{world}: {len(mine)} of {len(paths)} shards, {summary.shards_skipped} already done "
          f"-> {out} ({e.decoder}, clip {cfg.video.num_frames}x{cfg.video.height}x{cfg.video.width} @ {cfg.video.fps} fps)")
    if todo:
        enc = Encoder(cfg)
        with DecodePool(e.decode_workers, e.decoder, e.decode_timeout_s, e.decoder_restart_every) as pool:
            for p, final in tqdm(todo, unit="shard", disable=not progress):
                summary.add(encode_shard(cfg, enc, pool, p, final))
    common.finish_run(out, "latents", summary, f"summary-encode-rank{rank}.json")
    return summary


def write_negative_embedding(cfg: Config, out: str | Path) -> Path:
    """``vmla-data negative-embedding OUT``: Wan's negative prompt through the umT5 at ``prep.encode.text_encoder``
    -> ``OUT``, the safetensors file ``dmd.negative_embedding`` reads (key 'text', [L, text_dim] float32 trimmed to
    the prompt's L tokens). Written under a temporary name and renamed; an existing OUT is kept (resume)."""
    from safetensors.torch import save_file

    from .. import wan

    out, e = Path(out), cfg.prep.encode
    if out.exists():
        print(f"negative-embedding: {out} exists, kept")
        return out
    if not e.text_encoder:
        raise ValueError("prep.encode.text_encoder must be a local folder with tokenizer/ and text_encoder/ (umT5), found ''")
    tok, text = wan.load_text_encoder(e.text_encoder, resolve_device(e.device), torch_dtype(e.text_dtype))
    if text.config.d_model != cfg.model.text_dim:
        raise ValueError(f"text encoder '{e.text_encoder}' has width {text.config.d_model}, "
                         f"expected model.text_dim={cfg.model.text_dim}")
    emb, mask = wan.encode_prompts(tok, text, [wan.WAN_NEGATIVE_PROMPT], cfg.model.text_len)  # (1, Lt, D), (1, Lt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = common.tmp_path(out)
    save_file({"text": emb[0, : int(mask[0].sum())].float().cpu().contiguous()}, str(tmp))  # (L, D)
    honour_umask(tmp)  # save_file makes 0600
    os.replace(tmp, out)
    print(f"negative-embedding: wrote {out}")
    return out
