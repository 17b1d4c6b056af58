"""QIDO-RS (PS3.18 §10.6), pure: the attributes the gateway's index answers queries on, a query's parameters
parsed and checked (`parse`), the matching of PS3.4 C.2.2.2 as QIDO uses it (single value, `*`/`?` wildcards,
date and time ranges, UID lists), and a result as DICOM JSON (PS3.18 F.2).

Matching happens here, on rows of the index, not in SQL: the same semantics on SQLite and MariaDB whatever their
collations (case-sensitive, as DICOM matching is unless `fuzzymatching`, which we answer case-insensitively for
person names).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LEVELS = (STUDY, SERIES, INSTANCE)


@dataclass(frozen=True)
class Attr:
    keyword: str
    tag: str  # 8 hex digits, upper case
    vr: str
    level: str
    column: str  # in the index (`catalog.webindex`), or a computed one
    size: int = 0  # the longest text the index keeps (its column's size); 0: a number


ATTRS: tuple[Attr, ...] = (
    Attr("StudyDate", "00080020", "DA", STUDY, "study_date", 8),
    Attr("StudyTime", "00080030", "TM", STUDY, "study_time", 16),
    Attr("AccessionNumber", "00080050", "SH", STUDY, "accession_number", 16),
    Attr("ModalitiesInStudy", "00080061", "CS", STUDY, "modalities"),
    Attr("ReferringPhysicianName", "00080090", "PN", STUDY, "referring_physician", 324),
    Attr("StudyDescription", "00081030", "LO", STUDY, "study_description", 64),
    Attr("PatientName", "00100010", "PN", STUDY, "patient_name", 324),
    Attr("PatientID", "00100020", "LO", STUDY, "patient_id", 64),
    Attr("PatientBirthDate", "00100030", "DA", STUDY, "patient_birth_date", 8),
    Attr("PatientSex", "00100040", "CS", STUDY, "patient_sex", 16),
    Attr("StudyInstanceUID", "0020000D", "UI", STUDY, "study_uid", 64),
    Attr("StudyID", "00200010", "SH", STUDY, "study_id", 16),
    Attr("NumberOfStudyRelatedSeries", "00201206", "IS", STUDY, "series_count"),
    Attr("NumberOfStudyRelatedInstances", "00201208", "IS", STUDY, "instance_count"),
    Attr("SeriesDate", "00080021", "DA", SERIES, "series_date", 8),
    Attr("SeriesTime", "00080031", "TM", SERIES, "series_time", 16),
    Attr("Modality", "00080060", "CS", SERIES, "modality", 16),
    Attr("SeriesDescription", "0008103E", "LO", SERIES, "series_description", 64),
    Attr("BodyPartExamined", "00180015", "CS", SERIES, "body_part", 16),
    Attr("SeriesInstanceUID", "0020000E", "UI", SERIES, "series_uid", 64),
    Attr("SeriesNumber", "00200011", "IS", SERIES, "series_number"),
    Attr("NumberOfSeriesRelatedInstances", "00201209", "IS", SERIES, "series_instance_count"),
    Attr("SOPClassUID", "00080016", "UI", INSTANCE, "sop_class_uid", 64),
    Attr("SOPInstanceUID", "00080018", "UI", INSTANCE, "sop_uid", 64),
    Attr("InstanceNumber", "00200013", "IS", INSTANCE, "instance_number"),
    Attr("Rows", "00280010", "US", INSTANCE, "rows_"),
    Attr("Columns", "00280011", "US", INSTANCE, "columns_"),
    Attr("NumberOfFrames", "00280008", "IS", INSTANCE, "frames"),
)
BY_KEYWORD = {a.keyword: a for a in ATTRS}
BY_TAG = {a.tag: a for a in ATTRS}
COUNTS = {"series_count", "instance_count", "series_instance_count"}  # computed, not matched
# What the index (`catalog.webindex`, `stages.webindex`) holds: every attribute but the computed ones
INDEXED: tuple[Attr, ...] = tuple(a for a in ATTRS if a.column not in COUNTS and a.column != "modalities")
# What every response of a level holds (PS3.18 Table 10.6.3-3..5), lower levels add their own
DEFAULTS = {
    STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "StudyDescription",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    SERIES: (
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ),
    INSTANCE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"),
}
MAX_LIMIT = 1000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
EXTENSIONS = ("direction", "partner")  # ours: received from a partner, or sent to one


class QueryError(ValueError):
    """A query parameter that is not valid (400, with this text: it names the parameter, never echoes a value)."""


@dataclass(frozen=True)
class Matcher:
    """One attribute's condition."""

    attr: Attr
    kind: str  # "uids", "range", "wildcard", "exact"
    values: tuple[str, ...]
    fuzzy: bool = False

    def __call__(self, value: object) -> bool:
        text = "" if value is None else str(value)
        if self.kind == "uids":
            return text in self.values
        if self.kind == "range":
            lo, hi = self.values
            if not text:
                return False
            width = 8 if self.attr.vr == "DA" else len(text)
            return (not lo or text[:width] >= lo[:width]) and (not hi or text[: len(hi)] <= hi)
        if self.attr.keyword == "ModalitiesInStudy":
            return any(self._one(m) for m in text.split("\\"))
        return self._one(text)

    def _one(self, text: str) -> bool:
        want = self.values[0]
        if self.attr.vr == "PN" and self.fuzzy:
            text, want = text.lower(), want.lower()
        if self.kind == "wildcard":
            return fnmatch.fnmatchcase(text, want.replace("[", "[[]"))
        if self.attr.vr == "PN":  # a single value matches any component group, as written
            return text == want or text.split("=")[0] == want
        return text == want


@dataclass(frozen=True)
class Query:
    level: str
    matchers: tuple[Matcher, ...]
    include: tuple[Attr, ...]
    limit: int
    offset: int
    extensions: Mapping[str, str] = field(default_factory=dict)
    not_included: tuple[str, ...] = ()  # includefield names we do not index

    def matches(self, row: Mapping[str, Any]) -> bool:
        return all(m(row.get(m.attr.column)) for m in self.matchers)


def _attr(name: str) -> Attr:
    found = BY_KEYWORD.get(name) or BY_TAG.get(name.upper())
    if found is None:
        raise QueryError(f"attribute {name[:64]!r} is not supported for matching")
    return found


def _matcher(attr: Attr, value: str, fuzzy: bool) -> Matcher:
    if attr.column in COUNTS:
        raise QueryError(f"{attr.keyword} cannot be matched")
    if attr.vr == "UI":
        uids = tuple(u for u in re.split(r"[\\,]", value) if u)
        if not uids or any(not _UID.match(u) or len(u) > 64 for u in uids):
            raise QueryError(f"{attr.keyword}: not a UID list")
        return Matcher(attr, "uids", uids)
    if attr.vr in ("DA", "TM") and "-" in value:
        lo, _, hi = value.partition("-")
        check = _DATE if attr.vr == "DA" else _TIME
        if (lo and not check.match(lo)) or (hi and not check.match(hi)) or not (lo or hi):
            raise QueryError(f"{attr.keyword}: not a {attr.vr} range")
        return Matcher(attr, "range", (lo, hi))
    if attr.vr == "DA" and not _DATE.match(value):
        raise QueryError(f"{attr.keyword}: not a date (YYYYMMDD or a range)")
    if len(value) > 256:
        raise QueryError(f"{attr.keyword}: value too long")
    kind = "wildcard" if ("*" in value or "?" in value) else "exact"
    return Matcher(attr, kind, (value,), fuzzy)


def parse(level: str, params: Sequence[tuple[str, str]], fixed: Mapping[str, str] | None = None) -> Query:
    """A QIDO query at `level` from its parameters (repeated keys allowed); `fixed` holds the UIDs of the path
    (e.g. the study of `/studies/{uid}/series`). Raises `QueryError`."""
    fuzzy = any(k == "fuzzymatching" and v.lower() == "true" for k, v in params)
    matchers: list[Matcher] = []
    include: list[Attr] = []
    include_all = False
    limit, offset = MAX_LIMIT, 0
    extensions: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in params:
        if key == "fuzzymatching":
            continue
        if key == "limit":
            limit = _int(key, value, 1, MAX_LIMIT)
        elif key == "offset":
            offset = _int(key, value, 0, 10**9)
        elif key == "includefield":
            for name in value.split(","):
                if name == "all":
                    include_all = True
                elif name in BY_KEYWORD or name.upper() in BY_TAG:
                    include.append(_attr(name))
                elif name:
                    ignored.append(name[:64])  # not in our index: left out, said in a Warning header
        elif key in EXTENSIONS:
            if key == "direction" and value not in ("received", "sent"):
                raise QueryError("direction: received or sent")
            extensions[key] = value[:64]
        elif value == "":
            continue  # an empty value asks for the attribute to be returned (universal matching)
        else:
            matchers.append(_matcher(_attr(key), value, fuzzy))
    for keyword, uid in (fixed or {}).items():
        matchers.append(_matcher(BY_KEYWORD[keyword], uid, False))
    order = LEVELS.index(level)
    if include_all:
        include = [a for a in ATTRS if LEVELS.index(a.level) <= order]
    else:
        include += [a for a in ATTRS if a.keyword in DEFAULTS[level]]
        if level != STUDY:  # lower levels name the study (and series) they belong to
            include.append(BY_KEYWORD["StudyInstanceUID"])
        if level == INSTANCE:
            include.append(BY_KEYWORD["SeriesInstanceUID"])
        include += [m.attr for m in matchers]
    seen: dict[str, Attr] = {}
    for a in include:
        if LEVELS.index(a.level) <= order or a.keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            seen.setdefault(a.keyword, a)
    return Query(level, tuple(matchers), tuple(seen.values()), limit, offset, extensions, tuple(ignored))


def _int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except ValueError:
        raise QueryError(f"{key}: not a number") from None
    if not lo <= n <= hi:
        raise QueryError(f"{key}: must be between {lo} and {hi}")
    return n


def to_json(row: Mapping[str, Any], attrs: Sequence[Attr], base: str = "") -> dict[str, Any]:
    """One result as DICOM JSON (PS3.18 F.2), attributes in tag order; `base` adds the Retrieve URL."""
    out: dict[str, Any] = {}
    for a in sorted(attrs, key=lambda a: a.tag):
        out[a.tag] = element(a.vr, row.get(a.column))
    if base:
        out["00081190"] = {"vr": "UR", "Value": [base]}
    return dict(sorted(out.items()))


def element(vr: str, value: object) -> dict[str, Any]:
    """A DICOM JSON element: empty when there is no value."""
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(value)}]}
    if vr in ("US", "IS", "UL", "SL", "SS"):
        try:
            return {"vr": vr, "Value": [int(str(value))]}
        except ValueError:
            return {"vr": vr}
    if vr == "CS" and "\\" in str(value):
        return {"vr": vr, "Value": [v for v in str(value).split("\\") if v]}
    return {"vr": vr, "Value": [str(value)]}
