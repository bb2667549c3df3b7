"""The `pmoe` command line (`pmoe --help`)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmoe", description="Progressive mixture of LoRA experts for HF models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="Run the offline end-to-end demo on a tiny model.")
    demo.add_argument("--output-dir", default=None, help="Where to save the demo checkpoint (default: a temp dir).")
    demo.add_argument("--steps-per-task", type=int, default=150, help="Training steps per task (default: 150).")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.steps_per_task < 1:
            parser.error("--steps-per-task must be >= 1")
        from .demo import run_demo

        run_demo(output_dir=args.output_dir, steps_per_task=args.steps_per_task, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
