"""The world's text encoder and video codec, end to end on CPU: built / trained into a temporary folder,
loaded back through the Wan loaders every consumer uses (`wan.load_text_encoder` + `encode_prompts`,
`wan.load_vae` + `vae_encode` / `vae_decode`), deterministic, resumable bit for bit, and learning."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vmla_train import wan
from vmla_train.world import text
from vmla_train.world.captions import PromptError, caption, parse_prompt, vocabulary_line
from vmla_train.world.codec import CodecConfig, train_codec
from vmla_train.world.scene import sample_scene

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 64  # token slots per prompt; the longest world caption is about 50 tokens (with </s>)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread makes the
    codec's many small ops about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return text.build_text_encoder(tmp_path_factory.mktemp("text") / "world", text.world_words())


@pytest.fixture(scope="module")
def text_model(text_dir):
    return wan.load_text_encoder(text_dir, dtype=torch.float32)


def _world_captions(num_scenes: int = 60, per_scene: int = 20) -> list[str]:
    """Captions of ``num_scenes`` sampled scenes (1-3 objects, every background kind), ``per_scene``
    paraphrases each."""
    scenes = [sample_scene(s, 32, 32, 16) for s in range(num_scenes)]
    return [caption(sc, int(k)) for sc in scenes for k in range(per_scene)]


@pytest.mark.timeout(120)
def test_text_encoder_loads_offline_through_wan(text_dir, text_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok, enc = wan.load_text_encoder(text_dir)  # the default (bfloat16) path a consumer takes
    assert enc.dtype == torch.bfloat16 and not enc.training
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    prompts = ["A small red circle drifts left.", "a blue square bounces up and down", "green"]
    emb, mask = wan.encode_prompts(*text_model, prompts, MAX_LEN)
    assert emb.shape == (3, MAX_LEN, text.TINY_TEXT_DIM) and emb.dtype == torch.float32
    assert enc.config.d_model == text.TINY_TEXT_DIM
    assert mask.sum(1).tolist() == [8, 8, 2]  # words and punctuation, then </s>
    assert torch.isfinite(emb).all()
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()


@pytest.mark.timeout(120)
def test_every_world_caption_tokenizes_without_unk(text_model):
    tok, _ = text_model
    captions = _world_captions()
    ids = tok([*captions, vocabulary_line()]).input_ids
    bad = [(c, tok.convert_ids_to_tokens(i)) for c, i in zip([*captions, "vocabulary_line"], ids)
           if tok.unk_token_id in i]
    assert not bad, f"<unk> in {bad[:3]}"
    assert all(i[-1] == tok.eos_token_id for i in ids)
    assert max(map(len, ids[:-1])) <= MAX_LEN
    # the tokenizer reads what the parser reads: case and punctuation do not change the words
    assert tok("A Red CIRCLE, drifts LEFT.").input_ids == tok("a red circle , drifts left .").input_ids


@pytest.mark.timeout(60)
def test_unknown_word_is_unk_for_the_encoder_and_refused_by_the_parser(text_model):
    tok, _ = text_model
    ids = tok("a red zebra drifts left").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["a", "red", "<unk>", "drifts", "left", "</s>"]
    # the tokenizer never fails (an encoder must embed any string); the world's parser names the word
    with pytest.raises(PromptError, match="'zebra'"):
        parse_prompt("a red zebra drifts left")


@pytest.mark.timeout(120)
def test_text_encoder_build_is_seeded_and_refuses_to_overwrite(text_dir, tmp_path):
    again = text.build_text_encoder(tmp_path / "again", text.world_words())
    assert _digest(again) == _digest(text_dir)
    assert set(_digest(again)) >= {"tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                                   "text_encoder/config.json", "text_encoder/model.safetensors"}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        text.build_text_encoder(again, text.world_words())
    other = text.build_text_encoder(tmp_path / "other", text.world_words(), seed=1)
    assert _digest(other)["text_encoder/model.safetensors"] != _digest(text_dir)["text_encoder/model.safetensors"]
    assert _digest(other)["tokenizer/tokenizer.json"] == _digest(text_dir)["tokenizer/tokenizer.json"]
    with pytest.raises(ValueError, match="words"):
        text.build_text_encoder(tmp_path / "empty", [])


@pytest.mark.timeout(60)
def test_embeddings_of_different_prompts_differ(text_model):
    a, b = "a red circle drifts left and a blue square moves up", "a blue circle drifts left and a red square moves up"
    emb, mask = wan.encode_prompts(*text_model, [a, b, a, "a green triangle glides down"], MAX_LEN)
    assert torch.equal(emb[0], emb[2])  # deterministic
    assert not torch.allclose(emb[0], emb[3], atol=1e-3)
    # same words, colours swapped between the objects: the nouns' embeddings carry their own adjectives
    n = int(mask[0].sum())
    cos = torch.nn.functional.cosine_similarity(emb[0, :n], emb[1, :n], dim=-1)  # (n,)
    assert cos.min() < 0.95, cos


# Pretraining the text encoder on the world's captions (token tagging)
def test_clause_roles_mark_each_objects_clause():
    """Every word of an object's clause (article, size, colour, shape, motion and the connective after it)
    is that object's; the prefix, punctuation and the background clause belong to none."""
    from vmla_train.world.captions import clause_roles

    words = "a clip where a small red circle drifts left , and a blue box bounces up and down over a plain " \
            "background .".split()
    assert clause_roles(words) == [-1, -1, -1, 0, 0, 0, 0, 0, 0, -1, 0, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1]
    # the background clause in front, a three-object caption: the order parse_prompt gives the objects
    words = "against a gradient , a cyan disc moves right while a yellow triangle floats up as a big green " \
            "block glides down".split()
    roles = clause_roles(words)
    assert roles[:4] == [-1] * 4 and [words[i] for i, r in enumerate(roles) if r == 2] == \
        ["a", "big", "green", "block", "glides", "down"]
    assert [o.colour for o in parse_prompt(" ".join(words)).objects] == ["cyan", "yellow", "green"]


def test_token_targets_tag_each_token_with_its_objects_attributes(text_model):
    tok, _ = text_model
    classes = text.attribute_classes()
    names = list(classes)
    ids, mask, targets = text.token_targets(tok, ["A little red ball drifts left, a blue square moves up quickly."],
                                            MAX_LEN)
    pieces = text.caption_pieces(tok, "A little red ball drifts left, a blue square moves up quickly.")
    assert int(mask.sum()) == len(pieces) + 1 and ids.shape == targets.shape[:2] == (1, MAX_LEN)

    def value(t: int, attr: str):
        k = int(targets[0, t, names.index(attr)])
        return classes[attr][k] if k >= 0 else None

    red, blue = pieces.index("ball"), pieces.index("square")
    assert [value(red, a) for a in ("colour", "shape", "size", "direction", "speed")] == \
        ["red", "circle", "small", "left", text.UNSAID]
    assert [value(blue, a) for a in ("colour", "shape", "size", "direction", "speed")] == \
        ["blue", "square", text.UNSAID, "up", "quickly"]
    comma, eos = pieces.index(","), len(pieces)
    for t in (comma, eos):  # no object: only the caption's attributes
        assert value(t, "colour") is None and value(t, "objects") == "2" and value(t, "background") == text.UNSAID
    assert (targets[0, eos + 1:] == -100).all()  # padding


@pytest.mark.timeout(120)
def test_text_encoder_pretraining_learns_the_binding(tmp_path, capsys):
    """`vmla-world text-encoder`: a few dozen steps already make held-out tokens carry more of their object's
    attributes; the folder loads through Wan's loader; OUT is written atomically and never overwritten; bad
    settings exit 2."""
    from vmla_train.world.evaluate import main

    torch.manual_seed(0)
    tok = text.build_tokenizer(text.world_words())
    enc = text.build_encoder(len(tok), text.TINY_TEXT_DIM)
    result = text.train_encoder(enc, tok, 30, batch_size=32, heldout=100, log=_quiet)
    first, trained = result["history"][0], result["heldout_accuracy"]
    assert not enc.training and first["step"] == 3 and trained["step"] == 30
    for attr in ("colour", "size", "objects"):  # the fastest to learn; all reach > 0.99 in the shipped run
        assert trained[attr] > first[attr] + 0.05, (attr, first, trained)
    out = tmp_path / "text"
    capsys.readouterr()
    assert main(["text-encoder", str(out), "--steps", "3", "--batch-size", "8", "--heldout", "20"]) == 0
    assert "held-out token accuracy colour" in capsys.readouterr().out
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 3 and report["heldout_accuracy"]["step"] == 3
    tok2, enc2 = wan.load_text_encoder(out, dtype=torch.float32)
    emb, _ = wan.encode_prompts(tok2, enc2, ["a red circle moves left"], MAX_LEN)
    assert emb.shape == (1, MAX_LEN, enc2.config.d_model) and torch.isfinite(emb).all()
    before = _digest(out)
    capsys.readouterr()
    assert main(["text-encoder", str(out), "--steps", "3"]) == 2
    assert main(["text-encoder", str(tmp_path / "bad"), "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "--steps 0" in err[1], err
    assert _digest(out) == before and not (tmp_path / "bad").exists()


@pytest.mark.timeout(120)
def test_shipped_text_encoder_tokens_carry_their_objects_attributes(text_model):
    """checkpoints/world/text: linear heads fitted on its frozen tokens (a few steps, captions of another
    stream than its training) read each object's colour, shape and direction from every token of its
    clause; on the seeded random encoder's tokens the same readout finds much less."""
    tok, enc = wan.load_text_encoder(ROOT / "checkpoints" / "world" / "text", dtype=torch.float32)
    assert tok.get_vocab() == text_model[0].get_vocab()
    kw = dict(steps=30, batch_size=32, lr=3e-2, heldout=100, seed=5, frozen=True, log=_quiet)
    shipped = text.train_encoder(enc, tok, **kw)["heldout_accuracy"]
    seeded = text.train_encoder(text_model[1], tok, **kw)["heldout_accuracy"]
    for attr in ("colour", "shape", "direction"):
        assert shipped[attr] > 0.95 and shipped[attr] > seeded[attr] + 0.2, (attr, shipped, seeded)


@pytest.mark.timeout(120)
def test_world_text_benchmark_tiny_cpu_run(tmp_path, capsys):
    """benchmarks/world_text.py end to end at a few steps (numbers mean nothing here): a row for the seeded
    encoder and one per --text folder; a folder with another vocabulary exits 2 naming it."""
    spec = importlib.util.spec_from_file_location("world_text_bench", ROOT / "benchmarks" / "world_text.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shipped = ROOT / "checkpoints" / "world" / "text"
    assert bench.main(["--text", str(shipped), "--steps", "2", "--heldout", "20", "--results", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "world_text-cpu.json").read_text())["rows"]
    assert [r["encoder"] for r in rows] == ["seeded random", "checkpoints/world/text"]
    assert all(0 <= r["direction"] <= 1 for r in rows)
    other = tmp_path / "other"
    text.build_text_encoder(other, ["red", "circle"])
    capsys.readouterr()
    assert bench.main(["--text", str(other), "--steps", "2", "--results", str(tmp_path)]) == 2
    assert str(other) in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Codec
# ----------------------------------------------------------------------------------------------
TINY_CODEC = CodecConfig(base_dim=8)


def _train(out: Path, **kw) -> dict:
    args = dict(height=32, width=32, num_frames=5, steps=3, batch_size=1, device="cpu", codec=TINY_CODEC,
                warmup_steps=1, log_every=1, num_workers=0, stats_clips=1, eval_clips=1, ceiling_clips=0, log=_quiet)
    return train_codec(out, **{**args, **kw})


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codec") / "run"
    report = _train(out, height=32, width=32, num_frames=9, steps=2, stats_clips=2, ceiling_clips=2, ceiling_frames=9)
    assert report["done"] and report["steps"] == 2
    return out


@pytest.mark.timeout(180)
def test_codec_folder_loads_through_wan_with_latent_statistics(codec_dir):
    vae = wan.load_vae(codec_dir)
    z = TINY_CODEC.z_dim
    assert vae.config.z_dim == z
    assert len(vae.config.latents_mean) == z and len(vae.config.latents_std) == z
    assert all(np.isfinite(vae.config.latents_mean)) and all(s > 0 for s in vae.config.latents_std)
    assert vae.config.latents_std != [1.0] * z  # measured, not the initial unit statistics
    report = json.loads((codec_dir / "codec.json").read_text())
    assert report["latents_mean"] == vae.config.latents_mean and report["steps"] == 2
    assert np.isfinite(report["psnr_heldout_db"]) and report["device"] == "cpu"
    assert len(report["history"]) == 2
    # a finished run called again returns its report without training
    assert _train(codec_dir, height=32, width=32, num_frames=9, steps=2, stats_clips=2) == report
    # the metric ceiling: world metrics of round-tripped clips against their scenes, in range
    ceiling = report["ceiling"]
    assert (ceiling["clips"], ceiling["frames"]) == (2, 9) and len(ceiling["psnr_per_frame_db"]) == 9
    assert all(0.0 <= ceiling[k] <= 1.0 for k in ("adherence", "object_adherence", "identity")), ceiling


@pytest.mark.timeout(180)
def test_codec_latent_geometry(codec_dir):
    """Wan's strides: T = 1 + 4k frames -> 1 + k latent frames (the first frame coded alone), 8x8 spatial."""
    vae = wan.load_vae(codec_dir)
    s, t = TINY_CODEC.spatial_stride, TINY_CODEC.temporal_stride
    assert (s, t) == (8, 4)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1  # (B, 3, T, H, W)
    lat = wan.vae_encode(vae, video)
    assert lat.shape == (2, 1 + 8 // t, TINY_CODEC.z_dim, 32 // s, 32 // s)  # (B, F, C, h, w)
    rec = wan.vae_decode(vae, lat)
    assert rec.shape == video.shape and rec.abs().max() <= 1
    assert wan.vae_encode(vae, video[:, :, :1]).shape[1] == 1
    # causal: the first latent frame sees only the first pixel frame; later frames change later latents
    changed = video.clone()
    changed[:, :, 1:] = -changed[:, :, 1:]
    lat2 = wan.vae_encode(vae, changed)
    assert torch.equal(lat2[:, 0], lat[:, 0]) and not torch.allclose(lat2[:, 1:], lat[:, 1:])


@pytest.mark.timeout(240)
def test_codec_resume_is_bit_identical(tmp_path):
    whole = _train(tmp_path / "whole")
    calls = []
    while True:  # time_limit_s=0: every call trains one step, saves and stops
        calls.append(_train(tmp_path / "pieces", time_limit_s=0.0))
        if calls[-1]["done"]:
            break
    assert [c["steps"] for c in calls] == [1, 2, 3] and not calls[0]["done"]
    a = torch.load(tmp_path / "whole" / "codec-train" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "pieces" / "codec-train" / "state.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert calls[-1]["latents_mean"] == whole["latents_mean"]
    assert calls[-1]["psnr_heldout_db"] == whole["psnr_heldout_db"]
    weights = "vae/diffusion_pytorch_model.safetensors"
    assert _digest(tmp_path / "whole")[weights] == _digest(tmp_path / "pieces")[weights]


@pytest.mark.timeout(240)
def test_codec_learns(tmp_path):
    """The same held-out clips before (0 steps) and after a few dozen steps on 32x32, 5-frame clips."""
    kw = dict(batch_size=2, lr=3e-3, warmup_steps=2, stats_clips=2, eval_clips=4)
    before = _train(tmp_path / "untrained", steps=0, **kw)
    after = _train(tmp_path / "trained", steps=30, **kw)
    assert before["history"] == [] and after["steps"] == 30
    # about 12 dB -> 15.5 dB on CPU; the same 4 held-out clips, round trip through wan.vae_encode / vae_decode
    assert after["psnr_heldout_db"] > before["psnr_heldout_db"] + 2.0, (before["psnr_heldout_db"],
                                                                         after["psnr_heldout_db"])
    rec = [h["rec"] for h in after["history"]]  # one entry per step, each on new clips (noisy)
    assert np.mean(rec[-8:]) < 0.85 * np.mean(rec[:8]), rec


@pytest.mark.timeout(120)
def test_codec_budget_fixes_the_step_count(tmp_path):
    """A budget measures the step rate over 20 steps after the warm-up and fixes the step count; a budget
    too small for more still trains one more step, and resuming keeps the fitted count."""
    report = _train(tmp_path / "run", steps=50, budget_s=0.0)
    assert report["done"] and report["steps"] == 1 + 20 + 1, report["steps"]  # warm-up 1, 20 timed, 1 more
    state = torch.load(tmp_path / "run" / "codec-train" / "state.pt", weights_only=True)
    assert state["fitted_steps"] == 22
    assert _train(tmp_path / "run", steps=50, budget_s=0.0) == report  # finished: returned, not retrained


@pytest.mark.timeout(120)
def test_codec_budget_is_a_hard_cap(tmp_path, monkeypatch):
    """Steps that turn slower after the timed ones (a drained prefetch queue) do not overrun the budget:
    training ends at the first step past it, with the final phase, and the shortened count is saved."""
    import types

    from vmla_train.world import codec

    clock = {"t": 0.0, "dt": 1e-4}

    def tick() -> float:
        clock["t"] += clock["dt"]
        return clock["t"]

    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("budget") and "training" in line:  # fitted on fast steps; from here on they are slow
            clock["dt"] = 10.0

    lines: list[str] = []
    monkeypatch.setattr(codec, "time", types.SimpleNamespace(time=tick))
    report = _train(tmp_path / "run", steps=50, budget_s=1.0, log=log)
    assert any("training 50 steps" in x for x in lines), lines
    assert report["done"] and report["steps"] == 22, report["steps"]  # warm-up 1, 20 timed, 1 past the budget
    assert any("spent at step 22" in x for x in lines), lines
    assert torch.load(tmp_path / "run" / "codec-train" / "state.pt", weights_only=True)["fitted_steps"] == 22


@pytest.mark.timeout(120)
def test_codec_resumes_a_state_saved_before_the_inflate_setting(tmp_path):
    """A state written before ``inflate`` was a setting resumes as the run it was (inflate off)."""
    _train(tmp_path / "run", steps=2)
    path = tmp_path / "run" / "codec-train" / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["settings"]["inflate"]
    torch.save(state, path)
    assert _train(tmp_path / "run", steps=3)["steps"] == 3
    with pytest.raises(ValueError, match="other settings"):
        _train(tmp_path / "run", steps=4, inflate=True, init_from=tmp_path / "run")


@pytest.mark.timeout(120)
def test_codec_init_from_starts_from_another_codec(codec_dir, tmp_path):
    """``init_from`` copies a codec's weights into a fresh run (0 steps: the same weights come out), and a
    codec of other widths is refused with one line naming the folder."""
    report = _train(tmp_path / "b", height=32, width=32, num_frames=9, steps=0, init_from=codec_dir)
    assert report["done"] and report["settings"]["init_from"] == str(codec_dir)
    a = wan.load_vae(codec_dir).state_dict()
    b = wan.load_vae(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="other widths"):
        _train(tmp_path / "c", steps=0, codec=CodecConfig(base_dim=16), init_from=codec_dir)
    with pytest.raises(ValueError, match="not a codec folder"):
        _train(tmp_path / "d", steps=0, init_from=tmp_path / "missing")


@pytest.mark.timeout(120)
def test_world_models_folder_holds_codec_and_text_encoder(codec_dir, tmp_path, capsys):
    """`vmla-world models OUT --vae CODEC`: the codec copied and the seeded world text encoder built, in the
    layout `prep.encode.vae` / `text_encoder` and `generate.*` read; an existing OUT is refused."""
    from vmla_train.config import MODEL_SIZES
    from vmla_train.world.evaluate import main

    out = tmp_path / "models"
    assert main(["models", str(out), "--vae", str(codec_dir / "vae")]) == 0
    assert _digest(out / "vae") == _digest(codec_dir / "vae")
    assert wan.load_vae(out).config.latents_std == wan.load_vae(codec_dir).config.latents_std
    tok, enc = wan.load_text_encoder(out, dtype=torch.float32)
    emb, _ = wan.encode_prompts(tok, enc, ["a red circle moves left"], MAX_LEN)
    assert emb.shape[-1] == MODEL_SIZES["world"]["model"]["text_dim"]
    before = _digest(out)
    capsys.readouterr()
    assert main(["models", str(out), "--vae", str(codec_dir / "vae")]) == 2
    assert main(["models", str(tmp_path / "other"), "--vae", str(codec_dir)]) == 2  # not the vae folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "config.json" in err[1], err
    assert _digest(out) == before and not (tmp_path / "other").exists()
    # --text-encoder: a pretrained text encoder folder copied beside the codec
    text_out = text.build_text_encoder(tmp_path / "text", text.world_words(), seed=3)
    assert main(["models", str(tmp_path / "m2"), "--vae", str(codec_dir / "vae"), "--text-encoder", str(text_out)]) == 0
    for part in ("tokenizer", "text_encoder"):
        assert _digest(tmp_path / "m2" / part) == _digest(text_out / part)
    capsys.readouterr()
    assert main(["models", str(tmp_path / "m3"), "--vae", str(codec_dir / "vae"), "--text-encoder", str(codec_dir)]) == 2
    assert "--text-encoder" in capsys.readouterr().err and not (tmp_path / "m3").exists()
    narrow = text.build_text_encoder(tmp_path / "narrow", text.world_words(), d_model=16)  # not the DiT's text_dim
    assert main(["models", str(tmp_path / "m4"), "--vae", str(codec_dir / "vae"), "--text-encoder", str(narrow)]) == 2
    assert "d_model 16" in capsys.readouterr().err and not (tmp_path / "m4").exists()


@pytest.mark.timeout(60)
def test_codec_refuses_bad_settings(codec_dir, tmp_path):
    with pytest.raises(ValueError, match="num_frames = 1 \\+ 4k"):
        _train(tmp_path / "a", num_frames=8)
    with pytest.raises(ValueError, match="multiples of 8"):
        _train(tmp_path / "a", height=20)
    with pytest.raises(ValueError, match="other settings"):  # resuming with another learning rate
        _train(codec_dir, height=32, width=32, num_frames=9, steps=4, stats_clips=2, lr=1e-4)
    (tmp_path / "foreign" / "vae").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not made by train_codec"):
        _train(tmp_path / "foreign")


# ----------------------------------------------------------------------------------------------
# benchmarks/world_codec.py
# ----------------------------------------------------------------------------------------------
SCRIPT = ROOT / "benchmarks" / "world_codec.py"


@pytest.mark.timeout(120)
def test_world_codec_benchmark_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert "--time-limit" in out.stdout and "--results" in out.stdout


@pytest.mark.timeout(180)
def test_world_codec_benchmark_tiny_cpu_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)  # write_result also copies into $OUT when it is set
    spec = importlib.util.spec_from_file_location("world_codec_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results_before = sorted((ROOT / "benchmarks" / "results").glob("world_codec-*"))
    args = ["--steps", "3", "--height", "32", "--width", "32", "--frames", "9", "--base-dim", "8", "--batch", "1",
            "--stats-clips", "1", "--eval-clips", "1", "--ceiling-clips", "0", "--log-every", "1", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results")]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out PSNR" in printed
    result = json.loads((tmp_path / "results" / "world_codec-cpu.json").read_text())
    assert result["steps"] == 3 and result["done"] and len(result["history"]) == 3
    assert (tmp_path / "run" / "vae" / "config.json").is_file()
    assert sorted((ROOT / "benchmarks" / "results").glob("world_codec-*")) == results_before
    # a bad geometry is one line on stderr and exit status 2
    assert bench.main([*args[:7], "8", *args[8:]]) == 2
    assert "num_frames" in capsys.readouterr().err


_GEOMETRIES = {  # 8x in space (Wan's strides), 4x in space, and both temporal downsamplings in the first stages
    "s8": CodecConfig(base_dim=8, z_dim=16),
    "s4": CodecConfig(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], temperal_downsample=[True, True]),
    "early": CodecConfig(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], temperal_downsample=[True, True, False]),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("geometry", list(_GEOMETRIES))
def test_one_pass_codec_equals_diffusers_chunk_loop(geometry):
    """``wan.vae_encode_whole`` / ``vae_decode_whole`` compute what diffusers' chunked encode / per-latent-frame
    decode compute (float64: to rounding), for a single frame, one chunk and several, with the attention block."""
    from diffusers import AutoencoderKLWan

    c = _GEOMETRIES[geometry]
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=c.base_dim, z_dim=c.z_dim, dim_mult=c.dim_mult, num_res_blocks=1,
                           attn_scales=[], temperal_downsample=c.temperal_downsample).double().eval()
    g = torch.Generator().manual_seed(1)
    for frames in (1, 5, 13):
        x = torch.rand(2, 3, frames, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
        with torch.no_grad():
            ref = vae.encode(x).latent_dist.parameters  # (B, 2 z, F, h, w)
            got = wan.vae_encode_whole(vae, x)
            assert got.shape == ref.shape and (got - ref).abs().max() < 1e-12, (frames, (got - ref).abs().max())
            z = torch.randn(ref[:, : c.z_dim].shape, generator=g, dtype=torch.float64) * 3  # some pixels clamp
            ref = vae.decode(z).sample
            got = wan.vae_decode_whole(vae, z)
            assert got.shape == ref.shape == (2, 3, frames, 32, 32)
            assert (got - ref).abs().max() < 1e-12, (frames, (got - ref).abs().max())



@pytest.mark.timeout(120)
@pytest.mark.parametrize("geometry", list(_GEOMETRIES))
def test_inflated_codec_is_the_image_codec_frame_by_frame(geometry):
    """After ``inflate_temporal`` a clip's latent frame j is the image codec's latent of pixel frame 4j (0 for
    j = 0), and each latent frame decodes to the image codec's frame repeated over its group; the spatial
    weights (the last temporal taps) are untouched. Chunked (diffusers) and one-pass paths, float64."""
    from vmla_train.world.codec import build_codec, inflate_temporal

    vae = build_codec(_GEOMETRIES[geometry], seed=3).double().eval()
    image = build_codec(_GEOMETRIES[geometry], seed=3).double().eval()  # what single frames see: the last taps
    inflate_temporal(vae)
    last = {k: v for k, v in image.state_dict().items() if "time_conv" not in k}
    assert all(torch.equal(vae.state_dict()[k][:, :, -1], v[:, :, -1]) for k, v in last.items() if v.dim() == 5)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 13, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()  # (B, z, 4, h, w)
        per_frame = torch.cat([image.encode(x[:, :, i:i + 1]).latent_dist.mode() for i in range(0, 13, 4)], 2)
        assert (z - per_frame).abs().max() < 1e-12
        assert (wan.vae_encode_whole(vae, x)[:, : z.shape[1]] - z).abs().max() < 1e-12
        held = torch.cat([image.decode(z[:, :, j:j + 1]).sample.repeat(1, 1, 1 if j == 0 else 4, 1, 1)
                          for j in range(z.shape[2])], 2)
        assert held.shape == x.shape
        assert (vae.decode(z).sample - held).abs().max() < 1e-12
        assert (wan.vae_decode_whole(vae, z) - held).abs().max() < 1e-12


@pytest.mark.timeout(120)
def test_codec_inflate_needs_init_from_and_is_recorded(codec_dir, tmp_path):
    from vmla_train.world.codec import inflate_temporal

    with pytest.raises(ValueError, match="inflate needs init_from"):
        _train(tmp_path / "a", steps=0, inflate=True)
    report = _train(tmp_path / "b", height=32, width=32, num_frames=9, steps=0, init_from=codec_dir, inflate=True)
    assert report["settings"]["inflate"] is True
    want = wan.load_vae(codec_dir)
    inflate_temporal(want)
    got = wan.load_vae(tmp_path / "b").state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.state_dict().items())


@pytest.mark.timeout(120)
def test_one_pass_codec_loss_has_the_chunk_loops_gradient():
    """The training loss (posterior sample included) and every gradient agree between the two paths."""
    from vmla_train.world.codec import build_codec, codec_loss

    vae = build_codec(_GEOMETRIES["s8"], seed=0).double().train()
    x = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    grads = []
    for one_pass in (False, True):
        vae.zero_grad()
        torch.manual_seed(3)  # the same posterior noise
        loss, parts = codec_loss(vae, x, kl_weight=1e-2, one_pass=one_pass)
        loss.backward()
        grads.append((loss.item(), parts, {n: p.grad.clone() for n, p in vae.named_parameters()}))
    (la, pa, ga), (lb, pb, gb) = grads
    assert la == pytest.approx(lb, rel=1e-12) and pa["kl"] == pytest.approx(pb["kl"], rel=1e-12)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-9, atol=1e-12), n


@pytest.mark.timeout(120)
def test_one_pass_refuses_other_vae_layouts():
    vae = wan.tiny_vae(0)
    vae.register_to_config(is_residual=True)
    with pytest.raises(ValueError, match="is_residual"):
        wan.vae_encode_whole(vae, torch.zeros(1, 3, 1, 16, 16))


@pytest.mark.timeout(120)
def test_codec_step_benchmark_tiny_cpu_run(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    spec = importlib.util.spec_from_file_location("codec_step", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "codec_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--batch", "1", "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu",
            "--results", str(tmp_path)]
    assert bench.main(args) == 0
    assert "speed-up" in capsys.readouterr().out
    rows = json.loads((tmp_path / "codec_step-cpu.json").read_text())["rows"]
    assert sorted(rows) == ["s4 chunked", "s4 one_pass", "s8 chunked", "s8 one_pass"]
    for codec in ("s4", "s8"):  # the same weights and noise: the first (warm-up) losses agree
        assert rows[f"{codec} one_pass"]["losses"][0] == pytest.approx(rows[f"{codec} chunked"]["losses"][0], rel=1e-5)
    assert bench.main([*args[:-2], "--frames", "6"]) == 2


@pytest.mark.timeout(120)
def test_codec_trains_in_one_pass_to_the_chunked_runs_weights(tmp_path):
    """A few steps trained with ``one_pass`` land on the chunked run's weights (float32: to rounding) and say so
    in the report."""
    a = _train(tmp_path / "chunked")
    b = _train(tmp_path / "one_pass", one_pass=True)
    assert b["one_pass"] and not a["one_pass"] and a["steps"] == b["steps"] == 3
    wa = wan.load_vae(tmp_path / "chunked").state_dict()
    wb = wan.load_vae(tmp_path / "one_pass").state_dict()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa)
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-4)


@pytest.mark.timeout(60)
def test_vae_encode_one_pass_gives_the_chunked_latents():
    """``wan.vae_encode(one_pass=True)`` (``prep.encode.one_pass``): the normalised posterior mode of the chunk
    loop, float32 rounding apart."""
    vae = wan.tiny_vae(0)
    vae.register_to_config(latents_mean=[0.1 * i for i in range(16)], latents_std=[1.0 + 0.05 * i for i in range(16)])
    x = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    a, b = wan.vae_encode(vae, x), wan.vae_encode(vae, x, one_pass=True)
    assert a.shape == b.shape == (2, 3, 16, 4, 4)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


# ----------------------------------------------------------------------------------------------
# The shipped world codec (checkpoints/world/models)
# ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_shipped_world_codec_reconstructs_held_out_clips():
    """checkpoints/world/models/vae is the trained codec: it loads through ``wan.load_vae`` with Wan2.1's strides and
    reconstructs held-out world clips at its measured quality (28.9 dB over 64 clips of 49 frames on the GPU);
    the same widths with seeded random weights fall far below (so the bound tells trained from untrained)."""
    from vmla_train.world.codec import EVAL, WorldClips, build_codec, psnr

    shipped = ROOT / "checkpoints" / "world" / "models"
    vae = wan.load_vae(shipped, dtype=torch.float32).eval()
    c = vae.config
    assert (c.scale_factor_temporal, c.scale_factor_spatial, c.z_dim) == (4, 8, 16)
    report = json.loads((shipped / "codec.json").read_text())
    assert report["done"] and report["ceiling"]["adherence"] >= 0.95
    video = torch.stack([WorldClips(64, 64, 17, 16, 0, EVAL)[i] for i in range(2)])  # (2, 3, 17, 64, 64)

    def round_trip_db(model) -> float:
        with torch.no_grad():
            return psnr((wan.vae_decode(model, wan.vae_encode(model, video)) - video).square().mean().item())

    assert round_trip_db(vae) > 27.0
    random = build_codec(CodecConfig(base_dim=c.base_dim, dim_mult=list(c.dim_mult), z_dim=c.z_dim), seed=0).eval()
    assert round_trip_db(random) < 20.0


@pytest.mark.timeout(120)
def test_shipped_world_models_folder_is_what_vmla_world_models_builds(tmp_path):
    """checkpoints/world/models is `vmla-world models OUT --vae <its codec> --text-encoder checkpoints/world/text`:
    the same codec, tokenizer and pretrained text encoder (the one the shipped teacher reads), file for file; and
    the seeded encoder the earlier teachers read is rebuilt exactly by the same command without --text-encoder."""
    from vmla_train.world.evaluate import main

    shipped = ROOT / "checkpoints" / "world" / "models"
    assert main(["models", str(tmp_path / "m"), "--vae", str(shipped / "vae"), "--text-encoder",
                 str(ROOT / "checkpoints" / "world" / "text")]) == 0
    for part in ("vae", "tokenizer", "text_encoder"):
        assert _digest(tmp_path / "m" / part) == _digest(shipped / part), part
    for seeded in ("s1", "s2"):
        assert main(["models", str(tmp_path / seeded), "--vae", str(shipped / "vae")]) == 0
    assert _digest(tmp_path / "s1" / "text_encoder") == _digest(tmp_path / "s2" / "text_encoder")
    assert _digest(tmp_path / "s1" / "text_encoder") != _digest(shipped / "text_encoder")


@pytest.mark.timeout(120)
def test_shipped_world_teacher_reads_the_pretrained_encoder_and_round_trips(tmp_path):
    """checkpoints/world/teacher: its manifest verifies, its text width is that of the shipped models' encoder
    (checkpoints/world/text's, test above), and the
    conversion FIT_FROM continues it from (diffusers -> world-pretrain student folder) keeps every weight:
    converted back to diffusers bf16 it is the shipped file tensor for tensor."""
    from safetensors.torch import load_file

    from vmla_train import convert, student_io

    shipped = ROOT / "checkpoints" / "world" / "teacher"
    student_io.verify_manifest(shipped, "diffusers folder")
    cfg = json.loads((shipped / "config.json").read_text())
    _, enc = wan.load_text_encoder(ROOT / "checkpoints" / "world" / "models", torch.device("cpu"), torch.float32)
    assert cfg["_class_name"] == "WanTransformer3DModel" and cfg["text_dim"] == enc.config.d_model
    assert convert.main([str(shipped), str(tmp_path / "student"), "--config",
                         str(ROOT / "configs" / "world" / "world-pretrain.yaml")]) == 0
    assert convert.main([str(tmp_path / "student"), str(tmp_path / "back"), "--to", "diffusers",
                         "convert.dtype=bfloat16"]) == 0
    a = load_file(str(shipped / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "back" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
