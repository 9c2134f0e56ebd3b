# Production image: the official Airflow 3.3.2 image plus this project's pinned requirements.
# (The official compose file's _PIP_ADDITIONAL_REQUIREMENTS reinstalls on every start; build instead.)
FROM apache/airflow:3.3.2-python3.11
# commit_csv runs the git CLI in the worker.
USER root
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
USER airflow
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /requirements.txt
