"""Train from a config file.

    python -m loramoe.train --config FILE.toml [--set key=value ...] [--resume]
    accelerate launch --config_file infra/accelerate/ddp.yaml -m loramoe.train --config F  # GPUs
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m loramoe.train --config F  # CPU, gloo

Prints one JSON line (output_dir, steps, artifact, final metrics); exit 2 on a bad config or
bad data, with the field or rows named.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramoe.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="TOML or JSON train config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set method=lora --set loramoe.lbc_beta=0")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    from loramoe.data.records import RecordsError
    from loramoe.model_paths import ModelNotAvailableError
    from loramoe.progress import whole_lines_off_terminal
    from loramoe.train.config import TrainConfig, TrainConfigError

    whole_lines_off_terminal()
    try:
        config = TrainConfig.from_file(args.config, args.set)
        from loramoe.cores import cap_threads_to_cores
        from loramoe.train import train  # torch and transformers: only for a valid config

        cap_threads_to_cores()  # a container's CPU quota, which torch's default ignores
        result = train(config, resume=args.resume)
    except (TrainConfigError, RecordsError, ModelNotAvailableError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps,
                      "artifact": str(result.artifact), **result.final_metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
