"""Print the pinned requirements of bertdistill's pyproject.toml, one per line, for an image build.

The images install the dependencies in a layer of their own, before the project's code is
copied in, so a code change reuses the cached TensorFlow layer. pyproject.toml stays the one
home of every pin: `pins.py EXTRA...` prints the core dependencies plus those extras;
`--variant gpu` swaps the CPU build of TensorFlow for the same release with its CUDA wheels;
`--only NAME` prints just that package's pin.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def pins(pyproject: Path, extras: list[str], gpu: bool = False) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += [r for r in project["optional-dependencies"][extra] if not r.startswith(project["name"])]
    if gpu:
        found = [re.sub(r"^tensorflow-cpu==", "tensorflow[and-cuda]==", r) for r in found]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to add, e.g. tf or airflow")
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    parser.add_argument("--variant", choices=("cpu", "gpu"), default="cpu",
                        help="gpu: TensorFlow with its CUDA wheels instead of tensorflow-cpu")
    parser.add_argument("--only", help="print only the pin of this package")
    args = parser.parse_args()
    extras = args.extras
    if args.only:  # looked up in every extra
        extras = list(tomllib.loads(args.pyproject.read_text())["project"]["optional-dependencies"])
    found = pins(args.pyproject, extras, args.variant == "gpu")
    if args.only:
        found = [r for r in found if re.split(r"[\[=<>~!]", r, maxsplit=1)[0] in (args.only, f"{args.only}-cpu")]
        if not found:
            sys.exit(f"pins.py: {args.only} is not pinned in {args.pyproject}")
    print("\n".join(found))


if __name__ == "__main__":
    main()
