"""The warp-specialised 8-bit kernel (Gluon, Hopper) against the 8-bit Triton kernel and float64 (STYLE 10).

CPU machines cannot run it (Gluon has no interpreter), but Triton compiles it for sm_90a with its bundled
ptxas, so CI checks what the schedule depends on: no register spills, the shared memory it plans for, the
8-bit wgmma instructions, and one wait per Q.K^T group and per P.V group (Triton 3.6's loop waited after every
dot). The GPU tests (marked gpu) compare outputs with ``attention8`` on the same quantised operands.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from vmla_train import config as C  # noqa: E402
from vmla_train.kernels import gluon_common as GC  # noqa: E402
from vmla_train.kernels import latent_attention as LA  # noqa: E402
from vmla_train.kernels import latent_attention_fp8 as LA8  # noqa: E402
from vmla_train.kernels import latent_attention_ws as WS  # noqa: E402

pytestmark = pytest.mark.skipif(not WS.available(), reason="needs Triton with Gluon")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
RANGES = 3  # key ranges walked per program: sinks, the rest of the prefix, the chunk


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "non-finite output"
    return float((a.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dc,dr,groups", [(160, 64, 1), (192, 32, 1), (160, 32, 2)])
def test_compiles_for_hopper_without_spills(dc, dr, groups):
    r = WS.compile_report(dc, dr, groups)
    ops, sass = r["ops"], r["sass"]
    assert r["spill_bytes"] == 0 and "STL" not in ops and "LDL" not in ops, r["spill_bytes"]
    assert r["shared_bytes"] <= WS.smem_bytes(dc, dr, 128, WS.default_config_ws(dc, dr).num_stages) <= GC.SMEM_BYTES
    # int8 Q.K^T and e4m3 P.V on the tensor cores, 64 rows per consumer warpgroup
    assert re.search(r"IGMMA\.64x128x32\.S8\.S8", sass) and re.search(r"QGMMA\.64x\d+x32\.F32\.E4M3\.E4M3", sass)
    # per key tile of each range loop of each consumer: one wait for the Q.K^T pieces, one for the two P.V dots
    assert len(re.findall(r"WARPGROUP\.DEPBAR", sass)) == 2 * RANGES * GC.CONSUMERS
    # register reallocation between the producer warp and the consumer warpgroups
    assert f"USETMAXREG.DEALLOC.CTAPOOL {hex(GC.PRODUCER_REGS)}" in sass
    assert f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {hex(GC.CONSUMER_REGS)}" in sass


def test_default_config_fits_shared_memory():
    assert WS.default_config_ws(160, 64).num_stages == 3 and WS.default_config_ws(256, 64).num_stages == 2
    for dc, dr in ((160, 64), (192, 32), (128, 64), (256, 64)):
        cfg = WS.default_config_ws(dc, dr)
        assert WS.smem_bytes(dc, dr, cfg.block_n, cfg.num_stages) <= GC.SMEM_BYTES


def test_host_descriptors_cover_each_batch_entry():
    """The TMA descriptors (built on CPU tensors too) over the batch-flattened key rows and token-last values:
    piece offsets, per-entry pitch, the tiles' blocks; values whose entries are not adjacent are refused."""
    dc, dr, groups = 160, 32, 2
    x = LA8.random_inputs8(2, 5, 2, dc, dr, 40, groups=groups)
    lat = LA8.quantize_keys(x["krow"][:, :40], x["c"][:, :40])
    d0, d1, dr_p = LA8.pieces8(dc, dr)
    descs, pitch = WS._key_descriptors(lat, dc, groups, dr, d0, d1, dr_p, 128)
    k0, k1, kr, v0, v1 = descs
    assert pitch == 40 and [t.shape for t in (k0, k1, kr)] == [[80, d0], [80, dc - d0], [80, groups * dr]]
    assert [t.base.data_ptr() - lat.k.data_ptr() for t in (k0, k1, kr)] == [0, d0, dc]
    assert v0.shape == v1.shape == [2 * dc, 40] and v0.strides == [lat.v.stride(1), 1]
    assert [t.block_shape for t in descs] == [[128, d0], [128, d1], [128, dr_p], [d0, 128], [d1, 128]]
    # the prefix of a larger cache buffer (rows keep the buffer's pitch) is accepted; a batch-major copy is not
    wide = LA8.quantize_keys(x["krow"], x["c"])
    prefix = LA8.Latent8(wide.k[:, :40], wide.ks, wide.v[:, :, :40], wide.vs)
    assert WS._key_descriptors(prefix, dc, groups, dr, d0, d1, dr_p, 128)[1] == 45
    bad = LA8.Latent8(lat.k, lat.ks, lat.v.transpose(0, 1).contiguous().transpose(0, 1), lat.vs)
    with pytest.raises(ValueError, match="values"):
        WS._key_descriptors(bad, dc, groups, dr, d0, d1, dr_p, 128)


@pytest.mark.skipif(HOPPER, reason="checks the refusal off Hopper")
def test_refuses_without_a_hopper_gpu():
    x = LA8.random_inputs8(1, 4, 2, 32, 32, 8)
    q8 = torch.zeros(1, 4, 2, 32, dtype=torch.int8)
    qr8, sq = torch.zeros(1, 4, 2, 32, dtype=torch.int8), torch.ones(1, 4, 2)
    new = LA8.quantize_keys(x["krow"][:, 8:], x["c"][:, 8:])
    with pytest.raises(RuntimeError, match="Hopper"):
        WS.attention8_ws(q8, qr8, qr8, sq, None, new, x["scale"])


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("dc,dr", [(160, 64), (192, 32), (128, 64)])
def test_matches_the_triton_8bit_kernel_gpu(dc, dr):
    """Same quantised operands, same math: tails, sinks ending mid-tile, both key sets, key splits, two RoPE
    groups, two videos, an empty prefix."""
    cases = [(2, 300, 4, 1, 700, 130, 1), (1, 97, 12, 1, 0, 0, 1), (2, 200, 6, 2, 513, 40, 3),
             (1, 1000, 12, 1, 5000, 1560, 4)]
    for b, l, h, groups, lp, sinks, splits in cases:
        x = LA8.random_inputs8(b, l, h, dc, dr // groups, lp, groups=groups, sink_tokens=sinks, device="cuda",
                               seed=dc + lp, q_gain=2.0)
        o_ref, lse_ref = LA8.run8(x, LA.TileConfig(128, 128, 8, 3, splits), dtype=torch.float32)
        o, lse = LA8.run8(x, LA.TileConfig(GC.BLOCK_M, 128, 4, WS.default_config_ws(dc, dr).num_stages, splits),
                          dtype=torch.float32, kernel=WS.attention8_ws)
        e_o, e_lse = _err(o, o_ref), _err(lse, lse_ref)
        print(dc, dr, (b, l, h, groups, lp, sinks, splits), e_o, e_lse)
        assert e_o < 1e-3 and e_lse < 1e-5, (b, l, h, groups, lp, sinks, splits)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU")
@pytest.mark.timeout(300)
def test_full_chunk_geometry_against_float64_gpu():
    """3 chunk frames x 12 heads against 21 + 3 sink frames (the 1.3B geometry), automatic tiles and splits."""
    tpf = C.load(None, []).tokens_per_frame
    x = LA8.random_inputs8(1, 3 * tpf, 12, 160, 64, 21 * tpf, sink_tokens=3 * tpf, device="cuda", seed=0)
    rows = torch.randperm(3 * tpf, device="cuda")[:256]
    o, lse = LA8.run8(x, kernel=WS.attention8_ws)
    o_ref, lse_ref = LA8.reference8(x["q_lat"][:, rows], x["q_r"][:, rows], x["q_r_sink"][:, rows], x["krow"], x["c"],
                                    x["scale"], x["groups"], x["sink_tokens"])
    assert _err(o[:, rows], o_ref) < 6e-2 and _err(lse[:, rows], lse_ref) < 2e-3
