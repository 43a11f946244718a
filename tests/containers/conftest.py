"""The images, built once per session the way `make images` builds them, on a locally made base."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.containers.engine import HOST_CA_BUNDLE, LOCAL_PYTHON_IMAGE, ROOT, engine_problem, make, podman

STAND_IN_AIRFLOW_IMAGE = "localhost/bertdistill/airflow-base:stand-in"
IMAGES = {"pipeline": "bertdistill/pipeline:0.1.0", "trainer": "bertdistill/trainer:0.1.0",
          "airflow": "bertdistill/airflow:0.1.0"}


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/containers/" in str(item.fspath):
            item.add_marker(pytest.mark.containers)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """pipeline, trainer and airflow images from `make images`, on bases made here (no registry is reachable):
    `make base-image` (Debian bookworm by mmdebstrap) and a stand-in for the official Airflow image."""
    problem = engine_problem()
    if problem:
        pytest.skip(problem)
    make("base-image", timeout=900)
    secret = [f"--secret=id=ca_bundle,src={HOST_CA_BUNDLE}"] if HOST_CA_BUNDLE.exists() else []
    airflow_pin = subprocess.run([sys.executable, str(ROOT / "containers" / "pins.py"), "--only", "apache-airflow"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    podman("build", "-q", *secret, "--build-arg", f"PYTHON_IMAGE={LOCAL_PYTHON_IMAGE}", "--build-arg",
           f"AIRFLOW_PIN={airflow_pin}", "-f", str(ROOT / "tests" / "containers" / "airflow-base.Dockerfile"),
           "-t", STAND_IN_AIRFLOW_IMAGE, str(ROOT), timeout=1200)
    make("images", PYTHON_IMAGE=LOCAL_PYTHON_IMAGE, AIRFLOW_IMAGE=STAND_IN_AIRFLOW_IMAGE,
         **({"CA_BUNDLE": str(HOST_CA_BUNDLE)} if HOST_CA_BUNDLE.exists() else {}))
    return IMAGES
