"""A model brought as a torch.export program, as a user brings it: the demo's trained
classifier exported to a `.pt2` with a dynamic batch (pipelines/README.md, "A torch.export
program"), `radpipe import`ed, optimized to int8 by `radpipe optimize` (its recipe:
int8_static, nothing pruned, since a program cannot be pruned), then `radpipe bench`
with the imported fp32 program, torchao int8, the optimized artifact and ONNX Runtime
fp32 and int8 side by side.

Run: .venv/bin/python -m benchmarks.imported [--threads 2] [--seconds 3] [--out DIR]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.common import REPO
from plugin.models.artifact import load_artifact

RADPIPE = [sys.executable, "-m", "plugin"]
DEMO = REPO / "pipelines" / "lung-nodule-demo.yaml"
RECIPE = {
    "quantize": {"cpu": "int8_static", "buckets": [1, 8, 32]},
    "calibration": {"source": "training", "samples": 256},
    "data": {"source": "phantom", "train_samples": 256, "heldout_samples": 1000, "seed": 1},
    "accept": {"max_auc_drop": 0.01, "max_per_class_auc_drop": 0.01},
}


def export_demo(path: Path) -> Path:
    """The demo classifier as a user's `.pt2`: any batch size, 1 x 128 x 128 images."""
    model = load_artifact(REPO / "pipelines" / "models" / "lung-nodule-demo", torch.device("cpu")).module.eval()
    example = torch.zeros(2, 1, 128, 128)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)
    return path


def pipeline(work: Path, artifact: Path) -> Path:
    """The demo pipeline with the imported artifact and the int8 recipe."""
    data = yaml.safe_load(DEMO.read_text())
    data.update(name="nodule-classifier", model={"artifact": str(artifact), "optimize": RECIPE})
    path = work / "nodule-classifier.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accel-imported-pt2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="radpipe-imported-") as tmp:
        work = Path(tmp)
        program = export_demo(work / "nodule-classifier.pt2")
        artifact = work / "nodule-classifier"
        imported = [*RADPIPE, "import", str(program), "--out", str(artifact), "--classes", "normal,nodule"]
        subprocess.run(imported, check=True)
        source = pipeline(work, artifact)
        optimized = work / "nodule-classifier-int8"
        subprocess.run([*RADPIPE, "optimize", str(source), "--out", str(optimized)], check=True)
        subprocess.run(
            [
                *RADPIPE,
                "bench",
                str(source),
                "--optimized",
                str(optimized),
                "--threads",
                str(args.threads),
                "--seconds",
                str(args.seconds),
                "--out",
                str(args.out),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
