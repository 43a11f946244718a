"""Teacher adaptation: how to fit MiniLM's masked-LM head best within the demo's time.

    python bench/teacher.py [--run data/runs/enwiki-20160101] [--variants exact-120-4e-4,...]

Each variant runs `bertdistill adapt-teacher` on the examples `make demo` left in the
store (4 train shards at dupe 2; held-out top-1 on the first 2,048 held-out examples, as
the step measures it) from the fetched MiniLM, and prints held-out masked-LM top-1 and wall
seconds. A variant is `<gelu>:<steps>:<learning rate>[:heads]`: gelu is `exact` (what
MiniLM was pretrained with) or `tanh` (what the teacher silently got before the config
round trip was fixed); `:heads` freezes the encoder and fits the heads alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
DEFAULT = "exact:120:4e-4,tanh:120:4e-4,exact:120:1e-3,exact:240:2e-3:heads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "data" / "runs" / "enwiki-20160101")
    parser.add_argument("--teacher", type=Path, default=ROOT / "data" / "teachers" / "minilm")
    parser.add_argument("--variants", default=DEFAULT)
    parser.add_argument("--examples", type=Path, default=None, help="examples folder (default: the run's)")
    parser.add_argument("--keep", type=Path, default=None, help="copy each adapted teacher into this folder")
    args = parser.parse_args()
    examples = [args.examples] if args.examples else sorted(
        p for p in (args.run / "examples").glob("*") if (p / "train").is_dir())
    if not examples or not (args.teacher / "bert_config.json").exists():
        raise SystemExit(f"no examples in {args.run} or no fetched teacher at {args.teacher}: run `make demo` first")
    print(f"examples {examples[-1]}; teacher {args.teacher}")
    print("| variant | held-out top-1 | before | seconds |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            gelu, steps, lr, *heads = variant.split(":")
            teacher = Path(tmp) / f"teacher-{gelu}"
            if not teacher.exists():
                edited = Path(tmp) / f"edited-{gelu}"
                shutil.copytree(args.teacher, edited)
                config = json.loads((edited / "bert_config.json").read_text())
                config["hidden_act"] = {"exact": "gelu", "tanh": "gelu_new"}[gelu]
                (edited / "bert_config.json").write_text(json.dumps(config))
                # an edited teacher is one made elsewhere: adapt-teacher reads only one fetch-teacher committed
                subprocess.run([sys.executable, "-m", "bertdistill.cli", "fetch-teacher", "--source", str(edited),
                                "--output", str(teacher), "--log-level", "WARNING"], check=True,
                               stdout=subprocess.DEVNULL)
            out = Path(tmp) / variant.replace(":", "-")
            command = [sys.executable, "-m", "bertdistill.cli", "adapt-teacher", "--teacher", str(teacher),
                       "--examples", str(examples[-1]), "--output", str(out), "--steps", steps, "--learning-rate",
                       lr, "--log-level", "WARNING"]
            if heads:
                command.append("--freeze-encoder")
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            summary = json.loads((out / "_MANIFEST.json").read_text())["summary"]
            if args.keep:
                shutil.copytree(out, args.keep / out.name, dirs_exist_ok=True)
            print(f"| {variant} | {summary['heldout_mlm_accuracy']:.2%} | {summary['heldout_mlm_accuracy_before']:.2%} "
                  f"| {summary['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
