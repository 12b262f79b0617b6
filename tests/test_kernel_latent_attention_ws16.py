"""The warp-specialised bf16 kernel (Gluon, Hopper) against the Triton bf16 kernel and float64 (STYLE 10).

As for the 8-bit Gluon kernel, CPU machines check what ptxas makes of it for sm_90a (no spills, the shared
memory it plans for, bf16 wgmma, one wait per Q.K^T group and per P.V pair, register reallocation) and the
host-side TMA descriptors; the GPU tests (marked gpu) compare its outputs with float64 and with the Triton
kernel on the same inputs.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from vmla_train import config as C  # noqa: E402
from vmla_train.kernels import gluon_common as GC  # noqa: E402
from vmla_train.kernels import latent_attention as LA  # noqa: E402
from vmla_train.kernels import latent_attention_ws as WS  # noqa: E402
from vmla_train.kernels import latent_attention_ws16 as W16  # noqa: E402

pytestmark = pytest.mark.skipif(not WS.available(), reason="needs Triton with Gluon")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def _loops(sass: str) -> list[list[str]]:
    """The instructions of each innermost loop (a backward branch's span) that issues wgmma: a consumer's key
    loop."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);", sass)]
    spans = [(int(m.group(1), 16), addr) for addr, t in ins
             if (m := re.search(r"\bBRA (0x[0-9a-f]+)", t)) and int(m.group(1), 16) < addr]
    spans = [(lo, hi) for lo, hi in spans if any(lo <= a <= hi and "HGMMA" in t for a, t in ins)]
    inner = []  # shortest first, none overlapping (a wait's retry branch at the end jumps back into a loop)
    for lo, hi in sorted(spans, key=lambda s: s[1] - s[0]):
        if not any(lo <= y and x <= hi for x, y in inner):
            inner.append((lo, hi))
    return [[t for a, t in ins if lo <= a <= hi] for lo, hi in inner]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dc,dr,groups", [(160, 64, 1), (192, 32, 1), (128, 64, 1)])
def test_compiles_for_hopper_without_spills(dc, dr, groups):
    """FA3's intra-warpgroup schedule as ptxas emits it: in each consumer's key loop one wait for the Q.K^T
    pieces that leaves the two P.V groups in flight (softmax overlaps them), then one for those, no local memory
    (a register or two may spill outside the loops: 8 B at 160/64 and 192/32), the per-key scales read from shared
    memory (TMA-staged), no global loads."""
    r = W16.compile_report16(dc, dr, groups)
    sass = r["sass"]
    cfg = W16.default_config_ws16(dc, dr)
    assert r["spill_bytes"] <= 8, r["spill_bytes"]
    assert r["shared_bytes"] <= W16.smem_bytes16(dc, dr, 128, cfg.num_stages) <= GC.SMEM_BYTES
    assert re.search(r"HGMMA\.64x128x16\.F32\.BF16", sass)  # bf16 Q.K^T, 64 rows per consumer warpgroup
    loops = _loops(sass)
    assert len(loops) == GC.CONSUMERS
    for body in loops:
        waits = [t for t in body if "WARPGROUP.DEPBAR" in t]
        assert [w.split()[-1] for w in waits] == ["0x2", "0x0"], waits
        assert not any(re.search(r"\b(STL|LDL|LDG)\b", t) for t in body)
        assert any(re.search(r"\bLDS\b", t) for t in body)
    assert f"USETMAXREG.DEALLOC.CTAPOOL {hex(GC.PRODUCER_REGS)}" in sass
    assert f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {hex(GC.CONSUMER_REGS)}" in sass


def test_default_config_and_support():
    assert W16.default_config_ws16(160, 64).num_stages == 3 and W16.default_config_ws16(256, 64).num_stages == 2
    for dc, dr in ((160, 64), (192, 32), (128, 64)):
        cfg = W16.default_config_ws16(dc, dr)
        assert W16.smem_bytes16(dc, dr, cfg.block_n, cfg.num_stages) <= GC.SMEM_BYTES
    with pytest.raises(ValueError, match="num_stages >= 2"):
        W16._check_config16(LA.TileConfig(GC.BLOCK_M, 128, 4, 1), 160, 64)
    cpu = torch.device("cpu")
    assert not W16.supports16(cpu, torch.bfloat16, 160, 64)
    if HOPPER:
        dev = torch.device("cuda")
        assert W16.supports16(dev, torch.bfloat16, 160, 64) and W16.supports16(dev, torch.float16, 32, 16)
        assert not W16.supports16(dev, torch.float32, 160, 64)  # 16-bit operands only
        assert not W16.supports16(dev, torch.bfloat16, 256, 64)  # two stages do not fit
        assert not W16.supports16(dev, torch.bfloat16, 164, 64)  # not 16-byte rows


def test_host_descriptors_cover_each_batch_entry():
    """The latent's TMA descriptors over batch-flattened rows: the second piece's offset, the per-entry pitch of
    a cache-buffer view, the blocks; a view whose batch stride is not a whole number of rows is refused."""
    d0, d1, dr_p = 128, 32, 64
    buf = torch.zeros(2, 50, 160 + 64, dtype=torch.bfloat16)  # a cache buffer holding c and kr side by side
    c = buf[:, :40, :160]
    (k0, k1), pitch = W16._latent_descriptors(c, d0, d1, dr_p, 128, "c_past")
    assert pitch == 50 and k0.shape == [90, 160] and k1.shape == [90, 32] and k0.strides == [224, 1]
    assert k1.base.data_ptr() - c.data_ptr() == d0 * 2
    assert k0.block_shape == [128, d0] and k1.block_shape == [128, d1]
    odd = torch.zeros(2 * 40 * 160 + 8, dtype=torch.bfloat16)[8:].view(2, 40, 160)  # 16-byte aligned
    assert W16._latent_descriptors(odd, d0, d1, dr_p, 128, "c_new")[1] == 40
    skew = torch.zeros(2 * 6408, dtype=torch.bfloat16).as_strided((2, 40, 160), (6408, 160, 1))
    with pytest.raises(ValueError, match="c_new"):
        W16._latent_descriptors(skew, d0, d1, dr_p, 128, "c_new")


def test_scale_descriptor_aligns_each_chunk():
    """The per-key scales as the kernel's TMA reads them: unchanged where the prefix length and the batch pitch
    are multiples of S_ALIGN (the 1.3B geometry), else copied so that each entry's chunk starts at the prefix
    length rounded up, with a pitch that is a multiple of S_ALIGN."""
    blocks = W16._tile_blocks16(torch.bfloat16, 128, 32, 64, 128)
    s = torch.rand(2, 8 + 12)
    sd, pitch, s_n = W16._scale_descriptor(s, 8, blocks)
    assert sd.base is s and pitch == 20 and s_n == 8 and sd.shape == [40] and sd.block_shape == [128]
    s = torch.rand(2, 5 + 6)
    sd, pitch, s_n = W16._scale_descriptor(s, 5, blocks)
    assert s_n == 8 and pitch % W16.S_ALIGN == 0 and pitch >= 8 + 6
    packed = sd.base.view(2, pitch)
    assert torch.equal(packed[:, :5], s[:, :5]) and torch.equal(packed[:, 8:14], s[:, 5:])


@pytest.mark.skipif(HOPPER, reason="checks the refusal off Hopper")
def test_refuses_without_a_hopper_gpu():
    x = LA.random_inputs(1, 4, 2, 32, 16, 8)
    with pytest.raises(RuntimeError, match="Hopper"):
        W16.latent_attention_ws16(**x)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dc,dr", [(160, 64), (192, 32), (128, 64)])
def test_matches_float64_like_the_triton_kernel_gpu(dc, dr):
    """Tails, a prefix ending mid-tile, splits landing inside the chunk, two RoPE groups, two videos, an empty
    prefix, a prefix that is a view of a larger cache buffer, prefixes whose length is not a multiple of S_ALIGN
    (the scales repacked, split starts moved, one split empty): as accurate as the Triton kernel, and close to
    it (both round P to bf16 against the same running maxima)."""
    cases = [(2, 300, 4, 1, 700, 1), (1, 97, 12, 1, 0, 1), (2, 200, 6, 2, 513, 3), (1, 1000, 12, 1, 5000, 4),
             (1, 4, 12, 1, 509, 3)]  # the last split moves past the last key (S_ALIGN): empty
    for b, l, h, groups, lp, splits in cases:
        x = LA.random_inputs(b, l, h, dc, dr, lp, groups=groups, device="cuda", seed=dc + lp, q_gain=2.0)
        if lp:  # the prefix as a cache read returns it: rows of a wider buffer
            buf = torch.zeros(b, lp + 37, dc + dr, device="cuda", dtype=torch.bfloat16)
            buf[:, :lp, :dc] = x["c_past"]
            x["c_past"] = buf[:, :lp, :dc]
        c = torch.cat([x["c_past"], x["c_new"]], 1)
        o_ref, lse_ref = LA.reference(x["q_lat"], x["q_r"], c, x["rho"], x["s"], x["scale"])
        o_tr, lse_tr = LA.latent_attention(**x, config=LA.TileConfig(64, 64, 4, 3, splits))
        o, lse = W16.latent_attention_ws16(**x, config=LA.TileConfig(GC.BLOCK_M, 128, 4, 2, splits))
        e = (_err(o, o_ref), _err(lse, lse_ref))
        e_tr = (_err(o_tr, o_ref), _err(lse_tr, lse_ref))
        print(dc, dr, (b, l, h, groups, lp, splits), e, e_tr, _err(o, o_tr))
        assert e[0] < 1.2 * e_tr[0] + 1e-4 and e[1] < 1.2 * e_tr[1] + 1e-6, (b, l, h, groups, lp, splits)
        assert _err(o, o_tr) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.timeout(300)
def test_full_chunk_geometry_against_float64_gpu():
    """3 chunk frames x 12 heads against 21 + 3 frames (the 1.3B geometry), automatic tiles and splits."""
    tpf = C.load(None, []).tokens_per_frame
    x = LA.random_inputs(1, 3 * tpf, 12, 160, 64, 21 * tpf, device="cuda", dtype=torch.bfloat16, q_gain=2.0)
    o, lse = W16.latent_attention_ws16(**x)
    rows = torch.randperm(3 * tpf, device="cuda")[:256]
    c = torch.cat([x["c_past"], x["c_new"]], 1)
    o_ref, lse_ref = LA.reference(x["q_lat"][:, rows], x["q_r"][:, rows], c, x["rho"], x["s"], x["scale"])
    assert _err(o[:, rows], o_ref) < 2e-2 and _err(lse[:, rows], lse_ref) < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.timeout(300)
def test_student_rollout_gluon_equals_triton_gpu():
    """A tiny bf16 MLA student's cached rollout (window wrapping past the sinks) with attention.kernel=auto
    (the Gluon kernel on Hopper) against kernel=triton: the same video up to bf16 rounding."""
    from vmla_train import schedule
    from vmla_train.kernels import dispatch
    from vmla_train.rollout import sample_video
    from vmla_train.student import WanStudent

    base = ["model.name=tiny", "model.num_layers=2", "model.dim=64", "attention.d_c=32", "attention.d_r=16",
            "video.height=32", "video.width=48", "cache.window_frames=6", "cache.sink_frames=1",
            "runtime.dtype=bfloat16", "cache.dtype=bfloat16", "attention.impl=fused"]
    outs = {}
    for kernel in ("auto", "triton"):
        cfg = C.load(None, base + [f"attention.kernel={kernel}"])
        torch.manual_seed(0)
        student = WanStudent(cfg).cuda().to(torch.bfloat16).eval()
        attn = student.blocks[0].attn1  # the kernel its layers run: Gluon for auto on Hopper
        q_lat, q_r = (torch.zeros(1, 1, 1, d, dtype=torch.bfloat16, device="cuda") for d in (attn.d_c, attn.d_r))
        assert (dispatch.kernel16(attn.kernel, q_lat, q_r, q_lat)
                is (W16.latent_attention_ws16 if kernel == "auto" else LA.latent_attention))
        gen = torch.Generator(device="cuda").manual_seed(1)
        text = torch.randn(1, 8, cfg.model.text_dim, generator=gen, device="cuda", dtype=torch.bfloat16)
        steps = schedule.warp_timesteps([1000, 500], 5.0)
        outs[kernel] = sample_video(student, text, 4 * cfg.video.chunk_frames, steps, generator=gen)
    err = _err(outs["auto"], outs["triton"])
    print("rollout gluon vs triton (bf16)", err)
    assert err < 2e-2
