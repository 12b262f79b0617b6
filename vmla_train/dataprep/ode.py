"""Stage 3, ``vmla-data ode-pairs``: teacher trajectories for ODE-init training.

Prompts come from ``prep.ode.prompts_file`` (one per line) or the captions of training shards
(``prep.ode.input``), in order, blank ones rejected. Prompt ``i`` starts from noise seeded with
``prep.ode.seed + i`` and is integrated by the teacher (diffusers Wan) with ``wan.euler_sample``:
flow-matching Euler over ``schedule.euler_sigmas(num_steps, shift)`` and classifier-free guidance
against ``wan.WAN_NEGATIVE_PROMPT``. Shard ``j`` = ``ode-{j:06d}.tar`` holds prompts
``[j S, (j + 1) S)`` (S = ``samples_per_shard``) and goes to rank ``j mod world``; finished shards are
skipped (resume).

**Causal ODE.** When ``prep.ode.teacher`` is a *student* folder (``config.yaml`` + ``model.safetensors``,
e.g. a teacher-forcing ``adapt`` export) instead of a diffusers Wan, the trajectories are its cached
rollouts: chunk by chunk, the same guided Euler steps over the chunk's noise against a KV cache of the
earlier chunks' results, then the chunk's clean result written to the cache at t = 0 (what inference does).
The conditional and the negative prompt run as one doubled batch with one cache (``generate.GuidedStudent``,
as in generation), both rows writing the guided result. Trajectory point k is then every chunk after k of its own steps. ``json`` says
``"source": "causal"`` (else ``"teacher"``). Sample members:

    <key>.noise.npy       [F, C, H, W]      the starting noise (t = 1000)
    <key>.trajectory.npy  [K, F, C, H, W]   latents at the kept step indices (index 0 = noise, num_steps = clean)
    <key>.clean.npy       [F, C, H, W]      the final latent
    <key>.text.npy        [L, text_dim]     the prompt embedding trimmed to its tokens
    <key>.txt / .json     prompt; {"timesteps": [K] (1000 = noise), "dtype", "prompt_index", settings}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config, resolve_device, torch_dtype
from ..data import encode_array, expand_shards
from . import common

SHARD_PREFIX = "ode"


def read_prompts(cfg: Config, rejects: list[dict]) -> list[str]:
    """The prompt list, in order (blank prompts become rejects and keep their index)."""
    o = cfg.prep.ode
    if o.prompts_file:
        path = Path(o.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prep.ode.prompts_file '{path}' does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    elif o.input:
        import webdataset as wds

        paths = sorted(expand_shards(o.input))
        if not paths:
            raise FileNotFoundError(f"prep.ode.input={o.input!r} matches no shards")
        prompts = []
        for p in paths:
            for s in wds.WebDataset(p, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None).select(lambda s: "txt" in s):
                prompts.append(s["txt"].decode("utf-8", errors="replace").strip())
                if o.max_samples and len(prompts) >= o.max_samples:
                    break
    else:
        raise ValueError("prep.ode.prompts_file or prep.ode.input must be set")
    if o.max_samples:
        prompts = prompts[: o.max_samples]
    return prompts


class Teacher:
    """Teacher transformer + text encoder on one device; ``trajectory`` runs the guided Euler ODE."""

    def __init__(self, cfg: Config):
        from .. import wan

        o = cfg.prep.ode
        if not o.teacher or not o.text_encoder:
            raise ValueError(f"prep.ode.teacher and prep.ode.text_encoder must be local folders "
                             f"(found {o.teacher!r}, {o.text_encoder!r})")
        self.cfg, self.device = cfg, resolve_device(o.device)
        self.causal = (Path(o.teacher) / "config.yaml").is_file()  # a student folder (diffusers has config.json)
        if self.causal:
            from ..student_io import load_student

            self.model, scfg = load_student(o.teacher, device=self.device, dtype=torch_dtype(o.dtype))
            if scfg.video.chunk_frames != cfg.video.chunk_frames or scfg.model.in_channels != cfg.model.in_channels:
                raise ValueError(f"prep.ode.teacher '{o.teacher}': a student with video.chunk_frames="
                                 f"{scfg.video.chunk_frames}, model.in_channels={scfg.model.in_channels}; this "
                                 f"config has {cfg.video.chunk_frames}, {cfg.model.in_channels}")
            self.model.eval()
        else:
            self.model = wan.load_wan_transformer(o.teacher, self.device, torch_dtype(o.dtype)).eval()
        self.tok, self.text = wan.load_text_encoder(o.text_encoder, self.device, torch.float32)
        neg, _ = wan.encode_prompts(self.tok, self.text, [wan.WAN_NEGATIVE_PROMPT], cfg.model.text_len)
        self.negative = neg  # (1, Lt, D)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .. import wan

        return wan.encode_prompts(self.tok, self.text, prompts, self.cfg.model.text_len)

    @torch.no_grad()
    def trajectory(self, noise: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """noise [B, F, C, H, W], text [B, Lt, D] -> (kept latents [B, K, F, C, H, W], timesteps [K], clean)."""
        from .. import schedule, wan

        o = self.cfg.prep.ode
        sample = causal_euler_sample if self.causal else wan.euler_sample
        x, kept = sample(self.model, noise.to(self.device), text.to(self.device), o.num_steps, o.shift,
                         self.cfg.model.text_len, self.negative, o.guidance_scale, o.keep_indices)
        sigmas = schedule.euler_sigmas(o.num_steps, o.shift)
        steps = torch.tensor([schedule.NUM_TRAIN_TIMESTEPS * float(sigmas[i]) for i in o.keep_indices], dtype=torch.float32)
        return torch.stack([kept[i] for i in o.keep_indices], 1).cpu(), steps, x.cpu()


@torch.no_grad()
def causal_euler_sample(student, noise: torch.Tensor, text: torch.Tensor, num_steps: int, shift: float,
                        text_len: int | None = None, negative: torch.Tensor | None = None, guidance_scale: float = 1.0,
                        keep=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``wan.euler_sample`` for a causal student: each chunk of ``noise`` [B, F, C, H, W] integrated by the
    guided Euler ODE against the cache of the earlier chunks' results, then its result written to the cache
    (t = 0). Returns the final latents and ``{k: every chunk after k of its steps}`` for ``k`` in ``keep``."""
    from .. import schedule
    from ..generate import GuidedStudent

    b, f = noise.shape[:2]
    chunk = student.cfg.video.chunk_frames
    sigmas = schedule.euler_sigmas(num_steps, shift)  # (num_steps + 1,) 1 -> 0
    model = student if negative is None else GuidedStudent(student, negative, guidance_scale)  # one doubled cache
    cache = model.new_cache(b)
    dtype = next(student.parameters()).dtype
    done, kept = [], {k: [] for k in keep}
    for s in range(0, f, chunk):
        x = noise[:, s: s + chunk].float()  # (B, c, C, H, W)
        if 0 in kept:
            kept[0].append(x)
        for k in range(num_steps):
            t = torch.full((b, x.shape[1]), schedule.NUM_TRAIN_TIMESTEPS * float(sigmas[k]), device=x.device)
            flow = model(x.to(dtype), t, text, cache=cache).float()
            x = schedule.euler_step(x, flow, float(sigmas[k]), float(sigmas[k + 1]))
            if k + 1 in kept:
                kept[k + 1].append(x)
        model(x.to(dtype), torch.zeros(b, x.shape[1], device=x.device), text, cache=cache, write_cache=True)
        done.append(x)
    return torch.cat(done, 1), {k: torch.cat(v, 1) for k, v in kept.items()}


def write_shard(cfg: Config, teacher: Teacher, j: int, prompts: list[tuple[int, str]], final: Path) -> common.Summary:
    import webdataset as wds

    o, v, m = cfg.prep.ode, cfg.video, cfg.model
    shape = (v.latent_frames, m.in_channels, v.latent_height, v.latent_width)
    summary = common.Summary("ode-pairs")
    rejects: list[dict] = []
    count = 0
    with wds.TarWriter(str(common.tmp_path(final))) as writer:
        todo = []
        for i, p in prompts:
            if p:
                todo.append((i, p))
            else:
                summary.failed["empty prompt"] += 1
                rejects.append({"reason": "empty prompt", "detail": "", "prompt_index": i})
        for s in range(0, len(todo), o.batch_size):
            batch = todo[s: s + o.batch_size]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(o.seed + i)) for i, _ in batch])
            text, mask = teacher.embed([p for _, p in batch])
            traj, steps, clean = teacher.trajectory(noise, text)
            for b, (i, p) in enumerate(batch):
                if not torch.isfinite(traj[b]).all():
                    summary.failed["non-finite trajectory"] += 1
                    rejects.append({"reason": "non-finite trajectory", "detail": "", "prompt_index": i, "prompt": p})
                    continue
                n_tok = int(mask[b].sum())
                meta = dict(source="causal" if teacher.causal else "teacher",
                            timesteps=steps.tolist(), dtype=o.latent_dtype, prompt_index=i, num_steps=o.num_steps,
                            shift=o.shift, guidance_scale=o.guidance_scale, keep_indices=list(o.keep_indices),
                            seed=o.seed + i, text_tokens=n_tok)
                sample = {"__key__": f"prompt{i:09d}", "noise.npy": encode_array(noise[b], o.latent_dtype),
                          "trajectory.npy": encode_array(traj[b], o.latent_dtype),
                          "clean.npy": encode_array(clean[b], o.latent_dtype),
                          "text.npy": encode_array(text[b, :n_tok].cpu(), o.latent_dtype), "txt": p,
                          "json": json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")}
                writer.write(sample)
                summary.bytes_out += sum(len(x) for k, x in sample.items() if k.endswith("npy"))
                summary.kept += 1
                count += 1
    common.finish_shard(final, count, rejects, {"first_prompt": prompts[0][0] if prompts else 0})
    summary.shards_written = 1
    return summary


def run(cfg: Config, rank: int | None = None, world: int | None = None, progress: bool = True) -> common.Summary:
    from tqdm import tqdm

    o = cfg.prep.ode
    if not o.output:
        raise ValueError("prep.ode.output must be set")
    env_rank, env_world = common.dist_env()
    rank = env_rank if rank is None else rank
    world = env_world if world is None else world
    out = Path(o.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = common.Summary("ode-pairs")
    pre: list[dict] = []
    prompts = read_prompts(cfg, pre)
    n_shards = (len(prompts) + o.samples_per_shard - 1) // o.samples_per_shard
    todo = []
    for j in range(rank, n_shards, world):
        final = out / f"{SHARD_PREFIX}-{j:06d}.tar"
        if final.is_file():
            summary.shards_skipped += 1
        else:
            lo = j * o.samples_per_shard
            todo.append((j, list(enumerate(prompts))[lo: lo + o.samples_per_shard], final))
    print(f"ode-pairs: rank {rank}/{world}: {len(prompts)} prompts in {n_shards} shards, {len(todo)} to write, "
          f"{summary.shards_skipped} done; {o.num_steps} Euler steps, shift {o.shift}, CFG {o.guidance_scale}, "
          f"keep {list(o.keep_indices)} -> {out}")
    if todo:
        teacher = Teacher(cfg)
        for j, items, final in tqdm(todo, unit="shard", disable=not progress):
            summary.add(write_shard(cfg, teacher, j, items, final))
    common.finish_run(out, "ode", summary, f"summary-ode-rank{rank}.json")
    return summary
