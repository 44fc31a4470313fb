"""``kgdx serve`` and ``kgdx predict``: the service, and the same pipeline in-process."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from kg.console import USER_ERRORS, handle_errors, print_json
from kg.errors import KgError
from service.errors import ServiceError

# Bad uploads and settings are the user's to fix: `Error: ...`, exit 1, no traceback.
if ServiceError not in USER_ERRORS:
    USER_ERRORS.append(ServiceError)

DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda.")]
CheckpointOpt = Annotated[
    Path | None, typer.Option(help="Checkpoint folder (default: the bundled model).")
]
OntologyOpt = Annotated[
    str | None,
    typer.Option(help="Ontology file or NAME[@VERSION] (default: the checkpoint's own)."),
]


def _set_threads(settings: Any) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def _settings(**overrides: Any) -> Any:
    from service.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        raise KgError(f"invalid settings: {problems}") from None


@handle_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [8000].")] = None,
    checkpoint: CheckpointOpt = None,
    ontology: OntologyOpt = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda [auto].")] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Images per forward pass [16].")
    ] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Wait to fill a batch [5].")] = None,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="No API keys (loopback hosts only).")
    ] = False,
    allow_other_ontology: Annotated[
        bool, typer.Option(help="Serve the checkpoint against another ontology version.")
    ] = False,
) -> None:
    """Serve the REST API (settings also from KGDX_* environment variables).

    Example: kgdx serve --port 8000
    """
    import uvicorn

    from models.default_checkpoint import resolve_checkpoint_dir
    from service.app import create_app

    settings = _settings(
        host=host,
        port=port,
        checkpoint=checkpoint,
        ontology=ontology,
        device=device,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        no_auth=no_auth or None,
        allow_other_ontology=allow_other_ontology or None,
    )
    resolve_checkpoint_dir(settings.checkpoint)  # fail now, clearly, when it is missing
    _set_threads(settings)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; a drained
    # shutdown is a clean one, so exit 0 instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if settings.no_auth:
        typer.echo("warning: authentication is off (--no-auth)", err=True)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        timeout_keep_alive=int(settings.keep_alive_s),
    )


@handle_errors
def predict(
    file: Annotated[Path, typer.Argument(help="PNG, JPEG or DICOM image.")],
    text: Annotated[str | None, typer.Option(help="Clinical indication.")] = None,
    checkpoint: CheckpointOpt = None,
    ontology: OntologyOpt = None,
    device: DeviceOpt = "auto",
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Decision threshold.")
    ] = None,
    top_k_paths: Annotated[int, typer.Option(min=0, max=20, help="Paths per finding.")] = 3,
    json: Annotated[bool, typer.Option("--json", help="Print the API's JSON response.")] = False,
) -> None:
    """Run the service's pipeline on one image in-process and print findings and paths.

    Example: kgdx predict chest.png --text "cough and fever"
    """
    from kg.store import GraphStore
    from service.app import load_model
    from service.metrics import Metrics
    from service.pipeline import PredictOptions, PredictRequest, decode, respond
    from service.state import AppState

    data = file.read_bytes()
    settings = _settings(checkpoint=checkpoint, ontology=ontology, device=device)
    t0 = time.perf_counter()
    decoded = decode(data, filename=file.name)
    decode_ms = (time.perf_counter() - t0) * 1e3
    _set_threads(settings)
    state = AppState(settings=settings, metrics=Metrics(), store=GraphStore(settings.db_url))
    load_model(state)
    assert state.pipeline is not None and state.predictor is not None
    options = PredictOptions(
        threshold=threshold,
        top_k_paths=top_k_paths,
        evidence_k=settings.evidence_k,
        max_hops=settings.max_path_hops,
    )
    [result] = state.pipeline.run_batch(
        [PredictRequest(decoded, text, options, settings.threshold)]
    )
    payload = respond(
        result,
        decoded,
        options,
        state.predictor,
        decode_ms=decode_ms,
    )
    if json:
        print_json(payload)
        return
    _print_tree(payload)


def _print_tree(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.tree import Tree

    model, onto = payload["model"], payload["ontology"]
    root = Tree(
        f"[bold]{payload['image']['kind']}[/] {payload['image']['width']}x"
        f"{payload['image']['height']} - model {model['name']} {model['version']}, "
        f"ontology {onto['name']}@{onto['version']}"
    )
    ranked = sorted(payload["findings"], key=lambda f: -f["probability"])
    for f in ranked:
        mark = "[red]positive[/]" if f["positive"] else "negative"
        node = root.add(f"{f['name']} ({f['concept']['id']}): {f['probability']:.3f} {mark}")
        if f["evidence"]:
            node.add(
                "evidence: "
                + ", ".join(f"{e['concept']['label']} {e['relevance']:.2f}" for e in f["evidence"])
            )
        for p in f["paths"]:
            parts = [p["nodes"][0]["label"]]
            for edge, n in zip(p["edges"], p["nodes"][1:], strict=True):
                rel = edge["relation"]
                parts.append(f"-{rel}->" if edge["direction"] == "forward" else f"<-{rel}-")
                parts.append(n["label"])
            node.add(f"path {p['score']:.2f}: {' '.join(parts)}")
    for note in payload["notes"]:
        root.add(f"note: {note}")
    Console().print(root)
