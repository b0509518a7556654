"""LoRAMoE experiment pipeline: does fine-tuning keep the world knowledge the model had?

    python flows/full_pipeline.py run                                   # embedded default
    python flows/full_pipeline.py --config config flows/configs/smoke.toml run
    python flows/full_pipeline.py run --methods loramoe,lora --scales 64,256 --max-steps 20
    python flows/full_pipeline.py --with kubernetes run                 # GPU/cloud workers

start -> ingest -> validate -> evaluate_base -> train (foreach method x scale [x seed])
-> evaluate -> join -> compare -> register -> end. Every step calls one function of
loramoe.pipeline; runs, metrics, plots and adapters go to MLflow (MLFLOW_TRACKING_URI, else
./mlflow.db).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tomllib

# Metaflow refuses to run without a user name; CI containers often have no $USER (or an
# empty one, which setdefault would keep).
os.environ["METAFLOW_USER"] = (
    os.environ.get("METAFLOW_USER") or os.environ.get("USER") or "loramoe"
)

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "default.toml"


def set_max_workers_from_config(argv: list[str]) -> None:
    """Metaflow runs at most METAFLOW_RUN_MAX_WORKERS (resume: ..._RESUME_...) tasks at once;
    set it from the config's local_parallel_branches, unless the user gave --max-workers or
    the variable, so parallel local branches never oversubscribe the cores. Each branch then
    takes cores // local_parallel_branches torch threads (loramoe.pipeline.threads)."""
    from loramoe.pipeline.precheck import config_file

    if "--max-workers" in argv:
        return
    path = config_file(argv, DEFAULT_CONFIG) or DEFAULT_CONFIG  # a config value: the default's
    try:
        workers = tomllib.loads(Path(path).read_text()).get("local_parallel_branches", 1)
    except (OSError, ValueError):
        return  # Metaflow and PipelineConfig report a missing or broken config themselves
    for command in ("RUN", "RESUME"):
        os.environ.setdefault(f"METAFLOW_{command}_MAX_WORKERS", str(workers))


# Only when this file is the command (`python flows/full_pipeline.py run ...`): Metaflow's
# Runner also imports it into the caller's process, where argv is the caller's and the
# variable set here would override the config of every run that process starts.
if __name__ == "__main__":
    from loramoe.pipeline.precheck import check_run_command_or_exit

    # A broken config or override: one message naming the field, before a run id exists
    check_run_command_or_exit(sys.argv, DEFAULT_CONFIG, base_dir=HERE / "configs")
    set_max_workers_from_config(sys.argv)
    # Every task writes whole lines: Metaflow reads task output with readline(), and a task
    # inside a progress bar would hold it until the bar ends, stalling the parallel branches
    from loramoe.progress import whole_lines_off_terminal

    whole_lines_off_terminal()

from metaflow import (  # noqa: E402
    Config,
    FlowSpec,
    Parameter,
    card,
    catch,
    config_expr,
    current,
    resources,
    retry,
    schedule,
    step,
    timeout,
)

from loramoe.pipeline.config import eval_gpus  # noqa: E402, F401 (named in EVAL_GPUS)

# An evaluation runs on one GPU: the evaluation steps ask for resources.eval_gpu, by default
# one where the branches train on GPUs (the expression runs with this module's names)
EVAL_GPUS = config_expr("eval_gpus(config.resources)")


@schedule(weekly=True)
class LoRAMoEPipeline(FlowSpec):
    """Vanilla SFT vs single LoRA vs LoRAMoE across data scales, tracked in MLflow."""

    config = Config("config", default=str(DEFAULT_CONFIG),
                    parser="tomllib.loads")
    scales = Parameter("scales", default="", help="comma list overriding config.mixture.scales")
    methods = Parameter("methods", default="", help="comma list of config.methods to run")
    max_steps = Parameter("max-steps", default=0, type=int,
                          help="override train.max_steps (0: the config's)")
    seeds = Parameter("seeds", default="", help="comma list overriding config.seeds (training "
                      "replicates)")

    @step
    def start(self):
        """Resolve and validate the config; create the MLflow experiment and the parent run
        here, once, so parallel branches never race to create them."""
        from loramoe.pipeline import PipelineConfig
        from loramoe.tracking import log_params, setup, start_parent_run, tracking_uri

        resolved = PipelineConfig.from_dict(dict(self.config), base_dir=HERE / "configs")
        resolved = resolved.with_overrides(self.scales, self.methods, self.max_steps,
                                            self.seeds)
        self.pipeline_config = resolved  # parsed and validated once, here
        self.resolved = resolved.to_dict()  # the same, as plain data for the card and MLflow
        self.workdir = os.environ.get("LORAMOE_WORKDIR", os.getcwd())
        self.started = time.time()  # the report states the run's wall time to compare
        self.tracking_uri = tracking_uri(self.workdir)
        self.experiment_id = setup(resolved.mlflow_experiment, self.workdir)
        self.parent_run_id = start_parent_run(self.experiment_id, f"{resolved.name}-"
                                              f"{current.run_id}",
                                              {"metaflow.pathspec": current.pathspec,
                                               "metaflow.run_id": current.run_id,
                                               "config": resolved.name})
        log_params(self.parent_run_id, self.resolved)
        self.next(self.ingest)

    @step
    def ingest(self):
        """Build the task mixture at every data scale (nested) and the held-out eval set."""
        from loramoe.pipeline import ingest

        with scratch("data") as out:
            data = ingest(self.pipeline_config, out)
            self.data_files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        self.train_sets, self.eval_set = data["train"], data["eval"]
        self.dropped_overlap, self.shortfall = data["dropped_overlap"], data["shortfall"]
        if self.shortfall:  # the report's setup says it too
            print(f"warning: records the tasks could not supply at the largest scale: "
                  f"{self.shortfall}; its branches train on what there is")
        self.next(self.validate)

    @step
    def validate(self):
        """great-expectations suites on every scale and the eval set (Data Docs to MLflow);
        a failure stops the run naming the report and the failed expectations, before any
        model is loaded or any GPU worker is asked for."""
        from loramoe.pipeline import validate_data
        from loramoe.tracking import store_folder, use_store

        docs = Path(self.workdir) / "outputs" / "data_docs" / current.run_id
        use_store(self.tracking_uri)
        with scratch("validate") as data_dir:
            for name, blob in self.data_files.items():
                (data_dir / name).write_bytes(blob)
            try:
                self.validation = validate_data(data_dir, docs)
            finally:
                if docs.exists():
                    store_folder(self.parent_run_id, sorted(docs.iterdir()), "data_docs")
        self.next(self.evaluate_base)

    @retry(times=config.retry_times)
    @timeout(minutes=config.timeout_minutes)
    @resources(cpu=config.resources.cpu, memory=config.resources.memory,
               gpu=EVAL_GPUS)  # the branches' evaluations' kind of worker: scores pair alike
    @step
    def evaluate_base(self):
        """Evaluate the base model once, for every branch's retention and "vs base" scores, on
        the workers the branches are evaluated on (a CPU worker would load a 7B model there,
        in another dtype, and round otherwise). First, what every branch needs: its target
        modules in the model, its max_length leaving each train set examples."""
        from loramoe.pipeline import evaluate_base_model
        from loramoe.tracking import use_store

        use_store(self.tracking_uri)
        with scratch("base") as workdir:
            base = evaluate_base_model(self.pipeline_config, self.eval_set, workdir,
                                       self.parent_run_id, self.train_sets)
        self.base_metrics, self.base_predictions = base["metrics"], base["predictions"]
        self.base_probe = base["probe"]  # likelihood probe of every fact, for retention
        cached = self.base_metrics.get("cache", {})
        print(f"base evaluation {'reused from' if cached.get('hit') else 'computed, stored in'}"
              f" the cache (key {cached.get('key', 'none: base_eval_cache = false')})")
        self.branches = self.pipeline_config.branches()
        self.next(self.train, foreach="branches")

    @catch(var="train_error", print_exception=True)
    @retry(times=config.retry_times)
    @timeout(minutes=config.timeout_minutes)
    @resources(cpu=config.resources.cpu, memory=config.resources.memory,
               gpu=config.resources.gpu)
    @step
    def train(self):
        """Train one (method, scale, seed) branch; per-step metrics go to its nested MLflow run."""
        from loramoe.pipeline import branch_name, run_branch_training
        from loramoe.tracking import start_child_run, use_store

        self.branch = dict(self.input)
        self.branch_name = branch_name(self.branch)
        self.train_error = None
        use_store(self.tracking_uri)
        self.mlflow_run_id = start_child_run(self.experiment_id, self.parent_run_id,
                                             self.branch_name,
                                             {"metaflow.pathspec": current.pathspec})
        with scratch("train") as workdir:  # the trained folder goes to the MLflow run
            self.trained = run_branch_training(self.pipeline_config, self.branch,
                                               self.train_sets[self.branch["scale"]], workdir,
                                               self.mlflow_run_id)
        self.next(self.evaluate)

    @catch(var="eval_error", print_exception=True)
    @retry(times=config.retry_times)
    @timeout(minutes=config.timeout_minutes)
    @resources(cpu=config.resources.cpu, memory=config.resources.memory, gpu=EVAL_GPUS)
    @step
    def evaluate(self):
        """Knowledge + downstream metrics, retention vs the base, router analysis."""
        from loramoe.pipeline import evaluate_branch
        from loramoe.tracking import end_run, use_store

        self.eval_error = None
        self.result = None
        use_store(self.tracking_uri)
        if self.train_error is not None:
            end_run(self.mlflow_run_id, "FAILED")
            self.next(self.join)
            return
        with scratch("eval") as workdir:
            self.result = evaluate_branch(self.pipeline_config, self.trained, self.eval_set,
                                          self.base_predictions, workdir, self.mlflow_run_id,
                                          self.base_probe)
        end_run(self.mlflow_run_id)
        self.next(self.join)

    @step
    def join(self, inputs):
        """Collect every branch, failed ones included (they are reported, not dropped)."""
        from loramoe.pipeline import branch_outcome

        self.merge_artifacts(inputs, include=["pipeline_config", "resolved", "workdir",
                                              "tracking_uri", "experiment_id", "parent_run_id",
                                              "base_metrics", "started", "shortfall", "eval_set"])
        self.outcomes = [branch_outcome(branch) for branch in inputs]
        # the run's wall time up to here, fixed now: a resume from compare clones this step,
        # so its report states the original run's time, not hours since its start
        self.wall_to_join = time.time() - self.started
        self.next(self.compare)

    @card(type="blank", id="comparison")
    @step
    def compare(self):
        """Table and plots across methods and scales, on this card and the MLflow parent run:
        retention and downstream vs scale, router type weights per task, router CV."""
        from loramoe.pipeline import compare_branches
        from loramoe.tracking import use_store

        use_store(self.tracking_uri)
        out = Path(self.workdir) / "outputs" / "reports" / current.run_id
        # None for a run joined before the join step recorded it: no wall time in its report
        wall = getattr(self, "wall_to_join", None)
        summary = compare_branches(self.outcomes, self.base_metrics, self.parent_run_id, out,
                                   self.pipeline_config, wall, getattr(self, "shortfall", None))
        print(f"report: {summary['report']}")
        self.results, self.failed_branches = summary["rows"], summary["failed"]
        comparison_card(current.card["comparison"], self.resolved["name"], summary)
        self.next(self.register)

    @resources(cpu=config.resources.cpu, memory=config.resources.memory,
               gpu=EVAL_GPUS)  # it may evaluate the current champion again
    @step
    def register(self):
        """Log every adapter as an MLflow pyfunc model; register the best LoRAMoE that beat the
        base significantly and kept retention, and move the alias `champion` to it if there is
        none yet or it beats the current champion on the same eval records (paired test; a
        champion scored on other records, code or settings is evaluated again here)."""
        from loramoe.pipeline import register_champion
        from loramoe.tracking import use_store

        use_store(self.tracking_uri)
        # for a champion scored otherwise, evaluated again on this run's eval set (None: a run
        # joined before the join step kept it; that champion is then not compared)
        eval_set = getattr(self, "eval_set", None)
        with scratch("register") as workdir:
            self.decision = register_champion(self.pipeline_config, self.outcomes,
                                              self.parent_run_id, workdir, eval_set)
        print(f"champion decision: {self.decision['reason']}")
        self.next(self.end)

    @step
    def end(self):
        """Close the MLflow parent run; a run in which no branch trained fails here, after
        its report, card and MLflow runs are written."""
        from loramoe.pipeline import check_some_trained
        from loramoe.tracking import end_run, use_store

        use_store(self.tracking_uri)
        end_run(self.parent_run_id, "FINISHED" if not self.failed_branches else "FAILED")
        check_some_trained(self.results)


@contextmanager
def scratch(step: str) -> Iterator[Path]:
    """A step's working folder, removed when the step ends: what it produced lives in
    Metaflow artifacts and the MLflow run. (Left behind, each evaluation of a full-SFT
    branch kept a 517 MB model copy and each register step 2-3 GB in /tmp, until a
    long session filled the disk and failed two runs.)"""
    with tempfile.TemporaryDirectory(prefix=f"loramoe-{step}-") as path:
        yield Path(path)


def comparison_card(card, name: str, summary: dict) -> None:
    """The comparison as a Metaflow card: failed branches, the results and paired tables as
    report.md prints them (scores with their 95% intervals), the claims, the plots."""
    import pandas as pd
    from metaflow.cards import Image, Markdown, Table

    from loramoe.pipeline.markdown import PAIRED_HEADERS, RESULT_HEADERS, paired_rows, result_rows

    card.append(Markdown(f"# LoRAMoE pipeline: {name}"))
    if summary["failed"]:
        card.append(Markdown("**Failed branches:** " + ", ".join(summary["failed"])))
    card.append(Table(result_rows(pd.DataFrame(summary["rows"])), headers=RESULT_HEADERS))
    if summary["paired"]:  # the same base-known facts, exact McNemar
        card.append(Markdown("## Paired retention comparisons"))
        card.append(Table(paired_rows(pd.DataFrame(summary["paired"])),
                          headers=PAIRED_HEADERS))
    if summary["claims"]:
        card.append(Markdown("## Paper claims"))
        card.append(Table([[row[h] for h in ("claim", "paper", "ours", "verdict")]
                           for row in summary["claims"]],
                          headers=["claim", "paper", "this run", "verdict"]))
    for path in summary["plots"]:
        card.append(Image(path.read_bytes(), label=path.stem))


if __name__ == "__main__":
    LoRAMoEPipeline()
