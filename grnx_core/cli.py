"""The ``grnx`` command: run, validate and show recipes, list plugins, inspect and clear the cache,
open the MLflow UI.

User errors (bad recipes, missing files, bad data) exit with status 2 and a short message; a
traceback is printed only with ``--debug``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

from grnx_core import __version__
from grnx_core.components import Kind
from grnx_core.errors import GrnxError, RecipeError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def _recipe_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


# -- commands -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from grnx_core.cache import Cache
    from grnx_core.recipe import load_recipe
    from grnx_core.runner import run_recipe

    resolved = load_recipe(args.recipe, args.overrides)
    cache = Cache(enabled=resolved.recipe.cache and not args.no_cache)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        result = run_recipe(
            resolved, tracking_uri=args.tracking_uri, track=not args.no_track, cache=cache, show_progress=True
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_summary(resolved, result, args)
    return 0


def _print_summary(resolved: Any, result: Any, args: argparse.Namespace) -> None:
    """The compact end-of-run summary; ``--verbose`` adds every metric and the top pairs."""
    from grnx_core.summary import headline_table, stage_line

    recipe = resolved.recipe
    nested = f", {len(result.children)} child runs" if result.children else ""
    print(
        f"run {result.run_id or '(not tracked)'}: {result.status} ({recipe.name} v{recipe.version}{nested})"
    )
    for line in headline_table(result.metrics, list(result.interactions)):
        print(f"  {line}")
    print(f"  {stage_line(result.stages)}")
    if args.verbose and result.metrics:
        width = max(len(name) for name in result.metrics)
        for name in sorted(result.metrics):
            print(f"  {name:<{width}}  {result.metrics[name]:.6g}")
    if args.verbose:
        for step_id, interactions in result.interactions.items():
            top = interactions.table.head(5)
            pairs = ", ".join(f"{s}-{t}" for s, t in zip(top["source"], top["target"]))
            print(f"  {step_id}: {len(interactions)} pairs; top: {pairs}")
    if result.run_id:
        if result.artifact_uri:
            print(f"  artifacts: {result.artifact_uri}")
        print(f"  view: grnx ui, then http://127.0.0.1:5000 (experiment {recipe.tracking.experiment!r})")
    if not args.verbose:
        print("  (--verbose lists every metric)")


def cmd_validate(args: argparse.Namespace) -> int:
    from grnx_core.recipe import load_recipe

    files = _recipe_files(args.paths)
    if not files:
        raise GrnxError(f"no recipe files found in {', '.join(args.paths)} (looked for *.yaml / *.yml).")
    failures = 0
    for path in files:
        try:
            load_recipe(path, args.overrides)
        except RecipeError as error:
            failures += 1
            print(f"invalid: {path}\n{textwrap.indent(str(error), '  ')}", file=sys.stderr)
        else:
            print(f"ok: {path}")
    return EXIT_USER_ERROR if failures else 0


def cmd_show(args: argparse.Namespace) -> int:
    from grnx_core.recipe import load_recipe

    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
    return 0


def _type_name(annotation: Any) -> str:
    import typing

    if typing.get_args(annotation) or not hasattr(annotation, "__name__"):
        return str(annotation).replace("typing.", "").replace("pathlib.", "")
    return annotation.__name__


def _describe_params(cls: Any) -> list[str]:
    lines = []
    fields = cls.Params.model_fields.items()
    # Required params first: inherited params (shared mixins) would otherwise lead the list.
    for name, info in sorted(fields, key=lambda item: not item[1].is_required()):
        default = (
            "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        )
        annotation = _type_name(info.annotation)
        lines.append(f"      {name} ({annotation}, {default}): {info.description or ''}".rstrip(": "))
    return lines


def cmd_plugins(args: argparse.Namespace) -> int:
    from grnx_core.registry import default_registry

    registry = default_registry()
    kinds = [Kind(args.kind)] if args.kind else list(Kind)
    for kind in kinds:
        names = registry.names(kind)
        if args.name is not None:
            names = [registry.entry(kind, args.name).name]
        print(f"{kind.plural} ({len(names)}):")
        for name in names:
            entry = registry.entries[kind][name]
            try:
                cls = entry.load()
            except GrnxError as error:
                print(f"  {name}  [failed to load] {error}")
                continue
            print(f"  {name}: {cls.description}  [{entry.plugin} {entry.plugin_version}]")
            if args.kind:
                if cls.reference:
                    print(f"    reference: {cls.reference}")
                params = _describe_params(cls)
                print("    params:" if params else "    params: none")
                for line in params:
                    print(line)
    problems = registry.problems()
    if problems:
        print("\nproblems:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from grnx_core.tracking import artifact_root_for, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    artifact_root = artifact_root_for(uri)
    if artifact_root is not None:
        command += ["--default-artifact-root", artifact_root.resolve().as_uri()]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it.", file=sys.stderr)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def cmd_cache(args: argparse.Namespace) -> int:
    import difflib
    from datetime import datetime, timezone

    from grnx_core.cache import Cache, format_duration, format_size, parse_duration

    cache_dir = getattr(args, "cache_dir", None)
    cache = Cache(Path(cache_dir).expanduser() if cache_dir else None)
    root = cache.root.absolute()
    now = datetime.now(timezone.utc)

    def when(moment: datetime) -> str:
        age = now - moment
        ago = "just now" if age.total_seconds() < 60 else f"{format_duration(age)} ago"
        return f"{moment.astimezone():%Y-%m-%d %H:%M} ({ago})"

    def entries(count: int) -> str:
        return f"{count} entr{'y' if count == 1 else 'ies'}"

    if args.cache_command == "info":
        summary = list(cache.info().values())
        print(f"cache: {root}")
        if not summary:
            print("no entries")
            return 0
        header = ("stage", "entries", "size", "last used", "least recently used")
        rows = [
            (s.stage, str(s.n_entries), format_size(s.n_bytes), when(s.newest_use), when(s.oldest_use))
            for s in summary
        ]
        rows.append(
            (
                "total",
                str(sum(s.n_entries for s in summary)),
                format_size(sum(s.n_bytes for s in summary)),
                when(max(s.newest_use for s in summary)),
                when(min(s.oldest_use for s in summary)),
            )
        )
        widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
        for row in [header, *rows]:
            # Counts and sizes right-aligned, so their magnitudes line up.
            cells = [
                cell.rjust(width) if column in (1, 2) else cell.ljust(width)
                for column, (cell, width) in enumerate(zip(row, widths))
            ]
            print("  ".join(cells).rstrip())
        return 0

    older_than = None
    if args.older_than is not None:
        try:
            older_than = parse_duration(args.older_than)
        except GrnxError as error:
            raise GrnxError(f"--older-than: {error}") from None
    if args.stage is not None:
        stages = cache.stages()
        close = difflib.get_close_matches(args.stage, stages, n=1)
        if args.stage.replace(":", "_") not in stages and close:
            raise GrnxError(
                f"no stage {args.stage!r} in the cache at {root}. Did you mean {close[0]!r}? "
                f"Stages there: {', '.join(stages)}."
            )
    if not args.yes and not sys.stdin.isatty():
        raise GrnxError(
            "grnx cache clear asks before removing anything, but stdin is not a terminal; "
            "pass --yes to remove without asking."
        )
    scope = "".join(
        [
            f"of stage {args.stage} " if args.stage is not None else "",
            f"not used for {args.older_than} " if older_than is not None else "",
        ]
    )
    n_entries, n_bytes = cache.clear(older_than, args.stage, dry_run=True)
    if n_entries == 0:
        print(f"nothing to remove {scope}in {root}")
        return 0
    if not args.yes:
        try:
            answer = input(f"remove {entries(n_entries)} ({format_size(n_bytes)}) {scope}from {root}? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing removed")
            return 0
    n_entries, n_bytes = cache.clear(older_than, args.stage)
    print(f"removed {entries(n_entries)} ({format_size(n_bytes)}) {scope}from {root}")
    return 0


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the command; the command's copy must not reset the other.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    parser = argparse.ArgumentParser(
        prog="grnx",
        description="Gene-gene interactions from single-cell data, as tracked experiments.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"grnx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run a recipe and track it in MLflow")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help="overrides such as seed=1 model.params.n_layers=2")
    run.add_argument("--no-cache", action="store_true", help="recompute every step")
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    run.add_argument("--verbose", "-v", action="store_true", help="print every metric and the top pairs")
    run.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", parents=[common], help="check recipes without running them")
    validate.add_argument("paths", nargs="+", help="recipe files or folders of recipes")
    validate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override to apply before validating (repeatable)",
    )
    validate.set_defaults(handler=cmd_validate)

    show = commands.add_parser("show", parents=[common], help="print the resolved recipe")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(handler=cmd_show)

    plugins = commands.add_parser("plugins", parents=[common], help="list installed components")
    plugins.add_argument(
        "kind", nargs="?", choices=[k.value for k in Kind], help="only this kind, with params"
    )
    plugins.add_argument("name", nargs="?", help="only this component")
    plugins.set_defaults(handler=cmd_plugins)

    ui = commands.add_parser("ui", parents=[common], help="open the MLflow UI on the grnx store")
    ui.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", default=None)
    ui.set_defaults(handler=cmd_ui)

    # --cache-dir is accepted before or after the action, like --debug.
    cache_dir = argparse.ArgumentParser(add_help=False)
    cache_dir.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="cache folder (default: GRNX_CACHE_DIR or ~/.cache/grnx)",
    )
    cache = commands.add_parser(
        "cache", parents=[common, cache_dir], help="inspect or clear the cache of finished steps"
    )
    cache_actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    cache_actions.add_parser("info", parents=[common, cache_dir], help="entries, size and last use per stage")
    clear = cache_actions.add_parser(
        "clear", parents=[common, cache_dir], help="remove cache entries (asks first)"
    )
    clear.add_argument(
        "--older-than", metavar="AGE", default=None, help="only entries not used for AGE, e.g. 7d, 12h or 30m"
    )
    clear.add_argument("--stage", default=None, help="only entries of this stage, e.g. model or tokenize")
    clear.add_argument(
        "--yes", "-y", action="store_true", help="remove without asking (needed without a terminal)"
    )
    cache.set_defaults(handler=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except GrnxError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:  # missing or unreadable files named by the user
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; the run is marked FAILED and finished steps stay cached.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        print(
            f"error: unexpected {type(error).__name__}: {error}\n"
            "This is a bug in grnx or a plugin; rerun with --debug for the traceback and report it.",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
