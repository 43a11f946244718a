"""distill as the MPI Operator v2 runs an MPIJob: containers of the trainer image, mpirun over ssh.

The job is mpijob_spec.py's own `mpijob_body`; engine.MPIJobRun wires it as the operator's
controller does (ssh Secret, hostfile, OMPI_MCA_* environment, worker DNS names, launcher after
every worker is Ready). Two workers train on two labelled shards in a folder mounted into both
(a ReadWriteMany volume); the result must equal `horovodrun -np 2` on this machine with the same
arguments: the same loss curve and the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from tests.containers.engine import MPIJobRun

HOROVODRUN = shutil.which("horovodrun", path=str(Path(sys.executable).parent))
ARGS = ["--student-layers", "1", "--steps", "4", "--batch-size", "8", "--grad-accum", "2", "--checkpoint-every", "2",
        "--warmup-steps", "1", "--threads", "1"]


def _distill_args(store: str) -> list[str]:
    return ["distill", "--teacher", f"{store}/teacher", "--labels", f"{store}/labels", "--output", f"{store}/student",
            *ARGS]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory, tiny_teacher, two_label_shards):
    """Teacher and labels in a folder that every worker mounts at /store, writable by the image's user."""
    store = tmp_path_factory.mktemp("rwx")
    shutil.copytree(tiny_teacher, store / "teacher")
    shutil.copytree(two_label_shards, store / "labels")
    for path in [store, *store.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o666)
    return store


def _job(workers: int) -> dict:
    from bertdistill.orchestration.mpijob_spec import mpijob_body
    from bertdistill.orchestration.settings import Settings

    labels = {"app.kubernetes.io/name": "bertdistill", "airflow.apache.org/task_id": "distill"}
    return mpijob_body(f"bertdistill-distill-{os.urandom(4).hex()}", Settings(mode="kubernetes"), workers,
                       _distill_args("/store"), {"TF_CPP_MIN_LOG_LEVEL": "2"}, {"cpu": "1", "memory": "4Gi"}, labels,
                       timedelta(hours=1))


@pytest.mark.skipif(HOROVODRUN is None, reason="horovod is not installed (make install builds it)")
def test_two_ranks_over_ssh_between_containers_match_horovodrun_here(images, shared_store, tmp_path):
    job = _job(2)
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    assert launcher["image"] == images["trainer"] and launcher["command"][:3] == ["mpirun", "-np", "2"]
    work = tmp_path / "job"
    work.mkdir()
    secrets = {"bertdistill-s3": {"AWS_ACCESS_KEY_ID": "unused", "AWS_SECRET_ACCESS_KEY": "unused"}}
    run = MPIJobRun(job, secrets=secrets, work=work, shared={str(shared_store): "/store"})
    proc = run.run()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len(set(run.host_keys)) == 2  # a host key per pod, not one baked into the image
    assert "distill: 4 steps" in proc.stdout + proc.stderr

    reference = tmp_path / "reference"
    args = _distill_args(str(shared_store))
    args[args.index("--output") + 1] = str(reference)
    ran = subprocess.run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
                          "bertdistill.cli", *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]

    in_pods = json.loads((shared_store / "student" / "_MANIFEST.json").read_text())["summary"]
    here = json.loads((reference / "_MANIFEST.json").read_text())["summary"]
    assert in_pods["ranks"] == 2 and len(set(in_pods["weights_sha256_per_rank"])) == 1, "ranks diverged"
    def names(per_rank):
        return [[Path(uri).name for uri in shards] for shards in per_rank]

    assert names(in_pods["shards_per_rank"]) == names(here["shards_per_rank"])  # the same disjoint split
    np.testing.assert_allclose(in_pods["losses"], here["losses"], rtol=1e-5)
    from safetensors.numpy import load_file

    pods_weights = load_file(sorted((shared_store / "student" / "checkpoints").glob("ckpt-*.safetensors"))[-1])
    here_weights = load_file(sorted((reference / "checkpoints").glob("ckpt-*.safetensors"))[-1])
    assert pods_weights.keys() == here_weights.keys()
    for name, value in here_weights.items():
        np.testing.assert_allclose(pods_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
