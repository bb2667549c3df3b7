"""The `pmoe` command line (`pmoe --help`)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmoe", description="Progressive mixture of LoRA experts for HF models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="Offline continual-learning demo: PMoE against sequential fine-tuning on built-in tasks."
    )
    demo.add_argument("--output-dir", default="pmoe-demo", help="Where results, figure and model go (./pmoe-demo).")
    demo.add_argument("--steps-per-task", type=int, default=300, help="Training steps per task (default: 300).")
    demo.add_argument("--pretrain-steps", type=int, default=1500,
                      help="Steps of base-model pretraining on the first run (cached; default: 1500).")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        if args.steps_per_task < 1 or args.pretrain_steps < 1:
            parser.error("--steps-per-task and --pretrain-steps must be >= 1")
        from .demo import run_demo

        run_demo(output_dir=args.output_dir, steps_per_task=args.steps_per_task, pretrain_steps=args.pretrain_steps,
                 seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
