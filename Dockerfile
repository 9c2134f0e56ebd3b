# Production image: the official Airflow 3.3.2 image (it already has the git CLI that commit_csv
# runs), this project's pinned runtime requirements, and the project's code, compiled to bytecode so
# that no task process spends its first seconds compiling imports.
# (The official compose file's _PIP_ADDITIONAL_REQUIREMENTS reinstalls on every start; build instead.)
FROM apache/airflow:3.3.2-python3.11
COPY --chown=airflow:0 requirements.txt /requirements.txt
RUN pip install --no-cache-dir --compile "apache-airflow==3.3.2" -r /requirements.txt
# The pipeline: DAG, plugin, the include/ package and tools/ (load_settings for airflow-init).
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 include/ /opt/airflow/include/
COPY --chown=airflow:0 tools/ /opt/airflow/tools/
COPY --chown=airflow:0 airflow_settings.yaml /opt/airflow/airflow_settings.yaml
ENV PYTHONPATH=/opt/airflow
RUN python -m compileall -q /opt/airflow/dags /opt/airflow/plugins /opt/airflow/include /opt/airflow/tools
