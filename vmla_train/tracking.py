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
"""

from __future__ import annotations

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
