"""Contrastive training of open_clip architectures on image-caption data (`embedsvc train`)."""

from embedsvc.training.train import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
