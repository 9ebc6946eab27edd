"""MLFLOW_TRACKING_URI from the environment is honoured when logging.mlflow.tracking_uri is empty
(the end-to-end check is in test_tensorboard.py, whose run logs to such a store)."""
from __future__ import annotations

import os

from dist_train.config import load_config
from dist_train.logging.mlflow import artifact_location, tracking_uri


def mlflow_cfg(*overrides: str):
    return load_config(None, list(overrides)).logging.mlflow


def test_empty_key_and_no_variable_is_the_embedded_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = mlflow_cfg()
    assert tracking_uri(cfg, str(tmp_path)) == "sqlite:///" + os.path.abspath(tmp_path / "mlflow.db")
    assert artifact_location(cfg, str(tmp_path)) == os.path.abspath(tmp_path / "mlartifacts")


def test_the_variable_is_used_when_the_key_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    cfg = mlflow_cfg()
    assert tracking_uri(cfg, str(tmp_path)) == "http://tracking.example:5000"
    assert artifact_location(cfg, str(tmp_path)) is None  # the server decides


def test_the_key_wins_over_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    cfg = mlflow_cfg("logging.mlflow.tracking_uri=http://other:5000")
    assert tracking_uri(cfg, str(tmp_path)) == "http://other:5000"


def test_a_blank_variable_counts_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "  ")
    assert tracking_uri(mlflow_cfg(), str(tmp_path)).startswith("sqlite:///")
