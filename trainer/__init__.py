"""kubetrain: PyTorch training and fine-tuning on Kubernetes (Kubeflow PyTorchJob)."""

__version__ = "0.1.0"
