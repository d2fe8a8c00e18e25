"""The demo: compile the seed's ResFFNLogReg into a PEF, train it from the PEF in a new process,
print loss per epoch and test accuracy, then measure performance -- the SambaFlow app workflow.

    python examples/demo.py [--backend inductor|reference] [--epochs 5]
"""

import argparse
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "ffn_app.py"


def step(title: str, *args: str) -> None:
    command = [sys.executable, str(APP), *args]
    print(f"\n=== {title}\n$ python examples/ffn_app.py {' '.join(args)}", flush=True)
    if subprocess.run(command).returncode != 0:
        sys.exit(f"demo step failed: {title}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", default="inductor", choices=["inductor", "reference"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--output-folder", default="out")
    args = parser.parse_args()
    pef = f"{args.output_folder}/ffn/ffn.pef"
    common = ["-b", "64"]
    step(
        "compile: trace forward + backward + SGD into one graph, write the PEF",
        "compile",
        *common,
        "--output-folder",
        args.output_folder,
        "--pef-name",
        "ffn",
        "--backend",
        args.backend,
    )
    step(
        "run: train from the PEF (scikit-learn digits, 28x28)",
        "run",
        *common,
        "-p",
        pef,
        "-e",
        str(args.epochs),
    )
    step("test: the compiled graph against plain PyTorch", "test", *common, "-p", pef)
    step("measure-performance", "measure-performance", *common, "-p", pef, "-n", "200")


if __name__ == "__main__":
    main()
