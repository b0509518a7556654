"""The scheduled-retraining deployment, compiled for real by Metaflow against a loopback
S3-compatible server (moto's, from the dev extra) as the Metaflow datastore: Argo Workflows
(WorkflowTemplate + CronWorkflow) and AWS Step Functions on Batch (moto also answers the
Batch/IAM/EC2 calls Metaflow makes while compiling)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

moto_server = pytest.importorskip("moto.server", reason="install the dev extra: moto[server]")
pytest.importorskip("kubernetes", reason="install the dev extra: kubernetes (Argo compile)")
boto3 = pytest.importorskip("boto3")

from loramoe.pipeline.deploy import (  # noqa: E402
    DeployCompileError,
    argo_cron_workflow,
    compile_argo,
    compile_step_functions,
)
from loramoe.pipeline.launch import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "flows" / "configs" / "paper.toml"
BUCKET = "loramoe-ci"
ACCOUNT_ARN = "arn:aws:iam::123456789012"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """A moto server on loopback with a bucket for the datastore and a GPU Batch queue; the
    environment that points Metaflow (and boto3) at it and nowhere else."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "METAFLOW_S3_ENDPOINT_URL": url,
           "METAFLOW_HOME": str(tmp_path_factory.mktemp("metaflow-home")),
           "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_USER": "ci",
           "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
           "METAFLOW_KUBERNETES_NAMESPACE": "loramoe",
           "METAFLOW_KUBERNETES_CONTAINER_IMAGE": "registry.example/loramoe-worker:1",
           "METAFLOW_BATCH_CONTAINER_IMAGE": "registry.example/loramoe-worker:1",
           "METAFLOW_SFN_IAM_ROLE": f"{ACCOUNT_ARN}:role/sfn",
           "METAFLOW_ECS_S3_ACCESS_IAM_ROLE": f"{ACCOUNT_ARN}:role/batch",
           "METAFLOW_EVENTS_SFN_ACCESS_IAM_ROLE": f"{ACCOUNT_ARN}:role/events",
           "METAFLOW_SFN_DYNAMO_DB_TABLE": "metaflow-sfn"}
    session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test",
                                    region_name="us-east-1")
    session.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
    env["METAFLOW_BATCH_JOB_QUEUE"] = gpu_job_queue(session, url)
    yield env
    server.stop()


def gpu_job_queue(session, url: str) -> str:
    """A managed EC2 GPU compute environment and its queue: Metaflow reads the queue's
    platform while it registers the Batch job definitions."""
    iam, ec2, batch = (session.client(name, endpoint_url=url) for name in ("iam", "ec2", "batch"))
    role = iam.create_role(RoleName="batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    profile = iam.create_instance_profile(InstanceProfileName="ecs")["InstanceProfile"]["Arn"]
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="batch", Description="batch", VpcId=vpc)
    environment = batch.create_compute_environment(
        computeEnvironmentName="gpu", type="MANAGED", state="ENABLED", serviceRole=role,
        computeResources={"type": "EC2", "minvCpus": 0, "maxvCpus": 96, "desiredvCpus": 0,
                          "instanceTypes": ["p4d.24xlarge"], "subnets": [subnet],
                          "securityGroupIds": [group["GroupId"]], "instanceRole": profile})
    queue = batch.create_job_queue(
        jobQueueName="gpu", state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1,
                                  "computeEnvironment": environment["computeEnvironmentArn"]}])
    return queue["jobQueueArn"]


def templates_by_step(workflow_template: dict) -> dict[str, dict]:
    return {t["name"]: t for t in workflow_template["spec"]["templates"]}


def test_argo_workflow_template_and_cron_workflow_compile(cloud, tmp_path):
    import json

    files = compile_argo(PAPER, tmp_path, cloud)
    template = json.loads(files["workflow_template"].read_text())
    cron = json.loads(files["cron_workflow"].read_text())
    assert template["kind"] == "WorkflowTemplate" and cron["kind"] == "CronWorkflow"
    assert cron["spec"]["workflowSpec"]["workflowTemplateRef"]["name"] == \
        template["metadata"]["name"]
    assert cron["spec"]["schedule"] == "0 0 ? * SUN"  # @schedule(weekly=True): Sundays 00:00
    assert template["metadata"]["namespace"] == "loramoe"
    gpus = tomllib.loads(PAPER.read_text())["resources"]["gpu"]
    steps = templates_by_step(template)
    # the base is evaluated on the branches' evaluations' kind of worker (it ran in validate,
    # on a CPU worker: a 7B model in another dtype, rounding otherwise); register may evaluate
    # the champion again; an evaluation holds one GPU, training all of the branch's
    for name, wanted in (("evaluate-base", 1), ("train", gpus), ("evaluate", 1),
                         ("register", 1)):
        container = steps[name]["container"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(wanted), name
        assert container["image"] == "registry.example/loramoe-worker:1"
    for name in ("validate", "compare"):  # no GPU held for data checks and tables
        assert "nvidia.com/gpu" not in json.dumps(steps[name]["container"]["resources"])


def test_step_functions_state_machine_compiles_with_gpu_batch_jobs(cloud, tmp_path):
    import json

    files = compile_step_functions(PAPER, tmp_path, cloud)
    machine = json.loads(files["state_machine"].read_text())
    rule = json.loads(files["eventbridge_rule"].read_text())
    assert rule["ScheduleExpression"] == "cron(0 0 ? * SUN *)"
    assert machine["StartAt"] == "start"
    gpus = tomllib.loads(PAPER.read_text())["resources"]["gpu"]
    text = json.dumps(machine)
    # evaluate_base, train and evaluate (the foreach's map), register
    assert text.count('"Type": "GPU"') >= 4
    assert f'{{"Type": "GPU", "Value": "{gpus}"}}' in text  # train
    assert '{"Type": "GPU", "Value": "1"}' in text  # the evaluations


def test_compile_error_keeps_metaflows_message(cloud, tmp_path):
    broken = {**cloud, "METAFLOW_DATASTORE_SYSROOT_S3": "s3://no-such-bucket/metaflow"}
    with pytest.raises(DeployCompileError, match="argo-workflows create --only-json failed"):
        compile_argo(PAPER, tmp_path, broken)


def test_unscheduled_template_has_no_cron_workflow():
    template = {"metadata": {"name": "x", "annotations": {}}}
    assert argo_cron_workflow(template) is None


def test_a_broken_config_is_named_before_metaflow_compiles(tmp_path, capsys):
    # Before: Metaflow compiled (or failed on the datastore) and the deployed schedule would
    # have failed in start on every run; the config's own problems were never named.
    from loramoe.pipeline.deploy import main

    text = PAPER.read_text().replace("retry_times = ", "retry_timez = ")
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace("eval_batch_size = 32", "eval_batch_size = 0"))
    with pytest.raises(SystemExit) as stopped:
        main(["argo", "--config", str(broken), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "2 problems:" in err, err
    assert "did you mean 'retry_times' for 'retry_timez'?" in err
    assert "config.eval_batch_size: must be >= 1, got 0" in err
    assert not (tmp_path / "out").exists()


def test_a_model_folder_only_the_workers_have_is_a_warning(tmp_path, capsys):
    from loramoe.pipeline.deploy import check_config

    config = tmp_path / "worker_path.toml"
    config.write_text(PAPER.read_text().replace('model = "meta-llama/Llama-2-7b-hf"',
                                                'model = "/models/on-the-worker/llama"', 1))
    check_config(config)  # no error: the start step checks it where it runs
    assert "config.methods.sft.model" in capsys.readouterr().err


def test_the_cli_names_what_keeps_it_from_compiling(tmp_path, capsys, monkeypatch):
    # Before: an --out under a file was found only after Metaflow had compiled (a traceback),
    # and a compile failure, e.g. no cloud datastore configured, was a DeployCompileError
    # traceback around Metaflow's message.
    from loramoe.pipeline.deploy import main

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    with pytest.raises(SystemExit) as stopped:
        main(["argo", "--config", str(PAPER), "--out", str(a_file / "out")])
    assert stopped.value.code == 2
    assert f"--out: {a_file / 'out'} cannot be made: {a_file} is a file" in \
        capsys.readouterr().err
    for name in ("METAFLOW_DEFAULT_DATASTORE", "METAFLOW_DATASTORE_SYSROOT_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METAFLOW_HOME", str(tmp_path / "no-profile"))  # local datastore
    assert main(["argo", "--config", str(PAPER), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: argo-workflows create --only-json failed") and \
        "--datastore=s3" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
