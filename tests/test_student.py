"""The student's load-bearing equivalences (STYLE 10).

- parity: diffusers WanTransformer3DModel == our mha student (bidirectional, float32);
- block-causal full forward == chunk-by-chunk cached rollout (mha, mla; rolling windows with sinks;
  both position schemes; past 1024 latent frames);
- MLA absorbed == MLA reference (same weights);
- MLA with per-head RoPE keys at full rank, built from MHA weights == the MHA student.
"""

import pytest
import torch

from conftest import rel_err, tiny_cfg
from vmla_train import wan
from vmla_train.attention import FrameMask
from vmla_train.student import WanStudent


def _inputs(cfg, b, f, h=None, w=None, text_tokens=5):
    h = h or cfg.video.latent_height
    w = w or cfg.video.latent_width
    x = torch.randn(b, f, cfg.model.in_channels, h, w)
    t = torch.rand(b, f) * 1000
    text = torch.randn(b, text_tokens, cfg.model.text_dim)
    return x, t, text


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("b, f, h, w", [(1, 3, 8, 12), (2, 5, 6, 4), (3, 2, 10, 10), (2, 4, 4, 14)])
def test_parity_with_diffusers_wan(b, f, h, w):
    cfg = tiny_cfg("attention.kind=mha")
    ref = wan.build_wan_transformer(cfg.model, seed=1).eval()
    student = WanStudent(cfg).eval()
    student.load_state_dict(ref.state_dict(), strict=True)  # same names: an identity copy
    x, t, text = _inputs(cfg, b, f, h, w, text_tokens=cfg.model.text_len - 3)
    with torch.no_grad():
        # one timestep per sample
        t1 = t[:, 0]
        expect = wan.wan_flow(ref, x, t1, text, cfg.model.text_len)
        got = student(x, t1, text)
        assert rel_err(got, expect) < 1e-5
        # per-frame timesteps (diffusers takes them per token)
        expect = ref(x.transpose(1, 2), t.repeat_interleave((h // 2) * (w // 2), 1),
                     torch.nn.functional.pad(text, (0, 0, 0, 3)), return_dict=False)[0].transpose(1, 2)
        got = student(x, t, text)
        assert rel_err(got, expect) < 1e-5


@pytest.mark.timeout(30)
def test_bad_shapes_are_named():
    cfg = tiny_cfg("attention.kind=mha")
    student = WanStudent(cfg)
    x, t, text = _inputs(cfg, 1, 3)
    with pytest.raises(ValueError, match="timesteps"):
        student(x, t[:, :2], text)
    with pytest.raises(ValueError, match="not divisible by patch"):
        student(x[..., :7], t, text)
    with pytest.raises(ValueError, match="text embeddings"):
        student(x, t, torch.randn(1, cfg.model.text_len + 1, cfg.model.text_dim))


# ----------------------------------------------------------------------------------------------
# Cached rollout == block-causal full forward
# ----------------------------------------------------------------------------------------------
def _full_vs_cached(cfg, num_frames, b=2, h=None, w=None):
    student = WanStudent(cfg).eval()
    x, t, text = _inputs(cfg, b, num_frames, h, w)
    c = cfg.cache
    chunk = cfg.video.chunk_frames
    with torch.no_grad():
        full = student(x, t, text, mask=FrameMask(chunk, c.window_frames, c.sink_frames))
        cache = student.new_cache(b)
        outs = []
        for s in range(0, num_frames, chunk):
            # a denoising step that must not change the cache, then the writing pass
            student(torch.randn_like(x[:, s:s + chunk]), t[:, s:s + chunk], text, cache=cache)
            outs.append(student(x[:, s:s + chunk], t[:, s:s + chunk], text, cache=cache, write_cache=True))
    return full, torch.cat(outs, 1), cache


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["mha", "mla"])
@pytest.mark.parametrize(
    "scheme, sinks, window",
    [("absolute", 1, 6), ("absolute", 0, 9), ("relative", 0, 6), ("absolute", 2, 5), ("relative", 1, 27)],
)
def test_cached_rollout_equals_block_causal_forward(kind, scheme, sinks, window):
    cfg = tiny_cfg(f"attention.kind={kind}", f"cache.position_scheme={scheme}",
                   f"cache.sink_frames={sinks}", f"cache.window_frames={window}")
    full, cached, cache = _full_vs_cached(cfg, num_frames=18)
    assert cache.next_frame == 18
    assert rel_err(cached, full) < 1e-5


@pytest.mark.timeout(60)
def test_unwindowed_block_causal_mask_is_a_full_window():
    cfg = tiny_cfg("attention.kind=mla", "cache.sink_frames=0", "cache.window_frames=12")
    student = WanStudent(cfg).eval()
    x, t, text = _inputs(cfg, 1, 12)
    with torch.no_grad():
        a = student(x, t, text, mask=FrameMask(3))
        b = student(x, t, text, mask=FrameMask(3, 12, 0))
        # block-causal: frames of chunk k do not depend on later chunks
        x2 = x.clone()
        x2[:, 6:] = torch.randn_like(x2[:, 6:])
        c = student(x2, t, text, mask=FrameMask(3))
    assert torch.equal(a, b)
    assert torch.allclose(a[:, :6], c[:, :6]) and not torch.allclose(a[:, 6:], c[:, 6:])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_rollout_past_1024_latent_frames(kind):
    """No RoPE table caps the rollout: 1101 frames, window rolled ~180 times, exact vs full forward."""
    cfg = tiny_cfg(f"attention.kind={kind}", "cache.position_scheme=absolute", "cache.sink_frames=1",
                   "cache.window_frames=6", "model.num_layers=1", "video.height=16", "video.width=16")
    assert cfg.tokens_per_frame == 1
    n = 1101
    full, cached, _ = _full_vs_cached(cfg, num_frames=n, b=1)
    assert torch.isfinite(cached).all()
    assert rel_err(cached[:, -30:], full[:, -30:]) < 1e-5
    assert rel_err(cached, full) < 1e-5


@pytest.mark.timeout(60)
def test_relative_positions_stay_in_the_window():
    cfg = tiny_cfg("attention.kind=mla", "cache.position_scheme=relative", "cache.sink_frames=2", "cache.window_frames=6")
    student = WanStudent(cfg).eval()
    cache = student.new_cache(1)
    x, t, text = _inputs(cfg, 1, 3)
    with torch.no_grad():
        for _ in range(400):  # 1200 frames
            student(x, t, text, cache=cache, write_cache=True)
    step = cache.begin(3, write=False)
    # sinks 0,1; the 3 ring frames 2..4; the chunk 5..7: never beyond sinks + window
    assert sorted(step.key_frame_pos.tolist()) == list(range(8))
    assert step.query_frame_pos.tolist() == [5, 6, 7]
    assert cache.next_frame == 1200


# ----------------------------------------------------------------------------------------------
# MLA: absorbed == reference, and full-rank per-head RoPE keys == MHA
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "extra",
    [[], ["attention.rope_key_groups=2"], ["attention.k_norm=none"], ["attention.qk_nope_head_dim=8", "attention.d_c=40"]],
)
def test_mla_absorbed_equals_reference(extra):
    cfg_ref = tiny_cfg("attention.kind=mla", "attention.impl=reference", *extra)
    cfg_abs = tiny_cfg("attention.kind=mla", "attention.impl=absorbed", *extra)
    ref, absd = WanStudent(cfg_ref).eval(), WanStudent(cfg_abs).eval()
    absd.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial key-norm gains
        for m in (ref, absd):
            for blk in m.blocks:
                if hasattr(blk.attn1, "norm_k"):
                    blk.attn1.norm_k.weight.copy_(torch.linspace(0.5, 1.5, blk.attn1.norm_k.weight.numel()))
    x, t, text = _inputs(cfg_ref, 2, 9)
    with torch.no_grad():
        a = ref(x, t, text, mask=FrameMask(3))
        b = absd(x, t, text, mask=FrameMask(3))
    assert rel_err(b, a) < 1e-5


def mla_state_from_mha(mha_state: dict, cfg_mla) -> dict:
    """Exact MLA weights from MHA ones: q_nope width 0, one RoPE key per head carrying Wan's whole
    normalised key, c = x (d_c = dim), W_uv = W_v, key-norm gains = Wan's norm_k weight."""
    d = cfg_mla.model.dim
    out = {}
    for k, v in mha_state.items():
        if ".attn1." not in k:
            out[k] = v
            continue
        prefix, name = k.split(".attn1.")
        p = f"{prefix}.attn1."
        if name in ("to_q.weight", "to_q.bias", "norm_q.weight", "to_out.0.weight", "to_out.0.bias"):
            out[p + name] = v
        elif name == "to_k.weight":
            out[p + "to_k_rope.weight"] = v
        elif name == "to_k.bias":
            out[p + "to_k_rope.bias"] = v
        elif name == "norm_k.weight":
            out[p + "norm_k.weight"] = v
        elif name == "to_v.weight":
            out[p + "v_up.weight"] = v
        elif name == "to_v.bias":
            out[p + "v_up.bias"] = v
            out[p + "to_kv_a.weight"] = torch.eye(d)
            out[p + "to_kv_a.bias"] = torch.zeros(d)
            out[p + "k_up.weight"] = torch.zeros(0, d)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["reference", "absorbed"])
def test_full_rank_per_head_rope_key_reproduces_mha(impl):
    cfg_mha = tiny_cfg("attention.kind=mha")
    h, dim = cfg_mha.model.num_heads, cfg_mha.model.dim
    cfg_mla = tiny_cfg("attention.kind=mla", f"attention.impl={impl}", f"attention.d_c={dim}",
                       f"attention.d_r={dim}", f"attention.rope_key_groups={h}", "attention.qk_nope_head_dim=0")
    mha = WanStudent(cfg_mha).eval()
    with torch.no_grad():
        for blk in mha.blocks:  # non-trivial norm gains, so the test sees the key norm
            blk.attn1.norm_k.weight.copy_(torch.rand_like(blk.attn1.norm_k.weight) + 0.5)
            blk.attn1.norm_q.weight.copy_(torch.rand_like(blk.attn1.norm_q.weight) + 0.5)
    mla = WanStudent(cfg_mla).eval()
    mla.load_state_dict(mla_state_from_mha(mha.state_dict(), cfg_mla), strict=True)
    x, t, text = _inputs(cfg_mha, 2, 6)
    with torch.no_grad():
        for mask in (None, FrameMask(3)):
            assert rel_err(mla(x, t, text, mask=mask), mha(x, t, text, mask=mask)) < 1e-5


@pytest.mark.timeout(60)
def test_key_scale_from_gram_equals_decompressed_norm():
    cfg = tiny_cfg("attention.kind=mla", "attention.qk_nope_head_dim=8")
    attn = WanStudent(cfg).blocks[0].attn1
    c = torch.randn(2, 7, cfg.attention.d_c)
    kr = torch.randn(2, 7, cfg.attention.d_r)
    s_gram = attn._key_scale(c, kr)
    kn = attn.k_up(c)
    explicit = torch.rsqrt(torch.cat([kn, kr], -1).pow(2).mean(-1, keepdim=True) + cfg.model.eps)
    assert rel_err(s_gram, explicit) < 1e-6
    assert rel_err(attn._key_scale(c, kr, kn), explicit) < 1e-6


@pytest.mark.timeout(60)
def test_gradients_flow_and_cache_stays_detached():
    cfg = tiny_cfg("attention.kind=mla")
    student = WanStudent(cfg)
    cache = student.new_cache(1)
    x, t, text = _inputs(cfg, 1, 3)
    with torch.no_grad():
        student(x, t, text, cache=cache, write_cache=True)
    out = student(x, t, text, cache=cache)  # grad-carrying step reading the cache
    with torch.no_grad():
        student(x, torch.zeros_like(t), text, cache=cache, write_cache=True)  # later cache write
    out.square().mean().backward()  # no in-place error: reads were copies
    assert all(not b.requires_grad for b in cache.buffers.values())
    assert student.blocks[0].attn1.to_kv_a.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# Masked full forwards: flex attention (BlockMask) == SDPA with a dense boolean mask
# ----------------------------------------------------------------------------------------------
def _flex_vs_sdpa(device, kinds_impls, window=None, sinks=0, extra=()):
    errs = []
    for kind, impl in kinds_impls:
        common = [f"attention.kind={kind}", f"attention.impl={impl}", *extra]
        a = WanStudent(tiny_cfg(*common, "attention.mask_backend=sdpa")).to(device).eval()
        b = WanStudent(tiny_cfg(*common, "attention.mask_backend=flex")).to(device).eval()
        b.load_state_dict(a.state_dict())
        x, t, text = (v.to(device) for v in _inputs(a.cfg, 2, 9))
        mask = FrameMask(3, window, sinks)
        with torch.no_grad():
            errs.append(rel_err(b(x, t, text, mask=mask), a(x, t, text, mask=mask)))
    return errs


@pytest.mark.timeout(120)
def test_flex_block_mask_equals_dense_mask_cpu():
    errs = _flex_vs_sdpa("cpu", [("mha", "auto"), ("mla", "reference"), ("mla", "absorbed")], window=6, sinks=1)
    assert max(errs) < 1e-5, errs


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_flex_block_mask_equals_dense_mask_cuda():
    # compiled flex needs head widths >= 16: heads of 16 here
    errs = _flex_vs_sdpa("cuda", [("mha", "auto"), ("mla", "absorbed")], extra=["model.dim=64"])
    assert max(errs) < 1e-3, errs  # compiled flex: another reduction order
