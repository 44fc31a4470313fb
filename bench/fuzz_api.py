"""API fuzzing: schemathesis against the OpenAPI document of a real ``kgdx serve``.

Everything runs on this machine, on loopback (127.0.0.1), bounded in cases and seconds; it
stops by itself, prints a table and a final JSON line, and exits 1 when any check failed,
schemathesis reported an error, or the server logged an unhandled error.

What runs (issue 6, "API fuzzing"):

1. A ``kgdx serve`` on 127.0.0.1 with its own temporary ``$KGDX_HOME`` (SQLite; the bundled
   default checkpoint when there is one, else the tiny test checkpoint, or ``--checkpoint
   DIR`` / ``--tiny``; ``KGDX_STABLE_SECONDS=1`` so STOW-RS studies become jobs during the
   run), or the server at ``--url`` (then ``--api-key`` or ``$KGDX_API_KEY``). The key has
   the ``admin`` scope (every scope), and every request carries it.
2. Real data first, so that cases get past 404s and 415s: ``POST /v1/predict`` of a sample
   radiograph (a result id, its concepts and finding names) and a one-instance STOW-RS
   study (a StudyInstanceUID). ``bench/fuzz_hooks.py`` mixes these, and the PNG and DICOM
   files (whole or mutated), into about half the generated cases of the operations that
   take them.
3. ``st run`` (schemathesis 4, a subprocess) on ``/openapi.json`` (fetched with the key):
   every operation, the coverage and fuzzing phases (and stateful when the schema has
   links), positive and negative data, at most ``--max-examples`` cases per operation and
   phase, seeded (``--seed``). Checks: ``not_a_server_error`` (a 503 is allowed: backpressure),
   ``backpressure_retry_after`` (that 503 carries ``Retry-After``),
   ``status_code_conformance``, ``content_type_conformance`` and
   ``response_schema_conformance`` (every status an operation answers is declared, with
   its body's schema; errors are ``{"error": {"code", "message"}}``).
   ``--max-seconds`` bounds the run: at that time schemathesis is interrupted (SIGINT), and
   what it tested until then is reported; the stop is said, not counted as a failure.
   With ``--rate-limit N`` the server limits each key to N requests a minute, so that the
   429 answers of every operation meet the checks too.
4. The server's log is read for unhandled errors (``unhandled error``, tracebacks): a 500
   that schemathesis did not provoke, or one hidden behind a handled answer, still fails.

Figures: operations tested (of the schema's), cases generated, failures by check (each
failing check's title, count and operations, from schemathesis's JSON report), errors,
server errors in the log, the responses of each operation by status (how far the cases
got), wall time. On a failure the failing cases schemathesis printed (with a curl command
and an ``st replay`` id to reproduce each) are shown.

Usage:
  python bench/fuzz_api.py                       # 50 cases per operation and phase, <= 300 s
  python bench/fuzz_api.py --quick               # the CI smoke run: 5 cases, <= 60 s
  python bench/fuzz_api.py --max-examples 200 --max-seconds 900 --seed 7
  python bench/fuzz_api.py --url http://127.0.0.1:8000 --api-key "$KEY"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOOKS = ROOT / "bench" / "fuzz_hooks.py"
#: The schemathesis CLI (``st``), run by this interpreter.
SCHEMATHESIS = [sys.executable, "-m", "schemathesis.cli"]
SAMPLE_PNG = ROOT / "tests" / "data" / "samples" / "nih_00028490_000.png"
CHECKS = (
    "not_a_server_error",
    "backpressure_retry_after",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
#: Statuses ``not_a_server_error`` accepts: 503 is backpressure (its Retry-After is checked).
ACCEPTED_STATUSES = ("2xx", "3xx", "4xx", "503")
#: Schemathesis's failure types -> the check that reports them.
FAILURE_CHECKS = {
    "ServerError": "not_a_server_error",
    "ContentTypeServerError": "not_a_server_error",
    "CustomFailure": "backpressure_retry_after",  # the only custom check
    "UndefinedStatusCode": "status_code_conformance",
    "MissingContentType": "content_type_conformance",
    "UndefinedContentType": "content_type_conformance",
    "MalformedMediaType": "content_type_conformance",
    "JsonSchemaError": "response_schema_conformance",
    "MalformedJson": "response_schema_conformance",
    "ContentDeserializationError": "response_schema_conformance",
    "DiscriminatorMismatch": "response_schema_conformance",
}
#: Lines of the server's log that mean an error no handler foresaw.
SERVER_ERROR = re.compile(r"unhandled error|Traceback \(most recent call last\)")
#: Seconds schemathesis gets to write its report after the SIGINT at the time bound.
GRACE_S = 30.0
REQUEST_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------------------------
# Real data on the server
# ---------------------------------------------------------------------------------------------


def dicom_instance(study_uid: str | None = None) -> bytes:
    """A small DX radiograph (PA, 64 x 64, 12 bits) as a Part 10 file, new UIDs."""
    from pydicom.uid import generate_uid

    from tests.service.images import dicom_dataset, write_dicom

    ds = dicom_dataset(modality="DX", rows=64, columns=64, bits=12, ViewPosition="PA")
    ds.StudyInstanceUID = study_uid or generate_uid()
    data: bytes = write_dicom(ds)
    return data


def seed_server(url: str, key: str, work: Path) -> dict[str, Any]:
    """Make a result and a study on the server; the seeds file of ``bench/fuzz_hooks.py``."""
    from pydicom.uid import generate_uid

    headers = {"Authorization": f"Bearer {key}"}
    # The study's instance is also what the cases send (whole or mutated): to its own study
    # URL it is stored again (or conflicts once mutated), not refused for its study.
    study_uid = generate_uid()
    instance = dicom_instance(study_uid)
    dicom = work / "instance.dcm"
    dicom.write_bytes(instance)
    seeds: dict[str, Any] = {
        "result_ids": [],
        "study_uids": [],
        "concept_ids": [],
        "finding_names": [],
        "images": [str(SAMPLE_PNG)],
        "dicom": [str(dicom)],
    }
    with httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S) as client:
        r = client.post(
            "/v1/predict",
            files={"file": (SAMPLE_PNG.name, SAMPLE_PNG.read_bytes(), "image/png")},
            data={"text": "fever and productive cough"},
        )
        r.raise_for_status()
        result = r.json()
        seeds["result_ids"].append(result["id"])
        for finding in result["findings"]:
            seeds["finding_names"].append(finding["name"])
            seeds["concept_ids"].append(finding["concept"]["id"])
            seeds["concept_ids"] += [e["concept"]["id"] for e in finding.get("evidence", [])]
        boundary = "kgdx-fuzz-seed"
        body = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + instance
            + f"\r\n--{boundary}--\r\n".encode()
        )
        r = client.post(
            "/dicomweb/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
            },
        )
        r.raise_for_status()
        seeds["study_uids"].append(study_uid)
    seeds["concept_ids"] = sorted(set(seeds["concept_ids"]))
    seeds["finding_names"] = sorted(set(seeds["finding_names"]))
    return seeds


# ---------------------------------------------------------------------------------------------
# Schemathesis
# ---------------------------------------------------------------------------------------------


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_config(path: Path, key: str, args: argparse.Namespace) -> None:
    """The run's ``schemathesis.toml``: key, hooks, checks, generation."""
    lines = [
        f"hooks = {_toml_str(str(HOOKS))}",
        f"seed = {args.seed}",
        f"workers = {args.workers}",
        "",
        "[headers]",
        f"Authorization = {_toml_str('Bearer ' + key)}",
        "",
        "[generation]",
        f"mode = {_toml_str(args.mode)}",
        f"max-examples = {args.max_examples}",
        'database = "none"',
        "",
        "[checks]",
        "enabled = false",
    ]
    for name in CHECKS:
        lines += ["", f"[checks.{name}]", "enabled = true"]
        if name == "not_a_server_error":
            lines.append(f"expected-statuses = {json.dumps(list(ACCEPTED_STATUSES))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


def run_schemathesis(
    url: str, key: str, seeds: dict[str, Any], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """``st run`` against ``url``, bounded by ``args.max_seconds``.

    Returns schemathesis's JSON run report, with ``statuses`` (the responses of each
    operation by status code, from its NDJSON event log) and ``run`` (exit code, seconds,
    whether the time bound stopped it, its console output) added.
    """
    config = work / "schemathesis.toml"
    write_config(config, key, args)
    # Fetched with the key, so the run works whether or not the document needs one.
    schema = work / "openapi.json"
    r = httpx.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    schema.write_bytes(r.content)
    seeds_file = work / "seeds.json"
    seeds_file.write_text(json.dumps(seeds), encoding="utf-8")
    report, events, log = work / "report.json", work / "events.ndjson", work / "schemathesis.log"
    cmd = [
        *SCHEMATHESIS,
        "--config-file",
        str(config),
        "--no-color",
        "run",
        str(schema),
        "--url",
        url,
        "--report",
        "json,ndjson",
        "--report-json-path",
        str(report),
        "--report-ndjson-path",
        str(events),
        "--request-timeout",
        str(REQUEST_TIMEOUT_S),
    ]
    env = {**os.environ, "KGDX_FUZZ_SEEDS": str(seeds_file), "NO_COLOR": "1", "COLUMNS": "120"}
    began = time.monotonic()
    stopped = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=args.max_seconds)
        except subprocess.TimeoutExpired:
            stopped = True
            proc.send_signal(signal.SIGINT)  # schemathesis stops and writes its reports
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - began
    output = log.read_text(encoding="utf-8", errors="replace")
    if not report.is_file():
        raise RuntimeError(
            f"schemathesis exited {proc.returncode} without a report:\n{output[-3000:]}"
        )
    data: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    data["statuses"] = statuses_by_operation(events) if events.is_file() else {}
    data["run"] = {
        "exit_code": proc.returncode,
        "seconds": round(seconds, 1),
        "stopped_at_time_bound": stopped,
        "output": output,
    }
    return data


def statuses_by_operation(events: Path) -> dict[str, dict[str, int]]:
    """``{"GET /v1/paths": {"200": 12, "404": 3, ...}, ...}`` from an NDJSON event log."""
    counts: dict[str, Counter[str]] = {}
    with events.open(encoding="utf-8") as f:
        for line in f:
            event = json.loads(line)
            finished = event.get("ScenarioFinished")
            if not finished:
                continue
            recorder = finished.get("recorder") or {}
            found = counts.setdefault(str(recorder.get("label")), Counter())
            for interaction in (recorder.get("interactions") or {}).values():
                response = interaction.get("response")
                found[str(response["status_code"]) if response else "no response"] += 1
    return {op: dict(sorted(c.items())) for op, c in sorted(counts.items())}


def failure_details(output: str, limit: int = 8000) -> str:
    """The failures section of schemathesis's output (cases, responses, curl commands)."""
    start = output.find("FAILURES")
    if start < 0:
        return output[-limit:]
    end = output.find("WARNINGS", start)
    section = output[start : end if end > start else None]
    return section if len(section) <= limit else section[:limit] + "\n... (truncated)"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="fuzz this running server (base URL) instead of starting one")
    p.add_argument("--api-key", help="admin-scope API key for --url [$KGDX_API_KEY]")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder for the started server")
    p.add_argument("--tiny", action="store_true", help="serve the tiny test checkpoint")
    p.add_argument("--max-examples", type=int, default=None, help="cases per operation [50]")
    p.add_argument("--max-seconds", type=float, default=None, help="time bound of the run [300]")
    p.add_argument("--seed", type=int, default=0, help="schemathesis's random seed [0]")
    p.add_argument(
        "--mode", choices=("positive", "negative", "all"), default="all", help="data [all]"
    )
    p.add_argument("--workers", type=int, default=1, help="concurrent schemathesis workers [1]")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="serve with KGDX_RATE_LIMIT_PER_MINUTE=N, so that 429s meet the checks too",
    )
    p.add_argument(
        "--quick", action="store_true", help="the CI smoke run (5 cases per operation, 60 s)"
    )
    args = p.parse_args(argv)
    defaults = (5, 60.0) if args.quick else (50, 300.0)
    if args.max_examples is None:
        args.max_examples = defaults[0]
    if args.max_seconds is None:
        args.max_seconds = defaults[1]
    if args.max_examples < 1:
        p.error(f"--max-examples must be >= 1, got {args.max_examples}")
    if args.max_seconds <= 0:
        p.error(f"--max-seconds must be > 0, got {args.max_seconds}")
    if not 1 <= args.workers <= 64:
        p.error(f"--workers must be 1 to 64, got {args.workers}")
    if args.url:
        args.url = args.url.rstrip("/")
        args.api_key = args.api_key or os.environ.get("KGDX_API_KEY")
        if not args.api_key:
            p.error("--url needs --api-key or $KGDX_API_KEY (a key with the admin scope)")
        if args.checkpoint or args.tiny or args.rate_limit:
            p.error("--checkpoint, --tiny and --rate-limit start a server; not with --url")
    if args.rate_limit is not None and args.rate_limit < 1:
        p.error(f"--rate-limit must be >= 1, got {args.rate_limit}")
    if args.checkpoint and args.tiny:
        p.error("--checkpoint and --tiny are exclusive")
    if args.checkpoint and not (args.checkpoint / "checkpoint.json").is_file():
        p.error(f"--checkpoint {args.checkpoint} has no checkpoint.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    figures: dict[str, Any] = {
        "quick": args.quick,
        "max_examples": args.max_examples,
        "max_seconds": args.max_seconds,
        "seed": args.seed,
        "mode": args.mode,
    }
    errors: list[str] = []
    report: dict[str, Any] | None = None
    server_log = ""
    with tempfile.TemporaryDirectory(prefix="kgdx-fuzz-") as tmp_name:
        tmp = Path(tmp_name)
        server = None
        try:
            if args.url:
                url, key = args.url, args.api_key
                figures["server"] = url
            else:
                server, key = start_server(args, tmp, figures)
                url = server.url
            seeds = seed_server(url, key, tmp)
            figures["seeds"] = {k: len(v) for k, v in seeds.items()}
            print(
                f"server {figures['server']}; seeded "
                + ", ".join(f"{n} {k}" for k, n in figures["seeds"].items()),
                flush=True,
            )
            report = run_schemathesis(url, key, seeds, tmp, args)
            if server is not None and not server.running:
                errors.append(f"kgdx serve died during the run: {server.log_tail(1500)}")
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if server is not None:
                server.stop(timeout=20)
                server_log = server.log_text()
    figures["server_errors"] = [
        line[:300] for line in server_log.splitlines() if SERVER_ERROR.search(line)
    ][:20]
    figures["errors"] = errors
    figures["wall_s"] = round(time.monotonic() - began, 1)
    return report_figures(figures, report)


def start_server(args: argparse.Namespace, tmp: Path, figures: dict[str, Any]) -> tuple[Any, str]:
    from tests.kgdx_server import KgdxServer, checkpoint_for_home, create_api_key, run_cli_module

    home = tmp / "home"
    home.mkdir()
    checkpoint: Path | None
    if args.checkpoint:
        checkpoint = args.checkpoint.resolve()
    elif args.tiny:
        checkpoint = tmp / "tiny-checkpoint"
        run_cli_module(["build-tiny", str(checkpoint)], home)
    else:
        checkpoint = checkpoint_for_home(home, tmp)
    figures["checkpoint"] = "default" if checkpoint is None else str(checkpoint)
    if checkpoint is not None and checkpoint.parent == tmp:
        figures["checkpoint"] = "tiny"
    key = create_api_key(home, "fuzz-api", ["admin"])
    settings = {"KGDX_STABLE_SECONDS": "1", "KGDX_LOG_LEVEL": "WARNING"}
    if checkpoint is not None:
        settings["KGDX_CHECKPOINT"] = str(checkpoint)
    if args.rate_limit:
        settings["KGDX_RATE_LIMIT_PER_MINUTE"] = str(args.rate_limit)
        figures["rate_limit_per_minute"] = args.rate_limit
    server = KgdxServer(home, settings, log_dir=tmp)
    server.start()
    figures["server"] = f"{server.url} (started, checkpoint {figures['checkpoint']})"
    return server, key


def summarise(f: dict[str, Any], report: dict[str, Any]) -> str:
    """Put the report's figures into ``f``; returns schemathesis's console output."""
    run = report["run"]
    operations = report.get("operations") or {}
    cases = report.get("test_cases") or {}
    f["operations"] = {k: operations.get(k) for k in ("total", "selected", "tested")}
    f["cases"] = {k: cases.get(k) for k in ("generated", "with_failures", "errored")}
    f["failures"] = [
        {
            "check": FAILURE_CHECKS.get(str(g.get("type")), str(g.get("type"))),
            **{k: g.get(k) for k in ("type", "title", "count", "operations")},
        }
        for g in report.get("failures", [])
    ]
    by_check: Counter[str] = Counter()
    for group in f["failures"]:
        by_check[group["check"]] += int(group["count"] or 0)
    f["failures_by_check"] = dict(by_check)
    f["schemathesis_errors"] = report.get("errors", [])
    f["stop_reason"] = report.get("stop_reason")
    f["phases"] = {k: v.get("status") for k, v in (report.get("phases") or {}).items()}
    f["statuses"] = report["statuses"]
    f["fuzz_s"] = run["seconds"]
    f["stopped_at_time_bound"] = run["stopped_at_time_bound"]
    f["schemathesis_exit_code"] = run["exit_code"]
    unexplained = run["exit_code"] not in (0, None) and not run["stopped_at_time_bound"]
    if unexplained and not f["failures"] and not f["schemathesis_errors"]:
        f["errors"].append(f"schemathesis exited {run['exit_code']}")
    return str(run["output"])


def report_figures(f: dict[str, Any], report: dict[str, Any] | None) -> int:
    output = summarise(f, report) if report is not None else ""
    rows = [
        ("server", str(f.get("server", "n/a"))),
        ("cases per operation / mode / seed", f"{f['max_examples']} / {f['mode']} / {f['seed']}"),
    ]
    if report is not None:
        bound = (
            f" (stopped at the {f['max_seconds']:g} s bound)" if f["stopped_at_time_bound"] else ""
        )
        checks = ", ".join(f"{k} {v}" for k, v in f["failures_by_check"].items())
        errors = ", ".join(f"{e.get('title')} x{e.get('count')}" for e in f["schemathesis_errors"])
        rows += [
            ("operations tested", f"{f['operations']['tested']} of {f['operations']['total']}"),
            (
                "cases generated",
                f"{f['cases']['generated']} ({f['cases']['with_failures']} failed)",
            ),
            ("phases", ", ".join(f"{k} {v}" for k, v in f["phases"].items())),
            ("failures by check", checks or "none"),
            ("schemathesis errors", errors or "none"),
            ("fuzz time", f"{f['fuzz_s']} s{bound}"),
        ]
    rows += [
        ("server errors in its log", str(len(f["server_errors"]))),
        ("wall time", f"{f['wall_s']} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if f.get("statuses"):
        print("\nresponses by operation and status")
        op_width = max(len(op) for op in f["statuses"])
        for op, counts in f["statuses"].items():
            print(f"  {op:<{op_width}}  " + "  ".join(f"{k}: {n}" for k, n in counts.items()))
    for group in f.get("failures", []):
        ops = ", ".join(group["operations"] or [])
        print(f"FAILURE: {group['check']}: {group['title']} x{group['count']} ({ops})")
    for line in f["server_errors"]:
        print(f"SERVER ERROR: {line}")
    for error in f["errors"]:
        print(f"ERROR: {error}")
    f["pass"] = report is not None and not (
        f["failures"] or f["schemathesis_errors"] or f["server_errors"] or f["errors"]
    )
    if not f["pass"] and output:
        print("--- schemathesis output (failures) ---", file=sys.stderr)
        print(failure_details(output), file=sys.stderr)
    print(json.dumps(f, sort_keys=True, default=str))
    return 0 if f["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
