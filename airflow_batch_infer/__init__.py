"""Offline batch inference on NVIDIA Triton Inference Server, as an Apache Airflow provider."""

__version__ = "0.1.0"
