"""ResNet18 for CIFAR-10: model, training, evaluation, embeddings, MLflow registry, ONNX export.

Library code: nothing here imports Dagster, and torch is imported only by the modules that use it.
"""
