"""`kdsearch`: the command line. Every user mistake ends in one clear message, never a traceback."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from kd.errors import Interrupted, KDError, UserError
from search import presets
from search.format import shown

log = logging.getLogger("kd")


def load(args: argparse.Namespace):
    path = presets.config_path(args.config)  # a missing file is said before anything heavy loads
    from search.config import load_config
    return load_config(path, args.set)


def setup_logging(quiet: bool) -> None:
    class Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = super().format(record)
            return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Format("%(message)s"))
    for name in ("kd", "search"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
        logger.propagate = False


def resume_hint(args: argparse.Namespace) -> str | None:
    """The command that continues an interrupted search (None for commands that are not searches)."""
    sets = "".join(f" --set {s}" for s in args.set) if hasattr(args, "set") else ""
    if args.command == "search":
        where = "".join(f" --{flag} {getattr(args, flag)}" for flag in ("address", "storage") if getattr(args, flag))
        return f"kdsearch search {args.config}{sets}{where} --resume"
    if args.command == "demo":
        return f"kdsearch demo{sets}"
    return None


# -------------------------------------------------------------------------------------------- commands

def cmd_distill(args: argparse.Namespace) -> int:
    cfg = load(args)  # a config error is answered before the training modules load
    from kd.distill import run_distill
    run_distill(cfg, args.out, progress=not args.quiet)
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    cfg = load(args)
    from kd.distill import run_teacher
    run_teacher(cfg, progress=not args.quiet)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from kd.evaluate import evaluate_export
    data = presets.config_path(args.data) if presets.is_preset(args.data) else args.data
    evaluate_export(args.model, data, args.out, args.file_column, args.label_column, args.images or "",
                    progress=not args.quiet)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from kd.predict import run_predict
    print(run_predict(args.model, args.images, args.out, progress=not args.quiet))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    cfg = load(args)  # a config error is answered before Ray loads
    from search.driver import run_search
    run_search(cfg, address=args.address, storage=args.storage, resume=args.resume, quiet=args.quiet,
               resume_command=resume_hint(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.driver import run_search
    print("kd-search demo: a search over distillation hyperparameters on scikit-learn's handwritten digits "
          "('8' vs the rest, ~10% minority)")
    run_dir = run_search(load_config(presets.config_path("digits"), args.set), quiet=args.quiet,
                         resume_command=resume_hint(args))
    best = shown(run_dir / "best")
    print(f"\nDone. Read {shown(run_dir / 'summary.md')} (tables and plots), {shown(run_dir / 'trials.csv')} "
          f"(every trial), and use the best student in {best}:\n"
          f"  kdsearch evaluate {best} digits\n  kdsearch predict {best} IMAGES...")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from search.report import analyze
    print(analyze(args.run_dir))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from search.compare import compare
    print(compare(args.run_dirs, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search.finalize import export_command
    print(export_command(args.run_dir, args.trial, args.out, args.final))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from search.configdoc import annotated_yaml
    cfg = load(args)
    sets = "".join(f" --set {s}" for s in args.set)
    print(annotated_yaml(cfg, f"kd-search {version().split()[0]}: {args.config}{sets}, resolved (every key, its "
                              f"meaning beside it).\nSave it and run it: kdsearch search FILE"), end="")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    print(presets.listing())
    return 0


# ---------------------------------------------------------------------------------------------- parser

def version() -> str:
    """The installed kd-search's version, with torch's, Ray's, Optuna's and timm's (what a bug report needs), read
    from the packages' metadata: nothing heavy is imported."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"
    return f"{of('kd-search')} (torch {of('torch')}, ray {of('ray')}, optuna {of('optuna')}, timm {of('timm')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdsearch", description="Hyperparameter search for knowledge distillation "
                                     "on small, imbalanced image datasets.")
    parser.add_argument("--version", action="version", version=f"kdsearch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", metavar="CONFIG", help="a YAML config file or a preset name (kdsearch presets)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set distill.temperature=4 (repeatable)")
        return p

    def quiet(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--quiet", "-q", action="store_true", help="only warnings, errors and results")
        return p

    p = quiet(with_config(sub.add_parser("distill", help="fine-tune the teacher (cached) and distil one student")))
    p.add_argument("--out", help="output folder (default: OUTPUT_DIR/NAME/distill)")
    p.set_defaults(func=cmd_distill)

    p = quiet(with_config(sub.add_parser("teacher", help="prepare only the teacher and its cached logits")))
    p.set_defaults(func=cmd_teacher)

    p = quiet(sub.add_parser("evaluate", help="metrics and a confusion matrix of an exported student"))
    p.add_argument("model", metavar="MODEL", help="an exported student folder")
    p.add_argument("data", metavar="DATA", help="a folder of class folders, a labelled CSV, 'digits', or a config "
                   "(its test split)")
    p.add_argument("--images", help="CSV: the folder image names are relative to (default: the CSV's folder)")
    p.add_argument("--file-column", default="file", help="CSV: the file-name column (default: file)")
    p.add_argument("--label-column", default="label", help="CSV: the label column (default: label)")
    p.add_argument("--out", default="results/evaluate", help="where the PNG and metrics.json go")
    p.set_defaults(func=cmd_evaluate)

    p = quiet(sub.add_parser("predict", help="predict classes of image files with an exported student"))
    p.add_argument("model", metavar="MODEL", help="an exported student folder, or its model.onnx or model.pt2")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files or folders")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    p.set_defaults(func=cmd_predict)

    p = quiet(with_config(sub.add_parser("search", help="run (or resume) a Ray Tune + Optuna search")))
    p.add_argument("--address", help="join a Ray cluster: 'auto' or ray://HOST:10001 (default: start Ray here)")
    p.add_argument("--storage", help="where the experiment lives: a shared path or s3://... (clusters)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (the same command "
                   "on an existing experiment does this too)")
    p.set_defaults(func=cmd_search)

    p = quiet(sub.add_parser("demo", help="a complete search on the built-in digits data (a few minutes on a CPU)"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the demo")
    p.set_defaults(func=cmd_demo)

    p = quiet(sub.add_parser("analyze", help="rebuild tables and plots from a search directory"))
    p.add_argument("run_dir", metavar="RUN_DIR", help="results/<name> of a search (finished, running or interrupted)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="several searches side by side: winners, test figures, cost, time")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="results/<name> of two or more searches")
    p.add_argument("--out", default="results/compare", help="where compare.csv, .md and .png go")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a trial's student (default: the best)")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--trial", help="trial id (see trials.csv); default: the search's pick (its re-ranked winner)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--final", choices=["checkpoint", "refit", "ensemble", "distilled"], help="how it ships "
                   "(kd/shipping.py): a holdout trial's checkpoint; with folds, the trial refitted on all the data, "
                   "its fold students averaged, or one student distilled from them on all the data (default: the "
                   "search's search.final)")
    p.set_defaults(func=cmd_export)

    p = with_config(sub.add_parser("config", help="print a config resolved (a preset or file with its --set "
                                   "overrides, and every default) as YAML, each key's meaning beside it"))
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("presets", help="list the shipped presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except Interrupted as e:
        print(f"{e}\nresume with: {resume_hint(args) or 'the same command'}", file=sys.stderr)
        return 130
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt:
        hint = resume_hint(args)
        print("interrupted" + (f"; resume with: {hint}" if hint else ""), file=sys.stderr)
        return 130


def entry() -> None:
    """The `kdsearch` console script and `python -m search.cli`: `main`, then exit.

    Every object alive is frozen first (`gc.freeze`), so the interpreter's last garbage collections skip them:
    walking the millions of objects torch, timm and Ray leave behind took about 3 s after each `kdsearch
    distill` on this project's VM (the exit itself frees the memory; what the command wrote is already on disk).
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `kdsearch config digits | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own recipe: no second error at exit
        code = 0
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
