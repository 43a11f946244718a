"""Where and how the pipeline runs, from the environment: no code edit moves it to a cluster.

Every setting is a BERTDISTILL_* environment variable (the Helm chart's ConfigMap sets them on
the Airflow pods). They are read from the environment alone: the mode decides which operators
the DAG has, so they are needed at every parse, where an Airflow Variable would cost a
metadata-database (or API) call each time. The defaults are the embedded mode: steps as local
processes, ./data as the store, a sqlite MLflow store in it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MODES = ("local", "kubernetes")
# A step's output ends up in a task log, not a terminal: a progress bar there is one line per redraw
# (MLflow's artifact transfers, Hugging Face downloads, anything else drawn with tqdm).
NO_PROGRESS_BARS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                    "TQDM_DISABLE": "1"}


def _get(name: str, default: str) -> str:
    """BERTDISTILL_<NAME>, else the default."""
    return os.environ.get(f"BERTDISTILL_{name.upper()}") or default


@dataclass(frozen=True)
class Settings:
    mode: str = "local"
    store: str = "data"                 # store root: a folder or s3://bucket/prefix
    mirror: str = "https://dumps.wikimedia.org"
    teacher: str = "data/sample/minilm"  # default teacher source when the form leaves it empty
    mlflow_uri: str = ""                # default: sqlite beside a local store
    mlflow_artifacts: str = ""          # default: beside the sqlite file / the server's choice
    s3_endpoint_url: str = ""
    airflow_url: str = ""               # the Airflow UI's base URL, for links from MLflow runs
    monthly_params: str = ""            # JSON object: the monthly DAG's sizes over the form's defaults
    shard_target_mb: str = "2048"      # most example bytes per shard: what a pod's scratch must hold
    # kubernetes mode
    namespace: str = "bertdistill"
    service_account: str = "bertdistill-steps"
    pipeline_image: str = "bertdistill/pipeline:0.1.0"
    pipeline_gpu_image: str = "bertdistill/pipeline:0.1.0-gpu"  # adapt-teacher, label-teacher
    trainer_image: str = "bertdistill/trainer:0.1.0"  # distill's MPIJob, when its workers request no GPU
    trainer_gpu_image: str = "bertdistill/trainer:0.1.0-gpu"
    s3_secret: str = "bertdistill-s3"
    mlflow_secret: str = ""             # Secret with MLFLOW_TRACKING_USERNAME/_PASSWORD: the pipeline's MLflow user
    gpu_resource: str = "nvidia.com/gpu"
    gpu_pool: str = ""                  # Airflow pool for the GPU steps (create it first); empty: none

    @classmethod
    def load(cls) -> Settings:
        values = {name: _get(name, getattr(cls, name)) for name in cls.__dataclass_fields__}
        settings = cls(**values)
        if settings.mode not in MODES:
            raise ValueError(f"BERTDISTILL_MODE={settings.mode!r}: use one of {', '.join(MODES)}")
        return settings

    def monthly_overrides(self) -> dict:
        """BERTDISTILL_MONTHLY_PARAMS as a dict, checked against the form's fields."""
        from bertdistill.orchestration.plan import DEFAULTS

        if not self.monthly_params.strip():
            return {}
        try:
            values = json.loads(self.monthly_params)
        except json.JSONDecodeError as exc:
            raise ValueError(f"BERTDISTILL_MONTHLY_PARAMS is not JSON ({exc}): give an object such as "
                             '{"train_shards": 64, "train_steps": 100000}') from None
        if not isinstance(values, dict) or set(values) - set(DEFAULTS):
            unknown = sorted(set(values) - set(DEFAULTS)) if isinstance(values, dict) else values
            raise ValueError(f"BERTDISTILL_MONTHLY_PARAMS: {unknown!r} are not form fields; use among "
                             f"{', '.join(DEFAULTS)}")
        return values

    def secrets(self) -> list[str]:
        """The Secrets a step pod loads whole (envFrom): the S3 keys and, with MLflow auth, the pipeline's user."""
        return [self.s3_secret, *([self.mlflow_secret] if self.mlflow_secret else [])]

    @property
    def local_store(self) -> bool:
        return "://" not in self.store or self.store.startswith("file://")

    def store_root(self) -> str:
        return self.store.rstrip("/") if not self.local_store else str(Path(self.store.removeprefix("file://"))
                                                                       .resolve())

    def tracking_uri(self) -> str:
        if self.mlflow_uri:
            return self.mlflow_uri
        base = Path(self.store_root()) if self.local_store else Path("data").resolve()
        return f"sqlite:///{base / 'mlflow' / 'mlflow.db'}"

    def step_env(self) -> dict[str, str]:
        """What every step process or pod needs besides its arguments (no secrets: those come from a Secret)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri(), "MLFLOW_EXPERIMENT_NAME": "bertdistill", **NO_PROGRESS_BARS}
        if self.mlflow_artifacts:
            env["BERTDISTILL_MLFLOW_ARTIFACTS"] = self.mlflow_artifacts
        if self.s3_endpoint_url:
            env["BERTDISTILL_S3_ENDPOINT_URL"] = self.s3_endpoint_url
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        return env
