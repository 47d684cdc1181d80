"""The ``pacsnode`` command line."""

from __future__ import annotations

import argparse
import atexit
import gc
import getpass
import logging
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from models.base import QUEUES
from node.config import Config, ConfigError, load_config
from node.state import JobStateValues

if TYPE_CHECKING:
    from node.audit import AuditLog
    from node.state import StateDB

__all__ = ["main"]

logger = logging.getLogger("pacsnode")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_CONFIG = 2


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom (every association) and highdicom (every copied module) are chatty at INFO.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        sys.stderr.write(f"{path}: invalid configuration\n")
        for error in exc.errors:
            sys.stderr.write(f"  {error}\n")
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.app import Node

    Node(config, args.config).run()
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    import torch
    from celery.signals import worker_process_init

    from node.services import broker_url
    from workers.celery_app import app, configure, load_standard_tables, prepare_job_process
    from workers.inputs import create_preload_folder
    from workers.series import owned_cores
    from workers.stages import STAGES
    from workers.stages import configure as configure_stages

    # NVML, not a CUDA context, answers whether there is a GPU: job processes forked
    # after CUDA was initialised here could not use it.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    lanes = config.worker.concurrency
    if "gpu" in args.queue.split(",") and torch.cuda.is_available() and lanes > 1:
        # Jobs on one GPU only compete for its memory; one at a time, one worker per GPU.
        logger.warning("worker on the gpu queue with a GPU runs one model at a time")
        lanes = 1
    threads = max(1, owned_cores() // lanes)
    torch.set_num_threads(threads)
    configure(
        broker_url(config),
        job_timeout_seconds=config.worker.job_timeout_seconds,
        lease_seconds=config.worker.lease_seconds,
    )
    if config.worker.overlap:
        # Lock files for the stage slots, made before the job processes fork.
        stage_dir = Path(tempfile.mkdtemp(prefix="pacsnode-stages-"))
        atexit.register(shutil.rmtree, stage_dir, True)
        configure_stages(stage_dir, lanes)
    processes = lanes * len(STAGES) if config.worker.overlap else lanes
    if config.worker.preload:
        create_preload_folder()  # before the job processes fork
    load_standard_tables()
    # What is loaded by now (torch, highdicom's tables, the models) lives as long as
    # the worker: out of the garbage collector's sight, a job's collections do not
    # walk it (they took 0.1 s and more when a job made many objects at once).
    gc.freeze()
    if processes > 1:
        worker_process_init.connect(lambda **_: prepare_job_process(threads), weak=False)
        pool = ["--pool", "prefork", "--concurrency", str(processes), "-O", "fair"]
    else:
        pool = ["--pool", "solo"]
    app.worker_main(
        [
            "worker",
            "--queues",
            args.queue,
            "--hostname",
            # The pid keeps two workers on one host apart (Celery's ping and revokes).
            f"pacsnode-{args.queue.replace(',', '-')}-{os.getpid()}@{socket.gethostname()}",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            *pool,
        ]
    )
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.config import bundle_build_problems, folder_problems

    problems = folder_problems(config) + bundle_build_problems(config)
    if problems:
        sys.stderr.write(f"{args.file}: invalid configuration\n")
        for problem in problems:
            sys.stderr.write(f"  {problem}\n")
        return EXIT_BAD_CONFIG
    _out(
        f"{args.file}: OK ({len(config.rules)} rules, {len(config.destinations)} destinations, "
        f"{len(config.peers)} peers, broker {'embedded' if config.embedded_broker else 'external'})"
    )
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from models.registry import model_entries, refused_folders

    _out(f"models folder: {config.models_dir}")
    header = ("NAME", "VERSION", "FORMAT", "TASK", "QUEUE", "INPUT", "WEIGHTS SHA-256", "FROM")
    rows = [header]
    problems = []
    for entry in model_entries():
        cls = entry.cls
        accepts = cls.accepts
        taken = "/".join(accepts.modalities) or "any"
        if accepts.orientations:
            taken += " " + "/".join(str(o) for o in accepts.orientations)
        if accepts.min_slices > 1:
            taken += f" >={accepts.min_slices} slices"
        taken += f" ({cls.input_kind})"
        if cls.inputs:  # a multi-series model: its inputs, the reference first
            names = [str(cls.reference_input)] + [n for n in cls.inputs if n != cls.reference_input]
            taken += f" series {'+'.join(names)}"
        digest = cls.weights_sha256() if entry.problem is None else None
        rows.append(
            (
                cls.name,
                cls.version,
                cls.model_format,
                cls.task,
                cls.queue,
                taken,
                digest[:12] if digest else "-",
                entry.source,
            )
        )
        if entry.problem is not None:
            problems.append(f"{cls.name} ({entry.source}): {entry.problem}")
    problems.extend(refused_folders().values())
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    for problem in problems:
        _out(f"problem: {problem}")
    return EXIT_FAILED if problems else EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from models.registry import get_model_class
    from node import evaluate

    try:
        task = get_model_class(args.model).task
    except KeyError as exc:
        sys.stderr.write(f"cannot evaluate: {exc.args[0]}\n")
        return EXIT_FAILED
    db = None
    if args.dicom is None:
        db = _read_state(config)
        if db is None:
            return EXIT_FAILED
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if task == "segmentation":
            if args.reference is None:
                sys.stderr.write(f"{args.model} segments: give --reference (SEG or NIfTI)\n")
                return EXIT_FAILED
            scores, problems = evaluate.evaluate_segmentation(
                args.model, args.reference, args.map, db=db, dicom=args.dicom
            )
            _out(f"{'CASE':<24}  {'LABEL':<16}  {'DICE':>6}  {'HD95 MM':>8}  "
                 f"{'ML':>9}  {'REF ML':>9}  {'DIFF ML':>8}")  # fmt: skip
            for score in scores:
                _out(
                    f"{score.case[-24:]:<24}  {score.label[:16]:<16}  {score.dice:>6.3f}  "
                    f"{score.hd95_mm:>8.2f}  {score.volume_ml:>9.2f}  "
                    f"{score.reference_volume_ml:>9.2f}  {score.volume_difference_ml:>8.2f}"
                )
            for label in sorted({s.label for s in scores}):
                dice = [s.dice for s in scores if s.label == label]
                hd95 = sorted(s.hd95_mm for s in scores if s.label == label)
                _out(
                    f"{label}: mean Dice {sum(dice) / len(dice):.3f}, median HD95 "
                    f"{hd95[len(hd95) // 2]:.2f} mm over {len(dice)} cases"
                )
            rows = [
                {
                    "study_instance_uid": s.case, "label": s.label, "dice": s.dice,
                    "hd95_mm": s.hd95_mm, "volume_ml": s.volume_ml,
                    "reference_volume_ml": s.reference_volume_ml,
                    "volume_difference_ml": s.volume_difference_ml,
                }
                for s in scores
            ]  # fmt: skip
            if scores:
                evaluate.plot_segmentation(scores, args.out / "evaluation.png")
        else:
            if args.labels is None:
                sys.stderr.write(f"{args.model} classifies: give --labels (a CSV)\n")
                return EXIT_FAILED
            results, curves, problems = evaluate.evaluate_classification(
                args.model, args.labels, db=db, dicom=args.dicom
            )
            rows = []
            for result in results:
                _out(
                    f"{result.label}: {result.cases} cases ({result.positives} positive); "
                    f"AUC {result.auc}; at {result.threshold:g}: sensitivity "
                    f"{result.sensitivity}, specificity {result.specificity}"
                )
                rows.append(
                    {
                        "class": result.label, "cases": result.cases,
                        "positives": result.positives, "threshold": result.threshold,
                        "auc": result.auc.value, "auc_low": result.auc.low,
                        "auc_high": result.auc.high,
                        "sensitivity": result.sensitivity.value,
                        "sensitivity_low": result.sensitivity.low,
                        "sensitivity_high": result.sensitivity.high,
                        "specificity": result.specificity.value,
                        "specificity_low": result.specificity.low,
                        "specificity_high": result.specificity.high,
                    }
                )  # fmt: skip
            if results:
                evaluate.plot_roc(curves, args.out / "evaluation.png")
    except evaluate.EvaluationError as exc:
        sys.stderr.write(f"cannot evaluate: {exc}\n")
        return EXIT_FAILED
    finally:
        if db is not None:
            db.close()
    evaluate.write_csv(args.out / "evaluation.csv", rows)
    for problem in problems:
        sys.stderr.write(f"not scored: {problem}\n")
    _out(f"written: {args.out / 'evaluation.csv'}" + (
        f", {args.out / 'evaluation.png'}" if rows else ""
    ))  # fmt: skip
    return EXIT_OK if rows else EXIT_FAILED


def _read_state(config: Config) -> StateDB | None:
    """The node's state DB opened for reading only, or None (the reason on stderr)."""
    from node.state import StateDB, StateDBError

    path = config.node.data_dir / "state.db"
    if not path.is_file():
        sys.stderr.write(f"no state DB at {path}: this node has received nothing yet\n")
        return None
    try:
        return StateDB(path, read_only=True)
    except (StateDBError, sqlite3.Error) as exc:
        sys.stderr.write(f"cannot read the state DB {path}: {exc}\n")
        return None


def _cmd_jobs(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    db = _read_state(config)
    if db is None:
        return EXIT_FAILED
    jobs = db.jobs(args.state, since=args.since, study_instance_uid=args.study)
    _out(f"{'JOB':>5}  {'REV':>3}  {'STATE':<13}  {'MODEL':<14}  {'UPDATED':<19}  SERIES / REASON")
    for job in jobs:
        updated = datetime.fromtimestamp(job.updated_at).strftime("%Y-%m-%d %H:%M:%S")
        revision = str(job.revision) if job.revision is not None else "-"
        notes = [f"reason: {job.reason}"] if job.reason else []
        if job.superseded_by is not None:
            notes.append(f"replaced by job {job.superseded_by} (newer input)")
        if job.result is not None and job.result.timings_s:
            notes.append(_stage_durations(job.result.timings_s))
        _out(
            f"{job.id:>5}  {revision:>3}  {job.state:<13}  {job.model:<14}  {updated:<19}  "
            f"{job.series_instance_uid}" + "".join(f"\n{'':>5}  {note}" for note in notes)
        )
    if not jobs:
        filtered = args.state or args.since is not None or args.study
        _out("(no jobs match)" if filtered else "(no jobs yet)")
    db.close()
    return EXIT_OK


def _stage_durations(timings: dict[str, float]) -> str:
    """The worker's stage times of a job, as ``pacsnode jobs`` prints them (waits for a
    busy stage only when they took a moment)."""
    parts = [
        f"{stage} {seconds:.2f} s"
        for stage, seconds in timings.items()
        if stage != "total" and (not stage.startswith("wait for") or seconds >= 0.01)
    ]
    total = f" (total {timings['total']:.2f} s)" if "total" in timings else ""
    return "stages: " + ", ".join(parts) + total


def since_time(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from now (``30m``, ``12h``, ``7d``; see
    :func:`node.rules_check.parse_duration`) or a local date or date and time
    (``2026-11-30``, ``2026-11-30T08:00``), as epoch seconds."""
    from node.rules_check import parse_duration

    try:
        return (time.time() if now is None else now) - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 12h, 7d) nor a date or date and time "
            "(2026-11-30, 2026-11-30T08:00)"
        ) from None


def _cmd_retry(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.state import StateDB

    db = StateDB(config.node.data_dir / "state.db")
    try:
        job = db.retry_job(args.job)
    except (KeyError, ValueError) as exc:
        sys.stderr.write(f"cannot retry: {exc.args[0]}\n")
        return EXIT_FAILED
    finally:
        db.close()
    done = f"job {job.id} ({job.model}) will run again"
    audit = _audit_log(config)
    audit.action(f"retry: {done}", job.study_instance_uid, user=_cli_user())
    audit.close()
    _out(done)
    return EXIT_OK


def _cli_user() -> str:
    """Who ran the command, for the audit trail (``cli:<login name>``)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return f"cli:uid {os.getuid()}"


def _audit_log(config: Config) -> AuditLog:
    """The node's audit trail, appended to (the running node rotates it)."""
    from node.audit import AuditLog

    return AuditLog(config.node.data_dir / "audit", config.audit, rotate=False)


def _cmd_render(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.dispatch import results_dir
    from workers.render import RenderError, render_job

    db = _read_state(config)
    if db is None:
        return EXIT_FAILED
    job = db.job(args.job)
    db.close()
    if job is None:
        sys.stderr.write(f"cannot render: there is no job {args.job}\n")
        return EXIT_FAILED
    try:
        files = render_job(
            job.source_paths,
            results_dir(config.node.data_dir, job.id),
            args.out,
            config.results.notice,
        )
    except RenderError as exc:
        sys.stderr.write(f"cannot render job {job.id}: {exc}\n")
        return EXIT_FAILED
    for path in files:
        _out(str(path))
    return EXIT_OK


def _cmd_cleanup(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.retention import run_cleanup
    from node.spool import Spool
    from node.state import StateDB, StateDBError

    path = config.node.data_dir / "state.db"
    if not path.is_file():
        _out(f"nothing to clean: no state DB at {path}")
        return EXIT_OK
    try:
        db = StateDB(path, read_only=args.dry_run)
    except (StateDBError, sqlite3.Error) as exc:
        sys.stderr.write(f"cannot open the state DB {path}: {exc}\n")
        return EXIT_FAILED
    now = time.time() if args.as_of is None else args.as_of
    audit = None if args.dry_run else _audit_log(config)
    try:
        removals = run_cleanup(
            db,
            Spool(config.node.data_dir / "spool"),
            config.node.data_dir,
            config.retention,
            now=now,
            dry_run=args.dry_run,
            audit=audit,
        )
    finally:
        db.close()
        if audit is not None:
            audit.close()
    verb = "would remove" if args.dry_run else "removed"
    for removal in removals:
        _out(f"{verb} {removal.describe(now)}")
    _out(f"{len(removals)} removals" + (" (dry run: nothing was removed)" if args.dry_run else ""))
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.audit import read_trail

    found = 0
    for entry in read_trail(config.node.data_dir / "audit", args.study):
        found += 1
        event = entry["EventID"]["originalText"]
        outcome = {0: "ok", 4: "minor failure", 8: "serious failure", 12: "major failure"}.get(
            entry["EventOutcomeIndicator"], str(entry["EventOutcomeIndicator"])
        )
        who = ", ".join(
            p["UserID"] + (f"@{p['NetworkAccessPointID']}" if "NetworkAccessPointID" in p else "")
            + (f" ({p['RoleIDCode']})" if "RoleIDCode" in p else "")
            for p in entry.get("ActiveParticipant", [])
        )  # fmt: skip
        details = [
            f"{key}={value}"
            for o in entry.get("ParticipantObjectIdentification", [])
            if o.get("ParticipantObjectID") == args.study
            for key, value in o.get("ParticipantObjectDetail", {}).items()
        ]
        note = entry.get("EventOutcomeDescription")
        _out(
            f"{entry['EventDateTime']}  {event} [{entry['EventActionCode']}] {outcome}  {who}"
            + (f"  {' '.join(details)}" if details else "")
            + (f"  {note}" if note else "")
        )
    if not found:
        _out(f"(nothing in the audit trail for study {args.study})")
    return EXIT_OK


def _cmd_echo(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.sender import echo

    try:
        failure = echo(config, args.destination)
    except KeyError as exc:
        sys.stderr.write(f"{exc.args[0]}\n")
        return EXIT_FAILED
    destination = config.destinations[args.destination]
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if failure is not None:
        sys.stderr.write(f"C-ECHO to {args.destination} ({where}) failed: {failure}\n")
        return EXIT_FAILED
    _out(f"C-ECHO to {args.destination} ({where}): success")
    return EXIT_OK


def _duration(text: str) -> str:
    """``text`` if it is a duration (a usage error otherwise); the handler converts it."""
    from node.rules_check import parse_duration

    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text


def _cmd_rules_test(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_BAD_CONFIG
    from node.rules_check import (
        build_report,
        format_report,
        parse_duration,
        studies_from_db,
        studies_from_files,
    )

    if args.paths:
        missing = [str(path) for path in args.paths if not path.exists()]
        if missing:
            sys.stderr.write(f"no such file or folder: {', '.join(missing)}\n")
            return EXIT_FAILED
        studies, passed_over = studies_from_files(args.paths)
        if passed_over:
            files = "1 file" if passed_over == 1 else f"{passed_over} files"
            sys.stderr.write(f"passed over {files}: not DICOM, or no study or series UID\n")
        if not studies:
            where = ", ".join(str(path) for path in args.paths)
            sys.stderr.write(f"no DICOM series found in {where}\n")
            return EXIT_FAILED
    else:
        db_path = config.node.data_dir / "state.db"
        db = _read_state(config)
        if db is None:
            return EXIT_FAILED
        try:
            if args.study is not None:
                uids = [args.study]
            else:
                uids = db.studies_received_since(time.time() - parse_duration(args.since))
            studies = studies_from_db(db, uids)
        finally:
            db.close()
        if not studies:
            what = (
                f"no study {args.study} in {db_path}"
                if args.study is not None
                else f"no study received in the last {args.since} ({db_path})"
            )
            sys.stderr.write(what + "\n")
            return EXIT_FAILED
    for index, study in enumerate(studies):
        if index:
            _out("")
        for line in format_report(build_report(study, config.rules)):
            _out(line)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacsnode", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    default_config = Path("config.yaml")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", type=Path, default=default_config, help="config file")
        return sub

    with_config(
        "run", "run the node (SCP, pipeline, sender; embedded Redis and worker)"
    ).set_defaults(handler=_cmd_run)
    worker = with_config("worker", "run a Celery worker for model jobs")
    worker.add_argument(
        "--queue", default=",".join(QUEUES), help="queues to consume (comma-separated)"
    )
    worker.set_defaults(handler=_cmd_worker)
    check = commands.add_parser("check-config", help="validate a config file (exit 2 if invalid)")
    check.add_argument("file", type=Path, nargs="?", default=default_config)
    check.set_defaults(handler=_cmd_check_config)
    jobs = with_config("jobs", "list jobs, their states and stage times")
    jobs.add_argument(
        "--state",
        action="append",
        choices=[state.value for state in JobStateValues],
        help="only jobs in this state (repeatable)",
    )
    jobs.add_argument(
        "--since", type=since_time, help="only jobs created since: 30m, 12h, 7d or 2026-11-30"
    )
    jobs.add_argument("--study", help="only jobs of this Study Instance UID")
    jobs.set_defaults(handler=_cmd_jobs)
    cleanup = with_config("cleanup", "remove what retention: says has been kept long enough")
    cleanup.add_argument(
        "--dry-run", action="store_true", help="print what would be removed; remove nothing"
    )
    cleanup.add_argument(
        "--as-of",
        type=since_time,
        help="count ages as of this date or time (2026-12-31, 2026-12-31T08:00) instead of now",
    )
    cleanup.set_defaults(handler=_cmd_cleanup)
    audit = with_config("audit", "print a study's audit trail")
    audit.add_argument("--study", required=True, help="Study Instance UID")
    audit.set_defaults(handler=_cmd_audit)
    with_config(
        "models", "list the models (built in and in models_dir) and their problems"
    ).set_defaults(handler=_cmd_models)
    evaluate = with_config("evaluate", "score a model's results against reference labels")
    evaluate.add_argument("--model", required=True, help="the model whose results to score")
    evaluate.add_argument(
        "--reference", type=Path, help="segmentation: a DICOM SEG or NIfTI file, or a folder"
    )
    evaluate.add_argument(
        "--map", type=Path, help="CSV with file,study_instance_uid for NIfTI references"
    )
    evaluate.add_argument(
        "--labels", type=Path, help="classification: CSV with key,class,truth (1 or 0)"
    )
    evaluate.add_argument(
        "--dicom",
        type=Path,
        help="run the model here on the DICOM files under this folder instead of scoring "
        "its results in the data folder",
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("evaluation"), help="folder for the CSV and PNG"
    )
    evaluate.set_defaults(handler=_cmd_evaluate)
    retry = with_config("retry", "run a failed job again")
    retry.add_argument("job", type=int)
    retry.set_defaults(handler=_cmd_retry)
    render = with_config("render", "write a job's overlay key images as PNG files")
    render.add_argument("job", type=int)
    render.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    render.set_defaults(handler=_cmd_render)
    echo = with_config("echo", "C-ECHO a configured destination")
    echo.add_argument("destination")
    echo.set_defaults(handler=_cmd_echo)
    rules = commands.add_parser("rules", help="try the rules without changing anything")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True)
    rules_test = rules_commands.add_parser(
        "test",
        help="which rules match each series, why the others do not, which models would run",
        description="A dry run of the rules on received studies or on DICOM files; "
        "changes nothing. Exit 1 when nothing is found.",
    )
    rules_test.add_argument("--config", type=Path, default=default_config, help="config file")
    source = rules_test.add_mutually_exclusive_group(required=True)
    source.add_argument("--study", metavar="UID", help="a received study (Study Instance UID)")
    source.add_argument(
        "--since",
        type=_duration,
        metavar="DURATION",
        help="studies received in the last DURATION (90s, 30m, 2h, 1d)",
    )
    source.add_argument(
        "paths",
        nargs="*",
        type=Path,
        default=[],
        metavar="PATH",
        help="DICOM files or folders (searched recursively)",
    )
    rules_test.set_defaults(handler=_cmd_rules_test)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
