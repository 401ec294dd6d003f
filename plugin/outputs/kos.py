"""Key Object Selection: the key image of each present finding, so that a viewer opens
the study at the slice that made the model decide."""

from collections.abc import Sequence

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import KeyObjectSelectionDocumentStorage

from plugin import __version__
from plugin.loader import frame_count
from plugin.outputs.conformance import conformant_source, referenceable
from plugin.outputs.sr import AlgorithmIdentity, result_uids
from plugin.postprocess import Finding

OF_INTEREST = Code("113000", "DCM", "Of Interest")
RESULT_SERIES_NUMBER = 9902


def key_images(sources: Sequence[Dataset], findings: Sequence[Finding], only_present: bool) -> list[Dataset]:
    """The instance holding the highest-probability image of each (present) finding, each
    instance once. A finding's key slice counts the model's images, one per frame."""
    holder = [i for i, source in enumerate(sources) for _ in range(frame_count(source))]
    chosen = {holder[f.key_slice] for f in findings if f.present or not only_present}
    return [sources[i] for i in sorted(chosen)]


def key_object_selection(
    sources: Sequence[Dataset], images: Sequence[Dataset], algorithm: AlgorithmIdentity
) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS referencing ``images`` (a non-empty subset of ``sources``)."""
    if not images:
        raise ValueError("images: a key object selection needs at least one image")
    if not all(referenceable(s) for s in images):
        raise ValueError("images: a Study, Series or SOP Instance UID is not a valid UID")
    series_uid, sop_uid = result_uids(algorithm, sources, "kos")
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[conformant_source(images[0], KeyObjectSelectionDocumentStorage), *images[1:]],
        content=hd.ko.KeyObjectSelection(
            document_title=OF_INTEREST,
            referenced_objects=list(images),
            description=f"{algorithm.pipeline} v{algorithm.pipeline_version}: key images"[:1024],
        ),
        series_instance_uid=series_uid,
        series_number=RESULT_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="radpipe",
        software_versions=f"radpipe {__version__}",
        series_description=f"radpipe {algorithm.pipeline} key images"[:64],
    )
    return kos
