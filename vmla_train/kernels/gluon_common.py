"""Pieces shared by the two warp-specialised Gluon kernels (``latent_attention_ws``: 8-bit, ``latent_attention_ws16``:
16-bit): the CTA plan, the query staging and epilogue device functions, and the sm_90a compile report.

Notation as in ``latent_attention``: B batch, L query tokens, H heads, G RoPE-key groups (REP = H / G heads folded
into the M dimension), dc latent width. A CTA holds BLOCK_M = WG_ROWS * CONSUMERS query rows: one producer warp
issues the TMA loads, CONSUMERS warpgroups of WG_ROWS rows (the wgmma M) each run the softmax loop.
"""

from __future__ import annotations

import torch

from .latent_attention import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:  # pragma: no cover - Triton absent or without Gluon
    gluon = None

WG_ROWS = 64  # query rows per consumer warpgroup: the wgmma M of one warpgroup
CONSUMERS = 2  # consumer warpgroups per CTA: BLOCK_M = 128 rows
BLOCK_M = WG_ROWS * CONSUMERS
# Registers a thread, per warpgroup (setmaxnreg): the producer warp's warpgroup gets the minimum, the consumers
# the rest of the 64 K register file over 3 warpgroups (65536 / 384 = 170 -> 168 before reallocation).
PRODUCER_REGS = 24
CONSUMER_REGS = 240
MAX_REGS = 168
SMEM_BYTES = 227 * 1024  # H100 / H200 shared memory a CTA may use


def available() -> bool:
    return gluon is not None


def is_hopper(device: torch.device) -> bool:
    """Whether the Gluon kernels can run on ``device``: Gluon present and a Hopper GPU (sm_90)."""
    return gluon is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


if gluon is not None:

    # the constants above as Gluon constexprs (a Gluon function reads module globals only as constexprs)
    GL_WG_ROWS = gl.constexpr(WG_ROWS)
    GL_CONSUMERS = gl.constexpr(CONSUMERS)
    GL_CONSUMER_REGS = gl.constexpr(CONSUMER_REGS)
    GL_PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)

    @gluon.jit
    def query_rows(first, L, b, g, H: gl.constexpr, G: gl.constexpr, ROWS: gl.constexpr, layout: gl.constexpr):
        """(row index into [B, L, H] tensors, valid mask) of the ROWS query rows from M row ``first`` (the REP
        heads of RoPE group g folded into M, as in the Triton kernels)."""
        REP: gl.constexpr = H // G
        r = first + gl.arange(0, ROWS, layout=layout)
        return (b * L + r // REP) * H + g * REP + r % REP, r < L * REP

    @gluon.jit
    def stage_queries(ptr, row, rmask, width, COL0: gl.constexpr, COLS: gl.constexpr, layout: gl.constexpr):
        """Query columns [COL0, COL0 + COLS) of ``row`` (``ptr``'s element type, zero at and past ``width`` and on
        invalid rows) in shared memory, in the wgmma operand layout."""
        ROWS: gl.constexpr = row.shape[0]
        dtype: gl.constexpr = ptr.dtype.element_ty
        cols = COL0 + gl.arange(0, COLS, layout=gl.SliceLayout(0, layout))
        x = gl.load(ptr + row[:, None] * width + cols[None, :], mask=rmask[:, None] & (cols[None, :] < width), other=0)
        return gl.allocate_shared_memory(dtype, [ROWS, COLS], gl.NVMMASharedLayout.get_default_for([ROWS, COLS],
                                                                                                    dtype), x)

    @gluon.jit
    def _store_rows(o_base, acc, inv, first, L, b, g, COL0: gl.constexpr, DC: gl.constexpr, H: gl.constexpr,
                    G: gl.constexpr):
        """o[row, COL0 + j] = acc[:, j] * inv for the columns below DC, in o's element type."""
        layout: gl.constexpr = acc.type.layout
        row, rmask = query_rows(first, L, b, g, H, G, acc.shape[0], gl.SliceLayout(1, layout))
        cols = COL0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, layout))
        o = acc * gl.convert_layout(inv, gl.SliceLayout(1, layout))[:, None]
        gl.store(o_base + row[:, None] * DC + cols[None, :], o.to(o_base.dtype.element_ty),
                 mask=rmask[:, None] & (cols[None, :] < DC))

    @gluon.jit
    def epilogue(acc0, acc1, m_i, l_i, vnorm, o_ptr, lse_ptr, row, rmask, first, L, b, g, split, n_rows,
                 DC: gl.constexpr, D0: gl.constexpr, H: gl.constexpr, G: gl.constexpr, SPLITS: gl.constexpr):
        """A consumer's epilogue: the LSE and the output normalised by l (and ``vnorm``, the values' factor), or
        the split's fp32 partials [SPLITS, B*L*H, DC] and [SPLITS, B*L*H]."""
        has = l_i > 0
        l_safe = gl.where(has, l_i, 1.0)
        lse = gl.where(has, (m_i + gl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        inv = 1.0 / (l_safe * vnorm)
        o_base = o_ptr
        lse_base = lse_ptr
        if SPLITS > 1:
            o_base = o_ptr + split * n_rows * DC
            lse_base = lse_ptr + split * n_rows
        gl.store(lse_base + row, lse, mask=rmask)
        _store_rows(o_base, acc0, inv, first, L, b, g, 0, DC, H, G)
        _store_rows(o_base, acc1, inv, first, L, b, g, D0, DC, H, G)


# ----------------------------------------------------------------------------------------------
# Compile report (no GPU needed): what ptxas makes of a kernel for sm_90a
# ----------------------------------------------------------------------------------------------
def desc_type(elem: str, block: list, layout) -> str:
    """A TMA descriptor argument's type in a compile signature."""
    return f"tensordesc<{elem}[{', '.join(map(str, block))}],{layout!r}>"


def compile_sm90(fn, ptrs: dict, descs: dict, const: dict) -> dict:
    """Compile the Gluon kernel ``fn`` for sm_90a with Triton's bundled ptxas (works on machines without a
    GPU): pointer, descriptor and constexpr arguments by name (the rest i32, ``qk_scale`` fp32). Returns
    {"registers", "spill_bytes", "shared_bytes", "ops": SASS opcode counts, "sass": text}."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = fn.arg_names
    sig = {n: "constexpr" if n in const else ptrs.get(n) or descs.get(n) or ("fp32" if n == "qk_scale" else "i32")
           for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ptrs}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=MAX_REGS))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        r = subprocess.run([os.path.join(tools, "ptxas"), "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin],
                           capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", r.stderr))
    ops = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]+)", sass))
    return dict(registers=regs, spill_bytes=spills, shared_bytes=k.metadata.shared, ops=dict(ops), sass=sass)


def in_clean_process(module: str, func: str, **kwargs) -> dict | None:
    """``module.func(**kwargs)`` in a fresh Python without TRITON_INTERPRET, when this process has it set (Triton
    then builds its own library functions for the interpreter, and Gluon cannot compile them); None otherwise.
    ``kwargs`` and the result must be JSON values."""
    import json
    import os
    import subprocess
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, sys; from {module} import {func}; "
            f"json.dump({func}(**json.loads(sys.argv[1])), sys.stdout)")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{module}.{func}({kwargs}) failed in a clean process:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)
