"""The rendered MPIJob: launcher command, environment, config file, pods."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from chart_tools import (
    CHART,
    HelmError,
    env_of,
    forwarded_env,
    launcher_command_and_config,
    one,
    render,
    replica_container,
    replica_pod,
)

from job import sources

DATA, OUTPUT = "s3://datasets/flowers", "s3://runs/flowers"


def values(**top):
    training = {"data": DATA, "output": OUTPUT, **top.pop("training", {})}
    return {"training": training, **top}


@pytest.mark.parametrize(
    "replicas,slots,np_",
    [(1, 1, 1), (2, 1, 2), (4, 4, 16), (3, 2, 6)],
    ids=["1x1", "2x1", "4x4", "3x2"],
)
def test_launcher_runs_mpirun_over_every_slot(helm, replicas, slots, np_):
    docs = render(helm, values(workers={"replicas": replicas}, slotsPerWorker=slots))
    command, _ = launcher_command_and_config(docs)
    assert command[:8] == ["mpirun", "-np", str(np_), "-bind-to", "none", "-map-by", "slot", "-x"]
    assert forwarded_env(command)[:3] == ["LD_LIBRARY_PATH", "PATH", "OMP_NUM_THREADS"]
    mca = command.index("-mca")
    assert command[mca : mca + 6] == ["-mca", "pml", "ob1", "-mca", "btl", "^openib"]
    assert command[-4:] == ["finetune-job", "train", "--config", "/etc/finetune-job/config.yaml"]
    mpijob = one(docs, "MPIJob")
    assert mpijob["spec"]["slotsPerWorker"] == slots
    assert mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == replicas
    assert mpijob["spec"]["mpiReplicaSpecs"]["Launcher"]["replicas"] == 1


def test_extra_mpirun_args_go_before_the_training_command(helm):
    extra = ["-mca", "btl_tcp_if_include", "eth0", "--report-bindings"]
    command, _ = launcher_command_and_config(render(helm, values(mpirun={"extraArgs": extra})))
    assert command[-8:] == [
        *extra,
        "finetune-job",
        "train",
        "--config",
        "/etc/finetune-job/config.yaml",
    ]
    assert command.index("^openib") < command.index("btl_tcp_if_include")


def test_s3_settings_become_env_forwarded_to_every_process(helm):
    docs = render(
        helm,
        values(
            s3={"endpoint": "http://minio:9000", "region": "eu-west-1", "existingSecret": "s3-keys"}
        ),
    )
    command, _ = launcher_command_and_config(docs)
    mpijob = one(docs, "MPIJob")
    for role in ("Launcher", "Worker"):
        env = env_of(replica_container(mpijob, role))
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
        assert env["AWS_REGION"] == "eu-west-1"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"secretKeyRef": {"name": "s3-keys", "key": key}}
    assert set(forwarded_env(command)) >= {
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    }


def test_unset_s3_settings_are_neither_env_nor_forwarded(helm):
    docs = render(helm, values())
    command, _ = launcher_command_and_config(docs)
    env = env_of(replica_container(one(docs, "MPIJob"), "Launcher"))
    assert not [name for name in env if name.startswith("AWS_")]
    assert not [name for name in forwarded_env(command) if name.startswith("AWS_")]
    assert "AWS" not in yaml.safe_dump(docs)


def test_web_identity_forwards_the_token_variables_and_annotates_the_account(helm):
    role = "arn:aws:iam::123456789012:role/s3"
    docs = render(
        helm,
        values(
            s3={"webIdentity": True},
            serviceAccount={"annotations": {"eks.amazonaws.com/role-arn": role}},
        ),
    )
    command, _ = launcher_command_and_config(docs)
    assert {"AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"} <= set(forwarded_env(command))
    account = one(docs, "ServiceAccount")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    for role_name in ("Launcher", "Worker"):
        pod = replica_pod(one(docs, "MPIJob"), role_name)
        assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_extra_env_reaches_the_pods_and_every_process(helm):
    env = [
        {"name": "NCCL_DEBUG", "value": "INFO"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    docs = render(helm, values(env=env))
    command, _ = launcher_command_and_config(docs)
    assert forwarded_env(command)[-2:] == ["NCCL_DEBUG", "POD_IP"]
    worker_env = env_of(replica_container(one(docs, "MPIJob"), "Worker"))
    assert worker_env["NCCL_DEBUG"] == "INFO"
    assert worker_env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}


@pytest.mark.parametrize(
    "resources,slots,threads,expected",
    [
        ({}, 1, 0, "1"),
        ({"limits": {"cpu": "8"}}, 2, 0, "4"),
        ({"requests": {"cpu": 6}}, 4, 0, "1"),
        ({"limits": {"cpu": "500m"}}, 1, 0, "1"),
        ({"limits": {"cpu": "8"}}, 2, 3, "3"),
    ],
    ids=["no-cpu", "8-cores-2-slots", "6-cores-4-slots", "millicores", "explicit"],
)
def test_omp_num_threads_per_process(helm, resources, slots, threads, expected):
    docs = render(
        helm,
        values(slotsPerWorker=slots, workers={"resources": resources, "ompNumThreads": threads}),
    )
    for role in ("Launcher", "Worker"):
        assert env_of(replica_container(one(docs, "MPIJob"), role))["OMP_NUM_THREADS"] == expected


def test_config_file_holds_the_training_values_and_loads_as_a_job_config(helm, tmp_path):
    training = {
        "model": "resnet50_v1",
        "epochs": 3,
        "lr": 0.02,
        "lr_steps": [2, 3],
        "fp16_allreduce": True,
        "warmup_epochs": 0.5,
        "pretrained": "none",
        "pushgateway": "http://pgw:9091",
    }
    _, text = launcher_command_and_config(render(helm, values(training=training)))
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    config = sources.load({"config": str(path)}, environ={})
    assert (config.data, config.output) == (DATA, OUTPUT)
    for key, value in training.items():
        got = getattr(config, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key


def test_config_is_mounted_in_launcher_and_workers(helm):
    docs = render(helm, values())
    mpijob = one(docs, "MPIJob")
    config_map = [d for d in docs if d["kind"] == "ConfigMap"][0]["metadata"]["name"]
    for role in ("Launcher", "Worker"):
        pod = replica_pod(mpijob, role)["spec"]
        (mount,) = [
            m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/finetune-job"
        ]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == config_map


def _checksums(docs):
    mpijob = one(docs, "MPIJob")
    return {
        replica_pod(mpijob, r)["metadata"]["annotations"]["checksum/config"]
        for r in ("Launcher", "Worker")
    }


def test_checksum_annotation_follows_the_config_file(helm):
    docs = render(helm, values())
    _, text = launcher_command_and_config(docs)
    assert _checksums(docs) == {hashlib.sha256(text.rstrip("\n").encode()).hexdigest()}
    assert _checksums(render(helm, values())) == _checksums(docs)
    assert _checksums(render(helm, values(training={"lr": 0.05}))) != _checksums(docs)


def test_defaults_wait_for_workers_and_run_as_the_non_root_user(helm):
    mpijob = one(render(helm, values()), "MPIJob")
    spec = mpijob["spec"]
    assert spec["launcherCreationPolicy"] == "WaitForWorkersReady"
    assert spec["sshAuthMountPath"] == "/home/mpiuser/.ssh"
    for role in ("Launcher", "Worker"):
        pod = replica_pod(mpijob, role)["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        container = pod["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    worker = replica_container(mpijob, "Worker")
    assert worker["command"][-2:] == ["/usr/local/bin/finetune-job-entrypoint", "worker"]
    assert worker["readinessProbe"]["tcpSocket"]["port"] == 2222


def test_run_policy_from_values(helm):
    run_policy = {
        "cleanPodPolicy": "All",
        "ttlSecondsAfterFinished": 3600,
        "backoffLimit": 0,
        "activeDeadlineSeconds": 7200,
    }
    spec = one(render(helm, values(runPolicy=run_policy)), "MPIJob")["spec"]
    assert spec["runPolicy"] == run_policy
    default = one(render(helm, values()), "MPIJob")["spec"]["runPolicy"]
    assert default == {
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 604800,
        "backoffLimit": 3,
    }


def test_image_tag_defaults_to_the_app_version(helm):
    mpijob = one(render(helm, values(image={"repository": "reg.example/ft"})), "MPIJob")
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert replica_container(mpijob, "Worker")["image"] == f"reg.example/ft:{app_version}"
    mpijob = one(render(helm, values(image={"tag": "1.2.3"})), "MPIJob")
    assert replica_container(mpijob, "Launcher")["image"] == "finetune-job:1.2.3"


def test_gpu_workers_get_the_gpus_and_scheduling_values(helm):
    workers = {
        "resources": {"limits": {"nvidia.com/gpu": 4}},
        "nodeSelector": {"gpu": "h100"},
        "priorityClassName": "train",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
    }
    mpijob = one(render(helm, values(slotsPerWorker=4, workers=workers)), "MPIJob")
    pod = replica_pod(mpijob, "Worker")["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["priorityClassName"] == "train"
    assert pod["tolerations"] == workers["tolerations"]
    launcher = replica_pod(mpijob, "Launcher")["spec"]
    assert "nvidia.com/gpu" not in str(launcher["containers"][0].get("resources"))
    assert "nodeSelector" not in launcher


def test_gpus_must_equal_slots(helm):
    with pytest.raises(HelmError, match=r"slotsPerWorker \(2\) must equal .*nvidia.com/gpu \(4\)"):
        render(
            helm, values(slotsPerWorker=2, workers={"resources": {"limits": {"nvidia.com/gpu": 4}}})
        )


def test_cuda_cache_volume_and_env(helm):
    cache = {"enabled": True, "volume": {"persistentVolumeClaim": {"claimName": "cuda"}}}
    docs = render(helm, values(cudaCache=cache))
    command, _ = launcher_command_and_config(docs)
    assert {"CUDA_CACHE_PATH", "CUDA_CACHE_MAXSIZE"} <= set(forwarded_env(command))
    mpijob = one(docs, "MPIJob")
    worker = replica_pod(mpijob, "Worker")["spec"]
    env = env_of(worker["containers"][0])
    assert env["CUDA_CACHE_MAXSIZE"] == "4294967296"
    (mount,) = [
        m
        for m in worker["containers"][0]["volumeMounts"]
        if m["mountPath"] == env["CUDA_CACHE_PATH"]
    ]
    (volume,) = [v for v in worker["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "cuda"}


def test_cuda_cache_without_a_volume_fails(helm):
    with pytest.raises(HelmError, match="cudaCache.enabled needs cudaCache.volume"):
        render(helm, values(cudaCache={"enabled": True}))


def test_workers_get_a_memory_backed_dev_shm(helm):
    worker = replica_pod(one(render(helm, values()), "MPIJob"), "Worker")["spec"]
    (mount,) = [m for m in worker["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in worker["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}


def test_extra_volumes_are_mounted(helm):
    docs = render(
        helm,
        values(
            extraVolumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "ds"}}],
            extraVolumeMounts=[{"name": "data", "mountPath": "/data", "readOnly": True}],
        ),
    )
    for role in ("Launcher", "Worker"):
        pod = replica_pod(one(docs, "MPIJob"), role)["spec"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "ds"}} in pod["volumes"]
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in pod["containers"][0][
            "volumeMounts"
        ]


def test_run_on_install_false_renders_no_mpijob(helm):
    docs = render(helm, values(runOnInstall=False))
    assert not [d for d in docs if d["kind"] == "MPIJob"]


def test_launcher_helper_returns_command_and_config(helm):
    command, text = launcher_command_and_config(render(helm, values(training={"epochs": 2})))
    assert command[0] == "mpirun"
    assert yaml.safe_load(text)["epochs"] == 2


@pytest.mark.parametrize("grace", [None, 300], ids=["default", "set"])
def test_pods_get_the_grace_period_that_covers_a_sigterm_checkpoint(helm, grace):
    extra = {} if grace is None else {"terminationGracePeriodSeconds": grace}
    mpijob = one(render(helm, values(**extra)), "MPIJob")
    for role in ("Launcher", "Worker"):
        assert replica_pod(mpijob, role)["spec"]["terminationGracePeriodSeconds"] == (grace or 120)
    # mpirun SIGKILLs the ranks this long after forwarding SIGTERM: inside the grace period,
    # with time left for the checkpoint.
    command, _ = launcher_command_and_config(render(helm, values(**extra)))
    at = command.index("odls_base_sigkill_timeout")
    assert command[at - 1] == "-mca"
    assert 0 < int(command[at + 1]) <= (grace or 120) - 10


def test_grace_period_below_one_second_is_rejected(helm):
    with pytest.raises(HelmError, match="terminationGracePeriodSeconds"):
        render(helm, values(terminationGracePeriodSeconds=0))


@pytest.mark.parametrize("seconds", [600, 0, 45])
def test_launcher_waits_for_the_workers_sshd_through_the_entrypoint(helm, seconds):
    vals = values() if seconds == 600 else values(launcher={"waitForHostsSeconds": seconds})
    docs = render(helm, vals)
    mpijob = one(docs, "MPIJob")
    launcher = replica_container(mpijob, "Launcher")
    assert launcher["command"] == [
        "/usr/bin/tini",
        "--",
        "/usr/local/bin/finetune-job-entrypoint",
        "launcher",
    ]
    assert launcher["args"][0] == "mpirun"
    assert env_of(launcher)["LAUNCHER_WAIT_SECONDS"] == str(seconds)
    # the launcher's own setting: neither a worker's env nor forwarded to the ranks
    assert "LAUNCHER_WAIT_SECONDS" not in env_of(replica_container(mpijob, "Worker"))
    assert "LAUNCHER_WAIT_SECONDS" not in forwarded_env(launcher["args"])


def test_negative_launcher_wait_is_refused(helm):
    with pytest.raises(HelmError, match=r"waitForHostsSeconds"):
        render(helm, values(launcher={"waitForHostsSeconds": -1}))
