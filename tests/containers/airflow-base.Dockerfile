# A stand-in for the official apache/airflow:<version>-python3.11 image where no registry is reachable
# (these tests): the parts of its layout that containers/airflow/Dockerfile and the Airflow chart rely
# on: user airflow (50000, group 0), AIRFLOW_HOME=/opt/airflow, Airflow installed in the user's own
# environment with pip on PATH, /entrypoint. Not a substitute for the official image in a deployment.
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE}
ARG AIRFLOW_PIN
RUN useradd --uid 50000 --gid 0 --create-home --home-dir /home/airflow --shell /bin/bash airflow \
    && install -d -o 50000 -g 0 -m 0775 /opt/airflow \
    && printf '#!/bin/bash\nexec "$@"\n' > /entrypoint && chmod 0755 /entrypoint
USER 50000:0
ENV AIRFLOW_HOME=/opt/airflow PATH=/home/airflow/.local/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca_bundle,target=/etc/ssl/certs/ca-certificates.crt,mode=0444 \
    python -m venv /home/airflow/.local \
    && PIP_CERT=/etc/ssl/certs/ca-certificates.crt pip install --no-cache-dir "$AIRFLOW_PIN"
WORKDIR /opt/airflow
ENTRYPOINT ["/entrypoint"]
CMD ["airflow", "version"]
