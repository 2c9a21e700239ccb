"""`pretrain track sync RUN_DIR`: send what a run kept for MLflow while its tracking server did not answer."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_track_sync(args: argparse.Namespace) -> int:
    from pretrain.callbacks.mlflow_tracking import PENDING_FILE, sync_spooled
    from pretrain.config import ConfigError

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a folder")
    try:
        sent = sync_spooled(run_dir, args.tracking_uri or "")
    except ValueError as exc:
        raise ConfigError("RUN_DIR", str(exc)) from None
    print(f"{run_dir}: nothing kept in {PENDING_FILE}, MLflow has everything" if sent == 0 else
          f"{run_dir}: sent {sent} kept item(s) to MLflow", flush=True)
    return 0


def add_track_parser(sub) -> None:
    track = sub.add_parser("track", help="MLflow tracking of finished runs")
    track_sub = track.add_subparsers(dest="track_command", required=True)
    sync = track_sub.add_parser("sync", help="send what a run kept in RUN_DIR/mlflow_pending.json because its "
                                "tracking server did not answer")
    sync.add_argument("run_dir", help="the run folder")
    sync.add_argument("--tracking-uri", help="default: the run's (MLFLOW_TRACKING_URI, else the runs folder's sqlite)")
    sync.set_defaults(func=cmd_track_sync)
