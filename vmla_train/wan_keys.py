"""Wan2.1 checkpoint key names: original layout <-> diffusers layout, and layout detection.

The student's parameter names are diffusers' ``WanTransformer3DModel`` names, so every reader maps to
diffusers names. The original (Wan-AI repository) names differ (docs/design.md, "Wan2.1 geometry")::

    original                                  diffusers / student
    self_attn.{q,k,v,o}                       attn1.to_{q,k,v}, attn1.to_out.0
    cross_attn.{q,k,v,o}                      attn2.to_{q,k,v}, attn2.to_out.0
    {self,cross}_attn.norm_{q,k}              attn{1,2}.norm_{q,k}
    blocks.N.norm3   (affine, cross-attn)     blocks.N.norm2          <- the names swap
    blocks.N.norm2   (never has parameters)   blocks.N.norm3
    ffn.0 / ffn.2                             ffn.net.0.proj / ffn.net.2
    blocks.N.modulation                       blocks.N.scale_shift_table
    head.head                                 proj_out
    head.modulation                           scale_shift_table          (top level)
    text_embedding.{0,2}                      condition_embedder.text_embedder.linear_{1,2}
    time_embedding.{0,2}                      condition_embedder.time_embedder.linear_{1,2}
    time_projection.1                         condition_embedder.time_proj
    patch_embedding                           patch_embedding

Original checkpoints may carry the prefix ``model.diffusion_model.``. Both mappings are bijections on
T2V names (tested by a round trip); names of other Wan variants (I2V ``img_emb``, ``k_img``) are
rejected by ``detect_layout``.
"""

from __future__ import annotations

import re
from typing import Iterable

ORIGINAL_PREFIX = "model.diffusion_model."

# Whole-name maps for the tensors outside the blocks.
_TOP_ORIG_TO_DIFF = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Module paths inside a block (everything before the final .weight / .bias).
_BLOCK_ORIG_TO_DIFF = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine LayerNorm before cross-attention
    "norm2": "norm3",  # parameter-free in Wan2.1; mapped for completeness so the swap stays a bijection
    "norm1": "norm1",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_DIFF_TO_ORIG = {v: k for k, v in _TOP_ORIG_TO_DIFF.items()}
_BLOCK_DIFF_TO_ORIG = {v: k for k, v in _BLOCK_ORIG_TO_DIFF.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class KeyMappingError(ValueError):
    """A tensor name that has no counterpart in the other layout."""


def _split_param(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _translate(name: str, layout: str, head: tuple[str, str], modulation: tuple[str, str],
               block_map: dict[str, str], top_map: dict[str, str]) -> str:
    """One direction of the key mapping: the two renamed scale tables, then block and top-level modules."""
    if name == head[0]:
        return head[1]
    m = _BLOCK_RE.match(name)
    if m:
        idx, rest = m.groups()
        if rest == modulation[0]:
            return f"blocks.{idx}.{modulation[1]}"
        module, leaf = _split_param(rest)
        if module in block_map:
            return f"blocks.{idx}.{block_map[module]}.{leaf}"
        raise KeyMappingError(f"{layout}-layout key '{name}': unknown block tensor (not a Wan2.1-T2V name)")
    module, leaf = _split_param(name)
    if module in top_map:
        return f"{top_map[module]}.{leaf}"
    raise KeyMappingError(f"{layout}-layout key '{name}': unknown tensor (not a Wan2.1-T2V name)")


def original_to_diffusers(name: str) -> str:
    """``blocks.0.self_attn.q.weight`` -> ``blocks.0.attn1.to_q.weight`` (prefix stripped)."""
    if name.startswith(ORIGINAL_PREFIX):
        name = name[len(ORIGINAL_PREFIX) :]
    return _translate(name, "original", ("head.modulation", "scale_shift_table"), ("modulation", "scale_shift_table"),
                      _BLOCK_ORIG_TO_DIFF, _TOP_ORIG_TO_DIFF)


def diffusers_to_original(name: str) -> str:
    """Inverse of ``original_to_diffusers`` (without the optional prefix)."""
    return _translate(name, "diffusers", ("scale_shift_table", "head.modulation"), ("scale_shift_table", "modulation"),
                      _BLOCK_DIFF_TO_ORIG, _TOP_DIFF_TO_ORIG)


ORIGINAL, DIFFUSERS, STUDENT = "original", "diffusers", "student"


def detect_layout(keys: Iterable[str], source: str) -> str:
    """``original`` | ``diffusers`` | ``student`` (a student with MLA self-attention) from tensor names.

    An ``mha`` student has exactly diffusers names and is reported as ``diffusers``. Raises
    ``ValueError`` naming ``source`` and a few keys when the names fit no Wan2.1-T2V layout.
    """
    keys = list(keys)
    plain = [k[len(ORIGINAL_PREFIX) :] if k.startswith(ORIGINAL_PREFIX) else k for k in keys]
    if any(".img_emb." in f".{k}" or ".k_img." in k or "image_embedder" in k for k in plain):
        raise ValueError(f"'{source}': image-conditioning tensors found (Wan I2V/FLF?); only Wan2.1-T2V converts")
    has = lambda s: any(s in k for k in plain)  # noqa: E731
    if has(".self_attn.q.") and has("head.head."):
        return ORIGINAL
    if has(".attn1.to_kv_a.") and has("proj_out."):
        return STUDENT
    if has(".attn1.to_q.") and has("proj_out."):
        return DIFFUSERS
    raise ValueError(
        f"'{source}': unknown checkpoint layout: expected Wan2.1 original names (blocks.N.self_attn.q.weight, "
        f"head.head.weight) or diffusers names (blocks.N.attn1.to_q.weight, proj_out.weight); "
        f"found {len(keys)} tensors, e.g. {sorted(keys)[:4]}"
    )
