"""Experiment tracking: W&B through Lightning's ``WandbLogger``, offline unless configured online.

- ``logging.wandb_mode=offline`` (default): runs are written under ``RUN_DIR/wandb/`` and can be
  uploaded later with ``wandb sync --append RUN_DIR/wandb/offline-run-*`` (``--append``: an offline run
  resumed with the same id writes a new folder per process start, and a plain sync of the second
  folder would overwrite the first).
- ``online``: needs the user's own login (``WANDB_API_KEY`` in the environment or ``wandb login``);
  this module never reads, prints or writes the key.
- ``disabled``: no logger.

The run id is created once per run folder, stored in every checkpoint and in ``RUN_DIR/wandb_run_id``,
and passed back with ``resume="allow"``: a resumed (or requeued) job continues the same run.

``RunLog`` is where the training loop's numbers go (rank 0): ``RUN_DIR/metrics.jsonl`` (one line per
iteration, trimmed to the resume point at start), W&B and the progress bar (the resolved config files:
``checkpoint.record_config``). A W&B failure mid-run (its service process killed, e.g. by Slurm's
requeue) is logged once and training continues without W&B.
"""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path

from . import config as C
from .config import atomic_write_text

RUN_ID_FILE = "wandb_run_id"


def run_id_for(run_dir: str | Path, saved_id: str | None = None, fresh: bool = False) -> str:
    """The run's W&B id: the checkpoint's, else the run folder's, else a new one (written down).
    ``fresh`` (training starts over, ``checkpoint.resume=false``) always makes a new one."""
    path = Path(run_dir) / RUN_ID_FILE
    if saved_id and not fresh:
        run_id = saved_id
    elif path.is_file() and not fresh:
        run_id = path.read_text().strip()
    else:
        alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet and length
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    if not path.is_file() or path.read_text().strip() != run_id:
        atomic_write_text(path, run_id)
    return run_id


def build_logger(cfg: C.Config, run_dir: str | Path, run_id: str):
    """A ``WandbLogger`` for the run (or None with ``logging.wandb_mode=disabled``)."""
    if cfg.logging.wandb_mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(run_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        name=save_dir.name,
        project=cfg.logging.wandb_project,
        entity=cfg.logging.wandb_entity or None,
        save_dir=str(save_dir),
        id=run_id,
        resume="allow",
        offline=cfg.logging.wandb_mode == "offline",
        config=_flat_config(cfg),
        settings=_settings(),
    )


def _settings():
    import wandb

    return wandb.Settings(console="off", x_disable_stats=True, silent=True)


def _flat_config(cfg: C.Config) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def log_video(logger, key: str, mp4_path: str | Path, step: int, fps: int) -> None:
    """Attach an mp4 written by the loop (PyAV) to the run as a ``wandb.Video``."""
    if logger is None:
        return
    import wandb

    logger.experiment.log({key: wandb.Video(str(mp4_path), format="mp4"), "trainer/step": step})  # fps: the file's


class RunLog:
    """The loop's logging (rank 0; other ranks only print through Fabric): metrics.jsonl,
    W&B every ``logging.every_n_steps`` iterations, the progress bar."""

    def __init__(self, fabric, cfg: C.Config, run_dir: Path, run_id: str):
        self.fabric, self.cfg, self.run_dir = fabric, cfg, Path(run_dir)
        self.rank0 = fabric.global_rank == 0
        self.logger = build_logger(cfg, run_dir, run_id) if self.rank0 else None
        self.bar = None

    def start(self, step: int) -> None:
        """At ``step`` (0 or the resume point): iterations past it are re-run, so their lines are dropped and
        each step is logged once; the progress bar starts there."""
        from tqdm import tqdm

        if self.rank0:
            trim_metrics(self.run_dir / "metrics.jsonl", step)
        self.bar = tqdm(total=self.cfg.train.num_steps, initial=step, disable=not self.rank0 or not self.cfg.runtime.progress,
                        unit="it", dynamic_ncols=True)

    def iteration(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        """One iteration's metrics (already reduced over ranks)."""
        if self.rank0:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(C.json_finite({"step": step, **metrics}), allow_nan=False) + "\n")  # a skipped step's NaN loss: null
        if step % self.cfg.logging.every_n_steps == 0:
            self.metrics(metrics, step)
        self.bar.update(1)
        self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if k.startswith("loss/")} |
                             {"it/s": f"{1 / seconds:.2f}"})

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is None:
            return
        try:
            self.logger.log_metrics(metrics, step=step)
        except Exception as e:  # W&B's service process died (Slurm's requeue SIGTERMs every job process):
            self.fabric.print(f"warning: W&B logging failed ({type(e).__name__}: {e}); continuing without W&B")
            self.logger = None  # ... the stop flag still checkpoints at this step boundary

    def video(self, key: str, path: Path, step: int) -> None:
        log_video(self.logger, key, path, step, self.cfg.video.fps)

    def close(self, success: bool) -> None:
        """Close the bar; after a finished run, finish the W&B run (a dead W&B service only warns)."""
        if self.bar is not None:
            self.bar.close()
        if not success or self.logger is None:
            return
        import wandb

        try:
            self.logger.finalize("success")
            wandb.finish()
        except Exception as e:  # a dead W&B service (see ``metrics``) must not fail a run that checkpointed
            self.fabric.print(f"warning: W&B finish failed ({type(e).__name__}: {e})")


def trim_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``last_step`` (all of them gone on a fresh start)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
