"""`foldserve`: one command line for training, folding, exporting and serving BN networks.

Importing this module, and any `--help`, loads neither torch nor ONNX Runtime: each command
imports what it needs when it runs, so `foldserve serve` works in an image without torch.
Errors a user can fix print as one line (`foldserve <command>: error: ...`) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
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
    p.add_argument("--batch-size", type=positive_int, help="mini-batch size (64)")
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
    from training.train import CHECKPOINT_NAME, HISTORY_NAME, PLOT_NAME, TrainConfig, train

    run_dir = Path(args.out)
    cfg = _train_config(args, TrainConfig, run_dir / CHECKPOINT_NAME if args.resume else None)
    result = train(
        cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=_progress(args)
    )
    last = result.history[-1]
    print(f"model       {cfg.model} on {result.data_info.source}")
    print(f"epochs      {len(result.history)}")
    print(f"val acc     {100 * last['val_acc']:.2f} %   (val loss {last['val_loss']:.4f})")
    if result.recalibration:
        r = result.recalibration
        print(
            f"BN recalibrated over {r['batches']} training batches: val acc "
            f"{100 * r['val_acc_before']:.2f} % (EMA statistics) → "
            f"{100 * r['val_acc_after']:.2f} % (cumulative average)"
        )
    print(f"checkpoint  {run_dir / CHECKPOINT_NAME}")
    print(f"history     {run_dir / HISTORY_NAME}, plot {run_dir / PLOT_NAME}")
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    raise UsageError(
        "the inference service is not part of this release yet; "
        "train with 'foldserve train' meanwhile"
    )


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

    p = sub.add_parser(
        "train",
        help="train a BN network and checkpoint it",
        description="Train a registry model on the bundled digits, an image folder or a CSV "
        "table. Writes RUN_DIR/checkpoint.pt (every epoch, atomically), history.json and "
        "curves.png. Validation runs in eval mode with BN's running statistics.",
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)

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

    p = sub.add_parser("models", help="list the registry's BN networks")
    p.set_defaults(handler=cmd_models)

    p = sub.add_parser(
        "serve",
        help="serve the model repository over the Open Inference Protocol (not yet built)",
        description="Serve models/<name>/<version>/model.onnx through ONNX Runtime over the "
        "Open Inference Protocol (KServe v2). Not part of this release yet.",
    )
    p.set_defaults(handler=cmd_serve)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story; imported only once a command ran."""
    errors: list[type[BaseException]] = [UsageError]
    if "training.errors" in sys.modules:
        errors.append(sys.modules["training.errors"].TrainingError)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
