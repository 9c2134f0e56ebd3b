# Production image: the official Airflow 3.3.2 image plus this project's pinned requirements.
# (The official compose file's _PIP_ADDITIONAL_REQUIREMENTS reinstalls on every start; build instead.)
FROM apache/airflow:3.3.2-python3.11
COPY requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /requirements.txt
