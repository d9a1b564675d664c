"""`foldserve`: one command line for training, folding, exporting and serving BN networks.

Importing this module, and any `--help`, loads neither torch nor ONNX Runtime: each command
imports what it needs when it runs, so `foldserve serve` works in an image without torch.
Errors a user can fix print as one line (`foldserve <command>: error: ...`) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from foldserve import __version__

EXIT_USAGE = 2
EXIT_FAILURE = 1

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A command-line value that parses but makes no sense; printed as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a newcomer needs the error and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- value parsers


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), not {text}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, not {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers separated by commas: {text!r}")
    return values


def model_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, lists, booleans)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


positive_int.__name__ = "positive integer"  # argparse names the type in its error message
positive_float.__name__ = "positive number"
fraction.__name__ = "fraction"
float_list.__name__ = "list of numbers"


# --------------------------------------------------------------------------- commands


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every option defaults to None so that `--resume` can tell which ones were given."""
    p.add_argument("--model", help="registry model name (see 'foldserve models'); digits_cnn")
    p.add_argument(
        "--model-option",
        action="append",
        type=model_option,
        metavar="KEY=VALUE",
        help="override a model config field, e.g. widths=[16,32]; repeatable",
    )
    p.add_argument(
        "--data",
        help="'digits' (scikit-learn's bundled handwritten digits, the default), a folder with "
        "one subfolder of images per class, or a .csv file with a 'label' column",
    )
    p.add_argument("--image-size", type=positive_int, help="image folders: resize to N×N (32)")
    p.add_argument("--color-mode", choices=("L", "RGB"), help="image folders: L or RGB (L)")
    p.add_argument("--val-fraction", type=fraction, help="stratified hold-out share (0.2)")
    p.add_argument("--epochs", type=positive_int, help="epochs to train (20)")
    p.add_argument("--batch-size", type=positive_int, help="mini-batch size, per process (64)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (0.01)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on weights (1e-4)")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), help="optimizer (adamw)")
    p.add_argument("--schedule", choices=("onecycle", "constant"), help="LR schedule (onecycle)")
    p.add_argument("--label-smoothing", type=float, help="cross-entropy label smoothing (0)")
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_const",
        const=False,
        help="images: no random one-pixel shifts",
    )
    p.add_argument("--seed", type=int, help="seed for split, init and shuffling (0)")


def cmd_train(args: argparse.Namespace) -> int:
    from training.distributed import in_launched_worker

    if args.nproc and not in_launched_worker():  # the relaunched command keeps --nproc
        return launch_torchrun(args.nproc, args.argv, Path(args.out))
    from training.train import CHECKPOINT_NAME, HISTORY_NAME, PLOT_NAME, TrainConfig, train

    run_dir = Path(args.out)
    cfg = _train_config(args, TrainConfig, run_dir / CHECKPOINT_NAME if args.resume else None)
    result = train(
        cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=_progress(args)
    )
    if not result.world.is_main:
        return 0  # rank 0 reports for the job
    last = result.history[-1]
    print(f"model       {cfg.model} on {result.data_info.source}")
    print(f"epochs      {len(result.history)}")
    print(f"val acc     {100 * last['val_acc']:.2f} %   (val loss {last['val_loss']:.4f})")
    if result.recalibration:
        r = result.recalibration
        print(
            f"BN recalibrated over {r['batches']} training batches: val acc "
            f"{100 * r['val_acc_before']:.2f} % ({cfg.bn_stats} statistics) → "
            f"{100 * r['val_acc_after']:.2f} % (cumulative average)"
        )
    if result.world.is_distributed:
        sync = "off" if cfg.sync_bn is False else "on"
        print(f"processes   {result.world.size} ({result.world.backend}), sync BN {sync}")
    print(f"checkpoint  {run_dir / CHECKPOINT_NAME}")
    print(f"history     {run_dir / HISTORY_NAME}, plot {run_dir / PLOT_NAME}")
    return 0


def launch_torchrun(nproc: int, argv: Sequence[str], run_dir: Path) -> int:
    """Run this same `foldserve` command as `nproc` processes under torchrun, on this machine.

    When a process dies, torchrun stops the others and prints which rank failed and how; this
    adds the one thing a person needs next: what state the run folder is in.
    """
    from training.distributed import torchrun_command

    proc = subprocess.Popen(torchrun_command(nproc, argv))
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # torchrun passes it on to its workers
        proc.wait()
        raise
    if code != 0:
        print(
            f"foldserve train: error: distributed training failed: torchrun exited with code "
            f"{code} (its report above names the rank that failed and why). "
            f"{_checkpoint_state(run_dir)}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


def _checkpoint_state(run_dir: Path) -> str:
    """One sentence on the run folder after a failed job: what is there, and how to go on."""
    from training.checkpoint import load_checkpoint
    from training.errors import CheckpointError
    from training.train import CHECKPOINT_NAME

    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        return f"No checkpoint was written to {str(path)!r}."
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        return f"The checkpoint cannot be read: {exc}"
    epochs = state["train_config"].get("epochs", "?")
    return (
        f"The last checkpoint, {str(path)!r} (epoch {state['epoch']} of {epochs}), is intact: "
        "run the same command with --resume to continue from it."
    )


def _train_config(args: argparse.Namespace, config_cls: type, resume_from: Path | None) -> Any:
    """Defaults, or the checkpoint's config on resume, overridden by the options given."""
    from training.checkpoint import load_checkpoint

    base: dict[str, Any] = {}
    if resume_from is not None:
        base = load_checkpoint(resume_from)["train_config"]
    given = {
        k: v
        for k, v in vars(args).items()
        if v is not None and k in config_cls.__dataclass_fields__
    }
    if args.model_option:
        given["model_options"] = {**base.get("model_options", {}), **dict(args.model_option)}
    return config_cls(**(base | given))


def cmd_why_bn(args: argparse.Namespace) -> int:
    from training.train import TrainConfig
    from training.why_bn import WhyBNConfig, run, table

    base = _train_config(args, TrainConfig, None)
    if args.epochs is None:
        base = type(base)(**(base.to_dict() | {"epochs": 8}))
    exp = WhyBNConfig(base=base, lrs=args.lrs)
    runs = run(exp, args.out)
    print(table(runs, exp.target_acc), end="")
    print(f"plot: {Path(args.out) / 'why_bn.png'}  data: {Path(args.out) / 'why_bn.json'}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import dataclasses

    from training.models import MODELS

    for name, spec in MODELS.items():
        print(f"{name:12s} {spec.description}")
        if args.verbose:
            defaults = {f.name: f.default for f in dataclasses.fields(spec.config_cls)}
            print(f"{'':12s} options: {defaults}")
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    import torch

    from training.fold import fold_model
    from training.train import load_trained_model, validation_data

    model, state = load_trained_model(args.checkpoint)
    val_x, _ = validation_data(state)
    _, report = fold_model(model, torch.from_numpy(val_x[: args.calibration]))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    return export_and_report(
        args.checkpoint, args.repository, args.name, args.version, args.tolerance, args.dtype
    )


def export_and_report(
    checkpoint: Path,
    repository: Path,
    name: str,
    version: int | None,
    tolerance: float | None,
    dtype: str = "fp32",
) -> int:
    from training.export import export_checkpoint

    result = export_checkpoint(checkpoint, repository, name, version, tolerance, dtype)
    v = result.verification
    print(f"exported    {result.path} (model {result.name!r}, version {result.version})")
    print(
        f"folded      {len(result.fold_report.folded)} BatchNorm(s), "
        f"{len(result.fold_report.skipped)} left in place"
    )
    print(
        f"verified    on {v['examples']} validation examples: max |diff| "
        f"{v['max_abs_diff']:.3g} (rel {v['max_rel_diff']:.3g}, allowed {v['bound']:.3g}), "
        f"argmax agreement {100 * v['argmax_agreement']:.2f} %"
    )
    print(
        f"accuracy    unfolded PyTorch fp32 {100 * v['accuracy_torch_unfolded']:.2f} %, "
        f"folded ONNX {v['dtype']} {100 * v['accuracy_onnx_folded']:.2f} %"
    )
    return 0


def cmd_fold_onnx(args: argparse.Namespace) -> int:
    from training.onnx_fold import fold_onnx_file

    report = fold_onnx_file(
        args.input, args.output, inputs_npz=args.inputs, verify=not args.no_verify
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(f"{report}\nwritten {args.output}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: train and export only when the repository lacks the model."""
    from training.repository import versions

    repo = Path(args.repository)
    published = versions(repo, args.name)
    if published:
        print(
            f"{repo / args.name} already holds version(s) {', '.join(map(str, published))}; "
            "nothing to train (delete it, or export a checkpoint with 'foldserve export', "
            "to publish another)"
        )
        return _serve_after_run(args)
    from training.checkpoint import load_checkpoint
    from training.train import CHECKPOINT_NAME, TrainConfig, train

    run_dir = Path(args.out)
    checkpoint = run_dir / CHECKPOINT_NAME
    resume = checkpoint.exists()
    if resume:
        cfg = TrainConfig.from_dict(load_checkpoint(checkpoint)["train_config"])
    else:
        cfg = TrainConfig(bn_recalibrate=True)
    result = train(cfg, run_dir, resume=resume, progress=_progress(args))
    print(f"trained     {cfg.model}: val acc {100 * result.val_acc:.2f} % ({checkpoint})")
    export_and_report(checkpoint, repo, args.name, None, None)
    return _serve_after_run(args)


def _serve_after_run(args: argparse.Namespace) -> int:
    if args.no_serve:
        return 0
    print(f"serving     {args.repository} on http://{args.host}:{args.port} (Ctrl-C stops)")
    sys.stdout.flush()
    from service.main import serve

    serve({"repository": args.repository, "host": args.host, "port": args.port})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from service.main import serve

    serve(serve_overrides(args))
    return 0


SERVE_FIELDS: list[str] = []  # Settings fields offered as `foldserve serve` options


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """One option per service Settings field, so the CLI and the settings never drift.

    Every default is None ("not given"), so FOLDSERVE_* environment variables still apply.
    Without the `serve` extra the command is listed but says what to install.
    """
    try:
        from service.settings import cli_options
    except ImportError:
        p.description = (
            f"{p.description} Needs the 'serve' extra: pip install 'foldserve[serve,cpu]'."
        )
        return
    for option in cli_options():
        SERVE_FIELDS.append(option.field)
        help_text = (
            f"{option.help} (default: {option.default}; env FOLDSERVE_{option.field.upper()})"
        )
        if isinstance(option.default, bool):
            p.add_argument(
                option.flag,
                dest=option.field,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            p.add_argument(option.flag, dest=option.field, default=None, help=help_text)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {field: getattr(args, field, None) for field in SERVE_FIELDS}


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="foldserve",
        description="Train BatchNorm networks, fold every BatchNorm into its conv/linear "
        "neighbour, export to ONNX and serve over the Open Inference Protocol.",
        epilog="Run 'foldserve COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"foldserve {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    _add_train_command(sub)
    _add_why_bn_command(sub)
    _add_fold_command(sub)
    _add_export_command(sub)
    _add_fold_onnx_command(sub)
    _add_run_command(sub)
    _add_models_command(sub)
    _add_serve_command(sub)
    return parser


def _add_train_command(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a BN network and checkpoint it",
        description="Train a registry model on the bundled digits, an image folder or a CSV "
        "table. Writes RUN_DIR/checkpoint.pt (every epoch, atomically), history.json and "
        "curves.png. Validation runs in eval mode with BN's running statistics. Under torchrun "
        "(or with --nproc) it trains data-parallel with DDP; only rank 0 writes files.",
    )
    add_train_options(p)
    p.add_argument("--out", default="runs/digits", help="run folder (runs/digits)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its stored settings",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument(
        "--bn-recalibrate",
        action="store_const",
        const=True,
        help="after training, recompute BN population statistics in one pass over the training "
        "set (cumulative average, as momentum=None) and report val accuracy before and after",
    )
    p.add_argument(
        "--bn-stats",
        metavar="POLICY",
        help="BN population statistics: ema (PyTorch's EMA, momentum 0.1), ema:<momentum>, "
        "window:<N> (average of the last N batches) or cumulative (every batch) (ema)",
    )
    p.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with several processes, normalise BN over the global batch (all processes' "
        "examples) and keep identical running statistics on every rank; --no-sync-bn: each "
        "process normalises its own batch and rank 0's statistics are saved (on when "
        "there are several processes)",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        metavar="N",
        help="train data-parallel as N processes on this machine: launches torchrun "
        "(python -m torch.distributed.run --standalone --nproc-per-node N) with this same "
        "command; NCCL and one GPU per process when CUDA is available, else gloo on the CPU. "
        "--batch-size is per process",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)


def _add_why_bn_command(sub: Any) -> None:
    p = sub.add_parser(
        "why-bn",
        help="train one architecture with and without BN over several learning rates",
        description="The 'why BatchNorm' experiment: the same network with and without BN, "
        "SGD with momentum at constant learning rates. Writes OUT/why_bn.png (curves side by "
        "side), why_bn.json and why_bn.md (the table).",
    )
    add_train_options(p)
    p.add_argument("--lrs", type=float_list, default=(0.01, 0.1, 0.5), help="0.01,0.1,0.5")
    p.add_argument("--out", default="runs/why_bn", help="output folder (runs/why_bn)")
    p.set_defaults(handler=cmd_why_bn)


def _add_fold_command(sub: Any) -> None:
    p = sub.add_parser(
        "fold",
        help="fold a checkpoint's BatchNorms and print the report",
        description="Fold every BatchNorm of a trained checkpoint into its conv/linear "
        "neighbour where that is exact, verify against a float64 copy of the original on the "
        "run's validation data, and print what was folded, what was not and why.",
    )
    p.add_argument("checkpoint", help="a checkpoint written by 'foldserve train'")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--calibration", type=positive_int, default=64, help="validation examples to verify on"
    )
    p.set_defaults(handler=cmd_fold)


def _add_export_command(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="fold a checkpoint, export it to ONNX, verify it and publish it",
        description="Eval mode, fold, export to ONNX (opset 18, dynamic batch, input 'input', "
        "output 'logits'), onnx.checker full check, then ONNX Runtime vs the unfolded PyTorch "
        "model on the run's validation data. Only if all pass is REPOSITORY/NAME/VERSION/"
        "model.onnx written (the folder appears whole or not at all).",
    )
    p.add_argument("checkpoint", help="a checkpoint written by 'foldserve train'")
    p.add_argument("--name", default="digits", help="model name in the repository (digits)")
    p.add_argument("--repository", default="models", help="model repository folder (models)")
    p.add_argument("--version", type=positive_int, help="version to write (default: next)")
    p.add_argument(
        "--tolerance",
        type=positive_float,
        help="allowed max |diff| per unit of (1 + max |y|) against the unfolded float32 model "
        "(1e-4 for fp32, 1e-2 for fp16, 6e-2 for bf16)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="compute precision inside the file; inputs and outputs stay FP32 so clients need "
        "no change. Folding runs in float64 with one cast to the target (fp32)",
    )
    p.set_defaults(handler=cmd_export)


def _add_fold_onnx_command(sub: Any) -> None:
    p = sub.add_parser(
        "fold-onnx",
        help="fold BatchNormalization nodes in any ONNX file",
        description="Fold BatchNormalization nodes into neighbouring Conv, ConvTranspose, Gemm "
        "and MatMul nodes of any ONNX file, whatever produced it, and verify the result "
        "against the original in ONNX Runtime with graph optimisations off. The input file is "
        "never modified; nothing is written unless verification passes. Needs no torch.",
    )
    p.add_argument("input", help="the ONNX file to fold")
    p.add_argument("-o", "--output", required=True, help="where to write the folded file")
    p.add_argument(
        "--inputs", help="an .npz with one array per graph input, to verify on real data"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_fold_onnx)


def _add_run_command(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="the main job: train, fold, export and verify the digits model if it is missing",
        description="If REPOSITORY/NAME holds no version yet: train the default digits model "
        "into --out (resuming a run that was interrupted), then fold, export and verify it "
        "into the repository. Otherwise do nothing, so running it twice adds no version.",
    )
    p.add_argument("--name", default="digits", help="model name in the repository (digits)")
    p.add_argument("--repository", default="models", help="model repository folder (models)")
    p.add_argument("--out", default="runs/digits", help="training run folder (runs/digits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-serve", action="store_true", help="stop after the export")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to serve on (8000)")
    p.set_defaults(handler=cmd_run)


def _add_models_command(sub: Any) -> None:
    p = sub.add_parser("models", help="list the registry's BN networks")
    p.set_defaults(handler=cmd_models)


def _add_serve_command(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model repository over the Open Inference Protocol (KServe/Triton v2)",
        description="Serve every REPOSITORY/<name>/<version>/model.onnx through ONNX Runtime "
        "(CUDA when available, else CPU) over the Open Inference Protocol: /v2 health, "
        "metadata, infer (JSON and binary tensors), classification, repository control, "
        "/metrics. Each option can also be set by its FOLDSERVE_* environment variable.",
    )
    add_serve_options(p)
    p.set_defaults(handler=cmd_serve)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story; imported only once a command ran."""
    errors: list[type[BaseException]] = [UsageError]
    for module, name in (
        ("training.errors", "TrainingError"),
        ("foldserve.model_metadata", "MetadataError"),
        ("service.errors", "SettingsError"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `train --nproc` to relaunch
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except user_errors() as exc:
        print(f"foldserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"foldserve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
