"""The procedural world (docs/world.md): seeded text-conditioned videos with exact ground truth.

Modules: ``scene`` (vocabulary, scenes, closed-form physics), ``render`` (frames), ``captions`` (captions and
the prompt parser), ``openvid`` (OpenVid-format folders, ``vmla-data world``), ``metrics`` (exact metrics
from decoded frames), ``evaluate`` (``vmla-world``: evaluation and teacher sampling), ``codec`` (the world's
AutoencoderKLWan and its training), ``text`` (the world's tokenizer and umT5 encoder).
"""
