"""Pipeline files: round trip, the match language, and errors at their exact file:line:column."""

import textwrap

import pydicom
import pytest
import yaml

from plugin.match import holds
from plugin.pipeline import PipelineError, load_pipeline, load_pipeline_files
from tests.conftest import DEID_HUMANS, DEMO_ARTIFACT, DEMO_PIPELINE, PYDICOM_FILES

CT = pydicom.dcmread(DEID_HUMANS / "ctbrain1.dcm", stop_before_pixels=True)
MR = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm", stop_before_pixels=True)


def test_load_dump_load_round_trip(tmp_path):
    original = load_pipeline(DEMO_PIPELINE)
    dumped = original.model_dump(mode="json", exclude_none=True)
    dumped["model"]["artifact"] = str(original.artifact_dir)
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(dumped))
    again = load_pipeline(tmp_path / "copy.yaml")
    assert again.model_dump(exclude={"model"}) == original.model_dump(exclude={"model"})
    assert again.artifact_dir == original.artifact_dir


def _pipeline(tmp_path, match: str, name: str = "p"):
    lines = [
        f"name: {name}",
        "version: 1",
        "match:",
        textwrap.indent(match, "  "),
        f"model: {{artifact: {DEMO_ARTIFACT}}}",
        "postprocess:",
        '  findings: [{label: nodule, code: [SCT, "27925004", Nodule]}]',
    ]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("match", "ct", "mr"),
    [
        ("Modality: CT", True, False),
        ("Modality: {in: [CT, MR]}", True, True),
        ('StudyDescription: {regex: "(?i)^ct"}', True, False),
        ("SliceThickness: {range: [1, 10]}", True, False),  # CT 4.8 mm, MR 0.8 mm
        ("SliceThickness: {range: [null, 1]}", False, True),
        ("ContrastBolusAgent: {exists: false}", True, True),
        ("PatientName: {exists: true}", True, True),
        ("Modality: {not: {in: [MR, PT]}}", True, False),
        ('"(0008,0060)": MR', False, True),
        ("ImageType: AXIAL", True, False),  # any value of a multi-valued attribute
        ("any: [{Modality: MR}, {SliceThickness: {range: [4, 6]}}]", True, True),
        ("all: [{Modality: CT}, {not: {Rows: 512}}]", True, False),
        ("not: {Modality: CT}", False, True),
    ],
)
def test_match_language(tmp_path, match, ct, mr):
    rule = load_pipeline(_pipeline(tmp_path, match)).rule
    assert (holds(rule, CT), holds(rule, MR)) == (ct, mr)


def test_private_tag_match_is_creator_aware(tmp_path):
    ds = pydicom.Dataset()
    ds.private_block(0x0019, "ACME_1.0", create=True).add_new(0x0C, "LO", "lung protocol")
    other = pydicom.Dataset()
    other.private_block(0x0019, "OTHER", create=True).add_new(0x0C, "LO", "lung protocol")
    rule = load_pipeline(_pipeline(tmp_path, '"(0019,ACME_1.0,0C)": {regex: lung}')).rule
    assert holds(rule, ds) and not holds(rule, other)


def test_explain_names_the_failing_condition_and_actual_value(tmp_path):
    rule = load_pipeline(_pipeline(tmp_path, "Modality: CT\nSliceThickness: {range: [1, 3]}")).rule
    assert rule.failure(MR) == "Modality == 'CT' failed (actual: MR)"
    assert rule.failure(CT) == "SliceThickness in range [1, 3] failed (actual: 4.8)"


def _errors(tmp_path, text: str, destinations=frozenset()) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text).replace("ARTIFACT", str(DEMO_ARTIFACT)))
    with pytest.raises(PipelineError) as error:
        load_pipeline_files([path], set(destinations))
    return [line.replace(f"{path}:", "") for line in str(error.value).splitlines()]


GOOD_TAIL = """\
model: {artifact: ARTIFACT}
postprocess:
  findings: [{label: nodule, code: [SCT, "27925004", Nodule]}]
"""

MISTAKES = [
    # bad indentation
    (
        "name: p\nversion: 1\nmatch:\n  Modality: CT\n   SeriesDescription: x\n" + GOOD_TAIL,
        "5:21: mapping values are not allowed here",
    ),
    # unknown key
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\ncolour: red\n" + GOOD_TAIL,
        "4:1: colour: Extra inputs are not permitted",
    ),
    # wrong type
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\npriority: high\n" + GOOD_TAIL,
        "4:1: priority: Input should be a valid integer, unable to parse string as an integer",
    ),
    # bad regex
    (
        'name: p\nversion: 1\nmatch:\n  SeriesDescription: {regex: "("}\n' + GOOD_TAIL,
        "4:23: match.SeriesDescription.regex: invalid regex '(': missing ), unterminated subpattern at position 0",
    ),
    # unknown DICOM keyword
    (
        "name: p\nversion: 1\nmatch:\n  Modalty: CT\n" + GOOD_TAIL,
        "4:3: match.Modalty: unknown DICOM keyword 'Modalty' (use a keyword, (gggg,eeee) or (gggg,CREATOR,ee))",
    ),
    # missing model artifact
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\nmodel:\n  artifact: /nowhere\n"
        'postprocess:\n  findings: [{label: nodule, code: [SCT, "27925004", Nodule]}]\n',
        "5:3: model.artifact: no manifest.json in /nowhere",
    ),
    # out-of-range threshold
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\nmodel: {artifact: ARTIFACT}\npostprocess:\n  findings:\n"
        '    - label: nodule\n      code: [SCT, "27925004", Nodule]\n      threshold: 1.5\n',
        "9:7: postprocess.findings.0.threshold: Input should be less than or equal to 1",
    ),
    # a finding that is not a class of the model
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\nmodel: {artifact: ARTIFACT}\npostprocess:\n"
        '  findings: [{label: mass, code: [SCT, "4147007", Mass]}]\n',
        "6:15: postprocess.findings.0.label: 'mass' is not a class of the model (classes: ['normal', 'nodule'])",
    ),
    # unknown coding scheme
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\nmodel: {artifact: ARTIFACT}\npostprocess:\n"
        '  findings:\n    - {label: nodule, code: [SNOMED, "27925004", Nodule]}\n',
        "7:30: postprocess.findings.0.code.0: Input should be 'SCT', 'DCM' or 'LN'",
    ),
    # a !!python tag: refused by the safe loader
    (
        "name: !!python/object/apply:os.system ['true']\nversion: 1\n",
        "1:7: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    # duplicate key
    ("name: p\nversion: 1\nmatch: {Modality: CT}\nversion: 2\n" + GOOD_TAIL, "4:1: duplicate key 'version'"),
    # unknown window preset
    (
        "name: p\nversion: 1\nmatch: {Modality: CT}\npreprocess:\n  - window: {preset: lungs}\n" + GOOD_TAIL,
        "5:5: preprocess.0.window: unknown window preset 'lungs'; known: "
        "['abdomen', 'bone', 'brain', 'liver', 'lung', 'mediastinum']",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MISTAKES, ids=[m[1].split(": ")[1][:30] for m in MISTAKES])
def test_mistakes_are_reported_at_their_line_and_column(tmp_path, text, expected):
    assert _errors(tmp_path, text) == [expected]


def test_unknown_destination_is_located(tmp_path):
    text = "name: p\nversion: 1\nmatch: {Modality: CT}\ndestinations: [pacs, archive]\n" + GOOD_TAIL
    assert _errors(tmp_path, text, {"pacs"}) == [
        "4:22: destinations.1: unknown destination 'archive' (the node config has ['pacs'])"
    ]


def test_every_error_is_reported_at_once(tmp_path):
    text = "name: p\nversion: 1\nmatch:\n  Modalty: CT\n  Rows: {between: [1, 2]}\npriority: high\n" + GOOD_TAIL
    assert _errors(tmp_path, text) == [
        "4:3: match.Modalty: unknown DICOM keyword 'Modalty' (use a keyword, (gggg,eeee) or (gggg,CREATOR,ee))",
        "5:10: match.Rows.between: unknown test 'between' (use in, regex, range, exists, not)",
        "6:1: priority: Input should be a valid integer, unable to parse string as an integer",
    ]


def test_duplicate_pipeline_names_across_files(tmp_path):
    first = _pipeline(tmp_path, "Modality: CT", name="a")
    second = tmp_path / "b.yaml"
    second.write_text(first.read_text())
    with pytest.raises(PipelineError) as error:
        load_pipeline_files([first, second], set())
    assert str(error.value) == f"{second}:1:1: name: pipeline name 'a' is already used by {first}"
