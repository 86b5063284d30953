"""Privacy end to end: a workload full of unique identifiers goes through every way in, and none
of them may be found, in clear or encoded, in anything the service wrote.

Every identifying field of every request is a marker unique to this run and to that request
(DICOM PatientName, PatientID, AccessionNumber, PatientBirthDate, InstitutionName,
ReferringPhysicianName, Study and SOP Instance UIDs; FHIR Patient id, name, identifier, telecom,
address and birthDate), so a leak names the request and the field it came from. Requests go in
as EHR predicts (FHIR Bundles and plain features), DICOM predicts (one instance and
multipart/related), STOW-RS, C-STORE (dcmtk's ``storescu``, and pynetdicom to read a refusal's
ErrorComment) and JWE, valid ones and refused ones, with patient names in multipart part headers too.

What the service keeps or says on its own is scanned: its stdout and stderr (at DEBUG),
``/metrics``, the audit API, every row of every table, every statement it sent to PostgreSQL
(this test's own cluster logs them all, with their parameters), its data directory (spool,
keys), its TMPDIR, new entries under /tmp and /dev/shm, and every error it answered.
Answers to the caller legitimately carry the caller's identifiers (the SR of an image names its
patient), so successful answers are not scanned, and UIDs are looked for only in what was kept
(a STOW-RS failure names the SOP Instance it refused, as PS3.18 requires).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
import pydicom
import pytest
from pydicom import config as dicom_config
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import MetaData, create_engine, func, select, text

from app.client import encrypt
from tests.conftest import REPO_ROOT
from tests.integration.conftest import PrivatePostgres, Served, base_env, free_port, medinfer, register_key, serve
from tests.support.dcmtk import dcmtk
from tests.support.fhir import bundle, full_observations
from training.dicom_studies import phantom_dataset

pytestmark = pytest.mark.integration

EHR: Final = "/v1/models/ehr-heart-disease/predict"
CXR: Final = "/v1/models/cxr-pneumonia/predict"
FHIR_JSON: Final = "application/fhir+json"
DICOM: Final = "application/dicom"
CALLING_AE: Final = "PRIVSCU"
STUDY_DONE: Final = '"event":"imaging.study_done"'
#: Files larger than this, under /tmp and /dev/shm but outside the service's own folders, are not read.
STRAY_FILE_LIMIT: Final = 16 << 20
STRAY_BUDGET: Final = 256 << 20
INCOMING_DIMSE: Final = re.compile(r"INCOMING DIMSE MESSAGE.*?END DIMSE MESSAGE", re.DOTALL)


class StatementLoggingPostgres(PrivatePostgres):
    """This test's own cluster, logging every statement with its parameters: what the service
    sends to the database is scanned, not only what the tables keep at the end."""

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c log_statement=all -c log_parameter_max_length=-1 -c log_parameter_max_length_on_error=-1"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    @property
    def log(self) -> Path:
        return self.root / "log"


@pytest.fixture
def logged_pg() -> Iterator[StatementLoggingPostgres]:
    cluster = StatementLoggingPostgres()
    try:
        yield cluster
    finally:
        cluster.destroy()


# -- markers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Marker:
    text: str
    origin: str  # "<request> <field>"
    uid: bool = False


@dataclass(frozen=True, slots=True)
class Person:
    """One request's patient: every field a marker of its own."""

    label: str
    token: str
    family: str
    given: str
    patient_id: str
    accession: str
    birth: date
    institution: str
    referrer: str
    fhir_id: str
    phone: str
    email: str
    street: str
    city: str
    postal: str

    @property
    def pn(self) -> str:
        return f"{self.family}^{self.given}"


@dataclass
class Markers:
    run: str = field(default_factory=lambda: secrets.token_hex(3))
    items: list[Marker] = field(default_factory=list)
    _n: int = 0

    def add(self, origin: str, value: str, *, uid: bool = False) -> str:
        self.items.append(Marker(value, origin, uid))
        return value

    def person(self, label: str) -> Person:
        self._n += 1
        t = f"{self._n:02d}{self.run}"
        birth = date(1931, 3, 1) + timedelta(days=53 * self._n + int(self.run, 16) % 401)
        p = Person(
            label=label,
            token=t,
            family=f"Zqfam{t}",
            given=f"Zqgiv{t}",
            patient_id=f"ZQPID{t}",
            accession=f"ZQACC{t}",
            birth=birth,
            institution=f"Zqinst{t} Hospital",
            referrer=f"Zqref{t}^Zqrefgiv{t}",
            fhir_id=f"zqpt{t}",
            phone=f"4179{self._n:02d}{int(self.run, 16) % 10**6:06d}",
            email=f"zqmail{t}",
            street=f"Zqstreet{t}",
            city=f"Zqcity{t}",
            postal=f"ZQZIP{t}",
        )
        for name in ("family", "given", "patient_id", "accession", "fhir_id", "phone", "email", "street", "city"):
            self.add(f"{label} {name}", getattr(p, name))
        self.add(f"{label} postal", p.postal)
        self.add(f"{label} institution", f"Zqinst{t}")
        self.add(f"{label} referrer family", f"Zqref{t}")
        self.add(f"{label} referrer given", f"Zqrefgiv{t}")
        self.add(f"{label} PN", p.pn)
        self.add(f"{label} birth (DA)", f"{birth:%Y%m%d}")
        self.add(f"{label} birth (ISO)", birth.isoformat())
        return p


# -- inputs -------------------------------------------------------------------------------------


@contextlib.contextmanager
def lenient_writing() -> Iterator[None]:
    """Let pydicom write values that break their VR, as a careless modality does."""
    settings = dicom_config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = dicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes


@dataclass(frozen=True, slots=True)
class Image:
    encoded: bytes
    study: str
    sop: str


def image(
    markers: Markers, who: Person, *, seed: int = 0, study: str | None = None, invalid: bool = False, **changes: str
) -> Image:
    """A 256 x 256 chest phantom carrying ``who``'s identifiers, with attributes changed as given;
    ``invalid`` adds values that break their VR."""
    study = study or generate_uid()
    if invalid:
        changes |= invalid_values(markers, who)
    with lenient_writing():
        ds = phantom_dataset(
            seed=seed, positive=seed % 2 == 1, rows=256, study_uid=study, series_uid=generate_uid(),
            sop_instance_uid=generate_uid(), patient_id=who.patient_id, patient_name=who.pn,
            accession_number=who.accession, patient_birth_date=f"{who.birth:%Y%m%d}",
        )  # fmt: skip
        ds.InstitutionName = who.institution
        ds.ReferringPhysicianName = who.referrer
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    markers.add(f"{who.label} StudyInstanceUID", study, uid=True)
    markers.add(f"{who.label} SOPInstanceUID", str(ds.SOPInstanceUID), uid=True)
    return Image(buffer.getvalue(), study, str(ds.SOPInstanceUID))


def invalid_values(markers: Markers, who: Person) -> dict[str, str]:
    """Values that break their VR and quote a marker: pydicom's validation messages would quote them."""
    return {
        "PatientSex": markers.add(f"{who.label} PatientSex (invalid CS)", f"sx{who.token}".lower()),
        "PatientAge": markers.add(f"{who.label} PatientAge (invalid AS)", f"age{who.token}"),
    }


def truncated_in_header(img: Image, who: Person) -> bytes:
    """Cut just after InstitutionName: the identifiers are there, the data set is broken."""
    cut = img.encoded.index(who.institution.encode()) + len(who.institution)
    return img.encoded[:cut]


def not_dicom(who: Person) -> bytes:
    return f"Patient {who.pn} ID {who.patient_id} born {who.birth:%Y%m%d} at {who.institution}".encode()


def fhir_patient(who: Person, **changes: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Patient",
        "id": who.fhir_id,
        "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": who.patient_id}],
        "name": [{"family": who.family, "given": [who.given], "text": f"{who.given} {who.family}"}],
        "telecom": [
            {"system": "phone", "value": f"+{who.phone}"},
            {"system": "email", "value": f"{who.email}@example.org"},
        ],
        "address": [{"line": [f"12 {who.street}"], "city": who.city, "postalCode": who.postal, "country": "CH"}],
        "gender": "male",
        "birthDate": who.birth.isoformat(),
    }
    return resource | changes


def observations(who: Person, drop: str | None = None) -> list[dict[str, Any]]:
    found = []
    for obs in full_observations():
        if obs["id"] == drop:
            continue
        obs["subject"] = {"reference": f"Patient/{who.fhir_id}"}
        found.append(obs)
    return found


def record(who: Person, obs: list[dict[str, Any]] | None = None, **patient_changes: Any) -> bytes:
    return json.dumps(
        bundle(*(observations(who) if obs is None else obs), pat=fhir_patient(who, **patient_changes))
    ).encode()


def related(*parts: bytes | tuple[bytes, dict[str, str]]) -> tuple[bytes, str]:
    """A multipart/related body; a part may come with headers of its own (uploaders name files after patients)."""
    boundary = secrets.token_hex(12)
    chunks = []
    for part in parts:
        content, extra = part if isinstance(part, tuple) else (part, {})
        headers = {"Content-Type": DICOM} | extra
        head = f"--{boundary}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        chunks.append(head.encode() + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f'multipart/related; type="{DICOM}"; boundary={boundary}'


def named_after(who: Person) -> dict[str, str]:
    """Part headers that name the patient, as a folder upload of ``DOE^JANE.dcm`` files would."""
    return {
        "Content-Disposition": f'attachment; filename="{who.pn}_{who.patient_id}.dcm"',
        "Content-Description": f"{who.given} {who.family}, {who.institution}",
        "Content-Location": f"file:///exports/{who.accession}/{who.family}.dcm",
    }


# -- the workload -------------------------------------------------------------------------------


@dataclass
class Workload:
    http: httpx.Client
    markers: Markers
    scu_dir: Path
    scp_port: int
    spool: Path
    counts: Counter[str] = field(default_factory=Counter)
    #: (request label, status line, headers and body) of every answer that reported an error.
    errors: list[tuple[str, bytes]] = field(default_factory=list)
    accepted_studies: set[str] = field(default_factory=set)
    #: Sealed instances caught in the spool while their study settles (best effort: it empties fast).
    spooled: list[tuple[str, bytes]] = field(default_factory=list)
    _jwks: dict[str, Any] | None = None

    def post(
        self, path: str, label: str, url: str, body: bytes, content_type: str, expect: Iterable[int], accept: str = ""
    ) -> httpx.Response:
        headers = {"Content-Type": content_type} | ({"Accept": accept} if accept else {})
        response = self.http.post(url, content=body, headers=headers)
        self.counts[path] += 1
        assert response.status_code in expect, f"{label}: {response.status_code} {response.text[:400]}"
        if response.status_code >= 400 or (path == "stow-rs" and response.status_code == 202):
            head = f"HTTP {response.status_code}\n" + "".join(f"{k}: {v}\n" for k, v in response.headers.items())
            self.errors.append((f"{path} {label}", head.encode() + b"\n" + response.content))
        return response

    def sealed(self, payload: bytes, content_type: str) -> bytes:
        if self._jwks is None:
            self._jwks = self.http.get("/.well-known/jwks.json").json()
        return encrypt(payload, content_type, self._jwks).encode()

    def ehr(self) -> None:
        m = self.markers
        for n in range(3):
            who = m.person(f"ehr-ok-{n}")
            self.post("ehr-predict", who.label, EHR, record(who), FHIR_JSON, {200}, FHIR_JSON if n == 0 else "")
        who = m.person("ehr-missing-features")
        self.post("ehr-predict", who.label, EHR, record(who, observations(who, drop="cp")), FHIR_JSON, {422})
        who = m.person("ehr-unknown-code")
        obs = observations(who)
        obs[0]["valueCodeableConcept"]["coding"][0]["code"] = m.add(f"{who.label} code", f"zqcode{who.token}")
        self.post("ehr-predict", who.label, EHR, record(who, obs), FHIR_JSON, {422})
        who = m.person("ehr-unknown-unit")
        obs = observations(who)
        obs[1]["valueQuantity"]["unit"] = obs[1]["valueQuantity"]["code"] = m.add(
            f"{who.label} unit", f"zqu{who.token}"
        )
        self.post("ehr-predict", who.label, EHR, record(who, obs), FHIR_JSON, {422})
        who = m.person("ehr-other-patient")
        obs = observations(who)
        obs[2]["subject"] = {"reference": "Patient/" + m.add(f"{who.label} other subject", f"zqother{who.token}")}
        self.post("ehr-predict", who.label, EHR, record(who, obs), FHIR_JSON, {422})
        who = m.person("ehr-bad-birthdate")
        bad_birth = m.add(f"{who.label} invalid birthDate", f"born-{who.token}")
        self.post("ehr-predict", who.label, EHR, record(who, birthDate=bad_birth), FHIR_JSON, {422})
        who = m.person("ehr-bad-gender")
        gender = m.add(f"{who.label} invalid gender", f"zqgender{who.token}")
        self.post("ehr-predict", who.label, EHR, record(who, gender=gender), FHIR_JSON, {422})
        who = m.person("ehr-unknown-element")
        extra = m.add(f"{who.label} unknown element value", f"zqextra{who.token}")
        self.post("ehr-predict", who.label, EHR, record(who, nickname=extra), FHIR_JSON, {422})
        who = m.person("ehr-truncated-json")
        body = record(who)
        self.post("ehr-predict", who.label, EHR, body[: body.index(b'"gender"')], FHIR_JSON, {400})
        who = m.person("ehr-wrong-media-type")
        self.post("ehr-predict", who.label, EHR, record(who), "text/plain", {415})
        who = m.person("features-unknown-code")
        code = m.add(f"{who.label} cp value", f"zqcp{who.token}")
        features = json.dumps({"features": {"age": 63, "sex": "male", "cp": code, "trestbps": 145}}).encode()
        self.post("features-predict", who.label, EHR, features, "application/json", {422})

    def dicom_predict(self) -> None:
        m = self.markers
        who = m.person("dicom-ok")
        self.post("dicom-predict", who.label, CXR, image(m, who).encoded, DICOM, {200})
        who = m.person("dicom-ok-sr")
        sr = self.post("dicom-predict", who.label, CXR, image(m, who, seed=1).encoded, DICOM, {200}, DICOM)
        assert who.patient_id.encode() in sr.content, "the SR answer names the patient: the markers went through"
        who = m.person("dicom-series")
        first = image(m, who, seed=2)
        second = image(m, who, seed=3, study=first.study)
        body, media = related(first.encoded, (second.encoded, named_after(who)))
        self.post("dicom-predict-multipart", who.label, CXR, body, media, {200})
        who = m.person("dicom-series-text-part")
        typed = {"Content-Type": f"text/plain; name={who.family}.txt"} | named_after(who)
        body, media = related(image(m, who, seed=2).encoded, (not_dicom(who), typed))
        self.post("dicom-predict-multipart", who.label, CXR, body, media, {415})
        who, other = m.person("dicom-two-patients"), m.person("dicom-two-patients-b")
        first = image(m, who, seed=4)
        body, media = related(first.encoded, image(m, other, seed=5, study=first.study).encoded)
        self.post("dicom-predict-multipart", who.label, CXR, body, media, {409})
        who = m.person("dicom-wrong-modality")
        self.post("dicom-predict", who.label, CXR, image(m, who, Modality="MR").encoded, DICOM, {422})
        who = m.person("dicom-body-part")
        part = m.add(f"{who.label} BodyPartExamined", f"ZQBODY{who.token}".upper())
        self.post("dicom-predict", who.label, CXR, image(m, who, BodyPartExamined=part).encoded, DICOM, {422})
        who = m.person("dicom-truncated-pixels")
        encoded = image(m, who).encoded
        self.post("dicom-predict", who.label, CXR, encoded[: len(encoded) // 2], DICOM, {400})
        who = m.person("dicom-truncated-header")
        self.post("dicom-predict", who.label, CXR, truncated_in_header(image(m, who), who), DICOM, {400})
        who = m.person("dicom-not-dicom")
        self.post("dicom-predict", who.label, CXR, not_dicom(who), DICOM, {400})
        who = m.person("dicom-invalid-values")
        encoded = image(m, who, invalid=True).encoded
        self.post("dicom-predict", who.label, CXR, encoded, DICOM, {200}, DICOM)

    def jwe(self) -> None:
        m = self.markers
        who = m.person("jwe-ehr-ok")
        self.post("jwe-predict", who.label, EHR, self.sealed(record(who), FHIR_JSON), "application/jose", {200})
        who = m.person("jwe-ehr-missing")
        body = self.sealed(record(who, observations(who, drop="cp")), FHIR_JSON)
        self.post("jwe-predict", who.label, EHR, body, "application/jose", {422})
        who = m.person("jwe-dicom-ok")
        self.post("jwe-predict", who.label, CXR, self.sealed(image(m, who).encoded, DICOM), "application/jose", {200})
        who = m.person("jwe-dicom-wrong-modality")
        body = self.sealed(image(m, who, Modality="MR").encoded, DICOM)
        self.post("jwe-predict", who.label, CXR, body, "application/jose", {422})

    def stow(self) -> None:
        m = self.markers
        a, b = m.person("stow-study-a"), m.person("stow-study-b")
        a1 = image(m, a, seed=6)
        named, typed = m.person("stow-part-headers"), m.person("stow-part-text-plain")
        good = [a1, image(m, a, seed=7, study=a1.study), image(m, b, seed=8), image(m, named, seed=13)]
        mr, body_part, cut, text_part = (m.person(f"stow-{n}") for n in ("mr", "body-part", "truncated", "not-dicom"))
        bad: list[bytes | tuple[bytes, dict[str, str]]] = [
            image(m, mr, Modality="MR").encoded,
            image(
                m,
                body_part,
                BodyPartExamined=m.add("stow-body-part BodyPartExamined", f"ZQBP{body_part.token}".upper()),
            ).encoded,
            truncated_in_header(image(m, cut), cut),
            not_dicom(text_part),
            (not_dicom(typed), named_after(typed) | {"Content-Type": f"text/plain; name={typed.family}.txt"}),
        ]
        body, media = related(*(i.encoded for i in good[:3]), (good[3].encoded, named_after(named)), *bad)
        self._stored(self.post("stow-rs", "mixed", "/dicomweb/studies", body, media, {202}), good)
        self.snapshot_spool()
        who, other = m.person("stow-study-mismatch"), m.person("stow-study-mismatch-path")
        path_study = m.add(f"{other.label} StudyInstanceUID in path", generate_uid(), uid=True)
        body, media = related(image(m, who).encoded)
        self.post("stow-rs", who.label, f"/dicomweb/studies/{path_study}", body, media, {409})
        who = m.person("stow-study-path")
        one = image(m, who, seed=9)
        body, media = related(one.encoded)
        self._stored(self.post("stow-rs", who.label, f"/dicomweb/studies/{one.study}", body, media, {200}), [one])
        who = m.person("stow-invalid-values")
        odd = image(m, who, invalid=True)
        body, media = related(odd.encoded)
        self._stored(self.post("stow-rs", who.label, "/dicomweb/studies", body, media, {200}), [odd])

    def snapshot_spool(self) -> None:
        for path in sorted(files_under(self.spool)):
            with contextlib.suppress(OSError):
                self.spooled.append((f"spool snapshot/{path.name}", path.read_bytes()))

    def _stored(self, response: httpx.Response, sent: list[Image]) -> None:
        items = response.json().get("00081199", {}).get("Value", [])
        stored = {item["00081155"]["Value"][0] for item in items}
        self.accepted_studies |= {i.study for i in sent if i.sop in stored}

    def c_store(self) -> None:
        m = self.markers
        g = m.person("cstore-study-g")
        self._storescu("cstore-ok", [image(m, g, seed=10)], expect_success=True)
        h = m.person("cstore-study-h")
        h1 = image(m, h, seed=11)
        self._storescu("cstore-ok", [h1, image(m, h, seed=12, study=h1.study)], expect_success=True)
        self.snapshot_spool()
        who = m.person("cstore-wrong-modality")
        self._storescu(who.label, [image(m, who, Modality="MR")], expect_success=False)
        who = m.person("cstore-body-part")
        part = m.add(f"{who.label} BodyPartExamined", f"ZQBPC{who.token}".upper())
        self._storescu(who.label, [image(m, who, BodyPartExamined=part)], expect_success=False)
        who = m.person("cstore-no-route-status")
        part = m.add(f"{who.label} BodyPartExamined", f"ZQBPS{who.token}".upper())
        self._status_of(who.label, image(m, who, BodyPartExamined=part))
        who = m.person("cstore-invalid-values")
        self._storescu(who.label, [image(m, who, invalid=True)], expect_success=True)

    def _storescu(self, label: str, images: list[Image], *, expect_success: bool) -> None:
        paths = []
        for img in images:
            path = self.scu_dir / f"{len(list(self.scu_dir.iterdir())):03d}.dcm"
            path.write_bytes(img.encoded)
            paths.append(str(path))
        result = subprocess.run(
            [dcmtk("storescu"), "-d", "-aet", CALLING_AE, "-aec", "MEDINFER", "127.0.0.1", str(self.scp_port), *paths],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        # Only the service's answers: the C-STORE-RSP messages as storescu -d prints them (without their
        # ErrorComment, which _status_of reads).
        answers = INCOMING_DIMSE.findall(result.stdout + result.stderr)
        successes = sum("DIMSE Status                  : 0x0000: Success" in answer for answer in answers)
        self.counts["c-store instances"] += len(images)
        assert (successes == len(images)) is expect_success, f"{label}: {result.stdout}{result.stderr}"
        if successes == len(images):
            self.accepted_studies |= {i.study for i in images}
        else:
            self.errors.append((f"c-store {label}", "\n".join(answers).encode()))

    def _status_of(self, label: str, img: Image) -> None:
        """storescu does not print a refusal's ErrorComment; pynetdicom hands back the whole status."""
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.scp_port, ae_title="MEDINFER")
        assert assoc.is_established, label
        try:
            status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(img.encoded)))
        finally:
            assoc.release()
        self.counts["c-store instances"] += 1
        assert status.Status != 0, label
        self.errors.append((f"c-store {label}", str(status).encode()))


# -- scanning -----------------------------------------------------------------------------------


def b64_cores(raw: bytes) -> set[bytes]:
    """The base64 characters that depend on ``raw`` alone, at each of the three alignments."""
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        core = encoded[-(-8 * offset // 6) : 8 * (offset + len(raw)) // 6]
        cores |= {core, core.translate(bytes.maketrans(b"+/", b"-_"))}
    return cores


@dataclass(frozen=True, slots=True)
class Leak:
    source: str
    marker: Marker
    form: str
    context: str

    def __str__(self) -> str:
        return f"{self.source}: {self.marker.origin} ({self.form}) ...{self.context}..."


def forms(text: str) -> list[tuple[str, bytes, bool]]:
    """(form, needle, case-insensitive) for one marker."""
    raw = text.encode()
    found = [
        ("clear, any case", raw.lower(), True),
        ("UTF-16LE, any case", text.lower().encode("utf-16-le"), True),
    ]
    found += [("base64", core, False) for core in b64_cores(raw)]
    return found


def _find(data: bytes, lowered: bytes, text: str) -> tuple[str, int, int] | None:
    for form, needle, folded in forms(text):
        at = (lowered if folded else data).find(needle)
        if at >= 0:
            return form, at, len(needle)
    return None


def scan(source: str, data: bytes, markers: Markers, *, uids: bool, run_only: bool = False) -> list[Leak]:
    """Every marker found in ``data``. Markers that hold the run's token are looked for only where the
    token itself is (in any form); ``run_only`` looks for those alone (large, unrelated files)."""
    lowered = data.lower()
    token_seen = _find(data, lowered, markers.run) is not None
    leaks = []
    for marker in markers.items:
        has_token = markers.run in marker.text.lower()
        if (marker.uid and not uids) or (has_token and not token_seen) or (run_only and not has_token):
            continue
        found = _find(data, lowered, marker.text)
        if found is not None:
            form, at, size = found
            context = data[max(0, at - 100) : at + size + 100].decode("utf-8", "replace")
            leaks.append(Leak(source, marker, form, context))
    return leaks


def files_under(root: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def directory_sources(group: str, root: Path) -> list[tuple[str, bytes]]:
    """Every file's bytes, and the list of names (a file named by an identifier leaks too)."""
    paths = sorted(files_under(root))
    listing = "\n".join(str(p.relative_to(root)) for p in paths).encode()
    return [(f"{group} (file names)", listing)] + [(f"{group}/{p.relative_to(root)}", p.read_bytes()) for p in paths]


def stray_sources(before: set[Path], exclude: tuple[Path, ...]) -> tuple[list[tuple[str, bytes]], int]:
    """New entries under /tmp and /dev/shm: whatever a library wrote outside TMPDIR (other jobs'
    files too, on a shared machine: they are read up to a budget and cannot hold this run's markers)."""
    sources, skipped, budget = [], 0, STRAY_BUDGET
    for root in (Path("/tmp"), Path("/dev/shm")):  # noqa: S108 - the shared temp dirs are what is inspected
        with contextlib.suppress(OSError):
            for entry in sorted(set(root.iterdir()) - before):
                if any(entry == e or e in entry.parents or entry in e.parents for e in exclude):
                    continue
                for path in [entry] if entry.is_file() else files_under(entry):
                    try:
                        size = path.stat().st_size
                        if size > min(STRAY_FILE_LIMIT, budget):
                            skipped += 1
                            continue
                        sources.append((f"stray {path}", path.read_bytes()))
                        budget -= size
                    except OSError:
                        skipped += 1
    return sources, skipped


def temp_entries() -> set[Path]:
    entries: set[Path] = set()
    for root in (Path("/tmp"), Path("/dev/shm")):  # noqa: S108 - see stray_sources
        with contextlib.suppress(OSError):
            entries |= set(root.iterdir())
    return entries


def dump_database(url: str) -> list[tuple[str, bytes]]:
    """Every row of every table, as text (binary values as they are)."""
    engine = create_engine(url)
    sources = []
    try:
        with engine.connect() as conn:
            metadata = MetaData()
            metadata.reflect(conn)
            for table in metadata.sorted_tables:
                chunks: list[bytes] = []
                for row in conn.execute(select(table)):
                    for value in row:
                        chunks.append(bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode())
                        chunks.append(b"\t")
                    chunks.append(b"\n")
                sources.append((f"table {table.name}", b"".join(chunks)))
    finally:
        engine.dispose()
    return sources


def outbox_rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(text("pacs_outbox"))).scalar_one())
    finally:
        engine.dispose()


def wait_for_studies(served: Served, studies: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served.log_path.read_text().count(STUDY_DONE) >= studies:
            return
        time.sleep(0.25)
    raise AssertionError(f"{studies} studies did not settle in {timeout_s}s:\n{served.log_path.read_text()[-3000:]}")


def audit_api(http: httpx.Client) -> bytes:
    pages, cursor = [], None
    while True:
        params = {"limit": "500"} | ({"cursor": cursor} if cursor else {})
        page = http.get("/v1/audit/events", params=params)
        assert page.status_code == 200, page.text
        pages.append(page.content)
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    export = http.get("/v1/audit/export")
    assert export.status_code == 200, export.text
    verify = http.get("/v1/audit/verify")
    assert verify.json()["valid"] is True, verify.text
    return b"\n".join([*pages, export.content, verify.content])


# -- the test -----------------------------------------------------------------------------------


@dataclass
class Scanned:
    #: What the service wrote, kept or logged: every marker, UIDs included.
    sources: list[tuple[str, bytes]] = field(default_factory=list)
    #: Answers, in which UIDs may legitimately appear (a STOW-RS failure names its instance): PHI only.
    phi_only: list[tuple[str, bytes]] = field(default_factory=list)
    #: New files under /tmp and /dev/shm, most of them other jobs': markers holding the run's token.
    stray: list[tuple[str, bytes]] = field(default_factory=list)

    def leaks(self, markers: Markers) -> list[Leak]:
        found = [leak for name, data in self.sources for leak in scan(name, data, markers, uids=True)]
        found += [leak for name, data in self.phi_only for leak in scan(name, data, markers, uids=False)]
        return found + [
            leak for name, data in self.stray for leak in scan(name, data, markers, uids=False, run_only=True)
        ]

    def summary(self) -> dict[str, int]:
        sizes: Counter[str] = Counter()
        for name, data in self.sources + self.phi_only + self.stray:
            sizes[_group(name)] += len(data)
        return dict(sorted(sizes.items()))


def assert_not_vacuous(sources: dict[str, bytes]) -> None:
    """Each source holds what it should, so a clean scan means something."""
    log = sources["service stdout+stderr"]
    assert b"C-STORE refused" in log
    assert log.count(STUDY_DONE.encode()) > 0
    assert b"result delivery failed" in log
    statements = sources["PostgreSQL statement log"]
    assert b"INSERT INTO audit_event" in statements
    assert b"parameters: $1 = " in statements
    assert sources["table audit_event"].count(b"\n") > 20
    assert b"MISEAL1\n" in sources["table pacs_outbox"]  # undelivered SR, sealed in their rows
    assert b"medinfer_http_requests" in sources["/metrics"]


def _group(source: str) -> str:
    for prefix in ("error answer", "stray", "data dir", "TMPDIR", "spool snapshot"):
        if source.startswith(prefix):
            return prefix
    return source


def test_no_identifier_reaches_logs_metrics_database_files_or_error_bodies(
    tmp_path: Path, logged_pg: StatementLoggingPostgres
) -> None:
    service_tmp, scu_dir = tmp_path / "service-tmp", tmp_path / "scu"
    service_tmp.mkdir()
    scu_dir.mkdir()
    scp_port = free_port()
    env = base_env(tmp_path, REPO_ROOT / "models", logged_pg.url) | {
        "TMPDIR": str(service_tmp),
        "MEDINFER_LOG_LEVEL": "DEBUG",
        "MEDINFER_DIMSE_ENABLED": "true",
        "MEDINFER_DIMSE_PORT": str(scp_port),
        "MEDINFER_DIMSE_AE_TITLE": "MEDINFER",
        "MEDINFER_DIMSE_ALLOWED_CALLING_AES": json.dumps([CALLING_AE]),
        "MEDINFER_STUDY_SETTLE_S": "0.5",
        "MEDINFER_IMAGING_ROUTES": json.dumps(
            [{"modality": ["CR", "DX"], "body_part": ["CHEST"], "model": "cxr-pneumonia"}]
        ),
        # Nobody listens there: every SR is retried, so delivery failures are written and logged too.
        "MEDINFER_PACS_DESTINATION": f"dimse://NOWHERE@127.0.0.1:{free_port()}",
        "MEDINFER_PACS_RETRY_BASE_S": "0.2",
    }
    assert medinfer(env, "migrate").returncode == 0
    assert medinfer(env, "keys", "generate", "--state", "active").returncode == 0
    key = register_key(env, "privacy-his", "infer", "audit:read", "metrics:read")
    before = temp_entries()
    served = serve(env, tmp_path / "medinfer.log")
    markers = Markers()
    scanned = Scanned()
    try:
        with httpx.Client(base_url=served.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            work = Workload(http, markers, scu_dir, scp_port, tmp_path / "var" / "spool")
            work.ehr()
            work.dicom_predict()
            work.jwe()
            work.stow()
            work.c_store()
            wait_for_studies(served, len(work.accepted_studies))
            outbox = outbox_rows(logged_pg.url)
            time.sleep(1.0)  # a few delivery attempts to the absent PACS, each one written and logged
            scanned.sources.append(("/metrics", http.get("/metrics").content))
            scanned.sources.append(("audit API", audit_api(http)))
    finally:
        served.stop()
    scanned.sources.append(("service stdout+stderr", served.log_path.read_bytes()))
    scanned.sources += dump_database(logged_pg.url)
    scanned.sources.append(("PostgreSQL statement log", logged_pg.log.read_bytes()))
    scanned.sources += directory_sources("data dir", tmp_path / "var")
    scanned.sources += directory_sources("TMPDIR", service_tmp)
    stray, skipped = stray_sources(before, (tmp_path, logged_pg.root))
    assert work.spooled, "no sealed instance was caught in the spool: the spool was never scanned"
    scanned.sources += work.spooled
    scanned.stray += stray
    scanned.phi_only += [(f"error answer: {label}", data) for label, data in work.errors]

    leaks = scanned.leaks(markers)
    print(  # the report: what ran, what was read, what was found
        json.dumps(
            {
                "requests": dict(sorted(work.counts.items())),
                "error answers": len(work.errors),
                "studies accepted by STOW-RS and C-STORE": len(work.accepted_studies),
                "pacs_outbox rows": outbox,
                "markers": len(markers.items),
                "bytes scanned": scanned.summary(),
                "sealed instances caught in the spool": len(work.spooled),
                "stray files skipped (unreadable, > 16 MiB or past the 256 MiB budget)": skipped,
                "leaks": len(leaks),
            },
            indent=1,
        )
    )
    assert outbox == len(work.accepted_studies), "every accepted study should have its SR in the outbox"
    assert_not_vacuous(dict(scanned.sources))
    assert not leaks, "identifiers found where the service keeps or says things:\n" + "\n".join(
        re.sub(r"\s+", " ", str(leak)) for leak in leaks
    )


def test_the_scanner_finds_markers_in_clear_in_any_case_in_base64_and_in_utf16() -> None:
    markers = Markers(run="abcdef")
    who = markers.person("probe")
    uid = markers.add("probe uid", "1.2.826.0.1.3680043.8.498.1234567", uid=True)
    for prefix in (b"", b"x", b"xy"):
        planted = [
            b"name=" + who.pn.upper().encode(),
            base64.b64encode(prefix + who.family.encode() + b"^Jane"),
            base64.urlsafe_b64encode(prefix + b"\xff\xfe" + who.patient_id.encode()),
            who.given.lower().encode("utf-16-le"),
            prefix + f"{who.birth:%Y%m%d}".encode(),
            prefix + uid.encode(),
        ]
        for data in planted:
            assert scan("probe", b"..." + data + b"...", markers, uids=True), data
    assert not scan("probe", who.family[:-1].encode(), markers, uids=True)
    assert not scan("probe", uid.encode(), markers, uids=False)
    assert not scan("probe", f"{who.birth:%Y%m%d}".encode(), markers, uids=False, run_only=True)
    assert scan("probe", who.city.encode(), markers, uids=False, run_only=True)
