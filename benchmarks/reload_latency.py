"""How soon a pipeline edit takes effect in a running node (issue goal: within 2 s).

Starts a node in-process on the demo pipeline, rewrites the pipeline file N times and
measures the time from each write to the reload being counted.

Run: .venv/bin/python -m benchmarks.reload_latency [--edits 10]
"""

import argparse
import shutil
import statistics
import sys
import time

from prometheus_client import CollectorRegistry

from benchmarks.common import REPO, free_port, node_config, scratch
from plugin.app import Node
from plugin.config import NodeConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    args = parser.parse_args()
    work = scratch("radpipe-reload-")
    shutil.copytree(REPO / "pipelines", work / "pipelines")
    config = node_config(work, free_port(), work / "pipelines")
    node = Node(NodeConfig.model_validate(config), CollectorRegistry())
    node.start()
    path = work / "pipelines" / "lung-nodule-demo.yaml"
    text = path.read_text()
    seconds = []
    try:
        for edit in range(args.edits):
            before = node.metrics.registry.get_sample_value("radpipe_config_reloads_total", {"result": "ok"})
            start = time.perf_counter()
            path.write_text(text.replace("version: 1", f"version: {edit + 2}"))
            while node.metrics.registry.get_sample_value("radpipe_config_reloads_total", {"result": "ok"}) == before:
                time.sleep(0.005)
            seconds.append(time.perf_counter() - start)
    finally:
        node.stop()
    print(f"{args.edits} edits: reload after p50 {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
