"""Data preparation (``vmla-data``): OpenVid-1M -> raw shards (``raw``) -> latents + text embeddings
(``encode``) -> teacher ODE trajectories (``ode``). See data_prep/README.md.

Modules: ``openvid`` (CSV, clip locations, zip archives), ``video`` (probe, decord/PyAV clip decoding
under a timeout), ``common`` (ranks, atomic shards, rejects, index, summary), ``testing`` (small real
inputs and tiny model folders made offline), ``cli``.
"""
