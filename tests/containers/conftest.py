"""The images, built the way `make images` builds them, on a locally made base.

Building them from nothing takes about 9 minutes on a 2-core machine, most of it downloads, layer
commits and Horovod's compile. The build starts in the background as soon as the session knows it
will run a container test, at a lower CPU priority, and the container tests run last: the build
overlaps the rest of the suite, which mostly keeps one core busy, instead of adding to it.
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import pytest

from tests.containers.engine import HOST_CA_BUNDLE, LOCAL_PYTHON_IMAGE, ROOT, engine_problem, make, podman

STAND_IN_AIRFLOW_IMAGE = "localhost/bertdistill/airflow-base:stand-in"
IMAGES = {"pipeline": "bertdistill/pipeline:0.1.0", "trainer": "bertdistill/trainer:0.1.0",
          "airflow": "bertdistill/airflow:0.1.0"}
NICE = 10  # below the tests running beside the build

_build: concurrent.futures.Future | None = None


def _is_container_test(item: pytest.Item) -> bool:
    return "tests/containers/" in str(item.fspath)


def pytest_collection_modifyitems(items):
    for item in items:
        if _is_container_test(item):
            item.add_marker(pytest.mark.containers)
            item.add_marker(pytest.mark.slow)
    items.sort(key=_is_container_test)  # stable: the container tests last, each file's order kept


def pytest_collection_finish(session):
    """Start building once the selection is final (after -m and -k), and only if a container test is in it."""
    global _build
    if any(_is_container_test(item) for item in session.items) and not session.config.option.collectonly:
        _build = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="images").submit(build_images)


def build_images() -> str | None:
    """pipeline, trainer and airflow images from `make images`, on bases made here (no registry is reachable):
    `make base-image` (Debian bookworm by mmdebstrap) and a stand-in for the official Airflow image.
    Returns why containers cannot run here, or None once the images are built."""
    problem = engine_problem()
    if problem:
        return problem
    make("base-image", timeout=900, nice=NICE)
    secret = [f"--secret=id=ca_bundle,src={HOST_CA_BUNDLE}"] if HOST_CA_BUNDLE.exists() else []
    airflow_pin = subprocess.run([sys.executable, str(ROOT / "containers" / "pins.py"), "--only", "apache-airflow"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    podman("build", "-q", *secret, "--build-arg", f"PYTHON_IMAGE={LOCAL_PYTHON_IMAGE}", "--build-arg",
           f"AIRFLOW_PIN={airflow_pin}", "-f", str(ROOT / "tests" / "containers" / "airflow-base.Dockerfile"),
           "-t", STAND_IN_AIRFLOW_IMAGE, str(ROOT), timeout=1200, nice=NICE)
    make("images", PYTHON_IMAGE=LOCAL_PYTHON_IMAGE, AIRFLOW_IMAGE=STAND_IN_AIRFLOW_IMAGE, nice=NICE,
         **({"CA_BUNDLE": str(HOST_CA_BUNDLE)} if HOST_CA_BUNDLE.exists() else {}))
    return None


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """The images, once the build started at collection has finished (or built now, for a test run alone
    in a way that skipped collection's start)."""
    problem = _build.result() if _build is not None else build_images()
    if problem:
        pytest.skip(problem)
    return IMAGES
