"""The ``pneumo`` command line: thin argument parsing over the library; heavy imports stay lazy."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from pneumo.config import Gate, Settings, TrainConfig
from pneumo.errors import PneumoError, redact

ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up banner buries our progress lines; errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _progress(label: str) -> Callable[[int, int], None] | None:
    """A one-line progress counter on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{label}: {done}/{total} ({100 * done // max(total, 1)}%)", end=end, file=sys.stderr, flush=True)

    return show


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], only: Sequence[str] | None = None) -> None:
    """One flag per field of a config model (``--image-size``, ``--augment/--no-augment``), defaults from the model."""
    for name, field in model.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        text = f"{field.description or ''} (default {field.get_default(call_default_factory=True)})".strip()
        text = text.replace("%", "%%")  # argparse formats help with %: "95 % interval" would crash --help
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            types = get_args(field.annotation) or (field.annotation,)  # float | None → (float, None)
            kind = next((t for t in (int, float) if t in types), str)
            parser.add_argument(flag, dest=name, type=kind, default=None, help=text)


def _model_from_flags(args: argparse.Namespace, model: type[ConfigModel]) -> ConfigModel:
    """A config model from the flags that were given; the rest keep the model's defaults."""
    given = {name: value for name in model.model_fields if (value := getattr(args, name, None)) is not None}
    return model.model_validate(given)


def _cmd_synth(args: argparse.Namespace) -> int:
    """Generate into OUT; ``synth s3://...`` (generated in a temp folder) or ``synth OUT --to s3://...`` uploads too."""
    import contextlib
    import tempfile

    from pneumo.data.storage import parse_source, upload_tree
    from pneumo.data.synthetic import generate_dataset
    from pneumo.errors import StorageError

    target = args.to or (args.out if args.out.startswith("s3://") else None)
    if target and (dest := parse_source(target)).scheme != "s3":  # a bad URI fails before minutes of generation
        raise StorageError(f"upload target must be an s3:// URI, got {target!r}")
    folder = tempfile.TemporaryDirectory(prefix="pneumo-synth-") if target == args.out else contextlib.nullcontext()
    with folder as scratch:
        local = Path(scratch or args.out)
        report = generate_dataset(local, seed=args.seed, scale=args.scale, image_kind=args.image_size,
                                  progress=_progress("generating"))
        upload = upload_tree(local / "chest_xray", f"s3://{dest.bucket}/{dest.base}chest_xray",
                             endpoint_url=args.endpoint_url, progress=_progress("uploading")) if target else None
    if args.json:
        _print_json({**report.to_dict(), "upload": upload.to_dict()} if upload else report.to_dict())
    elif upload:
        print(f"wrote {report.images} images; uploaded {upload.uploaded} files "
              f"({upload.unchanged} unchanged) to {target}")
    else:
        print(f"wrote {report.images} images to {args.out}")
    return 0


def _print_counts(counts: dict[str, dict[str, int]], width: int, skipped: dict[str, int]) -> None:
    """Images per split and label, then the files left out, by reason."""
    for split, by_label in counts.items():
        print(f"  {split:<{width}}" + "  ".join(f"{label} {count}" for label, count in by_label.items()))
    for reason, count in skipped.items():
        print(f"  skipped {count} ({reason})")


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pneumo.data.storage import sync

    cache = args.cache or Settings().home / "cache"
    result = sync(args.source, cache, endpoint_url=args.endpoint_url, workers=args.workers,
                  progress=_progress("ingesting"))
    if args.csv:
        result.frame.to_csv(args.csv, index=False)
    report = result.report
    if args.json:
        _print_json(report.to_dict())
        return 0
    print(f"{report.images} images from {report.source}: {report.downloaded} downloaded "
          f"({report.bytes_downloaded} bytes), {report.reused} reused, {report.removed} removed, "
          f"{len(report.skipped)} skipped in {report.seconds:.1f} s")
    _print_counts(report.counts, 6, report.skipped_by_reason())
    print(f"fingerprint {result.fingerprint}")
    print(f"dataset folder {result.root}")
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from pneumo.pipeline import prepare_source

    config = TrainConfig(val_fraction=args.val_fraction, seed=args.seed)
    with _held_cache(args.data):  # a pneumo cache read in place: held while its images are checked
        data = prepare_source(str(args.data), Settings(), config, log=_log, progress=_progress("checking images"))
    if args.csv:
        data.frame.to_csv(args.csv, index=False)
    if args.json:
        _print_json(data.report)
    else:
        bad = {"bad-image": len(data.report["bad_images"])} if data.report["bad_images"] else {}
        print(f"{data.report['images']} images, {data.report['patients']} patients")
        _print_counts(data.report["subsets"], 11, data.report["ingest"]["skipped_by_reason"] | bad)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from pneumo.pipeline import best_candidate, check_memory, prepare_source, run_candidate
    from pneumo.promotion.leaderboard import format_leaderboard, leaderboard
    from pneumo.training.models import list_models, model_spec

    models = list_models() if args.model == "all" else args.model.split(",")
    for name in models:
        model_spec(name)  # fails fast on a bad name, before data work
    config = _model_from_flags(args, TrainConfig)
    gate = _model_from_flags(args, Gate)
    with _held_cache(args.data):  # a pneumo cache read in place: no sync may rewrite it while training reads
        data = prepare_source(str(args.data), Settings(), config, log=_log)
        check_memory(models, config, data.report["images"], parallel=1, log=_log)  # one candidate at a time here
        subsets = ", ".join(f"{s} {sum(c.values())}" for s, c in data.report["subsets"].items())
        _log(f"dataset: {subsets}; class weights {({k: round(v, 2) for k, v in data.class_weight.items()})}")
        results = [run_candidate(name, data, config, args.out, score_weight=gate.score_weight, log=_log)
                   for name in models]
    best = best_candidate(results)
    if args.json:
        _print_json({"data": data.report, "candidates": [r.summary() for r in results],
                     "best": best.name if best else None})
    else:
        print(format_leaderboard(leaderboard(results)))
        print("score = (w·recall + specificity)/(w+1) on validation at the tuned threshold; other columns on test")
        print(f"best: {best.name} (score {best.score:.3f})" if best else "best: none (every candidate failed)")
    return 0 if best else 1


def _registry_target(args: argparse.Namespace) -> tuple[str, str]:
    """(tracking URI, registered model) from flags or settings; fails fast if MLflow is unreachable."""
    from pneumo.mlflow_client import check_tracking_server

    settings = Settings()
    uri = args.tracking_uri or settings.tracking_uri
    check_tracking_server(uri)
    return uri, args.model or settings.registered_model


def _with_intervals(metrics: dict[str, float], intervals: dict[str, list[float]]) -> str:
    """``recall 0.9500 [0.9100, 0.9700], …`` for the gate's metrics."""
    from pneumo.promotion.leaderboard import with_interval

    return ", ".join(f"{name} {with_interval(metrics[name], intervals.get(name))}"
                     for name in ("recall", "specificity", "roc_auc", "selection_score") if name in metrics)


def _print_champion(info: dict[str, Any]) -> None:
    metrics = info["metrics"]
    values = {key.removeprefix("test_"): value for key, value in metrics.items() if ".ci_" not in key}
    intervals = {key.removeprefix("test_"): [metrics[f"{key}.ci_low"], metrics[f"{key}.ci_high"]]
                 for key in metrics if f"{key}.ci_low" in metrics}
    print(f"{info['model']} version {info['version']} ({info['candidate']}) {info['uri']}")
    print(f"  threshold {info['threshold']:.4f}; test {_with_intervals(values, intervals)}; "
          f"test score {metrics.get('test_score', float('nan')):.4f}, validation score "
          f"{metrics.get('selection_score', float('nan')):.4f}")
    decision = info.get("decision") or {}
    if "score_diff" in decision:
        print(f"  promoted over the previous champion: score difference {decision['score_diff']:.4f} "
              f"[{decision['score_diff.ci_low']:.4f}, {decision['score_diff.ci_high']:.4f}] on "
              f"{int(decision.get('n_test_images', 0))} images ({decision.get('method', '')})")
    print(f"  run {info['run_id']} (retraining {info['parent_run_id']}), registered {info['created']}")


def _cmd_champion(args: argparse.Namespace) -> int:
    from pneumo.promotion.audit import verify_version
    from pneumo.promotion.registry import champion_info

    uri, model = _registry_target(args)
    info = champion_info(model, tracking_uri=uri)
    if info is not None and not args.card and not args.no_audit:  # do the served files still match the registered?
        audit = verify_version(model, info["version"], tracking_uri=uri)
        info["audit"] = {"ok": audit.ok, "state": audit.state, "problems": audit.problems}
    if args.card and info is not None:
        print(info["card"] or f"{model} version {info['version']} has no model card")
    elif args.json:
        _print_json(info)
    elif info is None:
        print(f"{model} has no champion yet")
    else:
        _print_champion(info)
        print(f"  audit: {info['audit']['state']}" if "audit" in info else "  audit: not checked (--no-audit)")
    return 0 if info is not None else 1


def _print_audit(report: Any) -> None:
    """The bundle's headline facts, then whether everything still matches."""
    bundle = report.bundle or {}
    print(f"{report.model} version {report.version}")
    if bundle:
        data, test, code = bundle["dataset"], bundle["test_set"], bundle["code"]
        decision, training, approval = bundle["decision"], bundle["training"], bundle["approval"]
        print(f"  data: {data['source']} (fingerprint {data['fingerprint']})")
        print(f"  test set: sha256 {test['sha256']}, {test['images']} images of {test['patients']} patients "
              f"({', '.join(f'{n} {name}' for name, n in sorted(test['per_class'].items()))})")
        print(f"  code: {code['version']}{' (uncommitted changes)' if code['dirty'] == 'true' else ''}; "
              f"{len(bundle['environment']['packages'])} packages; seed {training['seed']}")
        print(f"  decision: {decision['outcome']}: {decision['reason']}")
        print(f"  approval: {approval.get('status')}"
              + (f" by {approval.get('approver')} at {approval.get('at')}: {approval.get('reason', '')}"
                 if approval.get("required") else ""))
    print(f"  {report.state}")


def _cmd_audit(args: argparse.Namespace) -> int:
    from pneumo.promotion.audit import verify_version
    from pneumo.promotion.registry import champion_info

    uri, model = _registry_target(args)
    version = args.version
    if version is None:
        info = champion_info(model, tracking_uri=uri)
        if info is None:
            raise PneumoError(f"{model} has no champion: name a version with --version")
        version = info["version"]
    report = verify_version(model, str(version), tracking_uri=uri)
    if args.json:
        _print_json({"model": report.model, "version": report.version, "ok": report.ok, "state": report.state,
                     "problems": report.problems, "files_checked": report.files_checked, "bundle": report.bundle})
    else:
        _print_audit(report)
    return 0 if report.ok else 1


def _cmd_rollback(args: argparse.Namespace) -> int:
    from pneumo.promotion.registry import champion_info, rollback

    uri, model = _registry_target(args)
    expected = args.expect_champion
    if expected is None:  # the champion the operator sees now: a promotion landing while this waits is not undone
        seen = champion_info(model, tracking_uri=uri)
        expected = seen["version"] if seen else None
    info = rollback(model, tracking_uri=uri, expect_champion=expected)
    if args.json:
        _print_json(info)
    else:
        print(f"rolled back: champion is version {info['version']} again (version {info['rolled_back']} demoted)")
        _print_champion(info)
    return 0


def _held_cache(data: Path) -> AbstractContextManager[Any]:
    """The shared cache lock when ``data`` is a pneumo cache (``pneumo ingest`` prints one as the dataset
    folder, and a retraining's sync rewrites it): held, no sync can change the files while they are read."""
    from pneumo.data.storage import META_DIR, reading

    for root in (data, data.parent if data.name == "chest_xray" else None):
        if root is not None and (root / META_DIR).is_dir():
            return reading(root)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _promotion_test_set(args: argparse.Namespace, run_id: str, uri: str) -> Iterator[Any]:
    """The test split of ``--data``, or of the retraining's own dataset source (synced like the flow does),
    held for reading until the block exits: the gate reads the files a chunk at a time."""
    from pneumo.data.storage import parse_source
    from pneumo.evaluation.holdout import read_test_set
    from pneumo.pipeline import ingest, materialized
    from pneumo.promotion.runs import retraining_dataset

    settings = Settings()
    given = parse_source(args.data) if args.data else None  # refuses credentials without echoing them
    if given is not None and given.path is not None:
        with _held_cache(given.path):  # the user's folder, or a cache read in place
            result = ingest(args.data, settings)
            yield read_test_set(result.root, result.frame)
        return
    source, fingerprint = (args.data, None) if args.data else retraining_dataset(run_id, tracking_uri=uri)
    _log(f"syncing the dataset {source} ...")
    result = ingest(source, settings, progress=_progress("syncing"))
    if fingerprint and result.fingerprint != fingerprint:
        _log(f"note: {source} changed since the retraining (fingerprint {result.fingerprint[:12]} "
             f"vs {fingerprint[:12]}); evaluating on the current test split")
    test_rows = result.frame[result.frame["split"] == "test"]
    # As the flow does: a sync (another retraining starting) must not change the files being scored.
    with materialized(test_rows, source, settings) as root:
        yield read_test_set(root, test_rows)


def _cmd_promote(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from pneumo.promotion.registry import promote
    from pneumo.promotion.runs import latest_retraining

    gate = _model_from_flags(args, Gate)  # a bad flag fails before any MLflow or data work
    uri, model = _registry_target(args)
    run_id = args.run_id or latest_retraining(args.experiment or Settings().experiment, tracking_uri=uri)
    with _promotion_test_set(args, run_id, uri) as test:
        decision = promote(run_id, test, gate=gate, model_name=model, tracking_uri=uri, dry_run=args.dry_run)
    if args.json:
        _print_json(decision.record())
    else:
        print(f"{decision.outcome}: {decision.candidate} from retraining {run_id}"
              + (f" → version {decision.version}" if decision.version else ""))
        print("  test " + _with_intervals(decision.evaluation.metrics, decision.record()["intervals"])
              + f" ({decision.n_test_images} images, {decision.n_test_patients} patients)")
        print(f"  {decision.reason}")
        print(f"  why: {decision.selected_because}")
    return 0


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (1..65535): {text!r}")
    return int(text)


def _version(text: str) -> str:
    """A registry version number (MLflow's are 1, 2, …)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a version is a whole number from 1, got {text!r}")
    return str(int(text))


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _cmd_serve(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from pneumo.serving.server import serve

    uri, model = _registry_target(args)
    return serve(uri, model, args.alias, host=args.host, port=args.port, poll_seconds=args.poll_seconds,
                 webhook_url=args.webhook_url, log=_log)


def _add_registry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered model (default PNEUMO_REGISTERED_MODEL or pneumonia-classifier)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default MLFLOW_TRACKING_URI / PNEUMO_TRACKING_URI)")
    parser.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="pneumo", description="Train and retrain pneumonia-vs-normal chest X-ray classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="generate a chest X-ray-like dataset in the Kaggle layout")
    synth.add_argument("out", help="output folder, or s3://bucket/prefix to generate and upload")
    synth.add_argument("--to", metavar="S3_URI", help="also upload the generated dataset to s3://bucket/prefix")
    synth.add_argument("--endpoint-url", help="S3 endpoint (MinIO); default PNEUMO_S3_ENDPOINT_URL/AWS_ENDPOINT_URL_S3")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scale", type=float, default=0.05, help="fraction of the real dataset's counts")
    synth.add_argument("--image-size", choices=("small", "real"), default="small",
                       help="small: ~48-96 px (tests); real: ~900-2000 px like the Kaggle images")
    synth.add_argument("--json", action="store_true")
    synth.set_defaults(handler=_cmd_synth)

    ingest = sub.add_parser("ingest", help="sync a dataset from s3://bucket/prefix (or a folder) into a local cache")
    ingest.add_argument("source", help="s3://bucket/prefix, file:///path or a folder holding chest_xray/")
    ingest.add_argument("--cache", type=Path, help="local cache folder (default PNEUMO_HOME/cache)")
    ingest.add_argument("--endpoint-url", help="S3 endpoint (MinIO); default PNEUMO_S3_ENDPOINT_URL/AWS_ENDPOINT_URL_S3")
    ingest.add_argument("--workers", type=int, default=16, help="parallel downloads")
    ingest.add_argument("--csv", type=Path, help="also write the manifest as CSV")
    ingest.add_argument("--json", action="store_true", help="print the ingest report as JSON")
    ingest.set_defaults(handler=_cmd_ingest)

    manifest = sub.add_parser("manifest", help="validate a local dataset and report its counts")
    manifest.add_argument("data", type=Path, help="folder holding chest_xray/")
    manifest.add_argument("--val-fraction", type=float, default=0.15)
    manifest.add_argument("--seed", type=int, default=42)
    manifest.add_argument("--csv", type=Path, help="also write the manifest as CSV")
    manifest.add_argument("--json", action="store_true")
    manifest.set_defaults(handler=_cmd_manifest)

    train = sub.add_parser("train", help="train candidates on a local dataset and print a leaderboard")
    train.add_argument("model", help="a model name, a comma list of them, or 'all'")
    train.add_argument("--data", type=Path, required=True, help="folder holding chest_xray/")
    _add_model_flags(train, TrainConfig)
    _add_model_flags(train, Gate, only=("score_weight",))
    train.add_argument("--out", type=Path, default=Path(".pneumo/runs"), help="where plots go")
    train.add_argument("--json", action="store_true", help="print machine-readable results")
    train.set_defaults(handler=_cmd_train)

    promote = sub.add_parser("promote", help="gate a retraining's best candidate against the champion")
    promote.add_argument("run_id", nargs="?", help="retraining (parent) run id (default: the latest in --experiment)")
    promote.add_argument("--data", help="folder holding chest_xray/, or s3://bucket/prefix, whose test split to "
                         "evaluate on (default: the retraining's own dataset source); a pneumo cache folder is "
                         "held for reading, waiting at most PNEUMO_CACHE_LOCK_TIMEOUT seconds (default 1800)")
    promote.add_argument("--experiment", help="MLflow experiment (default PNEUMO_EXPERIMENT)")
    promote.add_argument("--dry-run", action="store_true", help="decide and print; change nothing")
    # Not the approval fields: only the retrain flow can pause for a person's sign-off.
    _add_model_flags(promote, Gate, only=[name for name in Gate.model_fields if not name.startswith("approval")])
    _add_registry_flags(promote)
    promote.set_defaults(handler=_cmd_promote)

    rollback = sub.add_parser("rollback", help="point champion back at previous-champion")
    rollback.add_argument("--expect-champion", type=_version, metavar="N",
                          help="roll back only if version N is still the champion once the promotion lock is "
                          "held (default: the champion when the command starts)")
    _add_registry_flags(rollback)
    rollback.set_defaults(handler=_cmd_rollback)

    champion = sub.add_parser("champion", help="show the current champion (version, metrics, threshold, run)")
    champion.add_argument("--card", action="store_true", help="print the champion's model card (Markdown)")
    champion.add_argument("--no-audit", action="store_true", help="skip verifying the champion's files (it "
                          "downloads the whole model; `pneumo audit` verifies on its own)")
    _add_registry_flags(champion)
    champion.set_defaults(handler=_cmd_champion)

    audit = sub.add_parser("audit", help="print a version's audit bundle and verify its files against the "
                           "checksums recorded at registration (exit 1 naming each changed, missing or added file)")
    audit.add_argument("--version", type=_version, help="registered version (default: the champion)")
    _add_registry_flags(audit)
    audit.set_defaults(handler=_cmd_audit)

    serve = sub.add_parser("serve", help="serve the version an alias points at over MLflow's scoring protocol, "
                           "following the alias as it moves")
    serve.add_argument("--model", help="registered model (default PNEUMO_REGISTERED_MODEL or pneumonia-classifier)")
    serve.add_argument("--alias", default="champion", help="registry alias to follow (default champion)")
    serve.add_argument("--tracking-uri", help="MLflow URI (default MLFLOW_TRACKING_URI / PNEUMO_TRACKING_URI)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=5001, help="TCP port (default 5001)")
    serve.add_argument("--poll-seconds", type=_seconds, default=30.0, help="how often to check the alias (default 30)")
    serve.add_argument("--webhook-url", help="URL at which the tracking server reaches this server's webhook "
                       "(e.g. http://scorer:5001/webhook); polling stays on as the fallback")
    serve.set_defaults(handler=_cmd_serve)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; expected failures print one line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValidationError as error:  # a ValueError too: caught first
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        print(f"pneumo: error: invalid parameter: {problems}", file=sys.stderr)
        return 2
    except (PneumoError, OSError, ValueError) as error:  # OSError: a folder where a file goes, and the like
        print(f"pneumo: error: {redact(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:
        if type(error).__module__.split(".")[0] != "mlflow":  # a bug of ours: keep its traceback
            raise
        # An unknown run id, or a tracking server that answered the start-up check and then failed.
        from pneumo.mlflow_client import one_line

        print(f"pneumo: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pneumo ... --json | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
