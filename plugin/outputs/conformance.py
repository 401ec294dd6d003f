"""What a result copies from its inputs, made conformant whatever the inputs carry.

highdicom copies every root attribute of the Patient and Study modules of the first
source, and its character set, into an SR (a KOS takes the Type 2 ones). Inputs are
often not conformant, and what radpipe writes must be. So highdicom copies from a
conformed copy of the source header, built by four general rules, in this order:

1. values: an attribute whose value is invalid for its VR or not one of its enumerated
   values is left out, unless the repair is certain (Age String "75Y" -> "075Y", an
   unknown character set -> UTF-8, which encodes any decoded text); a sequence is left
   out when one of its items has an invalid value, lacks a Type 1 or 2 attribute
   (highdicom's table of the modules' nested attributes) or is a code without its
   value, scheme or meaning;
2. conditions (:data:`CONDITIONS`, PS3.3's for these modules): a Type 1C attribute that
   is required and absent takes out the attributes that required it, a Type 2C one is
   added empty, and one that may not be present without its condition is left out;
3. modules: an optional module that lacks a Type 1 attribute is left out whole;
4. a Type 2 attribute that is absent is added empty (highdicom needs those of the
   mandatory modules, and a present optional module needs its own).

Only attribute names are logged: the values may identify the patient.
"""

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Literal

from highdicom._standard_utils import (  # the tables highdicom copies by (pinned minor version)
    get_iod_module_map,
    get_module_attribute_map,
    get_sop_class_iod_map,
)
from pydicom import DataElement, Dataset, config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
    SegmentationStorage,
)
from pydicom.valuerep import validate_value

log = logging.getLogger(__name__)

_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
_CODE_VALUES = ("CodeValue", "LongCodeValue", "URNCodeValue")


@dataclass(frozen=True)
class Condition:
    """PS3.3: when any of ``when`` has a value (equal to ``equal``, if set), one of
    ``required`` (Type ``type``) shall be present; with ``exclusive``, ``required`` may
    not be present otherwise."""

    when: tuple[str, ...]
    required: tuple[str, ...]
    type: Literal["1C", "2C"]
    equal: str | None = None
    exclusive: bool = False


# Attributes that make the patient an animal (PS3.3 C.7.1.1; as dciodvfy reads it).
_ANIMAL = (
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
)

# The conditions of the root-level Type 1C/2C attributes of the Patient, Clinical Trial
# Subject, General Study, Patient Study and Clinical Trial Study modules, in an order
# where no later repair breaks an earlier condition.
CONDITIONS = (
    Condition(("PatientIdentityRemoved",), ("DeidentificationMethod", "DeidentificationMethodCodeSequence"), "1C",
              equal="YES"),
    Condition(("PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar"),
              ("PatientAlternativeCalendar",), "1C", exclusive=True),
    Condition(_ANIMAL, ("PatientSpeciesDescription", "PatientSpeciesCodeSequence"), "1C"),
    *(Condition(_ANIMAL, (keyword,), "2C")
      for keyword in ("PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
                      "ResponsiblePerson", "ResponsibleOrganization", "PatientSexNeutered")),
    Condition(("ResponsiblePerson",), ("ResponsiblePersonRole",), "1C", exclusive=True),
    Condition(("ClinicalTrialSponsorName", "ClinicalTrialProtocolID"),
              ("ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID"), "1C"),
    Condition(("ClinicalTrialProtocolEthicsCommitteeApprovalNumber",), ("ClinicalTrialProtocolEthicsCommitteeName",),
              "1C", exclusive=True),
    Condition(("LongitudinalTemporalOffsetFromEvent",), ("LongitudinalTemporalEventType",), "1C", exclusive=True),
)  # fmt: skip

# Enumerated values (PS3.3) of the root attributes of those modules.
ENUMERATED: dict[str, set[str | int]] = {
    "PatientSex": {"M", "F", "O"},
    "PatientIdentityRemoved": {"YES", "NO"},
    "QualityControlSubject": {"YES", "NO"},
    "PatientSexNeutered": {"ALTERED", "UNALTERED"},
    "SmokingStatus": {"YES", "NO", "UNKNOWN"},
    "PregnancyStatus": {1, 2, 3, 4},
    "LongitudinalTemporalEventType": {"ENROLLMENT", "BASELINE"},
}


@dataclass(frozen=True)
class _Module:
    mandatory: bool
    types: dict[str, str]  # root keyword -> type
    nested: dict[tuple[str, ...], dict[str, str]]  # sequence path -> keyword -> type


@cache
def _modules(sop_class_uid: str) -> tuple[_Module, ...]:
    """The Patient and Study modules of the IOD of ``sop_class_uid``, from highdicom's tables."""
    attributes = get_module_attribute_map()
    modules = []
    for entry in get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]:
        if entry["ie"] not in ("Patient", "Study"):
            continue
        types: dict[str, str] = {}
        nested: dict[tuple[str, ...], dict[str, str]] = {}
        for item in attributes[entry["key"]]:
            level = nested.setdefault(tuple(item["path"]), {}) if item["path"] else types
            level[item["keyword"]] = item["type"]
        modules.append(_Module(entry["usage"] == "M", types, nested))
    return tuple(modules)


def load_tables() -> None:
    """Read highdicom's module tables for every SOP class radpipe writes (SR, KOS, SEG):
    0.3-0.5 s once per process, which the first result of a node would otherwise add to
    its series' wait. A node calls this while it loads."""
    for sop_class_uid in (Comprehensive3DSRStorage, EnhancedSRStorage, KeyObjectSelectionDocumentStorage,
                          SegmentationStorage):  # fmt: skip
        _modules(sop_class_uid)


def valid_uid(uid: object) -> bool:
    """A UID valid in what radpipe writes: PS3.5 9.1 (digits, no leading zeros, at most 64
    characters) under an ISO or joint ISO/ITU-T root arc (1 or 2), and not under the
    example arc 2.999 (as dciodvfy checks)."""
    text = "" if uid is None else str(uid)
    try:
        validate_value("UI", text, config.RAISE)
    except ValueError:
        return False
    return text.split(".")[0] in ("1", "2") and not (text + ".").startswith("2.999.")


def referenceable(*sources: Dataset) -> bool:
    """A result names its sources by their UIDs, which it cannot change: can it? Each
    distinct UID is checked once: a series' images share their Study and Series UIDs."""
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    uids = {str(source.get(k, "")) for source in sources for k in keywords}  # str: a broken one may be multi-valued
    return all(valid_uid(uid) for uid in uids)


def result_source(sop_class_uid: str) -> bool:
    """Can a result (SR, SEG, KOS) be written from an image of this SOP class? highdicom
    copies the image's patient and study modules as its IOD defines them, and has no IOD
    for the retired SOP classes that the node also stores (Ultrasound Image Storage
    (Retired), ...)."""
    return sop_class_uid in get_sop_class_iod_map()


def conformant_source(source: Dataset, sop_class_uid: str) -> Dataset:
    """A copy of ``source`` whose attributes that a result of ``sop_class_uid`` copies
    conform; logs the names of those it changed. ``source`` and its elements are not
    changed (the copy replaces elements, never alters them)."""
    copy = Dataset(dict(source.items()))
    modules = _modules(sop_class_uid)
    left_out: list[str] = []
    emptied: list[str] = []
    repaired: list[str] = []
    for keyword in [k for m in modules for k in m.types] + ["SpecificCharacterSet"]:
        if keyword in copy and (conformed := _conform_value(copy, keyword, modules)) != "valid":
            (repaired if conformed == "repaired" else left_out).append(keyword)
    for condition in CONDITIONS:
        present = [k for k in condition.when if _has_value(copy, k, condition.equal)]
        satisfied = any(k in copy for k in condition.required)
        if present and not satisfied and condition.type == "2C":
            emptied += _add_empty(copy, condition.required)
        elif present and not satisfied:
            left_out += _remove(copy, present)
        elif not present and satisfied and condition.exclusive:
            left_out += _remove(copy, condition.required)
    for module in modules:
        incomplete = any(t == "1" and not _has_value(copy, k) for k, t in module.types.items())
        if not module.mandatory and incomplete and any(k in copy for k in module.types):
            left_out += _remove(copy, module.types)
    for module in modules:
        if module.mandatory or any(k in copy for k in module.types):
            emptied += _add_empty(copy, [k for k, t in module.types.items() if t == "2"])
    left_out = [k for k in dict.fromkeys(left_out) if k not in copy]
    if left_out or emptied or repaired:
        log.warning(
            "input attributes not conformant; the result leaves out: %s; carries empty: %s; repaired: %s",
            ", ".join(left_out) or "-",
            ", ".join(dict.fromkeys(emptied)) or "-",
            ", ".join(repaired) or "-",
        )
    return copy


def _conform_value(ds: Dataset, keyword: str, modules: Sequence[_Module]) -> Literal["valid", "repaired", "removed"]:
    """Keep ``keyword`` if valid, replace it if the repair is certain, else remove it."""
    element = ds[keyword]
    if keyword == "SpecificCharacterSet":
        terms = element.value if isinstance(element.value, MultiValue) else [element.value]
        valid = all(term in python_encoding for term in terms)
    elif element.VR == "SQ":
        nested = next((m.nested for m in modules if keyword in m.types), {})
        valid = all(_item_conforms(item, nested, (keyword,)) for item in element.value)
    else:
        valid = _valid(element) and _enumerated(element)
    if valid:
        return "valid"
    if (repaired := _repair(element)) is not None:
        ds[keyword] = DataElement(element.tag, element.VR, repaired)
        return "repaired"
    del ds[keyword]
    return "removed"


def _item_conforms(item: Dataset, nested: dict[tuple[str, ...], dict[str, str]], path: tuple[str, ...]) -> bool:
    """Every value valid, every Type 1 attribute with a value, every Type 2 present, a
    code with its value, scheme and meaning, and so in every nested item."""
    level = nested.get(path, {})
    for keyword, type_ in level.items():
        if (type_ == "1" and not _has_value(item, keyword)) or (type_ == "2" and keyword not in item):
            return False
    if "CodeMeaning" in level and not (
        any(_has_value(item, k) for k in _CODE_VALUES)
        and (_has_value(item, "CodingSchemeDesignator") or _has_value(item, "URNCodeValue"))
    ):
        return False
    for element in item:
        if element.VR == "SQ":
            if not all(_item_conforms(i, nested, (*path, element.keyword)) for i in element.value):
                return False
        elif not _valid(element):
            return False
    return True


def _valid(element: DataElement) -> bool:
    """The element has its dictionary VR and every value is valid for it."""
    try:
        expected = dictionary_VR(element.tag)
    except KeyError:
        expected = element.VR  # private or unknown: judged by its own VR
    if expected != element.VR and " or " not in expected:
        return False
    if element.VR not in _TEXT_VRS or element.value in (None, ""):
        return True
    values = [str(v) for v in (element.value if isinstance(element.value, MultiValue) else [element.value])]
    try:
        for value in values:
            validate_value(element.VR, value, config.RAISE)
    except ValueError:
        return False
    # pydicom checks the length of a name's components, not how many there are (PS3.5 6.2).
    return element.VR != "PN" or all(v.count("=") <= 2 and all(g.count("^") <= 4 for g in v.split("=")) for v in values)


def _enumerated(element: DataElement) -> bool:
    allowed = ENUMERATED.get(element.keyword)
    if allowed is None or element.value in (None, ""):
        return True
    values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
    return all(v in allowed for v in values)


def _repair(element: DataElement) -> str | None:
    """The certain repair of an invalid value, or None."""
    if element.keyword == "SpecificCharacterSet":
        return "ISO_IR 192"  # pydicom has decoded the text already; UTF-8 encodes all of it
    value = element.value
    if element.VR == "AS" and isinstance(value, str) and (m := re.fullmatch(r"\s*(\d{1,3})([DWMY])\s*", value)):
        return f"{int(m.group(1)):03d}{m.group(2)}"
    return None


def _has_value(ds: Dataset, keyword: str, equal: str | None = None) -> bool:
    if keyword not in ds:
        return False
    value = ds[keyword].value
    if equal is not None:
        return value == equal
    return value is not None and value != "" and not (isinstance(value, (MultiValue, list)) and len(value) == 0)


def _remove(ds: Dataset, keywords: Iterable[str]) -> list[str]:
    removed = [k for k in keywords if k in ds]
    for keyword in removed:
        del ds[keyword]
    return removed


def _add_empty(ds: Dataset, keywords: Iterable[str]) -> list[str]:
    added = [k for k in keywords if k not in ds]
    for keyword in added:
        tag = Tag(keyword)
        ds.add(DataElement(tag, dictionary_VR(tag), None))
    return added
