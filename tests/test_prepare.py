"""Decoding on worker processes: the same images as in the runner's thread, and a worker
that dies fails one job's preparation, not the ones after it."""

import multiprocessing

import numpy as np
import pydicom
import pytest

from plugin.loader import Source
from plugin.pipeline import load_pipeline
from plugin.prepare import Preparer, WorkerDied
from tests.conftest import DEMO_PIPELINE


@pytest.fixture
def sources(demo_study) -> list[Source]:
    return [Source(pydicom.dcmread(p, stop_before_pixels=True), str(p)) for p in demo_study["Demo chest CT, nodules"]]


def test_worker_processes_prepare_what_the_thread_prepares(sources):
    steps = load_pipeline(DEMO_PIPELINE).preprocess
    in_thread, workers = Preparer(0), Preparer(2)
    try:
        expected = [prepared.images for _, prepared in in_thread.images(sources, steps)]
        got = [(source, prepared.images) for source, prepared in workers.images(sources, steps)]
    finally:
        workers.close()
    assert [source for source, _ in got] == sources  # in order
    for images, reference in zip([images for _, images in got], expected, strict=True):
        np.testing.assert_array_equal(images, reference)


def test_a_dead_worker_fails_one_preparation_and_the_pool_comes_back(sources):
    steps = load_pipeline(DEMO_PIPELINE).preprocess
    preparer = Preparer(1)
    try:
        images = preparer.images(sources, steps)
        next(images)  # the pool is running
        for child in multiprocessing.active_children():
            child.kill()  # as a decoder that segfaults would
        with pytest.raises(WorkerDied):
            list(images)
        assert len(list(preparer.images(sources, steps))) == len(sources)
    finally:
        preparer.close()
