"""`pretrain` command line: `pretrain train …`, `pretrain data prepare …`, `pretrain checkpoint …`,
`pretrain convert …`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cluster.submit import add_launch_parser
from pretrain.config import ConfigError, load_config, validate_world_size
from pretrain.generate_cli import add_generate_parser
from pretrain.track_cli import add_track_parser
from tools.cost_cli import add_cost_parser


def _user_facing_errors() -> tuple[type[Exception], ...]:
    """Imported when an error reaches `main`: the launcher of a multi-process run never loads the checkpoint code."""
    from data.shards.manifest import ManifestError
    from data.shards.reader import CorruptShardError
    from data.sources import SourceError
    from pretrain.checkpoint import CheckpointError
    from pretrain.heartbeat import CollectiveError
    from tools.hf import ConversionError

    return (CheckpointError, CollectiveError, ConversionError, CorruptShardError, ManifestError, SourceError)


def report_error(exc: Exception) -> int | None:
    """Prints an error the user can act on as one line and gives the exit code (2: the config or command line, 1:
    anything else); None for any other exception (a bug), whose traceback is wanted."""
    if isinstance(exc, ConfigError):
        code = 2
    elif isinstance(exc, _user_facing_errors()):
        code = 1
    else:
        return None
    from pretrain.fault_injection import signal_point

    signal_point("error report")
    print(f"error: {exc}", file=sys.stderr, flush=True)
    return code


def default_run_dir(config_path: str) -> Path:
    return Path("runs") / Path(config_path).stem


def check_run_dir(run_dir: Path) -> None:
    """The run folder can be created and written, before any model, data or process is set up."""
    import tempfile

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError("--run-dir", f"{run_dir} cannot be used as the run folder: {exc.strerror or exc}") from None


def _train_on_this_rank(cfg, run_dir: Path, resume: str | None, stop_request, main_rank: bool) -> dict:
    from cluster.distributed import finish_distributed, init_distributed
    from parallel.grid import GridShape, ProcessGrid
    from pretrain.callbacks import default_callbacks
    from pretrain.trainer import Trainer

    denv = init_distributed(cfg.parallel.timeout_s)
    p = cfg.parallel
    shape = GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep)
    grid = ProcessGrid.build(shape, denv.world_size, denv.rank, p.timeout_s) if denv.world_size > 1 else None
    trainer = Trainer(cfg, run_dir, default_callbacks(cfg, run_dir, main_rank), grid)
    if main_rank:
        print(
            f"run dir {run_dir} | {trainer.num_parameters / 1e6:.2f}M parameters | {denv.world_size} process(es) "
            f"tp={p.tp} pp={p.pp} dp={p.dp}{' +sp' if p.sequence_parallel else ''} | "
            f"{trainer.tokens_per_step:,} tokens/step | {cfg.train.steps} steps\n{trainer.precision.describe()}",
            flush=True,
        )
        if cfg.lora.enabled:
            print(f"LoRA rank {cfg.lora.rank} (alpha {cfg.lora.alpha:g}): {trainer.adapter_parameters:,} trainable "
                  f"parameters ({100 * trainer.adapter_parameters / trainer.num_parameters:.2f}% of the model), "
                  f"the base frozen at {cfg.train.init_from}", flush=True)
    summary = trainer.fit(resume=resume, stop_request=stop_request)
    finish_distributed()  # rank 0 has written summary.json once every rank is past this
    return summary


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.distributed import env_from_launcher
    from cluster.launch import Nodes

    if args.init_from:
        args.overrides = [*args.overrides, f"train.init_from={args.init_from}"]
    cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
    if cfg.train.init_from and not args.dry_run:
        from data.chat_dataset import ChatManifest
        from data.preference_dataset import load_preference_manifest
        from data.shards.manifest import Manifest
        from pretrain.checkpoint import read_meta
        from pretrain.trainer import check_initialization_source

        # a missing, truncated or mismatched checkpoint stops here, before any process starts
        load_manifest = {"chat": ChatManifest.load, "preference": load_preference_manifest}.get(cfg.data.format,
                                                                                               Manifest.load)
        manifest = load_manifest(Path(cfg.data.dataset_dirs()[0][0]))
        tokenizer = {"path": str(Path(cfg.data.dataset_dirs()[0][0]) / manifest.tokenizer_file),
                     "sha256": manifest.tokenizer_sha256}
        check_initialization_source(read_meta(Path(cfg.train.init_from)), cfg, tokenizer)
    launcher = env_from_launcher()
    nodes = Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    if (problem := nodes.problem()) is not None:
        raise ConfigError(*problem)
    if nodes.count > 1 and not args.nproc:
        raise ConfigError("--nnodes", "a multi-node launch needs --nproc (processes on each node)")
    world = args.nproc * nodes.count if args.nproc else launcher.world_size
    if args.dry_run:  # the layout is checked against --nproc (or a launcher's world), not against one process
        if args.nproc or launcher.world_size > 1:
            validate_world_size(cfg, world)
        from pretrain.dry_run import dry_run_report

        print("\n".join(dry_run_report(cfg)), flush=True)
        return 0
    validate_world_size(cfg, world)  # before any process or process group starts
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    check_run_dir(run_dir)
    has_checkpoints = any((run_dir / "checkpoints").glob("step_*"))
    if has_checkpoints and not args.resume:
        raise ConfigError(
            "--run-dir",
            f"{run_dir} already holds checkpoints; pass --resume auto to continue it, or a new --run-dir",
        )
    if args.nproc and launcher.world_size == 1:
        import time

        from cluster.launch import launch, strip_launch_options
        from pretrain.stop import EXIT_RESUMABLE

        started = time.time()
        code = launch(args.nproc, strip_launch_options(args.argv), nodes)
        summary = run_dir / "summary.json"  # the ranks exit 0 when stopped on request; rank 0 wrote why
        if summary.is_file() and summary.stat().st_mtime >= started:  # torchrun itself may exit 1 on a signal
            import json

            if json.loads(summary.read_text()).get("stopped"):
                return EXIT_RESUMABLE
        return code

    from pretrain.stop import StopRequest

    main_rank = launcher.rank == 0
    with StopRequest(announce=main_rank) as stop_request:  # from here on a signal stops the run cleanly
        try:
            summary = _train_on_this_rank(cfg, run_dir, args.resume, stop_request, main_rank)
        except Exception as exc:
            # Said while the handler is still in place: once a peer has failed the launcher stops this rank with
            # SIGTERM, which the default action would turn into a silent death between here and `main`.
            stop_request.announce = False
            code = report_error(exc)
            if code is None:
                raise
            return code
    if not main_rank:
        return 0
    if summary["stopped"]:
        from pretrain.stop import EXIT_RESUMABLE

        print(f"stopped by {summary['stopped']} after step {summary['steps']} of {cfg.train.steps}, checkpoint "
              f"saved: continue with --resume auto (exit code {EXIT_RESUMABLE})", flush=True)
        return EXIT_RESUMABLE if launcher.world_size == 1 else 0
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(
        f"done: {summary['steps']} steps, train loss {fmt(summary['final_train_loss'])}, "
        f"val loss {fmt(summary['val_loss'])}, {summary['wall_seconds']:.0f} s, "
        f"{summary['tokens_per_s']:,.0f} tokens/s -> {run_dir / 'summary.json'}",
        flush=True,
    )
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    if args.format in ("sft", "dpo"):
        from data.chat_prepare import DEFAULT_CHAT_SOURCES, prepare_chat_dataset
        from data.preference_prepare import prepare_preference_dataset

        if not args.tokenizer:
            raise ConfigError("--tokenizer", f"--format {args.format} needs the tokenizer.json of the pretraining "
                              "data, e.g. --tokenizer data_cache/tiny/tokenizer.json")
        names = [name for option in args.source or [] for name in option.split(",") if name]
        prepare = prepare_chat_dataset if args.format == "sft" else prepare_preference_dataset
        prepare(
            out_dir=args.out,
            sources=names or list(DEFAULT_CHAT_SOURCES),
            tokenizer=args.tokenizer,
            val_fraction=0.02 if args.val_fraction is None else args.val_fraction,
            seed=args.seed,
            max_per_source=args.max_per_source,
        )
        return 0
    if args.max_per_source is not None:
        raise ConfigError("--max-per-source", "applies to --format sft and dpo only")
    from data.prepare import prepare_dataset

    prepare_dataset(
        out_dir=args.out,
        sources=args.source or None,
        vocab_size=args.vocab_size,
        val_fraction=0.01 if args.val_fraction is None else args.val_fraction,
        shard_tokens=args.shard_tokens,
        seed=args.seed,
        tokenizer=args.tokenizer,
    )
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from data.stats import describe

    for key, value in describe(args.dir).items():
        print(f"{key:>24}: {value:,.4f}" if isinstance(value, float) else f"{key:>24}: {value:,}")
    return 0


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from pretrain.checkpoint import verify

    meta = verify(Path(args.checkpoint), contents=True)
    size = sum(f.bytes for f in meta.files.values())
    layout = ", ".join(f"{k}={v}" for k, v in meta.layout.items() if v is not None)
    print(f"{meta.path}: step {meta.step}, {len(meta.files)} shard file(s), {size / 2**20:,.1f} MiB, every sha256 "
          f"matches" + (f"; written by {layout}" if layout else ""))
    return 0


def _dtype_and_file_size(dtype: str, size: str | None, option: str):
    """The torch dtype of a `--dtype keep|fp32|bf16` choice (None: keep) and a file-size limit such as 5GB."""
    import torch

    from pretrain.consolidate import parse_size

    try:
        limit = parse_size(size) if size else None
    except ValueError as exc:
        raise ConfigError(option, str(exc)) from None
    return {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype], limit


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    from pretrain.consolidate import consolidate

    dtype, max_size = _dtype_and_file_size(args.dtype, args.max_file_size, "--max-file-size")
    files = consolidate(Path(args.checkpoint), Path(args.out), args.part, dtype, max_size)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} file(s), {total / 2**20:,.1f} MiB of whole tensors to {args.out}")
    return 0


def cmd_convert_reshard(args: argparse.Namespace) -> int:
    import shutil

    from cluster.distributed import env_from_launcher, finish_distributed, init_distributed
    from parallel.grid import GridShape, ProcessGrid
    from tools.reshard import Source, check_overrides, reshard_rank, staging_root

    check_overrides(args.overrides)
    source, out = Path(args.source), Path(args.out)
    if not (source / "config.yaml").is_file():
        raise ConfigError("SOURCE", f"{source} is not a checkpoint or consolidated folder (no config.yaml)")
    cfg = load_config(source / "config.yaml", args.overrides, check_paths=False)
    launcher = env_from_launcher()
    world = cfg.parallel.world_size
    if launcher.world_size == 1:  # the command as typed: check everything before any process starts
        if out.exists():
            raise ConfigError("OUT", f"{out} already exists; reshard writes a new folder")
        Source(source)
        shutil.rmtree(staging_root(out), ignore_errors=True)  # what a crashed reshard left
        if world > 1:
            from cluster.launch import launch

            print(f"resharding {source} for tp={cfg.parallel.tp} pp={cfg.parallel.pp} dp={cfg.parallel.dp} "
                  f"cp={cfg.parallel.cp} ep={cfg.parallel.ep}: {world} processes", flush=True)
            return launch(world, args.argv)
    validate_world_size(cfg, launcher.world_size)
    denv = init_distributed(cfg.parallel.timeout_s)
    p = cfg.parallel
    grid = (ProcessGrid.build(GridShape(tp=p.tp, pp=p.pp, dp=p.dp, cp=p.cp, ep=p.ep), denv.world_size, denv.rank,
                              p.timeout_s) if denv.world_size > 1 else ProcessGrid.single())
    written = reshard_rank(source, out, cfg, grid)
    finish_distributed()
    if written is not None:
        from pretrain.checkpoint import read_meta

        meta = read_meta(written)
        print(f"wrote {written}: step {meta.step}, {len(meta.files)} shard file(s) as tp={p.tp} pp={p.pp} dp={p.dp} "
              f"cp={p.cp} ep={p.ep} write them (resume with these parallel.* settings to read one file per rank)")
    return 0


def cmd_checkpoint_merge(args: argparse.Namespace) -> int:
    from pretrain.lora_checkpoint import merge_checkpoint

    out = merge_checkpoint(Path(args.checkpoint), Path(args.out))
    print(f"merged the LoRA adapters of {args.checkpoint} into its base weights: {out} (an ordinary checkpoint for "
          "--init-from, eval, generate and consolidate)")
    return 0


def cmd_convert_export_hf(args: argparse.Namespace) -> int:
    from tools.convert_hf import export_hf

    dtype, shard_size = _dtype_and_file_size(args.dtype, args.shard_size, "--shard-size")
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    record = export_hf(Path(args.checkpoint), Path(args.out), dtype, shard_size, tokenizer, args.verify, args.mtp)
    if record.get("mtp", {}).get("written") == 0:
        print(f"notice: the checkpoint's {record['mtp']['depth']} MTP module(s) are left out (--mtp drop)")
    target = record["target"]
    print(f"exported {args.checkpoint} as {target['architecture']} ({target['tensors']} {target['dtype']} tensors in "
          f"{len(target['files'])} file(s), config, tokenizer and chat template) -> {args.out}")
    if "parity" in record:
        parity = record["parity"]
        print(f"verified with transformers {parity['transformers']}: logits max abs diff {parity['max_abs_diff']:.2e}, "
              f"KL {parity['kl']:.2e} over {parity['windows']} x {parity['tokens_per_window']} tokens")
    return 0


def cmd_convert_import_hf(args: argparse.Namespace) -> int:
    from tools.convert_hf import import_hf

    out = import_hf(Path(args.hf_dir), Path(args.out))
    print(f"imported {args.hf_dir} as the checkpoint {out} (for --init-from, eval, generate and export-hf)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from pretrain.evaluate import TASKS, EvalSettings, evaluate_checkpoint, format_report

    def numbers(option: str, text: str | None, kind):
        if not text:
            return []
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise ConfigError(option, f"expected comma-separated numbers, got '{text}'") from None

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not tasks or any(t not in TASKS for t in tasks):
        raise ConfigError("--tasks", f"'{args.tasks}': choose from {', '.join(TASKS)}")
    depths = numbers("--depths", args.depths, float) or EvalSettings().depths
    if any(not 0 <= d <= 1 for d in depths):
        raise ConfigError("--depths", f"depths are fractions of the filler within [0, 1], got {depths}")
    settings = EvalSettings(tasks=tasks, seq_len=args.seq_len, data_dir=args.data or "", windows=args.windows,
                            buckets=args.buckets, lengths=numbers("--lengths", args.lengths, int), depths=depths,
                            trials=args.trials, seed=args.seed, questions=args.questions)
    try:
        report = evaluate_checkpoint(Path(args.checkpoint), settings, args.overrides)
    except ValueError as exc:
        raise ConfigError("pretrain eval", str(exc)) from None
    print("\n".join(format_report(report)), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"-> {args.out}")
    if not args.no_mlflow:
        _log_evaluation(Path(args.checkpoint), report, args.overrides)
    return 0


def _log_evaluation(checkpoint: Path, report: dict, overrides: list[str]) -> None:
    """Into the MLflow run of the run that wrote the checkpoint (RUN_DIR/checkpoints/step_N), if it was tracked."""
    import json
    import tempfile

    from pretrain.callbacks.mlflow_tracking import log_evaluation
    from pretrain.evaluate import report_metrics

    run_dir = checkpoint.resolve().parent.parent
    cfg = load_config(checkpoint / "config.yaml", overrides, check_paths=False)
    with tempfile.TemporaryDirectory() as tmp:
        label = "_".join(overrides).replace("/", "_")[:80] or "as_trained"
        name = Path(tmp) / f"step_{report['step']:08d}_{label}.json"
        name.write_text(json.dumps(report | {"overrides": overrides}, indent=1))
        run_id = log_evaluation(run_dir, cfg.tracking.tracking_uri, report["step"], report_metrics(report), name)
    if run_id:
        print(f"-> MLflow run {run_id} of {run_dir} (metrics eval/..., artifact eval/{name.name})")


def cmd_recipe(args: argparse.Namespace) -> int:
    from pretrain.recipe import format_results, run_recipe

    if args.resume not in (None, "auto"):
        raise ConfigError("--resume", "a recipe resumes each phase from its own newest checkpoint: use --resume auto")
    try:
        results = run_recipe(Path(args.config), Path(args.run_dir) if args.run_dir else None)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print("\n".join(format_results(results)), flush=True)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from parallel.memory_plan import GIB, layout_of, plan
    from pretrain.consolidate import parse_size

    cfg = load_config(args.config, args.overrides, check_paths=False)
    try:
        memory = parse_size(args.gpu_memory)
    except ValueError as exc:
        raise ConfigError("--gpu-memory", str(exc)) from None
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError("--gpus", "--gpus and --gpus-per-node must be positive")
    rows = plan(cfg, args.gpus, memory, args.gpus_per_node, args.peak_tflops * 1e12, args.mfu)
    own = layout_of(cfg) | {"recompute": cfg.train.activation_checkpointing}
    compared = ("tp", "cp", "pp", "virtual_stages", "ep", "dp", "zero_stage", "micro_batch_size", "recompute")
    is_own = [r for r in rows if r.memory and all(r.layout[k] == own[k] for k in compared)]
    if args.format == "json":
        def as_dict(r):
            mem = None if r.memory is None else {k: v for k, v in vars(r.memory).items()} | {"total": r.memory.total}
            return {"layout": r.layout, "fits": r.fits, "reason": r.reason, "step_seconds": r.step_seconds,
                    "heaviest_pipeline_rank": r.heaviest_pp_rank, "memory_bytes": mem}
        print(json.dumps({"gpus": args.gpus, "gpu_memory_bytes": memory, "mfu": args.mfu,
                          "peak_flops": args.peak_tflops * 1e12, "layouts": [as_dict(r) for r in rows]}, indent=1))
        return 0
    header = ("  tp  cp  pp   v   ep    dp  zero  mb  recompute | params/rank  weights  grads  optim  activ.  "
              "total GiB | step s")
    def line(r) -> str:
        lay, mem = r.layout, r.memory
        g = lambda b: f"{b / GIB:7.1f}"  # noqa: E731
        return (f"{lay['tp']:4d}{lay['cp']:4d}{lay['pp']:4d}{lay['virtual_stages']:4d}{lay['ep']:5d}{lay['dp']:6d}"
                f"{lay['zero_stage']:6d}{lay['micro_batch_size']:4d}  {lay['recompute']:>9} | "
                f"{mem.parameters / 1e9:9.2f}B {g(mem.weights)}{g(mem.gradients)}{g(mem.optimizer)}"
                f"{g(mem.activations)}  {mem.total / GIB:9.1f} | {r.step_seconds:6.2f}")
    fitting = [r for r in rows if r.fits]
    valid = [r for r in rows if r.memory is not None]
    print(f"{args.config}: {args.gpus} GPUs of {memory / GIB:,.0f} GiB ({args.gpus_per_node} per node), "
          f"{args.peak_tflops:,.0f} TFLOP/s peak at MFU {args.mfu:.0%}; per-rank memory of the heaviest rank "
          f"(GiB, including a {2:.0f} GiB reserve)")
    print(f"{len(fitting)} of {len(valid)} valid layouts fit ({len(rows) - len(valid)} combinations are not valid "
          f"for this config); the {min(args.top, len(fitting))} fastest:")
    print(header)
    for r in fitting[: args.top]:
        print(line(r))
    for r in is_own:
        print(f"the config's own layout, {'fits' if r.fits else 'does not fit: ' + r.reason}:\n{line(r)}")
    shown = {r.layout["recompute"] for r in fitting[: args.top] + is_own}
    if "full" in shown:
        print("recompute full: train.activation_checkpointing=full (every block runs its forward again in the "
              "backward; step time counts it as 4/3).")
    if "selective" in shown:
        print("recompute selective: train.activation_checkpointing=selective (blocks keep their matrix "
              "multiplications' and attention's outputs and recompute the rest; no matmul twice).")
    print("Step time is compute only (communication assumed overlapped) plus the pipeline bubble.")
    return 0


def _add_consolidate_parser(sub, name: str) -> None:
    whole = sub.add_parser(
        name, help="write whole tensors (safetensors) from a sharded checkpoint, one tensor at a time")
    whole.add_argument("checkpoint", help="a checkpoint folder")
    whole.add_argument("out", help="output folder (model.safetensors, or numbered files and an index, + config.yaml "
                       "and checkpoint.json; --part all: what `pretrain convert reshard` turns back into a checkpoint)")
    whole.add_argument("--part", choices=["model", "optimizer", "all"], default="model")
    whole.add_argument("--dtype", choices=["keep", "fp32", "bf16"], default="keep")
    whole.add_argument("--max-file-size", help="split into files of at most this size, e.g. 5GB (default: one file)")
    whole.set_defaults(func=cmd_checkpoint_consolidate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Distributed LLM pretraining")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    train.add_argument("--run-dir", help="output folder (default: runs/<config name>)")
    train.add_argument("--resume", help="'auto' (newest valid checkpoint in the run dir) or a checkpoint path")
    train.add_argument("--nproc", type=int, help="launch this many processes on this node (torchrun; alone on one "
                       "node: a free local port)")
    train.add_argument("--nnodes", type=int, default=1, help="nodes of a multi-node job (run the same command on "
                       "each, with its own --node-rank)")
    train.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 .. nnodes-1")
    train.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (multi-node rendezvous)")
    train.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0 (multi-node)")
    train.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start from another run's weights (a checkpoint folder, any layout) with a fresh "
                       "optimizer, schedule and data position, e.g. for context extension or fine-tuning")
    train.add_argument(
        "--dry-run", action="store_true",
        help="validate the config (and the layout against --nproc), build the model on the meta device, print "
        "parameter counts, FLOPs and tokens per step, and exit without starting processes or reading data",
    )
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    train.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="data preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser(
        "prepare", help="build tokenizer + webdataset shards from text, or chat conversations (--format sft) or "
        "preference pairs (--format dpo) for fine-tuning")
    prep.add_argument("--out", required=True, help="output data folder")
    prep.add_argument("--format", choices=["text", "sft", "dpo"], default="text",
                      help="text: pretraining shards; sft: train/val.jsonl of chat conversations for fine-tuning; "
                      "dpo: train/val.jsonl of preference pairs (prompt, chosen, rejected)")
    prep.add_argument(
        "--source", action="append",
        help="a packaged corpus name (bible, anarchism, gcide, fortunes, shakespeare) or a .txt/.jsonl/dir/glob; "
        "repeatable; default: all packaged corpora. With --format sft/dpo: dictionary, bible (repeatable or "
        "comma-separated; default: both)",
    )
    prep.add_argument("--vocab-size", type=int, default=8192)
    prep.add_argument("--val-fraction", type=float,
                      help="share held out: whole documents (default 0.01), or conversations by question (sft: 0.02)")
    prep.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one (folders to blend); "
                      "required with --format sft/dpo: the pretraining data's tokenizer")
    prep.add_argument("--max-per-source", type=int, metavar="N",
                      help="--format sft/dpo: at most N conversations or pairs of each source (a seeded sample)")
    prep.set_defaults(func=cmd_data_prepare)
    stats = data_sub.add_parser("stats", help="token counts and unigram entropy of a prepared folder")
    stats.add_argument("dir")
    stats.set_defaults(func=cmd_data_stats)

    evaluation = sub.add_parser("eval", help="evaluate a checkpoint: loss by position, passkey, held-out chat answers")
    evaluation.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny_long/checkpoints/step_00000150")
    evaluation.add_argument("--tasks", default="long_ppl,passkey", help="comma-separated: long_ppl, passkey, sft")
    evaluation.add_argument("--seq-len", type=int, default=0,
                            help="long_ppl window length and passkey's base length (default: the run's data.seq_len)")
    evaluation.add_argument("--data", help="prepared data folder for long_ppl (its val split) and the tokenizer, "
                            "or for sft a --format sft folder (its val conversations) (default: the run's data.dir)")
    evaluation.add_argument("--windows", type=int, default=16, help="long_ppl: validation windows to average")
    evaluation.add_argument("--buckets", type=int, default=4, help="long_ppl: position buckets per window")
    evaluation.add_argument("--lengths", help="passkey: prompt lengths in tokens, e.g. 128,256,512,1024 (default: "
                            "seq-len x 1/2, 1, 2, 4)")
    evaluation.add_argument("--depths", help="passkey: where the key sits in the filler, e.g. 0,0.5,1")
    evaluation.add_argument("--trials", type=int, default=4, help="passkey: random keys per length and depth")
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--questions", type=int, default=100, help="sft: held-out conversations to answer")
    evaluation.add_argument("--out", help="also write the report as JSON here")
    evaluation.add_argument("--no-mlflow", action="store_true",
                            help="do not log the results into the MLflow run of the run that wrote the checkpoint")
    evaluation.add_argument("overrides", nargs="*", metavar="section.key=value",
                            help="change the checkpoint's config, e.g. model.rope.scaling=yarn")
    evaluation.set_defaults(func=cmd_eval)
    add_generate_parser(sub)
    add_launch_parser(sub)
    add_cost_parser(sub)

    recipe = sub.add_parser("recipe", help="run a lifecycle of phases (pretrain, context extension, SFT, DPO), each "
                            "from the previous one's final checkpoint; running it again continues where it stopped")
    recipe.add_argument("config", help="a recipe YAML, e.g. configs/recipe_tiny.yaml")
    recipe.add_argument("--run-dir", help="the recipe's folder (one subfolder per phase); default: the recipe's "
                        "run_dir, else runs/<recipe name>")
    recipe.add_argument("--resume", choices=["auto"], help="accepted for symmetry with train: a recipe always "
                        "continues done and interrupted phases")
    recipe.set_defaults(func=cmd_recipe)

    planner = sub.add_parser("plan", help="which layouts fit N GPUs: memory per rank by category and step time")
    planner.add_argument("config", help="YAML config, e.g. configs/llama3_70b.yaml")
    planner.add_argument("--gpus", type=int, required=True, help="number of GPUs in the job")
    planner.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GB")
    planner.add_argument("--gpus-per-node", type=int, default=8, help="tensor parallelism stays within a node")
    planner.add_argument("--peak-tflops", type=float, default=989.0,
                         help="one GPU's dense bf16 peak (H100 SXM: 989)")
    planner.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed for step times")
    planner.add_argument("--top", type=int, default=10, help="fitting layouts to list")
    planner.add_argument("--format", choices=["table", "json"], default="table")
    planner.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    planner.set_defaults(func=cmd_plan)

    ckpt = sub.add_parser("checkpoint", help="inspect and convert sharded checkpoints (offline, one process)")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    check = ckpt_sub.add_parser("verify", help="check every shard file of a checkpoint against its sha256")
    check.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step_00000240")
    check.set_defaults(func=cmd_checkpoint_verify)
    _add_consolidate_parser(ckpt_sub, "consolidate")
    merge = ckpt_sub.add_parser(
        "merge", help="fold a LoRA checkpoint's adapters into its base weights: an ordinary checkpoint folder")
    merge.add_argument("checkpoint", help="a checkpoint of a run with lora.rank > 0")
    merge.add_argument("out", help="the merged checkpoint folder to write (must not exist)")
    merge.set_defaults(func=cmd_checkpoint_merge)

    convert = sub.add_parser("convert", help="convert checkpoints to and from Hugging Face transformers folders "
                             "(offline, one process)")
    convert_sub = convert.add_subparsers(dest="convert_command", required=True)
    export = convert_sub.add_parser(
        "export-hf", help="a dense GQA checkpoint as a LlamaForCausalLM folder (GQA + sigmoid MoE: "
        "Glm4MoeForCausalLM; GQA + softmax top-k MoE: MixtralForCausalLM; MLA + MoE: DeepseekV3ForCausalLM): "
        "safetensors, config.json, tokenizer")
    export.add_argument("checkpoint", help="a checkpoint folder (of a LoRA run: merge it first)")
    export.add_argument("out", help="the Hugging Face folder to write (must not exist)")
    export.add_argument("--dtype", choices=["keep", "fp32", "bf16"], default="keep", help="of the written weights")
    export.add_argument("--shard-size", help="split the weights into files of at most this size, e.g. 5GB "
                        "(default: one model.safetensors)")
    export.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json (default: the one the checkpoint was "
                        "trained with)")
    export.add_argument("--verify", action="store_true", help="load the result with transformers and compare its "
                        "logits with the checkpoint's (recorded in conversion.json)")
    export.add_argument("--mtp", choices=["keep", "drop"], default="keep", help="MTP modules of an MoE model "
                        "(Glm4MoeForCausalLM, DeepseekV3ForCausalLM): keep writes them in DeepSeek-V3's layout, for "
                        "transformers' generate(use_mtp=True); drop leaves them out")
    export.set_defaults(func=cmd_convert_export_hf)
    imported = convert_sub.add_parser(
        "import-hf", help="a LlamaForCausalLM, Glm4MoeForCausalLM, MixtralForCausalLM or DeepseekV3ForCausalLM "
        "folder (config.json + safetensors) as an ordinary checkpoint folder")
    imported.add_argument("hf_dir", help="a Hugging Face model folder")
    imported.add_argument("out", help="the checkpoint folder to write (must not exist)")
    imported.set_defaults(func=cmd_convert_import_hf)
    reshard = convert_sub.add_parser(
        "reshard", help="rewrite a checkpoint (or `consolidate --part all` whole tensors) as the checkpoint another "
        "parallel layout writes, one shard file per rank (offline, CPU: one process per target rank)")
    reshard.add_argument("source", help="a checkpoint folder, or a folder written by consolidate --part all")
    reshard.add_argument("out", help="the checkpoint folder to write (must not exist)")
    reshard.add_argument("overrides", nargs="*", metavar="parallel.key=value",
                         help="the target layout, e.g. parallel.tp=2 parallel.dp=1 (default: the source's)")
    reshard.set_defaults(func=cmd_convert_reshard)
    _add_consolidate_parser(convert_sub, "consolidate")
    add_track_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before or after options; anything else unknown is an error.
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if (args.command not in ("train", "plan", "eval", "launch")
                and getattr(args, "convert_command", None) != "reshard"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except Exception as exc:
        code = report_error(exc)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
