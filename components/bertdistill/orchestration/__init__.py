"""Airflow-side code: settings, the run plan, and the operators that launch steps.

Nothing here imports TensorFlow; the DAG imports only this package and Airflow.
"""
