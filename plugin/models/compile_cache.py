"""The node's cache of compiled int8 programs, so that a restarted node does not spend
10-50 s in inductor before its first job.

Why AOTInductor packages and not inductor's own caches (``torch.compiler.save_cache_artifacts``,
the FX graph and AOTAutograd caches): radpipe compiles int8 programs with freezing, so that
oneDNN gets prepacked weights, and torch 2.13 bypasses both caches for exactly those graphs
("mkldnn tensors unpickleable", "Cannot cache a graph with freezing enabled"): they would
store nothing. ``torch._inductor.aoti_compile_and_package`` compiles the same frozen graph
(the same oneDNN calls, the same outputs) into a package per batch bucket, which torch's
C++ package loader loads in milliseconds (see ``_load_package``).

A package is generated C++ compiled to a shared library, and loading it runs that code, so
it is not a model artifact's kind of file (DESIGN invariant 9: nothing inside an artifact is
executed). It is acceptable here because of where it comes from: only this node writes the
cache, under its own storage folder, compiled by this torch from an artifact whose hashes it
had just checked. The package's SHA-256 is recorded beside it when written and checked on
the bytes that are loaded; so is everything it was compiled from and for (the manifest's
hash, the torch version, the CPU's capability, the buckets). A package that was altered, cut
short or made for something else is refused with a warning and compiled afresh, and a
package inside a model artifact is never looked for. What the hash cannot stop is someone
who may write the node's storage folder: that person can already change what the node
receives and sends.
"""

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from prometheus_client import Histogram
from torch import Tensor, nn

log = logging.getLogger(__name__)

Program = Callable[[Tensor], Tensor]
# What radpipe makes of an artifact before compiling it (plugin/models/serving.py): raise it
# when that changes, so that a node's packages of the old graph are compiled afresh.
# 2: int8 max-pools run on the uint8 tensor (same outputs, faster).
GRAPH_VERSION = 2


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CompileCache:
    """Compiled int8 programs under ``directory``: ``<key>.b<bucket>.pt2`` (an AOTInductor
    package per bucket) and ``<key>.json`` (what they were compiled for, their SHA-256s). ``seconds`` observes how
    long each program took to be ready, labelled ``cache`` or ``compile``."""

    def __init__(self, directory: Path, seconds: Histogram | None = None) -> None:
        self.directory = directory
        self._seconds = seconds

    @staticmethod
    def identity(manifest: dict[str, Any], buckets: Sequence[int], shape: Sequence[int]) -> dict[str, Any]:
        """Everything a compiled program depends on: the artifact (its whole manifest,
        which records every file's hash), radpipe's graph of it, this torch, this CPU, the
        input and the buckets."""
        text = json.dumps(manifest, sort_keys=True)
        return {
            "manifest_sha256": _sha256(text.encode()),
            "graph": GRAPH_VERSION,
            "torch": str(torch.__version__),
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "input": list(shape),
            "buckets": sorted(buckets),
        }

    def program(
        self,
        converted: Callable[[], nn.Module],
        manifest: dict[str, Any],
        buckets: Sequence[int],
        shape: Sequence[int],
    ) -> Program:
        """The compiled program of the converted int8 graph that ``converted`` makes: this
        node's cached package if there is a sound one for ``manifest``, else the graph is
        made, compiled and cached."""
        identity = self.identity(manifest, buckets, shape)
        key = _sha256(json.dumps(identity, sort_keys=True).encode())
        start = time.perf_counter()
        program = self._load(key, identity)
        source = "cache"
        if program is None:
            program, source = self._compile(key, identity, converted(), shape), "compile"
        if self._seconds is not None:
            self._seconds.labels(source).observe(time.perf_counter() - start)
        log.info("compiled program %s of %s: from %s", key[:12], manifest.get("name", "model"), source)
        return program

    def _packages(self, key: str, buckets: Sequence[int]) -> dict[int, Path]:
        return {bucket: self.directory / f"{key}.b{bucket}.pt2" for bucket in buckets}

    def _load(self, key: str, identity: dict[str, Any]) -> Program | None:
        record = self.directory / f"{key}.json"
        if not record.exists():
            return None
        loaded = {}
        try:
            recorded = json.loads(record.read_text())
            if recorded.get("identity") != identity:
                log.warning("compile cache %s was made for something else; compiling afresh", record)
                return None
            for bucket, package in self._packages(key, identity["buckets"]).items():
                data = package.read_bytes()
                if _sha256(data) != recorded["sha256"].get(str(bucket)):
                    log.warning(
                        "compile cache %s does not match its recorded sha256; refusing it, compiling afresh", package
                    )
                    return None
                # the bytes hashed are the bytes loaded: no window to swap the file in between
                loaded[bucket] = _load_package(data)
        except (OSError, ValueError, KeyError, AttributeError, RuntimeError) as e:
            log.warning("compile cache %s unreadable (%s); compiling afresh", record, e)
            return None
        return _ByBatch(loaded)

    def _compile(self, key: str, identity: dict[str, Any], converted: nn.Module, shape: Sequence[int]) -> Program:
        """AOT-compile ``converted`` with inductor's freezing (see ``compile_program``), one
        package per bucket, write them to the cache (staged, then renamed, the record last:
        a reader never takes half of it for the whole) and load them.

        One package per bucket rather than one with a dynamic batch: torch 2.13's dynamic
        int8 package gave logits off by several units from the static ones and from the
        eager int8 graph, on the demo model; the static ones agree with ``compile_program``'s."""
        import torch._inductor.config as inductor

        inductor.freezing = True
        inductor.compile_threads = 1
        self.directory.mkdir(parents=True, exist_ok=True)
        packages = self._packages(key, identity["buckets"])
        loaded, hashes = {}, {}
        with torch.no_grad(), tempfile.TemporaryDirectory(dir=self.directory, prefix=".compiling.") as staging:
            for bucket, package in packages.items():
                exported = torch.export.export(converted, (torch.zeros((bucket, *shape)),))
                staged = Path(staging) / package.name
                torch._inductor.aoti_compile_and_package(exported, package_path=str(staged))
                data = staged.read_bytes()
                hashes[str(bucket)] = _sha256(data)
                loaded[bucket] = _load_package(data)
            record = Path(staging) / f"{key}.json"
            record.write_text(json.dumps({"identity": identity, "sha256": hashes}, indent=2) + "\n")
            for package in packages.values():
                os.replace(Path(staging) / package.name, package)
            os.replace(record, self.directory / record.name)
        return _ByBatch(loaded)


def _load_package(data: bytes) -> Program:
    """The program of the AOTInductor package ``data``, loaded by torch's C++ package loader
    (what ``torch._inductor.aoti_load_package`` ends in) from a file in a folder of this
    process's own (the loader reads a path; the folder is gone once it has loaded).

    Not through ``aoti_load_package`` itself: that imports inductor and dynamo and probes the
    CPU's vector instructions by building and running test programs, about 3 s of a 3.3 s
    load of three packages on 2 cores, for a check that only warns when a package was
    compiled for another CPU; the cache's identity refuses such a package already (``cpu``).
    The outputs are the same, bit for bit (tests/test_serving_cache.py)."""
    with tempfile.TemporaryDirectory(prefix="radpipe-program-") as folder:
        path = Path(folder) / "program.pt2"
        path.write_bytes(data)
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    return _Package(loader)


class _Package:
    """A loaded package called as its exported program is: one batch in, the logits out."""

    def __init__(self, loader: Any) -> None:
        self._run = loader.boxed_run
        self._outputs = pytree.treespec_loads(loader.get_call_spec()[1])

    def __call__(self, batch: Tensor) -> Tensor:
        return pytree.tree_unflatten(self._run([batch]), self._outputs)


class _ByBatch:
    """Calls the program compiled for the batch's size (``BucketedModule`` only ever
    passes bucket sizes)."""

    def __init__(self, programs: Mapping[int, Program]) -> None:
        self._programs = programs

    def __call__(self, batch: Tensor) -> Tensor:
        return self._programs[len(batch)](batch)
