"""The Metaflow pipeline end to end through Metaflow's Runner, with real MLflow."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import tomllib

# The Client API needs a user name too; an empty one counts as none.
os.environ["METAFLOW_USER"] = os.environ.get("METAFLOW_USER") or "tester"
ROOT = Path(__file__).resolve().parents[1]
FLOW = str(ROOT / "flows" / "full_pipeline.py")
SMOKE = ROOT / "flows" / "configs" / "smoke.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, seconds: float, log: Path | None = None
             ) -> None:
    """Poll url until it answers; fail with the server's output (its PIPE, or the log
    file it writes to) if it dies first."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert server.poll() is None, (log.read_text() if log else
                                           server.stdout.read().decode())[-3000:]
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {seconds}s")


def write_config(path: Path, **changes) -> Path:
    """The smoke config with top-level fields changed, as TOML."""
    data = tomllib.loads(SMOKE.read_text())
    data.update(changes)
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {_toml(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def run_flow(workdir: Path, config: Path, env: dict | None = None, **params):
    from metaflow import Runner

    full_env = {"METAFLOW_USER": "tester", "LORAMOE_WORKDIR": str(workdir), **(env or {})}
    with Runner(FLOW, show_output=False, cwd=str(workdir), env=full_env,
                config=[("config", str(config))]).run(**params) as running:
        return running.run, running.stdout, running.stderr


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run whose lora branches fail for real: their training diverges at lr 1e30
    (a wrong target module no longer gets that far: the base evaluation step refuses it)."""
    workdir = tmp_path_factory.mktemp("pipeline")
    methods = tomllib.loads(SMOKE.read_text())["methods"]
    methods["lora"] = {"method": "lora", "lr": 1e30}
    config = write_config(workdir / "smoke.toml", methods=methods)
    (workdir / "tmp").mkdir()  # the run's TMPDIR, to see what the steps leave behind
    run, stdout, stderr = run_flow(workdir, config, env={"TMPDIR": str(workdir / "tmp")})
    return workdir, run, stdout, stderr


def mlflow_client(workdir: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_smoke_flow_succeeds_with_mlflow_runs(smoke_run):
    from loramoe.precision import cpu_kernels

    workdir, run, _, stderr = smoke_run
    assert run.successful, stderr[-3000:]
    client = mlflow_client(workdir)
    experiment = client.get_experiment_by_name("loramoe-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert parent.data.tags["metaflow.pathspec"].startswith(f"LoRAMoEPipeline/{run.id}")
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    ok = [c for c in children if not c.info.run_name.startswith("lora-")]
    for child in ok:
        assert {"knowledge_score", "downstream_score", "train/lm_loss"} <= set(child.data.metrics)
        tasks = {k for k in child.data.metrics if k.startswith("task/")
                 and not k.endswith(("_lo", "_hi"))}
        assert tasks and all({f"{t}_lo", f"{t}_hi"} <= set(child.data.metrics) for t in tasks)
        history = client.get_metric_history(child.info.run_id, "train/lm_loss")
        assert [m.step for m in history] == [1, 2, 3]
        assert child.data.tags["train_device"] == "cpu"  # where it trained ("cuda" on a GPU)
        assert child.data.tags["train_hardware"] == cpu_kernels()  # which CPU, flags, caps
        scale = int(child.info.run_name.split("-")[1])  # none cut at the smoke max_length
        assert child.data.metrics["train/examples"] == scale
        assert child.data.metrics["train/examples_dropped"] == 0
        assert child.data.metrics["train/examples_truncated"] == 0
        assert child.data.metrics["train/examples_with_control_text"] == 0
    assert "loramoe-32/downstream_score" in parent.data.metrics
    assert any(k.startswith("system/") for c in ok for k in c.data.metrics)  # psutil present
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert "compare/retention_downstream_vs_scale.png" in artifacts
    assert "compare/router_type_weights.png" in artifacts and "compare/router_cv.png" in artifacts
    assert any(a.path == "data_docs" for a in client.list_artifacts(parent.info.run_id))


def test_the_gpu_checks_summary_reads_where_branches_trained_and_were_scored(smoke_run):
    """benchmarks/gpu_flow_summary.py, which gpu_check.sh runs after the smoke flow on a GPU:
    passes when every step ran on the device asked for, fails naming what did not."""
    workdir, run, _, _ = smoke_run
    assert run.successful

    def summary(device: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "gpu_flow_summary.py"),
             "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment",
             "loramoe-smoke", "--model", "loramoe-smoke", "--device", device],
            capture_output=True, text=True, timeout=120)

    on_cpu, on_gpu = summary("cpu"), summary("cuda")
    assert on_cpu.returncode == 0 and "every step ran on cpu" in on_cpu.stdout, on_cpu.stderr
    assert re.search(r"loramoe-16 +FINISHED +cpu", on_cpu.stdout)
    assert re.search(r"lora-16 +FAILED +- ", on_cpu.stdout)  # the branch that fails on purpose
    from loramoe.precision import cpu_kernels

    assert f"trained on: {cpu_kernels()}\n" in on_cpu.stdout  # one kind of CPU
    assert on_gpu.returncode == 1 and "sft-32 trained on cpu" in on_gpu.stdout
    assert "the champion was scored on cpu" in on_gpu.stdout
    assert "the base was scored on cpu" in on_gpu.stdout


def test_steps_leave_no_scratch_folders(smoke_run):
    """Each step's working folder goes when the step ends, failed branches' included
    (before: every run left its data, trained models and registry staging in /tmp)."""
    workdir, run, _, _ = smoke_run
    assert run.successful
    assert sorted(p.name for p in (workdir / "tmp").glob("loramoe-*")) == []


def test_every_task_writes_whole_lines(smoke_run):
    """Metaflow's runtime reads task output by lines: no bar of ours or of a library
    (transformers' loading, MLflow's artifact transfers) redraws one with carriage returns.
    The Runner reads its output as text, which turns a \\r into a line break: a tqdm bar
    shows as lines like "Downloading artifacts:  25%|██▌ | 1/4" (failed before: MLflow's)."""
    _, run, stdout, stderr = smoke_run
    assert run.successful
    bars = [line for line in (stdout + stderr).splitlines()
            if "\r" in line or re.search(r"\d%\|", line)]
    assert not bars, bars[:3]


def test_branches_pass_references_not_weights(smoke_run):
    workdir, run, _, _ = smoke_run
    client = mlflow_client(workdir)
    for task in run["train"]:
        if task.data.train_error is not None:
            continue
        trained = task.data.trained
        assert "files" not in trained and set(trained["store"]) == {"mlflow_run_id",
                                                                    "artifact_path"}
        assert task["trained"].size < 20_000, task["trained"].size  # bytes: no weights
        logged = {a.path for a in client.list_artifacts(trained["store"]["mlflow_run_id"],
                                                        "trained")}
        part = "model" if trained["train_config"]["method"] == "sft" else "adapter"
        assert f"trained/{part}" in logged and "trained/train_config.json" in logged
        assert "trained/train_data.json" in logged


def peak_concurrency(tasks) -> int:
    """Most tasks running at the same moment, from Metaflow's own task timestamps."""
    events = sorted([(t.created_at, 1) for t in tasks] + [(t.finished_at, -1) for t in tasks],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def branch_tasks(run) -> list:
    return [t for name in ("train", "evaluate") for t in run[name]]


def test_parallel_branches_overlap_up_to_the_configured_limit(smoke_run):
    workdir, run, _, _ = smoke_run
    # smoke.toml: local_parallel_branches = 2, so Metaflow's max-workers is 2
    assert peak_concurrency(branch_tasks(run)) == 2
    client = mlflow_client(workdir)
    children = [r for r in client.search_runs(
        [client.get_experiment_by_name("loramoe-smoke").experiment_id])
        if "mlflow.parentRunId" in r.data.tags]
    cores = len(os.sched_getaffinity(0))
    assert {r.data.params["torch_threads"] for r in children} == {str(max(1, cores // 2))}


def test_the_base_is_scored_as_the_branches_are(smoke_run):
    """The base's scores are paired with every branch's: same records, code and settings,
    the thread count included (it used to evaluate on every core while the branches took
    their share; in bf16 that moves scores: evaluate/cache.py's `rounding`)."""
    workdir, run, _, _ = smoke_run
    base = run["evaluate_base"].task.data.base_metrics["scored_by"]
    scored = [o["metrics"]["scored_by"] for o in run["join"].task.data.outcomes
              if not o["error"]]
    assert len(scored) == 4 and all(s == base for s in scored)
    metrics = run["evaluate_base"].task.data.base_metrics
    if not metrics.get("cache", {}).get("hit"):  # computed here: alone, on every core
        cores = len(os.sched_getaffinity(0))
        assert metrics["workers"] == cores // max(1, cores // 2)  # smoke: 2 branches at once
    parent = next(r for r in mlflow_client(workdir).search_runs(
        [mlflow_client(workdir).get_experiment_by_name("loramoe-smoke").experiment_id])
        if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get(
            "metaflow.run_id") == run.id)
    assert parent.data.tags["base_eval_settings"] == base["settings"]  # in MLflow too
    from loramoe.precision import cpu_kernels

    report = (workdir / "outputs" / "reports" / run.id / "report.md").read_text()
    setting = json.loads(base["settings"])
    assert f"(= {setting['dtype']} on {cpu_kernels()})" in report  # as the base was scored
    assert f"- Trained on: {cpu_kernels()}\n" in report
    cores = len(os.sched_getaffinity(0))
    assert json.loads(base["settings"])["threads"] == max(1, cores // 2)
    rows = [r for r in run["compare"].task.data.results if r["status"] == "ok"]
    assert [r["scored_otherwise"] for r in rows if r["branch"] != "base"] == [""] * 4


def test_largest_scale_trains_first_and_reports_sort_by_scale(smoke_run):
    """The longest trainings start first so short tasks fill the slots behind them; the
    results table still reads smallest scale first, methods in config order."""
    _, run, _, _ = smoke_run
    started = sorted(run["train"], key=lambda t: t.created_at)
    assert [t.data.branch["scale"] for t in started[:2]] == [32, 32]
    rows = [r["branch"] for r in run["compare"].task.data.results]
    assert rows == ["base", "sft-16", "lora-16", "loramoe-16", "sft-32", "lora-32",
                    "loramoe-32"]


def test_failed_branch_is_reported_and_others_kept(smoke_run):
    _, run, _, _ = smoke_run
    results = run["compare"].task.data.results
    by_branch = {r["branch"]: r for r in results}
    for failed in ("lora-16", "lora-32"):
        assert by_branch[failed]["status"].startswith("failed: ")
        assert "non-finite loss" in by_branch[failed]["status"]
    assert all(by_branch[b]["status"] == "ok" for b in
               ["sft-16", "sft-32", "loramoe-16", "loramoe-32"])
    assert sorted(run["compare"].task.data.failed_branches) == ["lora-16", "lora-32"]


def test_a_run_where_every_branch_failed_exits_non_zero(tmp_path):
    """Before: it ended "successfully" (exit 0), a scheduled retraining showing green with
    nothing trained. Now its end step fails, after the report and the MLflow runs."""
    methods = {"lora": {"method": "lora", "lr": 1e30}}  # diverges at step 1, for real
    config = write_config(tmp_path / "smoke.toml", methods=methods)
    done = subprocess.run([sys.executable, str(FLOW), "--config", "config", str(config), "run",
                           "--scales", "16"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "METAFLOW_USER": "tester",
                                             "LORAMOE_WORKDIR": str(tmp_path)})
    text = done.stdout + done.stderr
    assert done.returncode != 0, text[-3000:]
    assert "NothingTrained: every branch failed (1 of 1), e.g. lora-16: " in text, text[-3000:]
    assert "non-finite loss" in text and "/end/" in text.split("NothingTrained")[0]
    reports = list((tmp_path / "outputs" / "reports").glob("*/report.md"))
    assert len(reports) == 1 and "lora-16" in reports[0].read_text()


def test_card_renders(smoke_run):
    from metaflow.cards import get_cards

    _, run, _, _ = smoke_run
    cards = get_cards(run["compare"].task, id="comparison")
    html = cards[0].get()
    # The card's content is a base64 JSON blob that the page's script renders.
    blob = re.search(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"', html).group(1)
    data = json.loads(base64.b64decode(blob))
    text = json.dumps(data)
    assert "LoRAMoE pipeline: smoke" in text and "lora-16" in text and "failed: " in text
    images = re.findall(r'"type": "image", "src": "data:image/png;base64,', text)
    assert len(images) == 3  # retention/downstream, router type weights, router CV
    # the paired table as report.md prints it: '–', not nan/None, where a test has no value
    from loramoe.pipeline.markdown import PAIRED_HEADERS, RESULT_HEADERS

    def tables(node):
        if isinstance(node, dict):
            if node.get("type") == "table":
                yield node
            node = list(node.values())
        for child in node if isinstance(node, list) else []:
            yield from tables(child)

    paired = [t for t in tables(data) if t["columns"] == PAIRED_HEADERS]
    assert len(paired) == 1
    cells = {str(c) for row in paired[0]["data"] for c in row}
    assert "–" in cells and not {"nan", "None"} & cells
    # and the results table as report.md's: each score with its interval in one cell
    results = [t for t in tables(data) if t["columns"] == RESULT_HEADERS]
    assert len(results) == 1
    cells = {str(c) for row in results[0]["data"] for c in row}
    assert any(re.fullmatch(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", c) for c in cells)
    assert any(c.startswith("failed: ") for c in cells) and not {"nan", "None"} & cells


def test_champion_alias_and_decision(smoke_run):
    workdir, run, _, _ = smoke_run
    client = mlflow_client(workdir)
    version = client.get_model_version_by_alias("loramoe-smoke", "champion")
    decision = run["register"].task.data.decision
    assert decision["promoted"] and decision["version"] == version.version
    assert decision["candidate"].startswith("loramoe-")
    assert len(decision["logged_models"]) == 4  # every successful branch's adapter


def test_a_champion_scored_otherwise_is_evaluated_again(smoke_run, tmp_path):
    """A champion whose version says it was scored with other settings (as after a change of
    eval batch size, dtype, evaluation code or records) cannot be paired with this run's
    scores: the registry evaluates it again on this run's eval set and compares that, and
    keeps those scores, so the next run scored the same way does not evaluate it again."""
    from loramoe.pipeline import register_champion
    from loramoe.pipeline.champion import rescored_tag, scored_by_tags

    workdir, run, _, _ = smoke_run
    client = mlflow_client(workdir)
    champion = client.get_model_version_by_alias("loramoe-smoke", "champion")
    settings = champion.tags["eval_settings"]
    other = settings.replace('"batch_size": ', '"batch_size": 1')  # e.g. 16 -> 116
    outcomes, parent = run["join"].task.data.outcomes, run["start"].task.data.parent_run_id
    tag = rescored_tag(scored_by_tags(next(o for o in outcomes if o["name"] == run[
        "register"].task.data.decision["candidate"])["metrics"]))

    def register(folder):
        return register_champion(run["start"].task.data.pipeline_config, outcomes, parent,
                                 tmp_path / folder, run["ingest"].task.data.eval_set)

    client.set_model_version_tag("loramoe-smoke", champion.version, "eval_settings", other)
    try:
        decision = register("first")
        later = register("later")
    finally:
        client.set_model_version_tag("loramoe-smoke", champion.version, "eval_settings",
                                     settings)
        client.delete_model_version_tag("loramoe-smoke", champion.version, tag)
    # the same adapter evaluated again under the same settings: a tie, the alias stays
    why = f"it was scored with other evaluation settings ({other} vs {settings})"
    assert not decision["promoted"]
    assert (f"does not beat current champion (version {champion.version}, evaluated again "
            f"here: {why}" in decision["reason"])
    assert client.get_model_version_by_alias("loramoe-smoke", "champion").version == \
        champion.version
    assert client.get_model_version("loramoe-smoke", decision["version"]).tags[
        "eval_settings"] == settings
    # the next run reads the scores the first one stored in its run instead
    assert not later["promoted"] and not (tmp_path / "later" / "champion_again").exists()
    assert (f"does not beat current champion (version {champion.version}, evaluated again in "
            f"run {parent}: {why}, " in later["reason"])  # the smoke's rule "best": a tie


def test_resume_reruns_from_compare(smoke_run):
    from metaflow import Runner

    workdir, run, _, _ = smoke_run
    env = {"METAFLOW_USER": "tester", "LORAMOE_WORKDIR": str(workdir)}
    with Runner(FLOW, show_output=False, cwd=str(workdir), env=env).resume(
            step_to_rerun="compare", origin_run_id=run.id) as running:
        resumed = running.run
    assert resumed.successful, running.stderr[-3000:]
    assert resumed.id != run.id
    # Steps before compare were cloned, not re-run: same artifacts as the origin run.
    assert resumed["evaluate_base"].task.data.base_metrics == \
        run["evaluate_base"].task.data.base_metrics
    # the report states the original run's wall time, not the hours since its start
    def wall(run_id):
        report = (workdir / "outputs" / "reports" / run_id / "report.md").read_text()
        return next(line for line in report.splitlines() if line.startswith("- Wall time"))

    assert wall(resumed.id) == wall(run.id)
    client = mlflow_client(workdir)
    second = client.get_model_version_by_alias("loramoe-smoke", "champion")
    decision = resumed["register"].task.data.decision
    # Same scores as the current champion: a tie does not move the alias.
    assert not decision["promoted"] and "does not beat" in decision["reason"]
    assert second.version == run["register"].task.data.decision["version"]


@pytest.fixture(scope="module")
def seeds_run_on_a_server(smoke_run, tmp_path_factory):
    """A second run in the smoke run's workdir: two seeds of two methods, one branch at a
    time, tracked on a real MLflow server (infra/mlflow/start_server.sh) instead of the
    local sqlite store. One flow run serves both the server's and the seeds' tests (a flow
    run is most of a minute of the suite's CPU)."""
    workdir = smoke_run[0]
    here = tmp_path_factory.mktemp("server")
    port = free_port()
    # The server's log goes to a file: an unread PIPE fills (64 KiB of request lines) and
    # blocks the server, and with it every client call of the flow (seen: register hung).
    log = open(here / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(["bash", str(ROOT / "infra" / "mlflow" / "start_server.sh"),
                               str(port), str(here / "server")],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, 90, here / "server.log")
        uri = f"http://127.0.0.1:{port}"
        local_runs = len(mlflow_client(workdir).search_runs(
            [mlflow_client(workdir).get_experiment_by_name("loramoe-smoke").experiment_id]))
        config = write_config(here / "serial.toml", local_parallel_branches=1)
        run, _, stderr = run_flow(workdir, config, env={"MLFLOW_TRACKING_URI": uri},
                                  seeds="1,2", methods="sft,loramoe", scales="16")
        yield {"run": run, "stderr": stderr, "uri": uri, "workdir": workdir,
               "local_runs": local_runs}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(here / "server", ignore_errors=True)  # its artifact store


def test_pipeline_against_a_real_tracking_server(seeds_run_on_a_server):
    import mlflow

    done = seeds_run_on_a_server
    run, uri = done["run"], done["uri"]
    assert run.successful, done["stderr"][-3000:]
    assert peak_concurrency(branch_tasks(run)) == 1  # local_parallel_branches = 1
    client = mlflow.MlflowClient(tracking_uri=uri)  # not the process-wide default
    runs = client.search_runs([client.get_experiment_by_name("loramoe-smoke").experiment_id])
    assert len(runs) == 5  # parent + {sft, loramoe}-16 × seeds 1, 2
    assert client.get_model_version_by_alias("loramoe-smoke", "champion")
    local = mlflow_client(done["workdir"])  # nothing went to the local store
    assert len(local.search_runs([local.get_experiment_by_name("loramoe-smoke")
                                  .experiment_id])) == done["local_runs"]


def test_seed_replicates_pool_within_a_run_and_across_runs(smoke_run, seeds_run_on_a_server,
                                                           tmp_path):
    """A run with --seeds reports its branches pooled over the seeds; the CLI pools it with
    the smoke run (seed 0, its train.seed) into three seeds a method."""
    workdir, first, _, _ = smoke_run
    run, stderr = seeds_run_on_a_server["run"], seeds_run_on_a_server["stderr"]
    assert run.successful, stderr[-3000:]
    assert sorted(o["name"] for o in run["join"].task.data.outcomes) == \
        ["loramoe-16-s1", "loramoe-16-s2", "sft-16-s1", "sft-16-s2"]
    report = (workdir / "outputs" / "reports" / run.id / "report.md").read_text()
    assert "## Across training seeds" in report
    tests = pd.read_csv(workdir / "outputs" / "reports" / run.id / "replicate_tests.csv")
    assert tests[["a", "b", "seeds"]].astype(str).drop_duplicates().values.tolist() == \
        [["sft-16", "loramoe-16", "1,2"]]
    out = tmp_path / "pooled"
    subprocess.run([sys.executable, "-m", "loramoe.pipeline.replicates", first.id, run.id,
                    "--out", str(out)], cwd=workdir, check=True, capture_output=True)
    pooled = pd.read_csv(out / "replicates.csv", dtype={"seeds": str}).set_index(
        ["method", "scale"])
    assert pooled.loc[("sft", 16), "seeds"] == pooled.loc[("loramoe", 16), "seeds"] == "0,1,2"
    assert pooled.loc[("loramoe", 32), "seeds"] == "0"  # the smoke run's alone
    assert "## Across training seeds" in (out / "replicates.md").read_text()


def test_serve_champion_over_http(smoke_run, tmp_path):
    workdir, _, _, _ = smoke_run
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         "models:/loramoe-smoke@champion", "--env-manager", "local", "--host", "127.0.0.1",
         "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, 120)
        body = json.dumps({"inputs": ["What is the capital of France?"],
                           "params": {"max_new_tokens": 8}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert isinstance(answer["predictions"][0], str)
        assert len(answer["predictions"]) == 1
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("name", ["default", "smoke", "paper", "experiment"])
def test_shipped_configs_load_and_validate(name):
    from loramoe.pipeline import PipelineConfig

    data = tomllib.loads((ROOT / "flows" / "configs" / f"{name}.toml").read_text())
    config = PipelineConfig.from_dict(data)
    assert config.branches()
    if name == "paper":
        assert config.base_model == "meta-llama/Llama-2-7b-hf"
        train = config.train_config({"method": "loramoe"}, Path("x"), Path("y"))
        moe = train.loramoe
        assert (moe.num_experts, moe.rank, moe.alpha, moe.lbc_beta, moe.lbc_delta) == \
            (6, 4, 32.0, 0.1, 0.1)
        assert train.learning_rate == 2e-4 and config.resources["gpu"] >= 1
        assert config.mixture.scales[0] == 10_000 and config.mixture.scales[-1] == 3_000_000
        nolbc = config.train_config({"method": "loramoe_nolbc"}, Path("x"), Path("y")).loramoe
        assert nolbc.lbc_beta == 0.0 and nolbc.num_experts == 6  # deep-merged override


def test_config_errors_name_the_field():
    from loramoe.pipeline import PipelineConfig, PipelineConfigError

    data = tomllib.loads(SMOKE.read_text())
    with pytest.raises(PipelineConfigError, match=r"config\.methods\.sft: .*TrainConfig\.lr"):
        PipelineConfig.from_dict({**data, "methods": {"sft": {"method": "sft", "lr": -1}}})
    with pytest.raises(PipelineConfigError, match="unknown field"):
        PipelineConfig.from_dict({**data, "colour": 1})
    config = PipelineConfig.from_dict(data)
    with pytest.raises(PipelineConfigError, match="--methods"):
        config.with_overrides(methods="qlora")
    assert config.with_overrides(scales="8", methods="lora", max_steps=2).branches() == \
        [{"method": "lora", "scale": 8, "seed": None}]
    with pytest.raises(PipelineConfigError, match="--seeds"):
        config.with_overrides(seeds="1,x")
    with pytest.raises(PipelineConfigError, match="--scales: a comma list of integers, got "
                       "'16,abc'"):  # before: a bare ValueError from int()
        config.with_overrides(scales="16,abc")
    with pytest.raises(PipelineConfigError, match=r"config\.seeds: .*distinct"):
        PipelineConfig.from_dict({**data, "seeds": [1, 1]})
    # Before: a registered model name MLflow refuses failed the register step, after every
    # branch had trained and been evaluated.
    for bad in ("team/model", "a:b", "", "..x"):
        with pytest.raises(PipelineConfigError, match=r"config\.registered_model: must be a "
                                                      r"name MLflow's model registry accepts"):
            PipelineConfig.from_dict({**data, "registered_model": bad})
    with pytest.raises(PipelineConfigError, match=r"config\.mlflow_experiment: must be a "
                                                  r"non-empty"):
        PipelineConfig.from_dict({**data, "mlflow_experiment": " "})
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    for good in ("loramoe-smoke", "my model v2", "a.b"):  # what MLflow itself accepts
        _validate_model_name(good)
        PipelineConfig.from_dict({**data, "registered_model": good})
    for bad in ("team/model", "a:b", "", "..x"):
        with pytest.raises(MlflowException):
            _validate_model_name(bad)


def test_seeds_replicate_every_branch_with_its_own_train_seed():
    """Each (method, scale) is trained once per seed, named -s<seed>, train.seed set to it;
    without seeds, one replicate at the method's own seed and the old names."""
    from loramoe.pipeline import PipelineConfig, branch_name

    config = PipelineConfig.from_dict(tomllib.loads(SMOKE.read_text()))
    plain = config.branches()
    assert [branch_name(b) for b in plain] == [f"{b['method']}-{b['scale']}" for b in plain]
    assert {config.train_config(b, Path("x"), Path("y")).seed for b in plain} == \
        {t.seed for t in config.methods.values()}
    replicated = config.with_overrides(seeds="3,5").branches()
    assert len(replicated) == 2 * len(plain)
    names = [branch_name(b) for b in replicated]
    assert len(set(names)) == len(names) and all(n.endswith(("-s3", "-s5")) for n in names)
    for branch in replicated:
        assert config.train_config(branch, Path("x"), Path("y")).seed == branch["seed"]
